"""The multiplexed hot-path client (mailkube_core/redis_multiplexed.py) on a real Redis and on
a recorded transport: replies matched in order down one connection, errors to their callers,
requests held back for company, deadlines, READONLY after a failover, one attempt to reconnect.
Its drift against redis-py's internals: test_redis_multiplexed_drift.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from conditions import eventually
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis_servers import RedisServer

from mailkube_core.redis_multiplexed import LATER, MultiplexedRedis, _Connection, multiplexed

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
    connection = client.shared_connection
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


def _async(check: Any) -> Any:
    async def probe() -> bool:
        return bool(check())

    return probe


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


class _AbortableTransport(_RecordingTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def _connection(timeout: float) -> tuple[_Connection, _AbortableTransport]:
    transport = _AbortableTransport()
    loop = asyncio.get_running_loop()
    writer = asyncio.StreamWriter(transport, asyncio.Protocol(), None, loop)
    return _Connection(writer, timeout), transport


async def test_a_request_without_a_reply_in_time_fails_every_request_and_drops_the_connection(
) -> None:  # fmt: skip
    connection, transport = _connection(timeout=0.5)
    loop = asyncio.get_running_loop()
    first = connection.send(b"GET a\r\n", loop)
    await asyncio.sleep(0.25)
    second = connection.send(b"GET b\r\n", loop)
    started = time.monotonic()
    with pytest.raises(RedisTimeoutError, match=r"did not answer within 0\.5s"):
        await first
    with pytest.raises(RedisTimeoutError):  # behind the first: no reply could come before
        await second
    assert time.monotonic() - started < 0.5  # before its own deadline
    assert transport.aborted
    assert connection.closed
    # nothing more goes down a dropped connection
    with pytest.raises(RedisConnectionError):
        await connection.send(b"GET c\r\n", loop)


async def test_a_readonly_reply_drops_the_connection_for_one_to_the_new_primary() -> None:
    """READONLY: the primary was demoted by a failover. The request gets it, those behind it
    fail too, and the connection is dropped so that the next request opens a new one."""
    connection, transport = _connection(timeout=5)
    loop = asyncio.get_running_loop()
    write = connection.send(b"EVALSHA x 1 k\r\n", loop)
    behind = connection.send(b"GET a\r\n", loop)
    connection.data_received(b"-READONLY You can't write against a read only replica.\r\n")
    with pytest.raises(ReadOnlyError):
        await write
    with pytest.raises(RedisConnectionError, match="replica now"):
        await behind
    assert transport.aborted
    assert connection.closed


async def test_replies_in_time_keep_the_connection() -> None:
    connection, transport = _connection(timeout=0.5)
    loop = asyncio.get_running_loop()
    for n in range(3):  # replies that take a while, each within its request's deadline
        pending = connection.send(b"GET a\r\n", loop)
        await asyncio.sleep(0.2)
        connection.data_received(f"$1\r\n{n}\r\n".encode())
        assert await pending == str(n).encode()
    # the watchdog, set for the first request, finds nothing waiting and is done
    await eventually(_async(lambda: connection.watchdog is None), timeout=2)
    assert not transport.aborted
    assert not connection.closed


async def test_every_request_meanwhile_shares_one_attempt_to_open_the_connection(
    private_redis: RedisServer,
) -> None:
    """With Redis frozen, opening the connection hangs in redis-py's handshake: the requests
    that wait for it fail together when it times out, not one deadline after another."""
    client = multiplexed(Redis.from_url(private_redis.url, socket_timeout=0.5))
    assert isinstance(client, MultiplexedRedis)
    try:
        private_redis.freeze()
        try:
            started = time.monotonic()
            replies = await asyncio.gather(
                *(client.get(f"k{n}") for n in range(5)), return_exceptions=True
            )
            assert time.monotonic() - started < 0.5 + 1.0
            assert all(isinstance(reply, RedisTimeoutError) for reply in replies), replies
        finally:
            private_redis.thaw()
        with private_redis.client() as plain:
            plain.set("back", "1")
        assert await client.get("back") == b"1"
    finally:
        await client.aclose()


async def test_a_transaction_goes_down_the_shared_connection_whole(redis_url: str) -> None:
    """MULTI, its commands and EXEC are queued in one go: another session's commands of the
    same turn go before or after, never inside (Redis would queue them in the transaction)."""
    client = multiplexed(Redis.from_url(redis_url))
    assert isinstance(client, MultiplexedRedis)
    try:
        await client.get("warm")  # opens the shared connection
        others = [client.get(f"other{n}") for n in range(20)]
        both = await asyncio.gather(
            *others[:10],
            client.multi_exec(
                [("HSET", "tx", "body", b"\x00\r\n" * 1000), ("ZADD", "txz", 1, "m")]
            ),
            *others[10:],
        )
        assert both[10] == [1, 1]
        assert both[:10] == both[11:] == [None] * 10  # plain replies, not QUEUED
        with redis.Redis.from_url(redis_url) as plain:
            assert plain.hget("tx", "body") == b"\x00\r\n" * 1000
            assert plain.zscore("txz", "m") == 1
            plain.set("astring", "x")
        # an error at EXEC (a command on the wrong type) is raised; the rest ran (no rollback)
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await client.multi_exec([("HSET", "astring", "f", "v"), ("SET", "ran", "1")])
        assert await client.get("ran") == b"1"
        # a command refused while queued aborts the whole: nothing ran
        with pytest.raises(ResponseError, match="wrong number of arguments"):
            await client.multi_exec([("SET", "aborted", "1"), ("HSET", "odd")])
        assert await client.get("aborted") is None
        # the connection is fit for what comes next
        assert await client.get("ran") == b"1"
        assert client.shared_connection is not None
        assert not client.shared_connection.closed
    finally:
        await client.aclose()
