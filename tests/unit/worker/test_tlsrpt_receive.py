"""Incoming TLS-RPT reports (tlsrpt_receive.py): the reports our own worker sends and the
RFC 8460 Appendix B example parse; anything else is a ReportError (never another exception),
including fuzzed bytes, fuzzed JSON and gzip bombs; label values stay bounded."""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailkube_worker.tlspolicy.tlsrpt import build_report, report_message
from mailkube_worker.tlspolicy.tlsrpt_receive import (
    MAX_ORGANIZATIONS,
    PolicyResult,
    ReportCounter,
    ReportError,
    SessionCount,
    gunzip,
    parse_json,
    parse_message,
    session_counts,
)
from mailkube_worker.tlspolicy.tlsrpt_store import Outcome

STS = ("sts", ("version: STSv1", "mode: enforce"), ("mx.example.test",))
OUTCOMES = {
    Outcome(*STS, "success", "mx.example.test", "192.0.2.1"): 40,
    Outcome(*STS, "certificate-host-mismatch", "mx.example.test", "192.0.2.1"): 3,
    Outcome(*STS, "starttls-not-supported", "mx.example.test", "192.0.2.2"): 2,
}

#: RFC 8460 Appendix B, as printed (less its comments)
APPENDIX_B = {
    "organization-name": "Company-X",
    "date-range": {"start-datetime": "2016-04-01T00:00:00Z",
                   "end-datetime": "2016-04-01T23:59:59Z"},
    "contact-info": "sts-reporting@company-x.example",
    "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
    "policies": [{
        "policy": {"policy-type": "sts",
                   "policy-string": ["version: STSv1", "mode: testing",
                                     "mx: *.mail.company-y.example", "max_age: 86400"],
                   "policy-domain": "company-y.example",
                   "mx-host": ["*.mail.company-y.example"]},
        "summary": {"total-successful-session-count": 5326,
                    "total-failure-session-count": 303},
        "failure-details": [
            {"result-type": "certificate-expired", "sending-mta-ip": "2001:db8:abcd:0012::1",
             "receiving-mx-hostname": "mx1.mail.company-y.example", "failed-session-count": 100},
            {"result-type": "starttls-not-supported", "sending-mta-ip": "2001:db8:abcd:0013::1",
             "receiving-mx-hostname": "mx2.mail.company-y.example",
             "receiving-ip": "203.0.113.56", "failed-session-count": 200,
             "additional-information": "https://reports.company-x.example/"
                                       "report_info?id=5065427c-23d3#StarttlsNotSupported"},
            {"result-type": "validation-failure", "sending-mta-ip": "198.51.100.62",
             "receiving-ip": "203.0.113.58",
             "receiving-mx-hostname": "mx-backup.mail.company-y.example",
             "failed-session-count": 3,
             "failure-reason-code": "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED"},
        ],
    }],
}  # fmt: skip


def ours(domain: str) -> bool:
    return domain in ("company-y.example", "example.test")


def test_the_reports_our_worker_sends_parse_back() -> None:
    report = build_report("example.test", "2026-12-06", OUTCOMES, organization="Mailkube",
                          contact="tls@mail.test", report_id="r-1")  # fmt: skip
    raw = report_message(report, domain="example.test", submitter="mail.test",
                         sender="tls-reports@mail.test", recipients=["tls@example.test"],
                         unique="u1", now=datetime(2026, 12, 7, tzinfo=UTC))  # fmt: skip
    (parsed,) = parse_message(raw)
    assert (parsed.organization, parsed.report_id) == ("Mailkube", "r-1")
    assert session_counts(parsed, ours, "Mailkube") == [
        SessionCount("Mailkube", "example.test", "sts", "success", 40),
        SessionCount("Mailkube", "example.test", "sts", "certificate-host-mismatch", 3),
        SessionCount("Mailkube", "example.test", "sts", "starttls-not-supported", 2),
    ]


def test_appendix_b_as_json_and_as_gzip_counts_failures_by_result_type() -> None:
    data = json.dumps(APPENDIX_B).encode()
    (policy,) = parse_json(data).policies
    assert policy == PolicyResult("sts", "company-y.example", 5326, 303, (
        ("certificate-expired", 100), ("starttls-not-supported", 200),
        ("validation-failure", 3)))  # fmt: skip
    for subtype, payload in (("tlsrpt+json", data), ("tlsrpt+gzip", gzip.compress(data))):
        message = EmailMessage()
        message["Subject"] = "Report Domain: company-y.example"
        message.set_content("a report")
        message.add_attachment(payload, maintype="application", subtype=subtype)
        (report,) = parse_message(message.as_bytes())
        counts = {c.result: c.sessions for c in session_counts(report, ours, "Company-X")}
        assert counts == {"success": 5326, "certificate-expired": 100,
                          "starttls-not-supported": 200, "validation-failure": 3}  # fmt: skip


