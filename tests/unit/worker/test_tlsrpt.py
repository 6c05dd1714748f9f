"""TLS-RPT (RFC 8460): the `_smtp._tls` record, the aggregate report's JSON (§4.3, checked
field by field against §4.4's schema) and the report message (§5.1, §5.3)."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest

from mailkube_worker.tlspolicy.tlsrpt import (
    RecordError,
    ReportTargets,
    build_report,
    parse_record,
    report_message,
)
from mailkube_worker.tlspolicy.tlsrpt_store import Outcome

STS = ("version: STSv1", "mode: enforce", "mx: mx.example.test", "max_age: 86400")


@pytest.mark.parametrize(("strings", "expected"), [
    (["v=TLSRPTv1; rua=mailto:reports@example.test"], (("reports@example.test",), ())),
    (["v=TLSRPTv1;rua=mailto:a%40b@example.test,https://r.example.test/v1"],
     (("a@b@example.test",), ("https://r.example.test/v1",))),
    (["v=spf1 -all", "v=TLSRPTv1; rua=https://r.example.test/x; ext=1"],
     ((), ("https://r.example.test/x",))),
    (["v=TLSRPTv1; rua=mailto:r@example.test?subject=x, ftp://x.test"], (("r@example.test",), ())),
])  # fmt: skip
def test_records(strings: list[str], expected: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    assert parse_record(strings) == ReportTargets(*expected)


@pytest.mark.parametrize(("strings", "why"), [
    ([], "no TLSRPTv1"),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], "more than one"),
    (["v=TLSRPTv1"], "no mailto: or https:"),
    (["v=TLSRPTv1; rua=http://insecure.test/"], "no mailto: or https:"),
    (["v=TLSRPTv1; rua"], "malformed"),
])  # fmt: skip
def test_bad_records(strings: list[str], why: str) -> None:
    with pytest.raises(RecordError, match=why):
        parse_record(strings)


OUTCOMES = {
    Outcome("sts", STS, ("mx.example.test",), "success", "mx.example.test", "192.0.2.1"): 7,
    Outcome("sts", STS, ("mx.example.test",), "certificate-host-mismatch", "mx.example.test",
            "192.0.2.1"): 2,
    Outcome("sts", STS, ("mx.example.test",), "certificate-host-mismatch", "mx.example.test",
            "192.0.2.2"): 1,
    Outcome("tlsa", ("3 1 1 ab",), (), "tlsa-invalid", "mx2.example.test", "192.0.2.3"): 4,
    Outcome("no-policy-found", (), (), "success", "mx3.example.test", "192.0.2.4"): 3,
}  # fmt: skip


def check_schema(report: dict[str, Any]) -> None:
    """RFC 8460 §4.4: the required members and their types."""
    assert isinstance(report["organization-name"], str)
    assert isinstance(report["contact-info"], str)
    assert isinstance(report["report-id"], str)
    for field in ("start-datetime", "end-datetime"):
        datetime.strptime(report["date-range"][field], "%Y-%m-%dT%H:%M:%SZ")
    assert report["policies"]
    for item in report["policies"]:
        policy = item["policy"]
        assert policy["policy-type"] in ("tlsa", "sts", "no-policy-found")
        assert isinstance(policy["policy-domain"], str)
        assert all(isinstance(s, str) for s in policy.get("policy-string", []))
        assert all(isinstance(s, str) for s in policy.get("mx-host", []))
        summary = item["summary"]
        assert isinstance(summary["total-successful-session-count"], int)
        assert isinstance(summary["total-failure-session-count"], int)
        failures = sum(d["failed-session-count"] for d in item.get("failure-details", []))
        assert failures == summary["total-failure-session-count"]
        for detail in item.get("failure-details", []):
            assert isinstance(detail["result-type"], str)
            assert set(detail) <= {
                "result-type",
                "sending-mta-ip",
                "receiving-mx-hostname",
                "receiving-mx-helo",
                "receiving-ip",
                "failed-session-count",
                "additional-information",
                "failure-reason-code",
            }


def test_the_report() -> None:
    report = build_report("example.test", "2026-12-06", OUTCOMES, organization="Mailkube",
                          contact="tls@mail.test", report_id="r1")  # fmt: skip
    check_schema(report)
    assert report["date-range"] == {"start-datetime": "2026-12-06T00:00:00Z",
                                    "end-datetime": "2026-12-06T23:59:59Z"}  # fmt: skip
    by_type = {p["policy"]["policy-type"]: p for p in report["policies"]}
    sts = by_type["sts"]
    assert sts["policy"] == {
        "policy-type": "sts", "policy-domain": "example.test", "policy-string": list(STS),
        "mx-host": ["mx.example.test"],
    }  # fmt: skip
    assert sts["summary"] == {"total-successful-session-count": 7,
                              "total-failure-session-count": 3}  # fmt: skip
    details = sorted((d["receiving-ip"], d["failed-session-count"])
                     for d in sts["failure-details"])  # fmt: skip
    assert details == [("192.0.2.1", 2), ("192.0.2.2", 1)]
    assert by_type["tlsa"]["policy"]["policy-string"] == ["3 1 1 ab"]
    assert by_type["tlsa"]["failure-details"][0]["result-type"] == "tlsa-invalid"
    assert "failure-details" not in by_type["no-policy-found"]


def test_the_message() -> None:
    report = build_report("example.test", "2026-12-06", OUTCOMES, organization="Mailkube",
                          contact="tls@mail.test", report_id="r1@mail.test")  # fmt: skip
    raw = report_message(report, domain="example.test", submitter="mail.test",
                         sender="tls-reports@mail.test", recipients=["rua@example.test"],
                         unique="u1", now=datetime(2026, 12, 7, 1, 0, tzinfo=UTC))  # fmt: skip
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == "example.test"
    assert message["TLS-Report-Submitter"] == "mail.test"
    assert message["Subject"] == ("Report Domain: example.test Submitter: mail.test "
                                  "Report-ID: <r1@mail.test>")  # fmt: skip
    text, attachment = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    # §5.1: sender!policy-domain!begin!end!unique.json.gz, begin/end in seconds since 1970
    assert attachment.get_filename() == "mail.test!example.test!1796515200!1796601599!u1.json.gz"
    assert json.loads(gzip.decompress(attachment.get_content())) == report
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
