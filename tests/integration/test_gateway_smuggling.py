"""SMTP smuggling probes (bare LF, LF.CRLF, CR.CRLF, bare CR...) never split one message into
two or start a second transaction; a whole pipelined transaction works."""

from __future__ import annotations

from pathlib import Path

import pytest
from gateway_harness import ALICE, BOB, RawClient, running_gateway

PROBES = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\n..\n"]


@pytest.mark.parametrize("probe", PROBES)
async def test_smuggled_second_message_is_never_queued(
    redis_url: str, tmp_path: Path, probe: bytes
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<someone@remote.test>")
        await client.command(f"RCPT TO:<{ALICE}>")
        assert (await client.command("DATA")).startswith("354")
        smuggled = (
            b"From: a@remote.test\r\n\r\nfirst" + probe
            + b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<" + BOB.encode() + b">\r\n"
            + b"DATA\r\nFrom: admin@example.test\r\n\r\nsmuggled\r\n.\r\n"
        )  # fmt: skip
        await client.send(smuggled)
        reply = await client.reply()
        # the only end of data is the final CRLF.CRLF, and the tainted message is refused
        assert reply.startswith("554 5.6.0"), reply
        assert (await client.command("NOOP")).startswith("250")
        await client.close()
        assert await gw.messages() == []


async def test_a_whole_pipelined_transaction_and_the_next_one(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        assert "PIPELINING" in await client.command("EHLO client.test")
        # RFC 2920: everything up to DATA in one write
        await client.send(
            f"MAIL FROM:<a@remote.test>\r\nRCPT TO:<{ALICE}>\r\nRCPT TO:<nobody@example.test>\r\n"
            f"RCPT TO:<{BOB}>\r\nDATA\r\n".encode()
        )
        replies = [await client.reply() for _ in range(5)]
        assert [r[:3] for r in replies] == ["250", "250", "550", "250", "354"]
        # the message, with the next transaction right behind its end
        await client.send(
            b"From: a@remote.test\r\n\r\n..dot\r\n.\r\n"
            + f"MAIL FROM:<b@remote.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode()
        )
        replies = [await client.reply() for _ in range(4)]
        assert [r[:3] for r in replies] == ["250", "250", "250", "354"]
        await client.send(b"From: b@remote.test\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
        assert (await client.reply()).startswith("221")
        await client.close()
        infos = await gw.messages()
        assert sorted(i.envelope.mail_from for i in infos) == ["a@remote.test", "b@remote.test"]
        first = next(i for i in infos if i.envelope.mail_from == "a@remote.test")
        assert [r.address for r in first.envelope.recipients] == [ALICE, BOB]
        assert (await gw.body(first.id)).endswith(b"\r\n\r\n.dot\r\n")


async def test_the_replies_to_a_pipelined_group_go_out_in_one_write(
    redis_url: str, tmp_path: Path
) -> None:
    """RFC 2920 §3.1: MAIL and RCPT replies wait while the next command of the group is
    already here; DATA's 354 takes them all out together."""
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        (session,) = gw.app.gateway.sessions
        writes: list[bytes] = []
        write = session.writer.write

        def counted(data: bytes) -> None:
            writes.append(bytes(data))
            write(data)

        session.writer.write = counted  # type: ignore[method-assign]
        await client.send(
            f"MAIL FROM:<a@remote.test>\r\nRCPT TO:<{ALICE}>\r\nRCPT TO:<nobody@example.test>\r\n"
            f"RCPT TO:<{BOB}>\r\nDATA\r\n".encode()
        )
        replies = [await client.reply() for _ in range(5)]
        assert [r[:3] for r in replies] == ["250", "250", "550", "250", "354"]
        assert len(writes) == 1, writes
        # one command at a time: one write each
        await client.send(b"From: a@remote.test\r\n\r\nbody\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
        assert (await client.command("MAIL FROM:<b@remote.test>")).startswith("250")
        assert len(writes) == 3
        await client.close()
