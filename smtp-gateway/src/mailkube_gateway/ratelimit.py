"""Limits shared by every gateway process, kept in Redis by atomic Lua scripts, and the one
Redis connection the hot path of every session shares.

Every script touches one key, and every key carries its own hash tag, so each runs on one
Redis Cluster slot and different clients spread over the cluster:

  {P:rl:<kind>:<id>}        GCRA state (the theoretical arrival time, ms) of a message rate
  {P:conn:<ip>}             sorted set of connection leases (member = connection id,
                            score = lease expiry in ms); leases of dead pods simply expire
  {P:authfail:<kind>:<id>}  failed AUTH attempts in the current window

Time comes from Redis (TIME), so the gateways' clocks need not agree.

Rates and leases are soft state: a rate window lasts a minute, a lease a connection. Their
scripts replicate their writes to the replicas but keep them out of the append-only file
(`redis.set_repl(redis.REPL_REPLICA)`), so with `appendfsync always` they cost Redis no fsync;
only the queue's writes do. A failover keeps them (the replica has them); a restart from the
AOF alone starts every window afresh, as Postfix's anvil does when it restarts.

`multiplexed()` gives a standalone client whose hot-path commands (EVALSHA, GET, HGET, ZREM)
from every session of the process go down one connection: the commands of one event-loop turn
in one write at its end, the replies matched in order (what other clients call
auto-pipelining). Redis runs them one by one as always; the process saves a pool checkout, a
syscall pair and the client's bookkeeping per command, and Redis reads many commands per
wake-up.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError

from mailkube_core.mailbox import BYTES_FIELD, mailbox_key
from mailkube_core.redis_client import RedisClient

# Writes of the scripts below go to replicas but not to the AOF (see the module docstring).
_SOFT_STATE = "redis.set_repl(redis.REPL_REPLICA)\n"

# GCRA (generic cell rate algorithm): one message every `interval` ms, bursts up to
# `burst` messages. KEYS[1] the TAT key. ARGV[1] interval ms, ARGV[2] burst.
# Returns 0 when allowed, else the ms to wait.
_GCRA = (
    _SOFT_STATE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then return allow_at - now end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now + interval))
return 0
"""
)

# Give one message back (it was counted, then refused for another reason).
# KEYS[1] the TAT key. ARGV[1] interval ms.
_REFUND = (
    _SOFT_STATE
    + """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat == 0 then return 0 end
redis.call('SET', KEYS[1], tat - tonumber(ARGV[1]), 'KEEPTTL')
return 1
"""
)

# KEYS[1] the lease set. ARGV[1] connection id, ARGV[2] lease ms, ARGV[3] limit.
# Returns 1 if the lease is held (new or renewed), 0 if the limit is reached.
_ACQUIRE = (
    _SOFT_STATE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not held and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
)

# KEYS[1] the lease set. ARGV[1] connection id.
_RELEASE = _SOFT_STATE + "return redis.call('ZREM', KEYS[1], ARGV[1])\n"

