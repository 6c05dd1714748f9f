"""The chunked DATA reader: end-of-data only at CRLF.CRLF, dot-unstuffing, bare CR/LF refused,
bytes after the end given back, nothing buffered past the limit."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailkube_core.line_endings import has_bare_line_ending
from mailkube_gateway.data import DataResult, DataStatus, read_data, unstuff
from mailkube_gateway.headers import HeaderError, check_fields, parse_header_section
from mailkube_gateway.params import ParamError, decode_xtext, parse_mail_params, parse_rcpt_params


async def read(
    wire: bytes, limit: int = 10_000, pieces: int = 1
) -> tuple[DataStatus, bytes, bytes]:
    reader = asyncio.StreamReader()
    step = max(1, len(wire) // pieces)
    for start in range(0, len(wire), step):
        reader.feed_data(wire[start : start + step])
    reader.feed_eof()
    unread: list[bytes] = []
    result = await read_data(reader, unread.append, limit=limit)
    return result.status, result.content, b"".join(unread)


@pytest.mark.parametrize("pieces", [1, 3, 50])
async def test_end_of_data_and_unstuffing(pieces: int) -> None:
    wire = b"Subject: x\r\n\r\n..leading dot\r\n.single\r\nend\r\n.\r\nQUIT\r\n"
    status, content, rest = await read(wire, pieces=pieces)
    assert status is DataStatus.OK
    assert content == b"Subject: x\r\n\r\n.leading dot\r\nsingle\r\nend\r\n"
    assert rest == b"QUIT\r\n"


async def test_a_first_line_starting_with_a_dot_is_unstuffed_too() -> None:
    assert await read(b"..first\r\n.\r\n") == (DataStatus.OK, b".first\r\n", b"")
    assert await read(b".x\r\n\r\n..\r\n.\r\n") == (DataStatus.OK, b"x\r\n\r\n.\r\n", b"")


async def test_empty_message() -> None:
    assert await read(b".\r\n") == (DataStatus.OK, b"", b"")


@pytest.mark.parametrize(
    "probe", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r.\n", b"\n..\r\n"]
)
async def test_smuggling_endings_do_not_end_the_data_and_taint_the_message(probe: bytes) -> None:
    wire = b"Subject: a\r\n\r\nbody" + probe + b"MAIL FROM:<x@y>\r\n\r\n.\r\n"
    status, content, rest = await read(wire, pieces=7)
    assert status is DataStatus.BARE_LINE_ENDING
    assert content == b""
    assert rest == b""


async def test_too_big_is_dropped_as_it_comes_and_the_end_still_found() -> None:
    wire = b"x" * 1000 + b"\r\n" + b"y" * 50_000 + b"\r\n.\r\nRSET\r\n"
    status, content, rest = await read(wire, limit=1000, pieces=40)
    assert status is DataStatus.TOO_BIG
    assert content == b""
    assert rest == b"RSET\r\n"


async def test_hangup_before_the_end_raises() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await read(b"Subject: x\r\n\r\nno end\r\n")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                max_size=20))  # fmt: skip
def test_stuffing_round_trip(lines: list[bytes]) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines)
    assert unstuff(stuffed) == content
    assert not has_bare_line_ending(content)


def test_header_section() -> None:
    content = b"From: a@b\r\nSubject: x\r\n  folded\r\nReceived: 1\r\nReceived: 2\r\n\r\nbody\r\n"
    section = parse_header_section(content, max_size=1000)
    assert section.names == ["from", "subject", "received", "received"]
    assert content[section.size :] == b"\r\nbody\r\n"
    assert check_fields(section) is None
    assert check_fields(parse_header_section(b"Subject: x\r\n\r\n", max_size=99)) is not None
    twice = parse_header_section(b"From: a\r\nFrom: b\r\n\r\n", max_size=99)
    assert "from" in (check_fields(twice) or "")
    with pytest.raises(HeaderError):
        parse_header_section(b"X: " + b"y" * 2000 + b"\r\n\r\n", max_size=1000)


def test_params() -> None:
    mail = parse_mail_params("SIZE=100 BODY=8bitmime RET=full ENVID=a+2Bb SMTPUTF8", max_size=1000)
    assert (mail.size, mail.body, mail.ret, mail.envid, mail.smtputf8) == (
        100, "8BITMIME", "FULL", "a+b", True
    )  # fmt: skip
    for bad, code in [("SIZE=1001", "552 5.3.4"), ("SIZE=x", "501"), ("BODY=BINARY", "501"),
                      ("FOO=1", "555"), ("SIZE=1 SIZE=2", "501"), ("RET=NONE", "501"),
                      ("ENVID=a=b", "501"), ("SIZE=²", "501"), ("SIZE=١٢", "501")]:  # fmt: skip
        with pytest.raises(ParamError) as error:
            parse_mail_params(bad, max_size=1000)
        assert error.value.reply.startswith(code), bad
    assert parse_mail_params("BODY=binarymime", max_size=1000).body == "BINARYMIME"  # RFC 3030
    rcpt = parse_rcpt_params("NOTIFY=failure,DELAY ORCPT=rfc822;a+40b")
    assert rcpt.orcpt == "rfc822;a@b"
    for bad in ("NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "ORCPT=nosemicolon", "X=1"):
        with pytest.raises(ParamError):
            parse_rcpt_params(bad)
    assert decode_xtext("a+3Db") == "a=b"


@settings(deadline=None)
@given(st.lists(st.sampled_from([b"", b".", b"..", b"x", b".x", b"x.", b"..y"]), max_size=12))
def test_dot_lines_is_false_only_when_no_line_starts_with_a_dot(lines: list[bytes]) -> None:
    stuffed = b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines)

    async def read_it() -> DataResult:
        reader = asyncio.StreamReader()
        reader.feed_data(stuffed + b".\r\n")
        reader.feed_eof()
        return await read_data(reader, lambda _: None, limit=10_000)

    result = asyncio.run(read_it())
    assert result.content == b"".join(line + b"\r\n" for line in lines)
    if not result.dot_lines:
        assert not any(line.startswith(b".") for line in result.content.split(b"\r\n"))
    # what the client left unstuffed counts too: ".x" on the wire is "x" in the content
    assert result.dot_lines == any(line.startswith(b".") for line in lines)


@pytest.mark.parametrize("pieces", [1, 4])
async def test_the_first_end_of_data_ends_it_however_many_follow(pieces: int) -> None:
    # a second "message" pipelined behind the first is the next commands' business
    assert await read(b"a\r\n.\r\nb\r\n.\r\nc\r\n.\r\n", pieces=pieces) == (
        DataStatus.OK,
        b"a\r\n",
        b"b\r\n.\r\nc\r\n.\r\n",
    )
    # overlapping ends: CRLF "." CRLF "." CRLF ends at the first
    assert await read(b"a\r\n.\r\n.\r\n", pieces=pieces) == (DataStatus.OK, b"a\r\n", b".\r\n")
