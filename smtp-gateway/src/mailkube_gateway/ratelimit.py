"""Limits shared by every gateway process, kept in Redis by atomic Lua scripts.

Every script touches one key, and every key carries its own hash tag, so each runs on one
Redis Cluster slot and different clients spread over the cluster:

  {P:rl:<kind>:<id>}        GCRA state (the theoretical arrival time, ms) of a message rate
  {P:conn:<ip>}             sorted set of connection leases (member = connection id,
                            score = lease expiry in ms); leases of dead pods simply expire
  {P:authfail:<kind>:<id>}  failed AUTH attempts in the current window

Time comes from Redis (TIME), so the gateways' clocks need not agree.
"""

from __future__ import annotations

import math
from datetime import timedelta

from redis.commands.core import AsyncScript

from mailkube_core.mailbox import BYTES_FIELD, mailbox_key
from mailkube_core.redis_client import RedisClient

# GCRA (generic cell rate algorithm): one message every `interval` ms, bursts up to
# `burst` messages. KEYS[1] the TAT key. ARGV[1] interval ms, ARGV[2] burst.
# Returns 0 when allowed, else the ms to wait.
_GCRA = """
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

# KEYS[1] the lease set. ARGV[1] connection id, ARGV[2] lease ms, ARGV[3] limit.
# Returns 1 if the lease is held (new or renewed), 0 if the limit is reached.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not held and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS[1] the failure counter. ARGV[1] window ms. Returns the failures in the window.
_FAIL = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1])) end
return n
"""


def _ms(duration: timedelta) -> int:
    return max(1, math.ceil(duration.total_seconds() * 1000))


class Limits:
    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._gcra: AsyncScript = redis.register_script(_GCRA)
        self._acquire: AsyncScript = redis.register_script(_ACQUIRE)
        self._fail: AsyncScript = redis.register_script(_FAIL)

    # --- message rates ------------------------------------------------------------------

    async def allow_message(self, kind: str, identity: str, per_minute: int) -> bool:
        """One more message for `identity` (a sender or a recipient) within `per_minute`
        per minute, with bursts of up to `per_minute` at once."""
        key = f"{{{self.prefix}:rl:{kind}:{identity}}}"
        interval = 60000 / per_minute
        wait = await self._gcra(keys=[key], args=[interval, per_minute])
        return int(wait) == 0

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
        await self.redis.zrem(self._conn_key(ip), connection_id)

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
