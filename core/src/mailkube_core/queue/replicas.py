"""An enqueue that returns only once replicas hold the message (the gateway's enqueue_replicas).

Redis acknowledges a write to its replicas per connection: WAIT (and WAITAOF) block until the
writes sent *on this connection* reached N replicas (WAITAOF: reached their AOF, fsynced).
So the transaction (MULTI/EXEC) and the wait go down one connection taken from the pool, in
one write.

WAITAOF came with Redis 7.2. Which command a server has is learnt once per connection (per
socket: a failover or a restart may put another server behind the same pool connection): the
first enqueue on it asks WAITAOF; on "unknown command" it asks WAIT on the same connection at
once (the wait still covers the transaction's writes), and that socket asks WAIT from then on.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..redis_multiplexed import socket_of

#: the sockets (their StreamWriters) of servers without WAITAOF
_WITHOUT_WAITAOF: weakref.WeakSet[object] = weakref.WeakSet()


class TooFewReplicas(RedisTimeoutError):
    """Fewer replicas than asked for acknowledged in time. A RedisError like an outage: the
    gateway answers 451 4.3.0. The primary has the message, and may deliver it anyway."""


async def _reply(connection: AbstractConnection) -> Any:
    """The next reply; an error reply is returned, not raised (its pair must be read too)."""
    try:
        return await connection.read_response()
    except ResponseError as error:  # a connection error or a timeout goes up as it is
        return error


async def _exchange(connection: AbstractConnection, *commands: Sequence[Any]) -> list[Any]:
    await connection.send_packed_command(connection.pack_commands(commands))
    return [await _reply(connection) for _ in commands]


def _ack_command(replicas: int, timeout_ms: int, waitaof: bool) -> tuple[Any, ...]:
    # WAITAOF numlocal 0: the primary's own fsync is appendfsync always's, done before the
    # transaction's reply
    if waitaof:
        return ("WAITAOF", 0, replicas, timeout_ms)
    return ("WAIT", replicas, timeout_ms)


def _acknowledged(reply: Any) -> int:
    # WAIT: the replicas; WAITAOF: [local fsyncs, replicas that fsynced]
    return int(reply[1]) if isinstance(reply, list) else int(reply)


def _unknown_command(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and "unknown command" in str(reply).lower()


async def _enqueue_on(
    connection: AbstractConnection,
    commands: Sequence[Sequence[Any]],
    replicas: int,
    timeout_ms: int,
) -> Any:
    socket = socket_of(connection)
    waitaof = socket not in _WITHOUT_WAITAOF
    run = [("MULTI",), *commands, ("EXEC",)]
    *_queued, result, ack = await _exchange(
        connection, *run, _ack_command(replicas, timeout_ms, waitaof)
    )
    if waitaof and _unknown_command(ack):
        waitaof = False
        if socket is not None:
            _WITHOUT_WAITAOF.add(socket)
        (ack,) = await _exchange(connection, _ack_command(replicas, timeout_ms, False))
    if isinstance(result, Exception):  # EXECABORT: one was refused while queued, none ran
        raise result
    for reply in result:
        if isinstance(reply, Exception):
            raise reply
    if isinstance(ack, Exception):
        raise ack
    acknowledged = _acknowledged(ack)
    if acknowledged < replicas:
        raise TooFewReplicas(f"only {acknowledged} of {replicas} replicas hold the message")
    return result


async def enqueue_acknowledged(
    redis: Redis,
    commands: Sequence[Sequence[Any]],
    *,
    replicas: int,
    timeout_ms: int,
) -> Any:
    """Run `commands` as one transaction (MULTI/EXEC) and wait until `replicas` replicas
    acknowledged its writes, within `timeout_ms` (keep it under the connection's socket
    timeout: the wait is one request). Returns EXEC's replies; raises TooFewReplicas when
    fewer acknowledged."""
    pool = redis.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        return await _enqueue_on(connection, commands, replicas, timeout_ms)
    except (ResponseError, TooFewReplicas):
        raise  # every reply was read: the connection is fit for the next one
    except BaseException:
        # a reply may still be on its way (a timeout, a cancel): the socket cannot be reused
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)
