"""Drift test for redis_multiplexed.py: fails when a redis-py release (or hiredis, or Python's
asyncio) changes what the adapter relies on, before the gateway's hot path can misbehave in
production. Each item of the module docstring's "Relied on" list is checked here, by name and
signature, and then by a round trip through the adapter against a real redis-server."""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hiredis
import pytest
from conditions import eventually
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from redis._parsers.base import BaseParser
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import InvalidResponse, NoScriptError, ReadOnlyError, ResponseError
from redis_servers import RedisServer

from mailkube_core.redis_multiplexed import MULTIPLEXED, MultiplexedRedis, multiplexed, socket_of

PYPROJECT = Path(__file__).parents[3] / "core" / "pyproject.toml"


def _pinned() -> SpecifierSet:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (spec,) = [d for d in dependencies if d.startswith("redis[") or d.startswith("redis>")]
    return SpecifierSet(spec.split("]", 1)[-1].split(";")[0].strip())


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_the_installed_redis_py_is_in_the_pinned_range_and_the_range_is_closed() -> None:
    pinned = _pinned()
    assert Version(version("redis")) in pinned
    assert any(s.operator in ("<", "<=", "==", "~=") for s in pinned), (
        "an open range lets a release that changes the internals in unnoticed"
    )


def test_parse_error_still_maps_an_error_reply_to_redis_pys_exceptions() -> None:
    assert isinstance(inspect.getattr_static(BaseParser, "parse_error"), classmethod)
    assert _parameters(BaseParser.parse_error) == ["response"]
    noscript = BaseParser.parse_error("NOSCRIPT No matching script. Please use EVAL.")
    assert isinstance(noscript, NoScriptError)
    readonly = BaseParser.parse_error("READONLY You can't write against a read only replica.")
    assert isinstance(readonly, ReadOnlyError)
    assert str(readonly) == "You can't write against a read only replica."
    other = BaseParser.parse_error("WRONGTYPE Operation against a key holding the wrong kind")
    assert type(other) is ResponseError
    assert "WRONGTYPE" in str(other)


def test_hiredis_still_parses_with_redis_pys_errors_and_packs_commands() -> None:
    reader = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
    reader.feed(b"-READONLY gone\r\n$2\r\nok\r\n:7\r\n*2\r\n$1\r\na\r\n$-1\r\n")
    error = reader.gets()
    assert isinstance(error, ReadOnlyError)  # returned, not raised: one reply among others
    assert reader.gets() == b"ok"
    assert reader.gets() == 7
    assert reader.gets() == [b"a", None]
    assert reader.gets() is False  # nothing more yet
    reader.feed(b"?\r\n")
    with pytest.raises(InvalidResponse):
        reader.gets()
    assert hiredis.pack_command(("EVALSHA", "abc", 1, "k", b"\x00v")) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n$1\r\nk\r\n$2\r\n\x00v\r\n"
    )


def test_the_connection_api_the_handover_uses_is_still_there() -> None:
    assert _parameters(ConnectionPool.make_connection) == ["self"]
    assert _parameters(AbstractConnection.connect) == ["self"]
    disconnect = inspect.signature(AbstractConnection.disconnect).parameters
    assert "nowait" in disconnect
    assert _parameters(Redis.execute_command) == ["self", "args", "options"]
    assert _parameters(Redis.aclose)[:2] == ["self", "close_connection_pool"]
    assert _parameters(Redis.from_pool) == ["connection_pool"]
    # the streams connect() leaves, which the adapter takes, and disconnect() closes
    for method in (AbstractConnection.disconnect, Connection._connect):
        source = inspect.getsource(method)
        assert "_writer" in source, method
    assert "self._reader" in inspect.getsource(Connection._connect)
    # through Sentinel, the pool's connections ask the sentinels where to connect in connect()
    assert "connect" in vars(SentinelManagedConnection)
    assert SentinelConnectionPool.make_connection is ConnectionPool.make_connection


