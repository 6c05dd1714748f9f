"""The fields content scanning adds, the removal of forged ones, and the Subject of spam."""

from __future__ import annotations

import email
import email.policy

from hypothesis import given
from hypothesis import strategies as st

from mailkube_gateway.headers import parse_header_section
from mailkube_gateway.spam.headers import (
    FOLD_AT,
    MAX_RESULT_FIELD,
    UNCHECKED,
    rewrite_subject,
    spamd_result,
    strip_spam_fields,
    tag_headers,
)
from mailkube_gateway.spam.rspamd import RspamdResult, Symbol

RESULT = RspamdResult(
    action="add header",
    score=11.54,
    required_score=15.0,
    symbols=(
        Symbol("R_SPF_ALLOW", -0.2, ("http header",)),
        Symbol("MIME_GOOD", -0.1, ("text/plain",)),
        Symbol("MAILKUBE_TEST_ADD_HEADER", 8.0),
        Symbol("TRACKER_ID", 3.84),
        Symbol("ARC_NA", 0.0),
    ),
)


def header_size(content: bytes) -> int:
    return parse_header_section(content, max_size=len(content)).size


def test_spam_is_tagged_yes() -> None:
    assert tag_headers(RESULT, action="add header", spam=True, required=15.0) == (
        "X-Spam: Yes",
        "X-Spam-Status: Yes, score=11.54 required=15.00",
        "X-Spam-Score: 11.54",
        spamd_result(RESULT, "add header", 15.0),
    )


def test_clean_mail_says_no_and_has_no_x_spam() -> None:
    clean = RspamdResult("no action", -0.3, 15.0)
    fields = tag_headers(clean, action="no action", spam=False, required=15.0)
    assert fields[0] == "X-Spam-Status: No, score=-0.30 required=15.00"
    assert not any(field.startswith("X-Spam:") for field in fields)


def test_unchecked() -> None:
    assert UNCHECKED == "X-Spam-Status: unchecked"


def test_spamd_result_in_rspamds_style() -> None:
    assert spamd_result(RESULT, "add header", 15.0) == (
        "X-Spamd-Result: default: False [11.54 / 15.00];\r\n"
        "\tMAILKUBE_TEST_ADD_HEADER(8.00)[]; TRACKER_ID(3.84)[];\r\n"
        "\tR_SPF_ALLOW(-0.20)[http header]; MIME_GOOD(-0.10)[text/plain];\r\n"
        "\tARC_NA(0.00)[]"
    )


def test_a_reject_is_true() -> None:
    assert spamd_result(RESULT, "reject", 10.0).startswith(
        "X-Spamd-Result: default: True [11.54 / 10.00]"
    )


def test_spamd_result_without_symbols() -> None:
    bare = RspamdResult("no action", 0.0, 15.0)
    assert spamd_result(bare, "no action", 15.0) == "X-Spamd-Result: default: False [0.00 / 15.00]"


def _lines(field: str) -> list[str]:
    return field.split("\r\n")


def test_many_symbols_are_folded_and_bounded() -> None:
    many = RspamdResult(
        "reject", 500.0, 15.0,
        symbols=tuple(Symbol(f"SYMBOL_{n:04d}", n / 100, ("opt",) * 9) for n in range(1000)),
    )  # fmt: skip
    field = spamd_result(many, "reject", 15.0)
    assert len(field) <= MAX_RESULT_FIELD
    assert field.endswith("...")
    assert all(len(line.expandtabs(1)) <= FOLD_AT for line in _lines(field))
    assert "SYMBOL_0999(9.99)[opt,opt,opt,opt,opt,...]" in field  # largest first, 5 options


def test_rspamd_text_cannot_break_the_field() -> None:
    odd = RspamdResult(
        "add header", 7.0, 15.0,
        symbols=(Symbol("BAD\r\nX-Spam: No", 1.0, ("a\r\nb", "ü" * 200, "x" * 500)),),
    )  # fmt: skip
    field = spamd_result(odd, "add header", 15.0)
    assert field.isascii()
    for line in _lines(field)[1:]:
        assert line.startswith("\t")
    assert all(len(line) < 998 for line in _lines(field))
    # the whole field parses as one header field
    parsed = email.message_from_bytes(field.encode() + b"\r\n\r\n", policy=email.policy.default)
    assert list(parsed.keys()) == ["X-Spamd-Result"]


