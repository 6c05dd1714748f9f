"""The memory of all sessions in DATA, together, under data_memory_limit, through a real
gateway: many big messages at once with a small limit; some get 452 4.3.1, the others are
queued whole, the process never holds more than the limit (its accounting), and the count
returns to 0 however the sessions end."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conditions import eventually
from gateway_harness import ALICE, RawClient, message, running_gateway

from mailkube_gateway.data_memory import DataMemory

SESSIONS = 8
BODY_LINES = 300  # of 1000 bytes with CRLF: ~300 KB per message, ~2.4 MB in all


async def in_data(port: int) -> RawClient:
    client = await RawClient.connect(port)
    for command in ("EHLO client.test", "MAIL FROM:<someone@remote.test>", f"RCPT TO:<{ALICE}>"):
        assert (await client.command(command))[0] == "2"
    assert (await client.command("DATA")).startswith("354")
    return client


def big_message(n: int) -> bytes:
    line = (f"{n}" * 998)[:998].encode() + b"\r\n"
    return message(subject=f"big {n}").encode() + line * BODY_LINES


async def test_many_big_messages_at_once_stay_within_the_limit(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(
        redis_url, tmp_path, max_message_size="1MiB", data_memory_limit="1MiB"
    ) as gw:
        memory: DataMemory = gw.app.gateway.data_memory
        clients = [await in_data(gw.mx) for _ in range(SESSIONS)]
        # every message but its end: together, more than the limit
        await asyncio.gather(*(c.send(big_message(n)) for n, c in enumerate(clients)))

        async def some_refused() -> bool:
            return memory.refusals > 0

        await eventually(some_refused)
        replies = await asyncio.gather(*(c.command(b".") for c in clients))
        refused = [r for r in replies if r.startswith("452 4.3.1 ")]
        accepted = [r for r in replies if r.startswith("250 2.0.0 ")]
        assert len(refused) + len(accepted) == SESSIONS, replies
        assert refused
        assert accepted
        assert len(refused) == memory.refusals
        # the accounting never passed the limit, and all is given back
        assert 0 < memory.peak <= memory.limit
        assert memory.held == 0
        # the accepted ones are queued whole; the refused sessions go on
        infos = await gw.messages()
        assert len(infos) == len(accepted)
        for info in infos:
            body = await gw.body(info.id)
            assert len(body) > BODY_LINES * 1000
        for client in clients:
            assert (await client.command("RSET")).startswith("250 2.0.0")
            await client.close()


async def test_the_count_returns_to_zero_however_a_session_ends(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        memory: DataMemory = gw.app.gateway.data_memory
        # a client that hangs up in the middle of its message
        client = await in_data(gw.mx)
        await client.send(big_message(1))

        async def holding() -> bool:
            return memory.held > 0

        async def released() -> bool:
            return memory.held == 0

        await eventually(holding)
        await client.close()
        await eventually(released)
        # a session the gateway drops (what a stop does once its grace is over)
        client = await in_data(gw.mx)
        await client.send(big_message(2))
        await eventually(holding)
        gw.app.gateway.abort_sessions()
        assert await client.closed()
        await eventually(released)
        # and a message that is queued
        client = await in_data(gw.mx)
        assert (await client.command(big_message(3) + b".")).startswith("250 2.0.0")
        assert memory.held == 0
        await client.close()
