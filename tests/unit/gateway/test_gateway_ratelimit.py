"""The shared limits (ratelimit.py) on a real Redis: GCRA rates, the quota asked beside the
recipient's rate, connection leases; where their state is kept (replicas, not the AOF).
The connection they share: tests/unit/core/test_redis_multiplexed.py."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conditions import eventually
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis_servers import RedisServer

from mailkube_core.mailbox import BYTES_FIELD, mailbox_key
from mailkube_core.redis_multiplexed import multiplexed
from mailkube_gateway.ratelimit import Limits, SenderRate


async def test_scripts_are_loaded_when_redis_does_not_know_them(redis_url: str) -> None:
    client = multiplexed(Redis.from_url(redis_url))
    limits = Limits(client, f"t{uuid.uuid4().hex[:6]}")
    try:
        assert await limits.allow_message("sender", "a", 10)
        await client.script_flush()  # e.g. a Redis restarted without its script cache
        assert await limits.allow_message("sender", "a", 10)
    finally:
        await client.aclose()


async def test_gcra_allows_a_minutes_burst_then_refuses(redis_url: str) -> None:
    limits = Limits(multiplexed(Redis.from_url(redis_url)), "t")
    try:
        assert [await limits.allow_message("sender", "1.2.3.4", 3) for _ in range(4)] == [
            True,
            True,
            True,
            False,
        ]
        # each identity has its own
        assert await limits.allow_message("sender", "5.6.7.8", 3)
    finally:
        await limits.redis.aclose()


async def test_a_recipient_refused_for_its_quota_is_not_counted_against_its_rate(
    redis_url: str,
) -> None:
    limits = Limits(multiplexed(Redis.from_url(redis_url)), "t")
    try:
        await limits.redis.hset(mailbox_key("t", "full@x.test"), BYTES_FIELD, 5000)
        for _ in range(3):
            assert await verdict(limits, "full@x.test", 2, 1000) == (True, False)
        await limits.redis.hset(mailbox_key("t", "full@x.test"), BYTES_FIELD, 10)
        # the two messages a minute are all still there
        assert await verdict(limits, "full@x.test", 2, 1000) == (True, True)
        assert await verdict(limits, "full@x.test", 2, 1000) == (True, True)
        assert await verdict(limits, "full@x.test", 2, 1000) == (False, True)
        # no quota: no mailbox read, only the rate
        assert await verdict(limits, "free@x.test", 1, None) == (True, True)
        assert await verdict(limits, "free@x.test", 1, None) == (False, True)
    finally:
        await limits.redis.aclose()


async def verdict(
    limits: Limits,
    address: str,
    per_minute: int,
    quota: int | None,
    sender: SenderRate | None = None,
) -> tuple[bool, ...]:
    """(rate ok, under quota), and sender ok when a sender is asked about."""
    answer = await limits.admit_recipient(address, per_minute, quota, sender)
    if sender is None:
        return answer.rate_ok, answer.under_quota
    return answer.rate_ok, answer.under_quota, answer.sender_ok


async def test_the_senders_rate_is_asked_with_the_first_recipient_and_refunded_with_it(
    redis_url: str,
) -> None:
    limits = Limits(multiplexed(Redis.from_url(redis_url)), "t")
    bob = SenderRate("bob@x.test", 2)
    try:
        await limits.redis.hset(mailbox_key("t", "full@x.test"), BYTES_FIELD, 5000)
        # a recipient refused (quota) gives the sender's count back: bob still has two
        for _ in range(3):
            assert await verdict(limits, "full@x.test", 5, 1000, bob) == (True, False, True)
        assert await verdict(limits, "a@x.test", 5, None, bob) == (True, True, True)
        assert await verdict(limits, "b@x.test", 5, None, bob) == (True, True, True)
        # bob over his rate: the recipient's count is given back, so c@ still has its one
        assert await verdict(limits, "c@x.test", 1, None, bob) == (True, True, False)
        assert await verdict(limits, "c@x.test", 1, None) == (True, True)
        assert await verdict(limits, "c@x.test", 1, None) == (False, True)
    finally:
        await limits.redis.aclose()


async def test_two_processes_lent_a_busy_rate_admit_no_more_than_its_burst(
    redis_url: str,
) -> None:
    """Loans (rate_loans.py) save round trips, never messages: the two processes together
    admit what the GCRA allows, and what one holds unused the other gets once it is given
    back."""
    prefix = f"t{uuid.uuid4().hex[:6]}"
    first = Limits(multiplexed(Redis.from_url(redis_url)), prefix)
    second = Limits(multiplexed(Redis.from_url(redis_url)), prefix)
    per_minute = 64  # one every 937.5 ms; loans of up to 8
    started = time.monotonic()
    try:
        assert all([await first.allow_message("rcpt", "a@x.test", per_minute) for _ in range(40)])
        held = first.loans.held(f"{{{prefix}:rl:rcpt:a@x.test}}")
        assert held > 0
        second_got = 0
        while await second.allow_message("rcpt", "a@x.test", per_minute):
            second_got += 1
        await first.close()  # e.g. SIGTERM: what it held goes back
        after_return = 0
        while await second.allow_message("rcpt", "a@x.test", per_minute):
            after_return += 1
        regained = (time.monotonic() - started) / 0.9375 + 1
        assert after_return >= held
        assert per_minute <= 40 + second_got + after_return <= per_minute + regained
    finally:
        await second.close()
        await first.redis.aclose()
        await second.redis.aclose()


async def test_connection_leases_are_counted_and_released(redis_url: str) -> None:
    limits = Limits(multiplexed(Redis.from_url(redis_url)), "t")
    lease = timedelta(minutes=1)
    try:
        assert await limits.acquire_connection("10.0.0.1", "a", 2, lease)
        assert await limits.acquire_connection("10.0.0.1", "b", 2, lease)
        assert not await limits.acquire_connection("10.0.0.1", "c", 2, lease)
        # a held lease is renewed, not counted twice
        assert await limits.acquire_connection("10.0.0.1", "a", 2, lease)
        await limits.release_connection("10.0.0.1", "a")
        assert await limits.acquire_connection("10.0.0.1", "c", 2, lease)
        # an address's idle slots go back in one command (connection_slots.py)
        await limits.release_connection("10.0.0.1", "b", "c")
        assert await limits.acquire_connection("10.0.0.1", "d", 2, lease)
        assert await limits.acquire_connection("10.0.0.1", "e", 2, lease)
    finally:
        await limits.redis.aclose()


async def test_connection_slots_run_on_the_real_lease_set(redis_url: str) -> None:
    """Limits wires ConnectionSlots to the scripts: a reused slot is the same member, and
    close() empties the set."""
    redis = Redis.from_url(redis_url)
    limits = Limits(multiplexed(Redis.from_url(redis_url)), "t")
    slots = limits.connection_slots
    try:
        first = await slots.take("10.0.0.9", 1, 60.0)
        assert first is not None
        assert await slots.take("10.0.0.9", 1, 60.0) is None  # the limit, from Redis
        slots.give_back("10.0.0.9", first)
        assert await slots.take("10.0.0.9", 1, 60.0) == first
        assert await redis.zrange("{t:conn:10.0.0.9}", 0, -1) == [first.id.encode()]
        slots.give_back("10.0.0.9", first)
        await limits.close()
        assert await redis.zcard("{t:conn:10.0.0.9}") == 0
        # more idle slots than Lua's unpack() takes at once (~8,000) still go back
        many = [f"s{n}" for n in range(9000)]
        await redis.zadd("{t:conn:10.0.0.9}", dict.fromkeys(many, 2**40))
        await limits._release_slots("10.0.0.9", many)
        assert await redis.zcard("{t:conn:10.0.0.9}") == 0
    finally:
        await limits.redis.aclose()
        await redis.aclose()


async def test_limit_state_goes_to_replicas_but_not_into_the_aof(tmp_path: Path) -> None:
    primary = RedisServer(
        tmp_path / "primary", appendfsync="always", config={"repl-diskless-sync-delay": "0"}
    ).start()
    replica = RedisServer(
        tmp_path / "replica", config={"replicaof": f"127.0.0.1 {primary.port}"}
    ).start()
    try:
        limits = Limits(multiplexed(Redis.from_url(primary.url)), "t")
        assert await limits.allow_message("sender", "1.2.3.4", 10)
        assert await limits.acquire_connection("1.2.3.4", "c1", 5, timedelta(minutes=1))
        await limits.redis.set("durable", "yes")  # an ordinary write, for comparison
        await limits.redis.aclose()
        with replica.client() as on_replica:
            await eventually(_async(lambda: on_replica.get("durable") == b"yes"))
            assert on_replica.exists("{t:rl:sender:1.2.3.4}", "{t:conn:1.2.3.4}") == 2
        aof = b"".join(p.read_bytes() for p in (tmp_path / "primary").rglob("*.aof*"))
        assert b"durable" in aof
        assert b"{t:rl:sender:1.2.3.4}" not in aof
        assert b"{t:conn:1.2.3.4}" not in aof
    finally:
        replica.stop()
        primary.stop()


def _async(check: Any) -> Any:
    async def probe() -> bool:
        return bool(check())

    return probe


@pytest.mark.cluster
async def test_limits_on_a_redis_cluster(redis_cluster: Any) -> None:
    cluster = ClusterClient.from_url(redis_cluster.url)
    assert multiplexed(cluster) is cluster  # the shared connection is for standalone Redis
    prefix = f"c{uuid.uuid4().hex[:6]}"
    limits = Limits(cluster, prefix)
    try:
        assert await limits.allow_message("sender", "1.2.3.4", 1)
        assert not await limits.allow_message("sender", "1.2.3.4", 1)
        await cluster.hset(mailbox_key(prefix, "a@x.test"), BYTES_FIELD, 50)
        # rate and mailbox live in different slots
        assert await verdict(limits, "a@x.test", 5, 10) == (True, False)
        assert await verdict(limits, "a@x.test", 5, 100) == (True, True)
        assert await limits.acquire_connection("1.2.3.4", "x", 1, timedelta(minutes=1))
        assert not await limits.acquire_connection("1.2.3.4", "y", 1, timedelta(minutes=1))
        await limits.release_connection("1.2.3.4", "x")
        assert await limits.acquire_connection("1.2.3.4", "y", 1, timedelta(minutes=1))
    finally:
        await cluster.aclose()