# KEYS[1] the failure counter. ARGV[1] window ms. Returns the failures in the window.
# (In the AOF like any other write: rare, and a lockout should survive a restart.)
_FAIL = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1])) end
return n
"""


@dataclass(frozen=True, slots=True)
class SenderRate:
    """Who a message is counted against, and how many per minute it may send."""

    identity: str
    per_minute: int


@dataclass(frozen=True, slots=True)
class RecipientVerdict:
    rate_ok: bool
    under_quota: bool
    sender_ok: bool = True

    @property
    def accepted(self) -> bool:
        return self.rate_ok and self.under_quota and self.sender_ok


def _ms(duration: timedelta) -> int:
    return max(1, math.ceil(duration.total_seconds() * 1000))


class Script:
    """A Lua script run by its SHA1 (EVALSHA), loaded on first NOSCRIPT."""

    def __init__(self, redis: RedisClient, text: str) -> None:
        self.redis = redis
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis's script id
        #: how to say "nobody waits for this" to the client, if it can hold a request back
        self._later = {NOT_URGENT: True} if isinstance(redis, MultiplexedRedis) else {}

    async def __call__(self, keys: list[str], args: list[Any], *, urgent: bool = True) -> Any:
        options = {} if urgent else self._later
        try:
            return await self.redis.execute_command(
                "EVALSHA", self.sha, len(keys), *keys, *args, **options
            )
        except NoScriptError:
            await self.redis.script_load(self.text)
            return await self.redis.evalsha(self.sha, len(keys), *keys, *args)


class Limits:
    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._gcra = Script(redis, _GCRA)
        self._refund = Script(redis, _REFUND)
        self._acquire = Script(redis, _ACQUIRE)
        self._release = Script(redis, _RELEASE)
        self._fail = Script(redis, _FAIL)

    # --- message rates ------------------------------------------------------------------

    def _rate_key(self, kind: str, identity: str) -> str:
        return f"{{{self.prefix}:rl:{kind}:{identity}}}"

    async def allow_message(self, kind: str, identity: str, per_minute: int) -> bool:
        """One more message for `identity` (a sender or a recipient) within `per_minute`
        per minute, with bursts of up to `per_minute` at once."""
        wait = await self._gcra(
            keys=[self._rate_key(kind, identity)], args=[60000 / per_minute, per_minute]
        )
        return int(wait) == 0

    async def admit_recipient(
        self,
        address: str,
        per_minute: int,
        quota: int | None,
        sender: SenderRate | None = None,
    ) -> RecipientVerdict:
        """May one more message go to `address`: within its rate and its mailbox under
        `quota` and, for a transaction's first recipient, `sender` within its own rate? All
        asked together, in one round trip (the scripts go down the connection in one write).
        Whatever was counted for a refused recipient is given back."""
        checks: list[Awaitable[Any]] = [self.allow_message("rcpt", address, per_minute)]
        if quota is not None:
            checks.append(self.mailbox_bytes(address))
        if sender is not None:
            checks.append(self.allow_message("sender", sender.identity, sender.per_minute))
        # one check needs no task around it (the usual case: no quota, not the first);
        # results: the recipient's rate, then the mailbox's bytes and the sender's rate if asked
        results = [await checks[0]] if len(checks) == 1 else await asyncio.gather(*checks)
        verdict = RecipientVerdict(
            rate_ok=results[0],
            under_quota=quota is None or results[1] < quota,
            sender_ok=sender is None or results[-1],
        )
        if not verdict.accepted:
            refunds = []
            if verdict.rate_ok:
                refunds.append(self._give_back("rcpt", address, per_minute))
            if sender is not None and verdict.sender_ok:
                refunds.append(self._give_back("sender", sender.identity, sender.per_minute))
            await asyncio.gather(*refunds)
        return verdict

    async def _give_back(self, kind: str, identity: str, per_minute: int) -> None:
        await self._refund(keys=[self._rate_key(kind, identity)], args=[60000 / per_minute])

    # --- connections --------------------------------------------------------------------

    def _conn_key(self, ip: str) -> str:
        return f"{{{self.prefix}:conn:{ip}}}"

    async def acquire_connection(
        self, ip: str, connection_id: str, limit: int, lease: timedelta
    ) -> bool:
        """Hold (or renew) a connection lease for `ip`; False when `limit` are held."""
        held = await self._acquire(
            keys=[self._conn_key(ip)], args=[connection_id, _ms(lease), limit]
        )
        return bool(held)

    async def release_connection(self, ip: str, connection_id: str) -> None:
        """Nobody waits for this: it goes out with the next command that is waited for."""
        await self._release(keys=[self._conn_key(ip)], args=[connection_id], urgent=False)

    # --- authentication failures --------------------------------------------------------

    def _fail_key(self, kind: str, identity: str) -> str:
        return f"{{{self.prefix}:authfail:{kind}:{identity}}}"

    async def auth_failures(self, kind: str, identity: str) -> int:
        value = await self.redis.get(self._fail_key(kind, identity))
        return int(value or 0)

    async def record_auth_failure(self, kind: str, identity: str, window: timedelta) -> int:
        return int(await self._fail(keys=[self._fail_key(kind, identity)], args=[_ms(window)]))

    async def mailbox_bytes(self, address: str) -> int:
        """Bytes in a mailbox, as the delivery worker counts them (mailkube_core.mailbox)."""
        value = await self.redis.hget(mailbox_key(self.prefix, address), BYTES_FIELD)
        return int(value or 0)


# --- one shared connection for the hot path ---------------------------------------------

#: The longest a request nobody waits for is held back for company (see _Connection.send).
LATER = 0.05
#: execute_command option of MultiplexedRedis: the answer is not waited for by a client
NOT_URGENT = "mailkube_not_urgent"

#: Commands that may share the connection: they neither block nor change its state, and
#: redis-py applies no response callback to them.
MULTIPLEXED = frozenset({"EVALSHA", "GET", "HGET", "ZREM"})


class _Connection(asyncio.Protocol):
    """One Redis connection: requests written in order, replies given to their futures in
    order (Redis answers in order on a connection)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        #: kept: a StreamWriter closes its transport when it is garbage-collected
        self.writer = writer
        self.transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error
        )
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
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
                self.transport.write(b"".join(self.outgoing))
            self.outgoing.clear()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        while (reply := reader.gets()) is not False:
            if not waiting:  # a reply nobody asked for: the stream cannot be trusted
                self.transport.abort()
                return
            future = waiting.popleft()
            if future.done():  # the caller gave up (a timeout)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, error: Exception | None) -> None:
        self.closed = True
        if self.flush is not None:
            self.flush.cancel()
            self.flush = None
            self.flush_later = False
        self.outgoing.clear()
        reason = f"Redis connection lost: {error!r}" if error else "Redis closed the connection"
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(RedisConnectionError(reason))


