"""The gateway's hot-path Redis client (auto-pipelining), and everything Mailkube takes from
redis-py's private side, in one place.

`multiplexed()` gives a standalone client whose hot-path commands (EVALSHA, GET, HGET, ZREM)
from every session of the process go down one connection: the commands of one event-loop turn
in one write at its end, the replies matched in order (what other clients call
auto-pipelining). The gateway's rate limits and leases (mailkube_gateway/ratelimit.py) use
it, and so does the queue's enqueue (`Queue.enqueue`: a MULTI/EXEC transaction, which
`multi_exec` queues in one go, so that no other session's command comes between). Redis runs
them one by one
as always; the process saves a pool checkout, a syscall pair and the client's bookkeeping per
command, and Redis reads many commands per wake-up. Each request there has the client's
deadline (its socket_timeout: redis_timeout); one that passes it fails every request on the
connection and drops it (see _Connection.expire), and so does a READONLY reply (the primary was
demoted by a failover: _Connection.demoted). The next request opens a new connection, through
Sentinel to the primary the sentinels name now.

Relied on, for redis-py in the range pinned in core/pyproject.toml; the drift test
(tests/unit/core/test_redis_multiplexed_drift.py) fails on a release that changes any of it:
- `redis._parsers.base.BaseParser.parse_error`: an error reply's text to the exception
  redis-py raises for it (NoScriptError, ReadOnlyError, ...), given to hiredis's reader;
- `AbstractConnection._writer`/`_reader`, the asyncio streams `connect()` leaves (AUTH, SELECT,
  HELLO, CLIENT SETINFO done), taken over here; `disconnect()` closes only what they hold;
  asyncio's `StreamReader._buffer` (bytes read but not consumed); the connection comes from
  `ConnectionPool.make_connection`, which leaves it out of the pool's count;
- that `Redis.execute_command` is what the command methods (`evalsha`, `get`, `hget`, `zrem`)
  call, and that no response callback applies to the MULTIPLEXED commands (their replies are
  handed over as hiredis parses them);
- `socket_of` (queue/replicas.py): a pooled connection's `_writer`, new for each socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ExecAbortError, InvalidResponse, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .redis_client import RedisClient

log = logging.getLogger(__name__)

#: The longest a request nobody waits for is held back for company (see _Connection.send).
LATER = 0.05
#: execute_command option of MultiplexedRedis: the answer is not waited for by a client
NOT_URGENT = "mailkube_not_urgent"

#: Commands that may share the connection: they neither block nor change its state, and
#: redis-py applies no response callback to them.
MULTIPLEXED = frozenset({"EVALSHA", "GET", "HGET", "ZREM"})


class _Connection(asyncio.Protocol):
    """One Redis connection: requests written in order, replies given to their futures in
    order (Redis answers in order on a connection), each within `timeout` seconds."""

    def __init__(self, writer: asyncio.StreamWriter, timeout: float | None = None) -> None:
        #: kept: a StreamWriter closes its transport when it is garbage-collected
        self.writer = writer
        self.transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error
        )
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        #: how long a request may wait for its reply (None: for ever)
        self.timeout = timeout
        #: when each request in `waiting` is due (time.monotonic()), in the same order; with
        #: one timeout for all, the oldest request is always the first one due
        self.due: collections.deque[float] = collections.deque()
        #: the one timer that checks the oldest request's deadline while requests wait
        #: (re-armed when it fires, not per request)
        self.watchdog: asyncio.TimerHandle | asyncio.Handle | None = None
        #: the loop the connection was made in, kept: asyncio.get_running_loop() costs a
        #: getpid() system call on CPython 3.11, and the hot path sends several requests a
        #: message
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        #: requests not written yet
        self.outgoing: list[bytes] = []
        #: the write to come: at the end of this turn or, when only requests nobody waits
        #: for are there, a little later (`flush_later`)
        self.flush: asyncio.Handle | asyncio.TimerHandle | None = None
        self.flush_later = False
        self.closed = False

    def send(
        self, request: bytes, loop: asyncio.AbstractEventLoop, *, urgent: bool = True
    ) -> asyncio.Future[Any]:
        """The requests of one event-loop turn go out together, in one write at its end:
        from many sessions when the process is busy, and the commands one session sends
        at once (a recipient's checks) even when it is quiet. Redis then reads them in one
        wake-up and answers them in one write. The wait is one turn of the loop.

        A request that is not `urgent` (nobody waits for its answer: a lease release) waits
        up to LATER seconds for an urgent one to go out with, instead of costing a write and
        a Redis wake-up of its own; with one session at a time, that is one round trip less
        per connection."""
        future = loop.create_future()
        if self.closed or self.transport.is_closing():
            future.set_exception(RedisConnectionError("Redis connection closing"))
            return future
        self.waiting.append(future)
        self.outgoing.append(request)
        timeout = self.timeout
        if timeout is not None:
            self.due.append(time.monotonic() + timeout)
            if self.watchdog is None:
                self.watchdog = loop.call_later(timeout, self._watch)
        flush = self.flush
        if urgent:
            if flush is None or self.flush_later:
                if flush is not None:
                    flush.cancel()
                self.flush = loop.call_soon(self._flush)
                self.flush_later = False
        elif flush is None:
            # (a flag, not isinstance: other event loops have their own handle classes)
            self.flush = loop.call_later(LATER, self._flush)
            self.flush_later = True
        return future

    def _flush(self) -> None:
        self.flush = None
        self.flush_later = False
        if self.outgoing:
            # closing: connection_lost fails their futures
            if not self.closed and not self.transport.is_closing():
                # uvloop writes the list with one writev, without joining it (a copy of
                # every body being queued); asyncio's transports join it
                self.transport.writelines(self.outgoing)
            self.outgoing.clear()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        due = self.due
        while (reply := reader.gets()) is not False:
            if not waiting:  # a reply nobody asked for: the stream cannot be trusted
                self.transport.abort()
                return
            future = waiting.popleft()
            if due:
                due.popleft()
            if future.done():  # the caller gave up (a timeout)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
                if isinstance(reply, ReadOnlyError):
                    self.demoted()
                    return
            else:
                future.set_result(reply)

    def demoted(self) -> None:
        """A write was refused with READONLY: the primary this connection went to is a replica
        now (a failover). Every request on the connection fails, and it is dropped, so that
        the next request opens a new one to the primary (through Sentinel: the one the
        sentinels name now)."""
        log.warning("Redis is a replica now; dropping the shared connection")
        self._close(lambda: RedisConnectionError("Redis is a replica now (READONLY)"))
        self.transport.abort()

    def _watch(self) -> None:
        self.watchdog = None
        if self.closed or not self.due:
            return
        left = self.due[0] - time.monotonic()
        if left > 0:  # the oldest request now is younger than the one the timer was set for
            self.watchdog = self.loop.call_later(left, self._watch)
            return
        log.warning(
            "Redis did not answer in time; dropping the shared connection",
            extra={"timeout": self.timeout, "requests": len(self.waiting)},
        )
        self.expire()

    def expire(self) -> None:
        """The oldest request got no reply within `timeout`: Redis is frozen, or the path to it
        drops packets. Every request on the connection fails now (their replies could only
        come after that one's), and the connection is dropped, so that the next request opens
        a new one instead of queueing behind a dead one. A request that reached Redis may
        still run when Redis wakes up: failed here means unknown, not undone."""
        reason = f"Redis did not answer within {self.timeout:g}s"
        self._close(lambda: RedisTimeoutError(reason))
        self.transport.abort()

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, error: Exception | None) -> None:
        reason = f"Redis connection lost: {error!r}" if error else "Redis closed the connection"
        self._close(lambda: RedisConnectionError(reason))

    def _close(self, error: Any) -> None:
        """Closed: what is not written is dropped, and every waiting request fails with a
        fresh `error()`."""
        self.closed = True
        if self.flush is not None:
            self.flush.cancel()
            self.flush = None
            self.flush_later = False
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.outgoing.clear()
        self.due.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error())


class MultiplexedRedis(Redis):
    """A standalone client (sharing its pool for everything else: pub/sub, pipelines,
    transactions, WAIT) that sends MULTIPLEXED commands down one shared connection. Requests
    there get the pool connections' socket_timeout as their deadline, and opening it (TCP,
    TLS, the handshake) gets their socket_connect_timeout."""

    _connection: _Connection | None = None
    #: the connection being opened, which every request meanwhile waits for
    _opening: asyncio.Future[_Connection] | None = None

    @property
    def shared_connection(self) -> _Connection | None:
        """The shared connection, once a request opened it (tests watch what it writes)."""
        return self._connection

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        urgent = not options.pop(NOT_URGENT, False)
        if args[0] not in MULTIPLEXED:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        connection = self._connection
        if connection is None or connection.closed or connection.transport.is_closing():
            connection = await self._open()
        request = hiredis.pack_command(args)
        return await connection.send(request, connection.loop, urgent=urgent)

    async def multi_exec(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """MULTI, `commands`, EXEC down the shared connection, one after the other in the same
        write (no other session's command can come between: they are queued in one go), and
        EXEC's replies, hiredis's as they are. An error reply among them is raised (Redis ran
        the others: a transaction is not rolled back); a command refused while queued
        (EXECABORT: none ran) raises that command's error."""
        connection = self._connection
        if connection is None or connection.closed or connection.transport.is_closing():
            connection = await self._open()
        loop = connection.loop
        requests = [("MULTI",), *commands, ("EXEC",)]
        futures = [connection.send(hiredis.pack_command(tuple(r)), loop) for r in requests]
        for queued in futures[:-1]:  # their errors come back in EXEC's (EXECABORT)
            queued.add_done_callback(_retrieved)
        try:
            replies: list[Any] = await futures[-1]
        except ExecAbortError:  # say why: the reply to the command refused while queued
            for queued in futures[1:-1]:
                refused = None if queued.cancelled() else queued.exception()
                if refused is not None:
                    raise refused from None
            raise
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _open(self) -> _Connection:
        """One attempt at a time, shared by every request that comes meanwhile: when it fails
        (Redis frozen: after the connect deadline), they all fail together, instead of each
        trying in turn behind a lock and waiting for all the attempts before its own."""
        opening = self._opening
        if opening is None:
            opening = asyncio.ensure_future(self._connect())
            opening.add_done_callback(self._opened)
            self._opening = opening
        # a caller that gives up (its session closed) leaves the attempt to the others
        return await asyncio.shield(opening)

    def _opened(self, opening: asyncio.Future[_Connection]) -> None:
        if self._opening is opening:
            self._opening = None
        _retrieved(opening)  # the callers were told

    async def _connect(self) -> _Connection:
        # redis-py connects (TCP, TLS or a Unix socket; AUTH, SELECT, HELLO, CLIENT SETINFO)
        # and hands the transport over; all of it within the connect deadline
        client = self.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        deadline = client.socket_connect_timeout or client.socket_timeout or 10
        try:
            async with asyncio.timeout(deadline):
                await client.connect()
        except TimeoutError:
            with contextlib.suppress(Exception):
                await client.disconnect(nowait=True)
            raise RedisTimeoutError(f"Redis did not answer within {deadline:g}s") from None
        writer, reader = client._writer, client._reader
        assert writer is not None
        assert reader is not None
        buffered = bytes(reader._buffer)
        client._writer = client._reader = None  # ours now: redis-py must not close it
        connection = _Connection(writer, client.socket_timeout)
        connection.transport.set_protocol(connection)
        if buffered:  # nothing is expected after the handshake; be safe anyway
            connection.data_received(buffered)
        self._connection = connection
        return connection

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            connection.transport.close()
        await super().aclose(close_connection_pool)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def transaction(redis: RedisClient, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """MULTI `commands` EXEC in one round trip, on whichever client: the shared connection of a
    MultiplexedRedis, else a redis-py transaction pipeline (on Cluster, every key in one slot).
    Raises the first error reply."""
    if isinstance(redis, MultiplexedRedis):
        return await redis.multi_exec(commands)
    async with redis.pipeline(transaction=True) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute()


def multiplexed(redis: RedisClient) -> RedisClient:
    """The same Redis, with the hot path on one shared connection (standalone Redis; a
    Cluster client is returned as it is). Takes over `redis`'s connection pool."""
    if not isinstance(redis, Redis) or isinstance(redis, MultiplexedRedis):
        return redis
    if redis.connection_pool.connection_kwargs.get("decode_responses"):
        return redis  # the shared connection hands over replies as bytes, undecoded
    return MultiplexedRedis.from_pool(redis.connection_pool)


def socket_of(connection: AbstractConnection) -> object:
    """What tells a pooled connection's sockets apart: a new object for each socket it opens
    (after a reconnect, another server may be behind the same connection); None while it is
    not connected. Nothing public in redis-py does."""
    return connection._writer
