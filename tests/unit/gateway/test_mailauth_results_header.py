"""Authentication-Results (RFC 8601): what we write parses with the `authres` library, and
incoming fields claiming our authserv-id are removed, whatever their spelling."""

from __future__ import annotations

import authres
import authres.arc
import authres.dmarc
from hypothesis import given
from hypothesis import strategies as st

from mailkube_gateway.headers import parse_header_section
from mailkube_gateway.mailauth.header_fields import field_values, from_address, from_domain
from mailkube_gateway.mailauth.results_header import (
    Clause,
    authserv_id_of,
    remove_ours,
    render_header,
)

FEATURES = authres.FeatureContext(authres.dmarc, authres.arc)


def parse(header: str) -> authres.AuthenticationResultsHeader:
    unfolded = header.replace("\r\n", "")
    return FEATURES.parse(unfolded)


def test_a_full_header_parses_with_authres() -> None:
    header = render_header(
        "mx.example.test",
        [
            Clause("spf", "pass", "sender SPF authorized",
                   properties=(("smtp.mailfrom", "example.org"),)),
            Clause("dkim", "pass", properties=(("header.d", "example.org"), ("header.s", "sel"),
                                               ("header.a", "ed25519-sha256"),
                                               ("header.b", "AbCd+/EfGh12"))),
            Clause("dkim", "fail", reason="body hash did not verify",
                   properties=(("header.d", "other.example"),)),
            Clause("arc", "none"),
            Clause("dmarc", "pass", "p=reject dis=none",
                   properties=(("header.from", "example.org"),)),
        ],
    )  # fmt: skip
    assert header.startswith("Authentication-Results: mx.example.test;\r\n\t")
    assert all(len(line) < 998 for line in header.split("\r\n"))
    parsed = parse(header)
    assert parsed.authserv_id == "mx.example.test"
    methods = [(r.method, r.result) for r in parsed.results]
    assert methods == [("spf", "pass"), ("dkim", "pass"), ("dkim", "fail"), ("arc", "none"),
                       ("dmarc", "pass")]  # fmt: skip
    spf, dkim = parsed.results[0], parsed.results[1]
    assert spf.smtp_mailfrom == "example.org"
    assert (dkim.header_d, dkim.header_s, dkim.header_a) == ("example.org", "sel",
                                                           "ed25519-sha256")  # fmt: skip
    assert parsed.results[2].reason == "body hash did not verify"


def test_awkward_values_are_quoted_and_comments_escaped() -> None:
    header = render_header(
        "mx.test",
        [Clause("auth", "pass", "odd (comment) \\ here",
                properties=(("smtp.auth", 'we"ird user'),))],
    )  # fmt: skip
    parsed = parse(header)
    # authres keeps the quoted-pair as written; what matters is that the field parses
    assert parsed.results[0].smtp_auth.replace("\\", "") == 'we"ird user'


def test_no_results_is_none() -> None:
    header = render_header("mx.test", [])
    assert header == "Authentication-Results: mx.test; none"
    assert parse(header).results == []  # authres reads "none" as no results


@given(st.lists(st.tuples(st.sampled_from(["spf", "dkim", "dmarc", "arc", "auth"]),
                          st.sampled_from(["pass", "fail", "none", "temperror", "permerror"]),
                          st.text(max_size=40), st.text(max_size=40)),
                max_size=5))  # fmt: skip
def test_any_results_render_a_parseable_header(
    results: list[tuple[str, str, str, str]],
) -> None:
    clauses = [
        Clause(method, result, comment, reason=reason)
        for method, result, comment, reason in results
    ]
    parsed = parse(render_header("mx.test", clauses))
    assert [(r.method, r.result) for r in parsed.results] == (
        [(c.method, c.result) for c in clauses]
    )


def message(*fields: str) -> bytes:
    return (
        "\r\n".join(fields) + "\r\n\r\nbody\r\nAuthentication-Results: mx.test; spf=pass\r\n"
    ).encode()


def strip(content: bytes, authserv_id: str = "mx.test") -> tuple[bytes, int]:
    size = parse_header_section(content, max_size=len(content)).size
    return remove_ours(content, size, authserv_id)


def test_fields_claiming_our_authserv_id_are_removed_others_kept() -> None:
    content = message(
        "Authentication-Results: MX.test; dkim=pass header.d=bank.example",
        "From: a@b.example",
        "Authentication-Results: (comment first) mx.test;",
        "\tspf=pass smtp.mailfrom=bank.example",
        "Authentication-Results: other.example; spf=fail",
        "authentication-results:mx.test 1; dmarc=pass",
        "Subject: hi",
    )
    stripped, removed = strip(content)
    assert removed == 3
    assert stripped == message(
        "From: a@b.example",
        "Authentication-Results: other.example; spf=fail",
        "Subject: hi",
    )  # the body's look-alike line is not a header field and stays


def test_a_prefix_of_our_id_is_not_ours() -> None:
    content = message("Authentication-Results: mx.test.evil.example; spf=pass", "From: a@b")
    assert strip(content) == (content, 0)


def test_authserv_id_parsing() -> None:
    assert authserv_id_of(b" mx.test; none") == "mx.test"
    assert authserv_id_of(b' "mx.test" ; none') == "mx.test"
    assert authserv_id_of(b" (c) mx.test 1; none") == "mx.test"
    assert authserv_id_of(b" ;") is None


@given(st.binary(max_size=400))
def test_stripping_never_breaks_on_junk(junk: bytes) -> None:
    content = b"Authentication-Results: mx.test; x\r\n" + junk + b"\r\n\r\n"
    stripped, removed = strip(content)
    assert removed >= 0
    assert len(stripped) <= len(content)


def test_from_domain_wants_exactly_one_address() -> None:
    def domain(*fields: str) -> str | None:
        content = ("\r\n".join(fields) + "\r\n\r\n").encode()
        return from_domain(content, parse_header_section(content, max_size=9999).size)

    assert domain('From: "Ann" <ann@News.Example.COM>') == "news.example.com"
    assert domain("From: ann@xn--bcher-kva.example") == "xn--bcher-kva.example"
    assert domain("From: =?utf-8?q?B=C3=BC?= <b@b\u00fccher.example>") == "xn--bcher-kva.example"
    assert domain("From: a@one.example, b@two.example") is None
    assert domain("From: undisclosed") is None
    assert domain("Subject: no from") is None
    assert domain("From: a@one.example", "From: b@two.example") is None


def test_field_values_unfold() -> None:
    content = b"From: a@b\r\nSubject: one\r\n two\r\n\r\n"
    size = parse_header_section(content, max_size=999).size
    assert field_values(content, size, b"SUBJECT") == ["one two"]
    assert from_address(content, size) == "a@b"
