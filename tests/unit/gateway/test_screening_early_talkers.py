"""The early-talker memory (screening/early_talkers.py) on a real Redis: remembered for the
block time (Redis's clock), one key per address, replicated but kept out of the AOF."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from conditions import eventually
from redis.asyncio import Redis
from redis_servers import RedisServer

from mailkube_core.redis_multiplexed import multiplexed
from mailkube_gateway.screening.early_talkers import EarlyTalkers


async def test_an_address_is_remembered_for_the_block_time(redis_url: str) -> None:
    redis = multiplexed(Redis.from_url(redis_url))
    talkers = EarlyTalkers(redis, "t", timedelta(milliseconds=300))
    try:
        assert not await talkers.remembered("192.0.2.1")
        await talkers.remember("192.0.2.1")
        assert await talkers.remembered("192.0.2.1")
        assert not await talkers.remembered("192.0.2.2")
        assert talkers.key("192.0.2.1") == "{t:early:192.0.2.1}"

        async def forgotten() -> bool:
            return not await talkers.remembered("192.0.2.1")

        await eventually(forgotten, timeout=5)
    finally:
        await redis.aclose()


async def test_the_memory_goes_to_replicas_but_not_into_the_aof(tmp_path: Path) -> None:
    primary = RedisServer(
        tmp_path / "primary", appendfsync="always", config={"repl-diskless-sync-delay": "0"}
    ).start()
    replica = RedisServer(
        tmp_path / "replica", config={"replicaof": f"127.0.0.1 {primary.port}"}
    ).start()
    try:
        redis = multiplexed(Redis.from_url(primary.url))
        await EarlyTalkers(redis, "t", timedelta(hours=1)).remember("192.0.2.1")
        await redis.set("durable", "yes")  # an ordinary write, for comparison
        await redis.aclose()
        with replica.client() as on_replica:

            async def replicated() -> bool:
                return bool(on_replica.get("durable") == b"yes")

            await eventually(replicated)
            assert on_replica.exists("{t:early:192.0.2.1}") == 1
            assert 0 < on_replica.pttl("{t:early:192.0.2.1}") <= 3600_000
        aof = b"".join(p.read_bytes() for p in (tmp_path / "primary").rglob("*.aof*"))
        assert b"durable" in aof
        assert b"{t:early:192.0.2.1}" not in aof
    finally:
        replica.stop()
        primary.stop()