class MultiplexedRedis(Redis):
    """A standalone client (sharing its pool for everything else: pub/sub, pipelines,
    transactions, WAIT) that sends MULTIPLEXED commands down one shared connection."""

    _connection: _Connection | None = None
    _opening: asyncio.Lock | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        urgent = not options.pop(NOT_URGENT, False)
        if args[0] not in MULTIPLEXED:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        connection = self._connection
        if connection is None or connection.closed or connection.transport.is_closing():
            connection = await self._open()
        request = hiredis.pack_command(args)
        return await connection.send(request, asyncio.get_running_loop(), urgent=urgent)

    async def _open(self) -> _Connection:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            connection = self._connection
            if not (connection is None or connection.closed or connection.transport.is_closing()):
                return connection
            # redis-py connects (TCP, TLS or a Unix socket; AUTH, SELECT, HELLO) and hands
            # the transport over
            client = self.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            async with asyncio.timeout(client.socket_connect_timeout or 10):
                await client.connect()
            writer, reader = client._writer, client._reader
            assert writer is not None
            assert reader is not None
            buffered = bytes(reader._buffer)
            client._writer = client._reader = None  # ours now: redis-py must not close it
            connection = _Connection(writer)
            connection.transport.set_protocol(connection)
            if buffered:  # nothing is expected after the handshake; be safe anyway
                connection.data_received(buffered)
            self._connection = connection
            return connection

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            connection.transport.close()
        await super().aclose(close_connection_pool)


def multiplexed(redis: RedisClient) -> RedisClient:
    """The same Redis, with the hot path on one shared connection (standalone Redis; a
    Cluster client is returned as it is). Takes over `redis`'s connection pool."""
    if not isinstance(redis, Redis) or isinstance(redis, MultiplexedRedis):
        return redis
    if redis.connection_pool.connection_kwargs.get("decode_responses"):
        return redis  # the shared connection hands over replies as bytes, undecoded
    return MultiplexedRedis.from_pool(redis.connection_pool)