@given(
    st.lists(
        st.tuples(st.text(max_size=80), st.floats(-1e6, 1e6), st.lists(st.text(), max_size=8)),
        max_size=60,
    )
)
def test_any_symbols_make_one_well_formed_field(
    symbols: list[tuple[str, float, list[str]]],
) -> None:
    result = RspamdResult(
        "add header", 1.0, 15.0, tuple(Symbol(n, s, tuple(o)) for n, s, o in symbols)
    )
    field = spamd_result(result, "add header", 15.0)
    assert field.isascii()
    assert len(field) <= MAX_RESULT_FIELD
    lines = _lines(field)
    assert all(line.startswith("\t") and line.strip() for line in lines[1:])
    assert all(len(line) < 998 for line in lines)


# --- removal of incoming fields -------------------------------------------------------------

FORGED = (
    b"Received: from a\r\n"
    b"X-Spam: No\r\n"
    b"x-spam-STATUS: No, score=-100\r\n"
    b"From: a@remote.test\r\n"
    b"X-Spamd-Result: default: False [-100.00 / 15.00];\r\n"
    b"\tWHITELISTED(-100.00)[]\r\n"
    b"X-Spam-Score : -100\r\n"
    b"X-Spam-Flag: NO\r\n"
    b"X-Spam-Level: \r\n"
    b"X-Spam-Report-Bayes: kept\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"X-Spam: in the body stays\r\n"
)


def test_forged_spam_fields_are_removed_any_case_folded_included() -> None:
    content, removed = strip_spam_fields(FORGED, header_size(FORGED))
    assert removed == 6
    assert content == (
        b"Received: from a\r\n"
        b"From: a@remote.test\r\n"
        b"X-Spam-Report-Bayes: kept\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"X-Spam: in the body stays\r\n"
    )


def test_nothing_to_remove_keeps_the_same_bytes() -> None:
    content = b"From: a@remote.test\r\nSubject: hi\r\n\r\nbody\r\n"
    assert strip_spam_fields(content, header_size(content)) == (content, 0)


# --- the Subject of spam --------------------------------------------------------------------


def test_the_subject_gets_the_prefix_with_its_bytes_kept() -> None:
    content = (
        b"From: a@x.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n and more\r\nTo: b\r\n\r\nhi\r\n"
    )
    assert rewrite_subject(content, header_size(content), None) == (
        b"From: a@x.test\r\nSubject: ***SPAM*** =?utf-8?q?caf=C3=A9?=\r\n and more\r\nTo: b\r\n"
        b"\r\nhi\r\n"
    )


def test_the_prefix_is_not_added_twice() -> None:
    content = b"Subject: ***SPAM*** hi\r\n\r\nhi\r\n"
    assert rewrite_subject(content, header_size(content), None) == content


def test_rspamds_subject_replaces_the_original() -> None:
    content = b"Subject:hello\r\nFrom: a@x.test\r\n\r\nhi\r\n"
    assert rewrite_subject(content, header_size(content), "[SPAM] hello") == (
        b"Subject: [SPAM] hello\r\nFrom: a@x.test\r\n\r\nhi\r\n"
    )


def test_a_non_ascii_subject_from_rspamd_is_encoded() -> None:
    content = b"Subject: x\r\n\r\nhi\r\n"
    rewritten = rewrite_subject(content, header_size(content), "[SPAM] café\r\nBcc: evil")
    assert rewritten.isascii()
    parsed = email.message_from_bytes(rewritten, policy=email.policy.default)
    assert parsed["Subject"] == "[SPAM] café  Bcc: evil"
    assert "Bcc" not in parsed


def test_a_message_without_a_subject_gets_one() -> None:
    content = b"From: a@x.test\r\n\r\nhi\r\n"
    assert rewrite_subject(content, header_size(content), None) == (
        b"From: a@x.test\r\nSubject: ***SPAM***\r\n\r\nhi\r\n"
    )
