"""RFC 5321 paths and the relay verdict: table cases for every known trick, and a hypothesis
fuzz test of the one property that matters — unauthenticated mail is only ever accepted for a
plain mailbox in a local domain."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailkube_core.addresses import normalize_domain
from mailkube_gateway.relay import (
    ROUTING_CHARACTERS,
    PathSyntaxError,
    RelayVerdict,
    is_postmaster,
    parse_path,
    relay_verdict,
    split_path_command,
)

LOCAL_DOMAINS = {"example.test", "xn--bcher-kva.example"}


def is_local(domain: str) -> bool:
    return domain in LOCAL_DOMAINS


def verdict(text: str, *, authenticated: bool = False, utf8: bool = True) -> RelayVerdict | None:
    """None when the path does not even parse."""
    try:
        path = parse_path(text, utf8=utf8)
    except PathSyntaxError:
        return None
    assert path is not None
    return relay_verdict(path, authenticated=authenticated, is_local_domain=is_local)


@pytest.mark.parametrize(
    "text",
    [
        "<alice@example.test>",
        "<ALICE@EXAMPLE.TEST>",
        "<alice@Example.Test>",
        '<"alice"@example.test>',
        "<@relay.test,@other.test:alice@example.test>",  # source route ignored (§4.1.2)
        "<alice@bücher.example>",
        "<alice@XN--BCHER-KVA.example>",
    ],
)
def test_local_mailboxes_are_local(text: str) -> None:
    assert verdict(text) is RelayVerdict.LOCAL


@pytest.mark.parametrize(
    "text",
    [
        "<victim@remote.test>",
        "<victim%remote.test@example.test>",  # percent hack
        "<remote.test!victim@example.test>",  # bang path
        '<"victim@remote.test"@example.test>',  # quoted @
        '<"victim%remote.test"@example.test>',
        '<"remote!victim"@example.test>',
        "<@example.test:victim@remote.test>",  # source route through us
        "<victim@[192.0.2.1]>",
        "<victim@[IPv6:2001:db8::1]>",
        "<victim@example.test.remote.test>",
        "<victim@bücher.example.remote.test>",
        "<victim@xn--remote-9ya.test>",
    ],
)
def test_relay_tricks_are_denied_or_unparseable(text: str) -> None:
    assert verdict(text) in (RelayVerdict.DENIED, None)
    # and an authenticated user may send there, unless it is not an address at all
    assert verdict(text, authenticated=True) in (RelayVerdict.REMOTE, RelayVerdict.LOCAL, None)


@pytest.mark.parametrize(
    "text",
    [
        "alice@example.test",  # no angle brackets
        "<alice@example.test.>",  # trailing dot
        "<alice@@example.test>",
        "<victim@remote.test@example.test>",
        "<alice@example..test>",
        "<.alice@example.test>",
        "<alice.@example.test>",
        "<alice@-example.test>",
        "<alice>",
        "<@example.test>",
        "<<>>",
        "< >",
        "<alice@exa mple.test>",
        "<alice@example.test\r\nRCPT TO:<x@y>>",
        "<alice\x00@example.test>",
        "<alice@[999.1.1.1]>",
        "<alice@[foo:bar]>",
        "<" + "a" * 65 + "@example.test>",
        "<alice@" + "a" * 256 + ">",
    ],
)
def test_malformed_paths_are_refused(text: str) -> None:
    with pytest.raises(PathSyntaxError):
        parse_path(text, utf8=True)


def test_null_path_only_where_allowed() -> None:
    assert parse_path("<>", null_ok=True) is None
    with pytest.raises(PathSyntaxError):
        parse_path("<>")


def test_non_ascii_needs_smtputf8() -> None:
    with pytest.raises(PathSyntaxError):
        parse_path("<alice@bücher.example>", utf8=False)
    with pytest.raises(PathSyntaxError):
        parse_path("<jörg@example.test>", utf8=False)
    path = parse_path("<jörg@example.test>", utf8=True)
    assert path is not None
    assert path.local == "jörg"


def test_quoted_local_parts_keep_their_quotes_only_when_needed() -> None:
    plain = parse_path('<"alice"@example.test>')
    assert plain is not None
    assert plain.address == "alice@example.test"
    spaced = parse_path('<"john doe"@remote.test>')
    assert spaced is not None
    assert spaced.address == '"john doe"@remote.test'
    assert spaced.local == "john doe"


def test_bare_postmaster() -> None:
    assert is_postmaster("<postmaster>")
    assert is_postmaster("<PostMaster>")
    assert not is_postmaster("<postmaster@remote.test>")
    assert not is_postmaster("<postmaster.x>")


# --- fuzz --------------------------------------------------------------------------------

_PIECES = st.sampled_from(
    ["alice", "victim", "@", "%", "!", '"', "\\", ".", ",", ":", "<", ">", "[", "]", " ",
     "example.test", "remote.test", "EXAMPLE.TEST", "xn--bcher-kva.example", "bücher.example",
     "example.test.", "IPv6:", "127.0.0.1", "postmaster", "\x00", "\r\n", "\uff0e", "@example.test",
     "@remote.test"]
)  # fmt: skip


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=12), st.booleans())
def test_fuzz_unauthenticated_mail_only_reaches_plain_local_mailboxes(
    pieces: list[str], brackets: bool
) -> None:
    text = "".join(pieces)
    if brackets:
        text = f"<{text}>"
    try:
        path = parse_path(text, utf8=True, null_ok=True)
    except PathSyntaxError:
        return
    if path is None:
        assert text == "<>"
        return
    result = relay_verdict(path, authenticated=False, is_local_domain=is_local)
    if result is RelayVerdict.LOCAL:
        assert not path.literal
        assert normalize_domain(path.domain) in LOCAL_DOMAINS
        assert not ROUTING_CHARACTERS.intersection(path.local)
        # what the envelope will carry names the same local domain
        assert normalize_domain(path.address.rpartition("@")[2]) in LOCAL_DOMAINS
    else:
        assert result is RelayVerdict.DENIED


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_arbitrary_text_never_raises_anything_else(text: str) -> None:
    for candidate in (text, f"<{text}>"):
        with contextlib.suppress(PathSyntaxError):
            parse_path(candidate, utf8=True, null_ok=True)


@pytest.mark.parametrize(
    ("arg", "keyword", "esmtp", "split"),
    [("FROM:<a@b.test>", "FROM:", False, ("<a@b.test>", "")),
     ("from: <a@b.test> SIZE=10", "FROM:", True, ("<a@b.test>", "SIZE=10")),
     ('TO:<"a> b"@c.test> NOTIFY=NEVER', "TO:", True, ('<"a> b"@c.test>', "NOTIFY=NEVER")),
     ("TO:<a@b.test> NOTIFY=NEVER", "TO:", False, None),  # parameters need EHLO
     ("TO:<a@b.test>", "FROM:", True, None), (None, "TO:", True, None), ("", "TO:", True, None),
     ("TO", "TO:", True, None), ("FROM:<>", "FROM:", False, ("<>", ""))],
)  # fmt: skip
def test_mail_and_rcpt_arguments_split_alike(
    arg: str | None, keyword: str, esmtp: bool, split: tuple[str, str] | None
) -> None:
    assert split_path_command(arg, keyword, esmtp=esmtp) == split
