"""The shared limits (ratelimit.py) on a real Redis: GCRA rates, the quota asked beside the
recipient's rate, connection leases; where their state is kept (replicas, not the AOF); and the
one connection that the hot path of every session shares."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from conditions import eventually
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis_servers import RedisServer

from mailkube_core.mailbox import BYTES_FIELD, mailbox_key
from mailkube_gateway.ratelimit import (
    LATER,
    Limits,
    MultiplexedRedis,
    SenderRate,
    _Connection,
    multiplexed,
)

# spins for ARGV[1] microseconds of Redis time (a command that is surely in flight)
_SPIN = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat
  local n = redis.call('TIME')
until n[1] * 1000000 + n[2] - start > tonumber(ARGV[1])
return 'done'
"""


def client_count(url: str) -> int:
    with redis.Redis.from_url(url) as plain:
        return len(plain.client_list())


async def test_every_caller_gets_its_own_reply_down_one_connection(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as plain:
        for n in range(300):
            plain.set(f"k{n}", f"v{n}")
            plain.hset(f"h{n}", "f", f"w{n}")
    before = client_count(redis_url)
    client = multiplexed(Redis.from_url(redis_url))
    assert isinstance(client, MultiplexedRedis)
    try:
        gets = [client.get(f"k{n}") for n in range(300)]
        hgets = [client.hget(f"h{n}", "f") for n in range(300)]
        replies = await asyncio.gather(*gets, *hgets)
        assert replies == [f"v{n}".encode() for n in range(300)] + [
            f"w{n}".encode() for n in range(300)
        ]
        # 600 commands at once, and one connection more than before
        assert client_count(redis_url) == before + 1
        # commands outside the hot path take the pool as usual
        assert await client.set("other", "x") is True
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_a_client_that_decodes_replies_keeps_the_pool(redis_url: str) -> None:
    decoding = Redis.from_url(redis_url, decode_responses=True)
    assert multiplexed(decoding) is decoding
    await decoding.aclose()


async def test_an_error_reply_goes_to_its_caller_only(redis_url: str) -> None:
    client = multiplexed(Redis.from_url(redis_url))
    try:
        await client.set("text", "value")
        wrong, right = await asyncio.gather(
            client.hget("text", "f"), client.get("text"), return_exceptions=True
        )
        assert isinstance(wrong, ResponseError)
        assert "WRONGTYPE" in str(wrong)
        assert right == b"value"
        # and the connection carries on
        assert await client.get("text") == b"value"
    finally:
        await client.aclose()


async def test_scripts_are_loaded_when_redis_does_not_know_them(redis_url: str) -> None:
    client = multiplexed(Redis.from_url(redis_url))
    limits = Limits(client, f"t{uuid.uuid4().hex[:6]}")
    try:
        assert await limits.allow_message("sender", "a", 10)
        await client.script_flush()  # e.g. a Redis restarted without its script cache
        assert await limits.allow_message("sender", "a", 10)
    finally:
        await client.aclose()


async def test_a_lost_connection_fails_what_is_in_flight_and_the_next_call_reconnects(
    private_redis: RedisServer,
) -> None:
    client = multiplexed(Redis.from_url(private_redis.url))
    assert isinstance(client, MultiplexedRedis)
    try:
        sha = await client.script_load(_SPIN)
        spinning = asyncio.ensure_future(client.evalsha(sha, 0, 5_000_000))
        await eventually(lambda: _in_flight(client))
        private_redis.kill()
        with pytest.raises(RedisConnectionError):
            await spinning
        with pytest.raises(RedisConnectionError):
            await client.get("anything")
        private_redis.restart()
        with private_redis.client() as plain:
            plain.set("back", "1")
        assert await client.get("back") == b"1"
    finally:
        await client.aclose()


async def _in_flight(client: MultiplexedRedis) -> bool:
    connection = client._connection
    return connection is not None and bool(connection.waiting)


async def test_a_caller_that_gives_up_leaves_the_others_their_replies(redis_url: str) -> None:
    client = multiplexed(Redis.from_url(redis_url))
    try:
        sha = await client.script_load(_SPIN)
        await client.set("after", "ok")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await client.evalsha(sha, 0, 300_000)
        # the abandoned reply arrives first and is dropped; this one still gets its own
        assert await client.get("after") == b"ok"
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
    finally:
        await limits.redis.aclose()


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


class _RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _OwnHandles:
    """An event loop as uvloop is one: its timer handles are not asyncio.TimerHandle."""

    class Handle:
        def __init__(self, inner: asyncio.TimerHandle) -> None:
            self.inner = inner

        def cancel(self) -> None:
            self.inner.cancel()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def create_future(self) -> asyncio.Future[Any]:
        return self.loop.create_future()

    def call_soon(self, callback: Any) -> Any:
        return _OwnHandles.Handle(self.loop.call_soon(callback))  # type: ignore[arg-type]

    def call_later(self, delay: float, callback: Any) -> Any:
        return _OwnHandles.Handle(self.loop.call_later(delay, callback))


@pytest.mark.parametrize("own_handles", [False, True], ids=["asyncio", "own-handle-classes"])
async def test_a_request_nobody_waits_for_goes_out_with_the_next_urgent_one(
    own_handles: bool,
) -> None:
    real_loop = asyncio.get_running_loop()
    loop: Any = _OwnHandles(real_loop) if own_handles else real_loop
    transport = _RecordingTransport()
    writer = asyncio.StreamWriter(transport, asyncio.Protocol(), None, real_loop)
    connection = _Connection(writer)

    async def turns(count: int) -> None:
        for _ in range(count):
            await asyncio.sleep(0)

    connection.send(b"release\r\n", loop, urgent=False)
    await turns(3)
    assert transport.writes == []  # held back, for company
    connection.send(b"check-1\r\n", loop)
    connection.send(b"check-2\r\n", loop)
    await turns(1)
    assert transport.writes == [b"release\r\ncheck-1\r\ncheck-2\r\n"]  # one write, in order
    # alone, it still goes out, LATER seconds on
    connection.send(b"release\r\n", loop, urgent=False)
    await eventually(_async(lambda: len(transport.writes) == 2), timeout=LATER * 20)
    assert transport.writes[1] == b"release\r\n"
