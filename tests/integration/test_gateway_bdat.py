"""BDAT (RFC 3030 CHUNKING) through a real gateway, in raw sessions: chunks, exact byte
counts, no dot-unstuffing, refusals that still consume the chunk, a chunk over the size limit
dropped without being held, DATA and BDAT not mixed, a hang-up mid-chunk."""

from __future__ import annotations

from pathlib import Path

from conditions import eventually
from gateway_harness import ALICE, RawClient, running_gateway

HEADER = b"From: a@remote.test\r\nTo: alice@example.test\r\nSubject: chunks\r\n\r\n"


async def transaction(client: RawClient, mail_params: str = "") -> None:
    ehlo = await client.command("EHLO client.test")
    assert "250-CHUNKING\r\n" in ehlo
    assert "250-BINARYMIME\r\n" in ehlo
    assert "LIMITS RCPTMAX=100\r\n" in ehlo  # RFC 9422
    assert (await client.command(f"MAIL FROM:<a@remote.test>{mail_params}")).startswith("250")
    assert (await client.command(f"RCPT TO:<{ALICE}>")).startswith("250")


async def bdat(client: RawClient, chunk: bytes, *, last: bool = False) -> str:
    await client.send(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
    return (await client.reply()).rstrip("\r\n")


async def test_a_message_in_chunks_is_queued_byte_for_byte(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await transaction(client)
        # no dot-stuffing: a line "." and one "..x" are content; a chunk may end mid-line
        first = HEADER + b".\r\n..x\r\nBDAT 5\r\nmid"
        assert await bdat(client, first) == f"250 2.0.0 {len(first)} octets received"
        assert await bdat(client, b"dle\r\n") == "250 2.0.0 5 octets received"
        reply = await bdat(client, b"", last=True)  # BDAT 0 LAST is valid
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        # a second transaction on the same connection, with DATA this time
        assert (await client.command("MAIL FROM:<a@remote.test>")).startswith("250")
        assert (await client.command(f"RCPT TO:<{ALICE}>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        assert (await client.command(HEADER + b"second\r\n.")).startswith("250 2.0.0")
        await client.close()
        messages = await gw.messages()
        assert len(messages) == 2
        bodies = [await gw.body(m.id) for m in messages]
        stored = next(b for b in bodies if b"chunks" in b and b"middle" in b)
        assert stored.endswith(HEADER + b".\r\n..x\r\nBDAT 5\r\nmiddle\r\n")


async def test_pipelined_chunks_and_the_commands_behind_them(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        body = HEADER + b"pipelined\r\n"
        await client.send(
            f"MAIL FROM:<a@remote.test>\r\nRCPT TO:<{ALICE}>\r\nBDAT 10\r\n".encode()
            + body[:10] + f"BDAT {len(body) - 10} LAST\r\n".encode() + body[10:]
            + b"NOOP\r\n"
        )  # fmt: skip
        replies = [await client.reply() for _ in range(5)]
        assert [r[:3] for r in replies] == ["250", "250", "250", "250", "250"], replies
        assert replies[3].startswith("250 2.0.0 Ok: queued as ")
        await client.close()
        (stored,) = await gw.messages()
        assert (await gw.body(stored.id)).endswith(body)


async def test_a_refused_bdat_still_consumes_its_chunk(redis_url: str, tmp_path: Path) -> None:
    """RFC 3030 §2: the chunk's octets are read and dropped before the error, so none of
    them is taken for a command (a chunk that looks like a transaction queues nothing)."""
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        smuggled = f"MAIL FROM:<a@remote.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode()
        assert (await bdat(client, smuggled, last=True)).startswith("503 5.5.1")  # no MAIL
        assert (await client.command("MAIL FROM:<a@remote.test>")).startswith("250")
        assert (await bdat(client, smuggled)).startswith("503 5.5.1")  # no RCPT
        assert (await client.command("NOOP")).startswith("250")
        await client.close()
        assert await gw.messages() == []


async def test_a_chunk_over_the_size_limit_ends_the_transaction(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path, max_message_size="64KiB") as gw:
        client = await RawClient.connect(gw.mx)
        await transaction(client)
        assert (await bdat(client, HEADER)).startswith("250")
        held = gw.app.gateway.data_memory
        big = b"x" * 70_000 + b"\r\n"
        assert (await bdat(client, big)).startswith("552 5.3.4")
        assert held.held == 0  # dropped as it came, and the share given back
        assert held.peak < 64 * 1024
        # a chunk still in the pipeline after it: read, dropped, 503
        assert (await bdat(client, b"rest\r\n", last=True)).startswith("503 5.5.1")
        assert (await client.command("RSET")).startswith("250")
        await transaction_again(client)
        assert (await bdat(client, HEADER + b"small\r\n", last=True)).startswith("250 2.0.0")
        await client.close()
        assert len(await gw.messages()) == 1


async def transaction_again(client: RawClient) -> None:
    assert (await client.command("MAIL FROM:<a@remote.test>")).startswith("250")
    assert (await client.command(f"RCPT TO:<{ALICE}>")).startswith("250")


async def test_data_after_bdat_is_refused_and_bdat_after_last_has_no_transaction(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await transaction(client)
        assert (await bdat(client, HEADER)).startswith("250")
        assert (await client.command("DATA")).startswith("503 5.5.1")  # RFC 3030 §2
        assert (await bdat(client, b"end\r\n", last=True)).startswith("250 2.0.0 Ok: queued")
        assert (await bdat(client, b"more\r\n", last=True)).startswith("503 5.5.1")
        await client.close()
        assert len(await gw.messages()) == 1


async def test_bare_line_endings_are_refused_as_after_data(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await transaction(client)
        reply = await bdat(client, HEADER + b"bare\nline\r\n", last=True)
        assert reply.startswith("554 5.6.0"), reply
        await client.close()
        assert await gw.messages() == []


async def test_a_bad_bdat_line_closes_the_connection(redis_url: str, tmp_path: Path) -> None:
    """How many octets follow a malformed BDAT is unknown: rather than read them as
    commands, the session says 501 and hangs up."""
    async with running_gateway(redis_url, tmp_path) as gw:
        for line in ("BDAT", "BDAT -1", "BDAT 12 LATER", "BDAT 1" + "0" * 30, "BDAT x LAST"):
            client = await RawClient.connect(gw.mx)
            await transaction(client)
            await client.send(f"{line}\r\nMAIL FROM:<b@remote.test>\r\n".encode())
            assert (await client.reply()).startswith("501 5.5.4 Syntax: BDAT"), line
            assert await client.closed()
        assert await gw.messages() == []


async def test_a_hang_up_mid_chunk_queues_nothing_and_gives_memory_back(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await transaction(client)
        await client.send(b"BDAT 100000 LAST\r\n" + HEADER + b"x" * 5000)
        await client.close()
        memory = gw.app.gateway.data_memory

        async def settled() -> bool:
            return not gw.app.gateway.sessions and not memory.held

        await eventually(settled)
        assert await gw.messages() == []


BINARY = (
    HEADER.replace(b"\r\n\r\n", b"\r\nContent-Transfer-Encoding: binary\r\n\r\n")
    + bytes(range(256)) * 8
    + b"\r\n.\r\n\n\r"
)


async def test_binarymime_content_is_queued_byte_for_byte(redis_url: str, tmp_path: Path) -> None:
    """RFC 3030 §3: with BODY=BINARYMIME the body may hold any octet (NUL, bare CR and LF, a
    line "."), and the message is queued as sent, marked BINARYMIME for the hops after."""
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await transaction(client, " BODY=BINARYMIME")
        half = len(BINARY) // 2
        assert (await bdat(client, BINARY[:half])).startswith("250 2.0.0")
        assert (await bdat(client, BINARY[half:], last=True)).startswith("250 2.0.0 Ok: queued")
        await client.close()
        [info] = await gw.messages()
        assert info.envelope.body_type == "BINARYMIME"
        assert not info.envelope.crlf_checked  # binary: no lines to check
        assert (await gw.body(info.id)).endswith(BINARY)


async def test_binarymime_refuses_data_and_a_header_section_with_bare_line_ends(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await transaction(client, " BODY=BINARYMIME")
        # RFC 3030 §3: binary content cannot come by DATA; the transaction stays open
        assert (await client.command("DATA")).startswith("503 5.5.1 BODY=BINARYMIME")
        # binary is for the body: the header section is CRLF lines, or readers would split
        # its fields differently
        smuggled = b"From: a@remote.test\nBcc: x@example.test\r\nSubject: s\r\n\r\nbody"
        assert (await bdat(client, smuggled, last=True)).startswith("554 5.6.0")
        await client.close()
        assert await gw.messages() == []


async def test_the_envelope_says_what_the_gateway_checked_of_the_lines(
    redis_url: str, tmp_path: Path
) -> None:
    """Envelope.crlf_checked and dot_lines spare the worker a scan of the body before DATA:
    true only of what the gateway knows (DATA: both; BDAT: CRLF lines only, dots unknown;
    BINARYMIME: neither)."""
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await transaction(client)
        assert (await client.command("DATA")).startswith("354")
        assert (await client.command(HEADER + b"no dot here\r\nx.\r\n.")).startswith("250 2.0.0")
        await transaction_again(client)
        assert (await client.command("DATA")).startswith("354")
        assert (await client.command(HEADER + b"a\r\n..dotted\r\n.")).startswith("250 2.0.0")
        await transaction_again(client)
        assert (await bdat(client, HEADER + b"no dot\r\n", last=True)).startswith("250 2.0.0")
        await client.close()
        flags = {}
        for info in await gw.messages():
            body = await gw.body(info.id)
            flags[body.split(HEADER)[1]] = (info.envelope.crlf_checked, info.envelope.dot_lines)
        assert flags == {
            b"no dot here\r\nx.\r\n": (True, False),
            b"a\r\n.dotted\r\n": (True, True),
            b"no dot\r\n": (True, True),
        }
