"""smtp_chunking.py, the one module using aiosmtplib below its documented API: a drift test
(a real aiosmtplib session to an in-memory loopback server, BDAT through the protocol's
`write` and `read_response`), and the pure helpers for CHUNKING and LIMITS."""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from mailkube_core.queue import Recipient
from mailkube_worker.remote import split_recipients
from mailkube_worker.smtp_chunking import bdat_last, crlf_lines, data, dot_stuffed
from mailkube_worker.smtp_client import limits


def test_the_protocol_methods_bdat_uses_are_there() -> None:
    """What smtp_chunking.py relies on; a release that changes it fails here (and the
    pyproject range keeps such a release out until this module is adapted)."""
    assert version("aiosmtplib").startswith("5.1."), "pyproject pins aiosmtplib>=5.1.3,<5.2"
    assert list(inspect.signature(SMTPProtocol.write).parameters) == ["self", "data"]
    read = inspect.signature(SMTPProtocol.read_response)
    assert list(read.parameters) == ["self", "timeout"]
    assert inspect.iscoroutinefunction(SMTPProtocol.read_response)
    assert aiosmtplib.SMTP().protocol is None  # set by connect, None while not connected


async def test_bdat_last_over_a_real_session_gets_the_reply_of_the_chunk() -> None:
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        while line := await reader.readline():
            if line.startswith(b"BDAT"):
                got.append(await reader.readexactly(int(line.split()[1])))
                # the reply in two segments: read_response must join them
                writer.write(b"250-2.0.0 first\r\n")
                await writer.drain()
                await asyncio.sleep(0)
                writer.write(b"250 2.0.0 taken\r\n")
            elif line.startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
            else:
                writer.write(b"250-x\r\n250 CHUNKING\r\n")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    try:
        await smtp.connect()
        await smtp.ehlo()
        for body in (b"one\r\n.two\r\n", b"", b"x" * 200_000 + b"\r\n"):
            reply = await bdat_last(smtp, body, 10)
            assert (reply.code, reply.message) == (250, "2.0.0 first\n2.0.0 taken")
        assert got == [b"one\r\n.two\r\n", b"", b"x" * 200_000 + b"\r\n"]
        # the session is still in step: an ordinary command after it gets its own reply
        assert (await smtp.execute_command(b"NOOP")).code == 250
        await smtp.quit()
    finally:
        smtp.close()
        server.close()


def test_crlf_lines_keeps_crlf_bodies_and_fixes_bare_line_ends() -> None:
    body = b"a\r\nb\r\n"
    assert crlf_lines(body) is body
    assert crlf_lines(b"a\nb\rc\r\n") == b"a\r\nb\r\nc\r\n"


def test_limits_parses_rcptmax_and_ignores_what_does_not_parse() -> None:
    assert limits("RCPTMAX=50 MAILMAX=1000") == {"RCPTMAX": 50, "MAILMAX": 1000}
    assert limits("rcptmax=3 FOO BAR=x RCPTMAX2=0 X=-1") == {"RCPTMAX": 3}
    assert limits("") == {}


def test_split_recipients_at_the_peers_rcptmax() -> None:
    recipients = [(n, Recipient(address=f"r{n}@x.test")) for n in range(5)]
    assert split_recipients(recipients, None) == [recipients]
    assert split_recipients(recipients, 5) == [recipients]
    assert [[i for i, _ in chunk] for chunk in split_recipients(recipients, 2)] == [
        [0, 1], [2, 3], [4],
    ]  # fmt: skip


def test_dot_stuffed_doubles_leading_dots_and_ends_the_data() -> None:
    assert dot_stuffed(b".a\r\nb\r\n..c\r\n.\r\n") == b"..a\r\nb\r\n...c\r\n..\r\n.\r\n"
    assert dot_stuffed(b"") == b".\r\n"


async def test_data_over_a_real_session_stuffs_and_returns_the_final_reply() -> None:
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        while line := await reader.readline():
            if line == b"DATA\r\n":
                writer.write(b"354 go on\r\n")
                await writer.drain()
                lines = []
                while (part := await reader.readline()) != b".\r\n":
                    lines.append(part)
                got.append(b"".join(lines))
                writer.write(b"250 2.0.0 taken\r\n")
            elif line.startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    try:
        await smtp.connect()
        await smtp.ehlo()
        reply = await data(smtp, b".one\r\ntwo\r\n", 10)
        assert (reply.code, reply.message) == (250, "2.0.0 taken")
        assert got == [b"..one\r\ntwo\r\n"]
        assert (await smtp.execute_command(b"NOOP")).code == 250
        await smtp.quit()
    finally:
        smtp.close()
        server.close()
