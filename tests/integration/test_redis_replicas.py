"""enqueue_replicas at the gateway: a 250 only once a replica holds the message; too few
acknowledgements within enqueue_replicas_timeout get 451 4.3.0, never a 250."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from aiosmtplib import SMTPDataError
from conditions import eventually
from gateway_harness import ALICE, message, running_gateway
from redis.asyncio import Redis
from redis_servers import RedisServer

from mailkube_core.queue.keys import PartitionKeys


async def linked(primary: Redis, replicas: int) -> bool:
    info = await primary.info("replication")
    online = [k for k, v in info.items() if k.startswith("slave") and "online" in str(v)]
    return len(online) == replicas


async def test_gateway_answers_250_once_a_replica_holds_the_message_else_451(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    replica = RedisServer(
        tmp_path / "replica", config={"replicaof": f"127.0.0.1 {private_redis.port}"}
    )
    replica.start()
    primary = Redis.from_url(private_redis.url)
    try:
        await eventually(lambda: linked(primary, 1), timeout=20)
        async with running_gateway(
            private_redis.url,
            tmp_path,
            enqueue_replicas=1,
            redis_timeout="3s",
            enqueue_replicas_timeout="0.5s",
        ) as gw:
            async with gw.client(gw.mx) as client:
                errors, _ = await client.sendmail("x@remote.test", [ALICE], message())
                assert errors == {}, errors
            (info,) = await gw.messages()
            copy = replica.client()
            try:
                assert copy.exists(PartitionKeys("mailkube", 0).message(info.id)) == 1
            finally:
                copy.close()

            replica.stop()
            await eventually(lambda: linked(primary, 0), timeout=20)
            async with gw.client(gw.mx) as client:
                await client.ehlo()
                await client.mail("x@remote.test")
                await client.rcpt(ALICE)
                started = time.monotonic()
                with pytest.raises(SMTPDataError) as refused:
                    await client.data(message(subject="no replica"))
                waited = time.monotonic() - started
    finally:
        replica.stop()
        await primary.aclose()
    assert (refused.value.code, refused.value.message[:5]) == (451, "4.3.0"), refused.value
    assert waited >= 0.5  # it waited for the replica, then refused