def test_unknown_result_types_foreign_domains_and_undetailed_failures_are_other() -> None:
    report = copy.deepcopy(APPENDIX_B)
    policy = report["policies"][0]
    policy["policy"]["policy-domain"] = "someone-else.example"
    policy["summary"]["total-failure-session-count"] = 310
    policy["failure-details"][0]["result-type"] = "made-up-result"
    parsed = parse_json(json.dumps(report).encode())
    counts = {(c.policy_domain, c.result): c.sessions
              for c in session_counts(parsed, ours, "X")}  # fmt: skip
    assert counts == {("other", "success"): 5326, ("other", "other"): 100 + 7,
                      ("other", "starttls-not-supported"): 200,
                      ("other", "validation-failure"): 3}  # fmt: skip


def mutated(path: list[Any], value: Any) -> bytes:
    report = copy.deepcopy(APPENDIX_B)
    target: Any = report
    for step in path[:-1]:
        target = target[step]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(report).encode()


P0 = ["policies", 0]


@pytest.mark.parametrize(("data", "where"), [
    (b"[]", "report: expected an object"),
    (b'{"a": NaN}', "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    (mutated(["organization-name"], KeyError), "organization-name"),
    (mutated(["organization-name"], 7), "organization-name"),
    (mutated(["report-id"], "x" * 2000), "report-id: longer than"),
    (mutated(["date-range"], "yesterday"), "date-range: expected an object"),
    (mutated(["policies"], {}), "policies: expected an array"),
    (mutated([*P0, "policy", "policy-type"], "dkim"), "policy-type: unknown 'dkim'"),
    (mutated([*P0, "summary", "total-successful-session-count"], -1), "session count"),
    (mutated([*P0, "summary", "total-successful-session-count"], True), "session count"),
    (mutated([*P0, "summary", "total-successful-session-count"], 1.5), "session count"),
    (mutated([*P0, "summary", "total-failure-session-count"], 10**30), "session count"),
    (mutated([*P0, "failure-details"], [{"result-type": "x"}]), "failed-session-count"),
    (mutated(["policies"], [{}] * 10_001), "more than 10000"),
])  # fmt: skip
def test_invalid_reports_name_what_is_wrong(data: bytes, where: str) -> None:
    with pytest.raises(ReportError, match=where.replace("(", r"\(")):
        parse_json(data)


def test_gzip_bombs_truncation_and_trailing_data_are_refused() -> None:
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))
    assert len(bomb) < 100_000
    with pytest.raises(ReportError, match="larger than"):
        gunzip(bomb, 4 * 1024 * 1024)
    good = gzip.compress(b"{}")
    assert gunzip(good, 100) == b"{}"
    with pytest.raises(ReportError, match="truncated"):
        gunzip(good[:-6], 100)
    with pytest.raises(ReportError, match="after the gzip member"):
        gunzip(good + b"more", 100)
    with pytest.raises(ReportError, match="not gzip"):
        gunzip(b"plain text", 100)


def test_a_message_without_a_report_part_is_refused() -> None:
    message = EmailMessage()
    message.set_content("no report here")
    with pytest.raises(ReportError, match="no application/tlsrpt"):
        parse_message(message.as_bytes())


def test_organisation_labels_are_bounded() -> None:
    counter = ReportCounter(["tls@example.test"], ours)
    assert counter.wants(["TLS@example.test"])
    assert not counter.wants(["bob@example.test"])
    names = [counter._organization(f"org {i}") for i in range(MAX_ORGANIZATIONS + 5)]
    assert names[:MAX_ORGANIZATIONS] == [f"org {i}" for i in range(MAX_ORGANIZATIONS)]
    assert set(names[MAX_ORGANIZATIONS:]) == {"other"}
    assert counter._organization("org 3") == "org 3"  # known names keep their label


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzzed_messages_are_reports_or_report_errors(body: bytes) -> None:
    with contextlib.suppress(ReportError):
        parse_message(body)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    ["organization-name"], ["date-range"], ["date-range", "start-datetime"], ["policies"],
    [*P0, "policy"], [*P0, "policy", "policy-type"], [*P0, "policy", "policy-domain"],
    [*P0, "summary"], [*P0, "summary", "total-failure-session-count"], [*P0, "failure-details"],
    [*P0, "failure-details", 0, "result-type"],
    [*P0, "failure-details", 0, "failed-session-count"],
]), min_size=1, max_size=3), st.lists(JSON, min_size=3, max_size=3))  # fmt: skip
def test_fuzzed_fields_of_a_valid_report_are_parsed_or_refused(
    paths: list[list[Any]], values: list[Any]
) -> None:
    report = copy.deepcopy(APPENDIX_B)
    for path, value in zip(paths, values, strict=False):
        target: Any = report
        try:
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation took the path away
    try:
        parsed = parse_json(json.dumps(report).encode())
    except ReportError:
        return
    for count in session_counts(parsed, ours, "X"):
        assert count.sessions > 0
        assert count.policy_domain in ("company-y.example", "other")
