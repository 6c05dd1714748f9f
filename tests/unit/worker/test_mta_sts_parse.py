"""MTA-STS records and policies (RFC 8461 §3.1, §3.2) parsed strictly, and MX matching
(§4.1). Cases after chasquid's sts_test.go and the RFC's examples."""

from __future__ import annotations

import pytest

from mailkube_worker.tlspolicy.mta_sts import (
    PolicyError,
    StsPolicy,
    StsRecord,
    mx_matches,
    parse_policy,
    parse_record,
)

RFC_EXAMPLE = (
    "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    "mx: backupmx.example.com\r\nmax_age: 604800\r\n"
)


def test_the_rfc_example_policy() -> None:
    policy = parse_policy(RFC_EXAMPLE)
    assert policy == StsPolicy(
        "enforce", 604800, ("mail.example.com", "*.example.net", "backupmx.example.com")
    )


@pytest.mark.parametrize("text", [
    RFC_EXAMPLE.replace("\r\n", "\n"),  # LF alone is allowed
    RFC_EXAMPLE + "extension_field: anything goes\n",  # §3.2 extensions are ignored
    "  " + RFC_EXAMPLE.replace(": ", ":\t"),  # whitespace around keys and values
])  # fmt: skip
def test_equivalent_spellings(text: str) -> None:
    assert parse_policy(text) == parse_policy(RFC_EXAMPLE)


def test_mode_none_needs_no_mx_and_testing_does() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()
    with pytest.raises(PolicyError, match="without any mx"):
        parse_policy("version: STSv1\nmode: testing\nmax_age: 60\n")


@pytest.mark.parametrize(("text", "why"), [
    ("", "version"),
    ("version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n", "version"),
    ("version: STSv1\nmode: Enforce\nmx: a.b\nmax_age: 1\n", "bad mode"),
    ("version: STSv1\nmode: enforce\nmx: a.b\n", "bad max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n", "bad max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 31557601\n", "bad max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 1e5\n", "bad max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: ١٢\n", "bad max_age"),  # not ASCII
    ("version: STSv1\nmode: enforce\nmode: testing\nmx: a.b\nmax_age: 1\n", "twice"),
    ("version: STSv1\nmode: enforce\nmx: a..b\nmax_age: 1\n", "bad mx"),
    ("version: STSv1\nmode: enforce\nmx: *.*.b.c\nmax_age: 1\n", "bad mx"),
    ("version: STSv1\nmode: enforce\nmx: mail\nmax_age: 1\n", "bad mx"),  # one label
    ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 1\nno colon here\n", "key: value"),
    ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 1\nx: a\x00b\n", "control"),
    ("<html>version: STSv1</html>", "key: value"),
    ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 1\n" + "x" * 70000, "64 KB"),
])  # fmt: skip
def test_malformed_policies_are_no_policy(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(text)


@pytest.mark.parametrize(("strings", "expected"), [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=x1; ext=value;"], "x1"),  # other TXT records ignored
])  # fmt: skip
def test_records(strings: list[str], expected: str) -> None:
    assert parse_record(strings) == StsRecord(expected)


@pytest.mark.parametrize(("strings", "why"), [
    ([], "no v=STSv1"),
    (["v=STSv1; id=a;", "v=STSv1; id=b;"], "more than one"),  # §3.1: then no policy
    (["v=STSv1;"], "no id"),
    (["v=STSv1; id=" + "a" * 33], "bad id"),
    (["v=STSv1; id=a-b"], "bad id"),
    (["v=STSv1; id=a; id=b"], "repeated"),
    (["v=STSv1; id"], "malformed"),
    (["v=STSv10; id=a"], "does not start"),
])  # fmt: skip
def test_bad_records(strings: list[str], why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_record(strings)


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.Example.COM.", True),
    ("mail.example.com", "mail2.example.com", False),
    ("*.example.net", "mx1.example.net", True),
    ("*.example.net", "example.net", False),  # §4.1: exactly one label more
    ("*.example.net", "a.b.example.net", False),
    ("*.example.net", ".example.net", False),
])  # fmt: skip
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


def test_a_policy_round_trips_through_its_text() -> None:
    policy = parse_policy(RFC_EXAMPLE)
    assert parse_policy(policy.to_text()) == policy
    assert policy.allows("x.example.net")
    assert not policy.allows("evil.example.org")