async def test_the_command_methods_go_through_execute_command() -> None:
    """MultiplexedRedis overrides execute_command only: the hot path's commands must reach it
    with their arguments as Redis gets them, and redis-py must apply nothing to the reply."""
    calls: list[tuple[Any, ...]] = []

    class Recording(Redis):
        async def execute_command(self, *args: Any, **options: Any) -> Any:
            calls.append(args)
            return b"reply"

    client = Recording()
    replies = [
        await client.evalsha("sha", 1, "k", "a"),
        await client.get("k"),
        await client.hget("h", "f"),
        await client.zrem("z", "m"),
    ]
    assert replies == [b"reply"] * 4
    assert calls == [("EVALSHA", "sha", 1, "k", "a"), ("GET", "k"), ("HGET", "h", "f"),
                     ("ZREM", "z", "m")]  # fmt: skip
    assert {call[0] for call in calls} == MULTIPLEXED
    for protocol in (2, 3):
        callbacks = Redis(protocol=protocol).response_callbacks
        assert not MULTIPLEXED & {str(name).upper() for name in callbacks}, protocol


async def test_asyncio_stream_reader_still_keeps_its_unread_bytes_in_buffer() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"+OK\r\n")
    assert bytes(reader._buffer) == b"+OK\r\n"  # type: ignore[attr-defined]


async def test_a_connection_made_for_the_handover_takes_no_slot_of_the_pool(redis_url: str) -> None:
    """The shared connection comes from make_connection, outside the pool's count: a full
    blocking pool (redis_max_connections) must still hand out all of its own."""
    pool = BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=1)
    taken = pool.make_connection()
    try:
        await taken.connect()
        async with asyncio.timeout(0.5):
            own = await pool.get_connection()
        await pool.release(own)
    finally:
        await taken.disconnect()
        await pool.aclose()


async def test_socket_of_tells_a_connections_sockets_apart(redis_url: str) -> None:
    pool = ConnectionPool.from_url(redis_url)
    connection = pool.make_connection()
    try:
        assert socket_of(connection) is None  # not connected
        await connection.connect()
        first = socket_of(connection)
        assert isinstance(first, asyncio.StreamWriter)
        await connection.disconnect()
        await connection.connect()
        assert socket_of(connection) is not None
        assert socket_of(connection) is not first
    finally:
        await connection.disconnect()
        await pool.aclose()


async def test_a_round_trip_through_the_taken_over_connection(tmp_path: Path) -> None:
    """The adapter end to end, on a primary and its replica: replies as redis-py would give
    them, error replies as redis-py's exceptions, the pool untouched by the handover, and a
    READONLY reply dropping the shared connection."""
    primary = RedisServer(tmp_path / "primary", config={"repl-diskless-sync-delay": "0"}).start()
    replica = RedisServer(
        tmp_path / "replica", config={"replicaof": f"127.0.0.1 {primary.port}"}
    ).start()
    plain = Redis.from_url(primary.url)
    client = multiplexed(Redis.from_url(primary.url, socket_timeout=5))
    on_replica = multiplexed(Redis.from_url(replica.url, socket_timeout=5))
    assert isinstance(client, MultiplexedRedis)
    assert isinstance(on_replica, MultiplexedRedis)
    try:
        await plain.set("k", b"v\x00")
        await plain.hset("h", "f", "1")
        await plain.zadd("z", {"m": 1})
        sha = await plain.script_load("return {KEYS[1], ARGV[1], 3}")
        got = await asyncio.gather(
            client.get("k"), client.hget("h", "f"), client.zrem("z", "m"),
            client.evalsha(sha, 1, "key", "arg"), client.get("missing"),
        )  # fmt: skip
        assert got == [b"v\x00", b"1", 1, [b"key", b"arg", 3], None]
        assert client.shared_connection is not None  # they went down the shared connection
        with pytest.raises(NoScriptError):
            await client.evalsha("0" * 40, 0)
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await client.hget("k", "f")
        # the pool's own connections still work beside it (redis-py did not close the socket)
        assert await client.ping() is True
        assert await client.get("k") == b"v\x00"
        # a write on a replica: READONLY to the caller, and the shared connection is dropped
        async with Redis.from_url(replica.url) as replica_plain:
            await eventually(lambda: replica_plain.get("k"))
        with pytest.raises(ReadOnlyError):
            await on_replica.zrem("z", "m")
        shared = on_replica.shared_connection
        assert shared is not None
        assert shared.closed
        assert await on_replica.get("k") == b"v\x00"  # the next request opens a new one
        assert on_replica.shared_connection is not shared
    finally:
        for each in (client, on_replica, plain):
            await each.aclose()
        replica.stop()
        primary.stop()
