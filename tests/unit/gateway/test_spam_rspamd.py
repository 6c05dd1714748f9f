"""rspamd's protocol: the answer parsed strictly (anything else is "unavailable", never another
exception) and the request headers built from the message and the email-authentication
results."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailkube_core.settings import GatewaySettings
from mailkube_gateway.pipeline import AuthFacts, ClientFacts, Message
from mailkube_gateway.spam.rspamd import (
    RspamdUnavailable,
    Symbol,
    auth_headers,
    parse_result,
    request_headers,
)

# what rspamd 3.4 answered for the add-header test pattern (abridged)
ANSWER: dict[str, Any] = {
    "is_skipped": False,
    "score": 11.54,
    "required_score": 15.0,
    "action": "add header",
    "symbols": {
        "MAILKUBE_TEST_ADD_HEADER": {"name": "MAILKUBE_TEST_ADD_HEADER", "score": 8.0,
                                     "metric_score": 8.0, "description": "test pattern"},
        "R_SPF_ALLOW": {"name": "R_SPF_ALLOW", "score": -0.2, "metric_score": -0.2,
                        "options": ["http header"]},
    },
    "messages": {},
    "message-id": "m1@remote.test",
    "time_real": 0.003,
    "milter": {"remove_headers": {"X-Spam": 0}},
}  # fmt: skip


def encoded(data: Any) -> bytes:
    return json.dumps(data).encode()


def test_an_answer_is_parsed() -> None:
    result = parse_result(encoded(ANSWER))
    assert result.action == "add header"
    assert result.score == 11.54
    assert result.required_score == 15.0
    assert not result.is_skipped
    assert result.smtp_message is None
    assert result.subject is None
    assert set(result.symbols) == {
        Symbol("MAILKUBE_TEST_ADD_HEADER", 8.0),
        Symbol("R_SPF_ALLOW", -0.2, ("http header",)),
    }


def test_gtube_is_a_skipped_reject_with_its_message() -> None:
    gtube = {"is_skipped": True, "score": 15.0, "required_score": 15.0, "action": "reject",
             "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0}},
             "messages": {"smtp_message": "Gtube pattern"}}  # fmt: skip
    result = parse_result(encoded(gtube))
    assert result.is_skipped
    assert result.action == "reject"
    assert result.smtp_message == "Gtube pattern"


def test_a_rewritten_subject_is_kept() -> None:
    result = parse_result(encoded({**ANSWER, "action": "rewrite subject", "subject": "[SPAM] hi"}))
    assert result.subject == "[SPAM] hi"


def test_integer_scores_and_missing_optional_fields_are_fine() -> None:
    result = parse_result(encoded({"action": "no action", "score": 0, "required_score": 15}))
    assert (result.action, result.score, result.symbols) == ("no action", 0.0, ())


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in ANSWER.items() if k != key}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>502 Bad Gateway</html>",
        b"\xff\xfe{}",
        b"[1, 2]",
        b'"reject"',
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser recurses
        encoded(_without("action")),
        encoded(_without("score")),
        encoded(_without("required_score")),
        encoded({**ANSWER, "action": "discard"}),
        encoded({**ANSWER, "action": None}),
        encoded({**ANSWER, "score": "11.5"}),
        encoded({**ANSWER, "score": True}),
        encoded({**ANSWER, "score": 10**400}),
        b'{"action": "reject", "score": NaN, "required_score": 15}',
        b'{"action": "reject", "score": Infinity, "required_score": 15}',
        encoded({**ANSWER, "is_skipped": "yes"}),
        encoded({**ANSWER, "symbols": []}),
        encoded({**ANSWER, "symbols": {"X": 1}}),
        encoded({**ANSWER, "symbols": {"X": {"name": "X"}}}),
        encoded({**ANSWER, "symbols": {"X": {"score": 1, "options": "a"}}}),
        encoded({**ANSWER, "symbols": {"X": {"score": 1, "options": [1]}}}),
        encoded({**ANSWER, "messages": "hello"}),
        encoded({**ANSWER, "messages": {"smtp_message": 5}}),
        encoded({**ANSWER, "subject": ["a"]}),
    ],
)
def test_anything_else_is_unavailable(body: bytes) -> None:
    with pytest.raises(RspamdUnavailable):
        parse_result(body)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=30,
)
# answers close to rspamd's, with any field replaced by anything
NEAR = st.fixed_dictionaries(
    {
        "action": st.sampled_from(["no action", "reject", "add header", "x"]) | JSON,
        "score": st.floats() | st.integers() | JSON,
        "required_score": st.floats() | JSON,
    },
    optional={
        "symbols": st.dictionaries(
            st.text(max_size=10),
            st.fixed_dictionaries({"score": st.floats() | JSON},
                                  optional={"options": st.lists(JSON, max_size=3)}),
            max_size=4,
        ) | JSON,
        "messages": st.fixed_dictionaries({}, optional={"smtp_message": JSON}) | JSON,
        "subject": JSON,
        "is_skipped": JSON,
    },
)  # fmt: skip


def _parses_or_is_unavailable(body: bytes) -> None:
    try:
        result = parse_result(body)
    except RspamdUnavailable:
        return
    assert result.action in {"no action", "greylist", "add header", "rewrite subject",
                              "soft reject", "reject"}  # fmt: skip


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_else(body: bytes) -> None:
    _parses_or_is_unavailable(body)


@settings(max_examples=300)
@given(JSON)
def test_arbitrary_json_never_raises_anything_else(data: Any) -> None:
    _parses_or_is_unavailable(json.dumps(data).encode())


@settings(max_examples=300)
@given(NEAR)
def test_near_answers_never_raise_anything_else(data: Any) -> None:
    _parses_or_is_unavailable(json.dumps(data).encode())


# --- the request ----------------------------------------------------------------------------


def message(**changes: Any) -> Message:
    options: dict[str, Any] = {
        "mail_from": "bob@remote.test",
        "recipients": ["alice@example.test", "info@example.test"],
        "client_ip": "192.0.2.7",
        "helo": "mail.remote.test",
        "auth_user": None,
        "listener": "mx",
        "content": b"Subject: x\r\n\r\nhi\r\n",
        "queue_id": "0A1B2C3D4E5F",
    }
    options.update(changes)
    return Message(**options)


def test_the_envelope_goes_in_rspamd_headers() -> None:
    headers = request_headers(message(), GatewaySettings())
    assert headers == [
        ("User-Agent", "mailkube-gateway"),
        ("IP", "192.0.2.7"),
        ("Helo", "mail.remote.test"),
        ("Hostname", "unknown"),
        ("From", "bob@remote.test"),
        ("Rcpt", "alice@example.test"),
        ("Rcpt", "info@example.test"),
        ("Queue-Id", "0A1B2C3D4E5F"),
    ]


def test_a_verified_reverse_name_and_the_user_are_passed() -> None:
    facts = ClientFacts(reverse_name="mail.remote.test", reverse_verified=True)
    headers = dict(request_headers(message(client=facts, auth_user="alice@example.test"),
                                   GatewaySettings()))  # fmt: skip
    assert headers["Hostname"] == "mail.remote.test"
    assert headers["User"] == "alice@example.test"


def test_an_unverified_reverse_name_is_unknown() -> None:
    facts = ClientFacts(reverse_name="forged.example", reverse_verified=False)
    assert dict(request_headers(message(client=facts), GatewaySettings()))["Hostname"] == "unknown"


def test_without_the_reverse_dns_check_rspamd_looks_the_name_up_itself() -> None:
    headers = dict(request_headers(message(), GatewaySettings(client_rdns="off")))
    assert "Hostname" not in headers


def test_the_null_sender_and_odd_helo_bytes() -> None:
    # arguments are read with surrogateescape; HTTP header values must be valid UTF-8
    headers = dict(request_headers(message(mail_from="", helo="b\udcffd\x01"), GatewaySettings()))
    assert headers["From"] == "<>"
    assert headers["Helo"] == "b\ufffdd?"
    headers["Helo"].encode("utf-8")


def test_no_auth_headers_without_email_authentication() -> None:
    names = {name for name, _ in request_headers(message(), GatewaySettings())}
    assert not names & {"SPF", "DKIM", "DMARC"}


def auth(spf: str = "pass", dkim: tuple[tuple[str, str], ...] = (), dmarc: str = "pass",
         disposition: str = "none") -> AuthFacts:  # fmt: skip
    return AuthFacts(spf, "remote.test", dkim, dmarc, "remote.test", disposition)


def results(facts: AuthFacts) -> dict[str, Any]:
    return {name: json.loads(value) for name, value in auth_headers(facts)}


@pytest.mark.parametrize(
    ("ours", "word"),
    [("pass", "pass"), ("fail", "fail"), ("softfail", "softfail"), ("neutral", "neutral"),
     ("none", "na"), ("permerror", "permfail")],
)  # fmt: skip
def test_spf_results_in_http_headers_words(ours: str, word: str) -> None:
    assert results(auth(spf=ours))["SPF"] == {"result": word, "domain": "remote.test"}


def test_an_spf_temperror_is_left_to_rspamd() -> None:
    # http_headers.lua has no word for it
    assert "SPF" not in results(auth(spf="temperror"))


def test_dkim_results_per_signature() -> None:
    facts = auth(dkim=(("a.test", "pass"), ("b.test", "fail"), ("c.test", "temperror"),
                       ("d.test", "permerror"), ("e.test", "policy")))  # fmt: skip
    assert results(facts)["DKIM"] == {
        "results": [
            {"result": "pass", "domain": "a.test"},
            {"result": "fail", "domain": "b.test"},
            {"result": "tempfail", "domain": "c.test"},
            {"result": "permfail", "domain": "d.test"},
            {"result": "permfail", "domain": "e.test"},
        ]
    }


def test_no_dkim_signature_is_na() -> None:
    assert results(auth())["DKIM"] == {"result": "na"}


@pytest.mark.parametrize(
    ("ours", "disposition", "word"),
    [("pass", "none", "pass"), ("none", "none", "na"), ("temperror", "none", "tempfail"),
     ("permerror", "none", "permfail"), ("fail", "reject", "reject"),
     ("fail", "quarantine", "quarantine"), ("fail", "none", "softfail")],
)  # fmt: skip
def test_dmarc_results_in_http_headers_words(ours: str, disposition: str, word: str) -> None:
    assert results(auth(dmarc=ours, disposition=disposition))["DMARC"]["result"] == word
