"""BDAT's parser and chunk accounting (bdat.py), without a socket."""

from __future__ import annotations

import asyncio
import random

import pytest

from mailkube_gateway.bdat import Chunks, parse_bdat, read_chunk
from mailkube_gateway.data import DataStatus
from mailkube_gateway.data_memory import DataMemory


@pytest.mark.parametrize(
    ("arg", "parsed"),
    [("0", (0, False)), ("0 LAST", (0, True)), ("1000 last", (1000, True)),
     ("007", (7, False)), ("1  LAST", (1, True)), ("9" * 18, (10**18 - 1, False))],
)  # fmt: skip
def test_bdat_arguments(arg: str, parsed: tuple[int, bool]) -> None:
    assert parse_bdat(arg) == parsed


@pytest.mark.parametrize(
    "arg", [None, "", " 1", "1 ", "-1", "+1", "1.0", "1e3", "x", "LAST", "1 LAST x",
            "1 FIRST", "1\tLAST", "9" * 19, "١٢"],
)  # fmt: skip
def test_not_bdat_arguments(arg: str | None) -> None:
    assert parse_bdat(arg) is None


def test_random_arguments_never_raise() -> None:
    rng = random.Random(3030)
    alphabet = "0123456789 LASTlast\t-+x\x00\u0663"
    for _ in range(5000):
        arg = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        parsed = parse_bdat(arg)
        if parsed is not None:
            size, last = parsed
            assert 0 <= size < 10**18
            assert arg.split()[0].isascii()
            assert last == (arg.upper().endswith("LAST"))


def test_chunks_keep_what_fits_and_drop_the_rest_as_it_comes() -> None:
    memory = DataMemory(1000)
    chunks = Chunks(memory.hold(), limit=100)
    assert chunks.admit(60)
    chunks.content += b"x" * 60
    assert memory.held == 60
    assert not chunks.admit(41)  # past the message's limit
    assert chunks.refused is DataStatus.TOO_BIG
    assert memory.held == 0
    assert not chunks.admit(1)  # and everything after it
    assert chunks.result().status is DataStatus.TOO_BIG


def test_chunks_past_the_memory_of_all_sessions_are_refused() -> None:
    memory = DataMemory(100)
    other = memory.hold()
    assert other.grow(80)
    chunks = Chunks(memory.hold(), limit=1000)
    assert not chunks.admit(30)
    assert chunks.refused is DataStatus.NO_MEMORY
    assert memory.held == 80  # the other session's share only
    chunks.close()
    other.release()
    assert memory.held == 0


def test_the_message_is_the_chunks_together_and_must_be_crlf_lines() -> None:
    chunks = Chunks(DataMemory(1000).hold(), limit=1000)
    for piece in (b"Subject: a\r", b"\n\r\nbody\r\n"):
        assert chunks.admit(len(piece))
        chunks.content += piece
    result = chunks.result()
    assert (result.status, result.content) == (DataStatus.OK, b"Subject: a\r\n\r\nbody\r\n")
    bare = Chunks(DataMemory(1000).hold(), limit=1000)
    assert bare.admit(5)
    bare.content += b"a\nb\r\n"
    assert bare.result().status is DataStatus.BARE_LINE_ENDING
    binary = Chunks(DataMemory(1000).hold(), limit=1000)
    assert binary.admit(5)
    binary.content += b"a\nb\r\n"
    assert binary.result(binary=True).status is DataStatus.OK


async def test_read_chunk_reads_exactly_and_leaves_the_rest() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"0123456789NOOP\r\n")
    into = bytearray()
    await read_chunk(reader, 10, into)
    assert into == b"0123456789"
    await read_chunk(reader, 0, None)
    assert await reader.readline() == b"NOOP\r\n"
    reader.feed_data(b"short")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_chunk(reader, 10, None)
