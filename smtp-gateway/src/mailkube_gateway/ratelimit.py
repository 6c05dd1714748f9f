"""Limits shared by every gateway process, kept in Redis by atomic Lua scripts.

Every script touches one key, and every key carries its own hash tag, so each runs on one
Redis Cluster slot and different clients spread over the cluster:

  {P:rl:<kind>:<id>}        GCRA state (the theoretical arrival time, ms) of a message rate
  {P:conn:<ip>}             sorted set of connection leases (member = slot id, score =
                            lease expiry in ms); leases of dead pods simply expire. A
                            process reuses a slot for its next connection from the same
                            address within a second (connection_slots.py)
  {P:authfail:<network>}    failed AUTH attempts from a client network in the current window

and, for the AUTH attempts naming one user, keys under that user's own hash tag (the address
hashed: a password typed into the user name field stays out of Redis), read and written
together by one script each:

  {P:authuser:<h>}:failures            failed attempts for the user in the current window
  {P:authuser:<h>}:failures:<network>  of which from that client network
  {P:authuser:<h>}:known               sorted set of the networks that logged in as the
                                       user (member = network, score = when it is forgotten,
                                       ms)

Time comes from Redis (TIME), so the gateways' clocks need not agree. A busy rate is lent to
a process several messages at a time (rate_loans.py), so its messages do not each ask Redis.

Rates and leases are soft state: a rate window lasts a minute, a lease a connection. Their
scripts replicate their writes to the replicas but keep them out of the append-only file
(`redis.set_repl(redis.REPL_REPLICA)`), so with `appendfsync always` they cost Redis no fsync;
only the queue's writes do. A failover keeps them (the replica has them); a restart from the
AOF alone starts every window afresh, as Postfix's anvil does when it restarts.

The hot path's commands go down the process's one shared connection when the client is
`mailkube_core.redis_multiplexed.multiplexed()`'s (as the gateway's is): a recipient's checks
then leave in one write, and a lease release waits for company (`urgent=False`).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from redis.exceptions import NoScriptError

from mailkube_core.mailbox import BYTES_FIELD, mailbox_key
from mailkube_core.redis_client import RedisClient
from mailkube_core.redis_multiplexed import NOT_URGENT, MultiplexedRedis

from .auth_throttle import AuthHistory
from .connection_slots import ConnectionSlots
from .rate_loans import RateLoans

# Writes of the scripts below go to replicas but not to the AOF (see the module docstring).
_SOFT_STATE = "redis.set_repl(redis.REPL_REPLICA)\n"

# GCRA (generic cell rate algorithm): one message every `interval` ms, bursts up to
# `burst` messages. KEYS[1] the TAT (theoretical arrival time, ms) key. ARGV[1] interval ms,
# ARGV[2] burst, ARGV[3] how many messages are wanted at once (rate_loans.py lends them).
# Returns how many are granted, at most ARGV[3]: 0 when not even one is allowed now.
# The n-th of them is allowed when now >= tat + (n - 1) * interval - tolerance.
_GCRA = (
    _SOFT_STATE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local room = math.floor((now + tolerance - tat) / interval) + 1
if room < 1 then return 0 end
local granted = math.min(room, tonumber(ARGV[3]))
local new_tat = tat + granted * interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now + interval))
return granted
"""
)

# Give messages back (counted, then refused for another reason, or lent and not used).
# KEYS[1] the TAT key. ARGV[1] interval ms, ARGV[2] how many.
_REFUND = (
    _SOFT_STATE
    + """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat == 0 then return 0 end
redis.call('SET', KEYS[1], tat - tonumber(ARGV[1]) * tonumber(ARGV[2]), 'KEEPTTL')
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

# KEYS[1] the lease set. ARGV the connection ids (slots) to give back.
_RELEASE = _SOFT_STATE + "return redis.call('ZREM', KEYS[1], unpack(ARGV))\n"
#: most ids one _RELEASE call is given
_RELEASE_BATCH = 1000

# AUTH state is in the AOF like any other write: rare, and a throttled network or a
# remembered one should survive a restart.

# KEYS failure counters. ARGV[1] window ms. Counts one failure in each; returns the failures
# in each one's window.
_FAIL = """
local counts = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('PEXPIRE', key, tonumber(ARGV[1])) end
  counts[i] = n
end
return counts
"""

# KEYS[1] the user's failures, KEYS[2] the user's failures from the network, KEYS[3] the
# user's known networks. ARGV[1] the network.
# Returns {user failures, of which from the network, 1 if the network is known else 0}.
_AUTH_HISTORY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local known = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]) or '0') > now
return {tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0'),
        known and 1 or 0}
"""

# KEYS[1] the user's known networks, KEYS[2] the user's failures from the network.
# ARGV[1] the network, ARGV[2] how long it is remembered (ms), ARGV[3] most networks kept.
# Remembers the network (the ones forgotten soonest make room), forgets its failures.
_AUTH_SUCCESS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
redis.call('DEL', KEYS[2])
return 1
"""

#: client networks remembered per user (a roaming phone gets a new IPv6 /64 now and then)
KNOWN_NETWORKS_PER_USER = 100


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
        self._auth_history = Script(redis, _AUTH_HISTORY)
        self._auth_success = Script(redis, _AUTH_SUCCESS)
        self.loans = RateLoans(self._borrow, self._return_loan)
        self.connection_slots = ConnectionSlots(self._acquire_slot, self._release_slots)

    # --- message rates ------------------------------------------------------------------

    def _rate_key(self, kind: str, identity: str) -> str:
        return f"{{{self.prefix}:rl:{kind}:{identity}}}"

    async def allow_message(self, kind: str, identity: str, per_minute: int) -> bool:
        """One more message for `identity` (a sender or a recipient) within `per_minute`
        per minute, with bursts of up to `per_minute` at once: from this process's loan of
        the rate when it holds one (rate_loans.py), else asked of Redis."""
        return await self.loans.take(self._rate_key(kind, identity), per_minute)

    async def _borrow(self, key: str, per_minute: int, want: int) -> int:
        granted = await self._gcra(keys=[key], args=[60000 / per_minute, per_minute, want])
        return int(granted)

    async def _return_loan(self, key: str, per_minute: int, count: int) -> None:
        await self._refund(keys=[key], args=[60000 / per_minute, count], urgent=False)

    async def admit_recipient(
        self,
        address: str,
        per_minute: int,
        quota: int | None,
        sender: SenderRate | None = None,
    ) -> RecipientVerdict:
        """May one more message go to `address`: within its rate and its mailbox under
        `quota` and, for a transaction's first recipient, `sender` within its own rate? What
        must be asked of Redis (a rate this process holds no loan of, the quota) is asked
        together, in one round trip (the commands go down the connection in one write).
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
        key = self._rate_key(kind, identity)
        if not self.loans.put_back(key):
            await self._refund(keys=[key], args=[60000 / per_minute, 1])

    async def close(self) -> None:
        """Give back what this process holds of every rate and its idle connection slots
        (at SIGTERM, before Redis is closed)."""
        await asyncio.gather(self.loans.close(), self.connection_slots.close())

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

    async def release_connection(self, ip: str, *connection_ids: str) -> None:
        """Nobody waits for this: it goes out with the next command that is waited for."""
        await self._release(keys=[self._conn_key(ip)], args=list(connection_ids), urgent=False)

    # the connection_slots.py side: a slot is a lease whose id is the slot's
    async def _acquire_slot(self, ip: str, slot: str, limit: int, lease: float) -> bool:
        return await self.acquire_connection(ip, slot, limit, timedelta(seconds=lease))

    async def _release_slots(self, ip: str, slots: list[str]) -> None:
        # Lua's unpack() takes some thousands of values at most (max_connections_per_ip may
        # be set that high)
        for start in range(0, len(slots), _RELEASE_BATCH):
            await self.release_connection(ip, *slots[start : start + _RELEASE_BATCH])

    # --- authentication (auth_throttle.py decides) ----------------------------------------

    def _network_key(self, network: str) -> str:
        return f"{{{self.prefix}:authfail:{network}}}"

    def _user_keys(self, user: str, network: str) -> tuple[str, str, str]:
        """The user's failures, of which from `network`, and known networks: one hash tag."""
        digest = hashlib.sha256(user.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        tag = f"{{{self.prefix}:authuser:{digest}}}"
        return f"{tag}:failures", f"{tag}:failures:{network}", f"{tag}:known"

    async def auth_history(self, user: str, network: str) -> AuthHistory:
        """What is remembered about `network` and `user`: one round trip (the network's key
        and the user's live in different slots; both commands go out in one write)."""
        failures, of_user = await asyncio.gather(
            self.redis.get(self._network_key(network)),
            self._auth_history(keys=list(self._user_keys(user, network)), args=[network]),
        )
        return AuthHistory(
            network_failures=int(failures or 0),
            user_failures=int(of_user[0]),
            own_failures=int(of_user[1]),
            known=bool(of_user[2]),
        )

    async def record_auth_failure(
        self, user: str, network: str, window: timedelta, history: AuthHistory
    ) -> AuthHistory:
        """Count a failure from `network` for `user`; the history with it counted."""
        user_failures, own_failures, _ = self._user_keys(user, network)
        by_network, by_user = await asyncio.gather(
            self._fail(keys=[self._network_key(network)], args=[_ms(window)]),
            self._fail(keys=[user_failures, own_failures], args=[_ms(window)]),
        )
        return AuthHistory(
            network_failures=int(by_network[0]),
            user_failures=int(by_user[0]),
            own_failures=int(by_user[1]),
            known=history.known,
        )

    async def record_auth_success(self, user: str, network: str, remember: timedelta) -> None:
        """Remember that `network` logged in as `user`, for `remember` from now."""
        _, own_failures, known = self._user_keys(user, network)
        await self._auth_success(
            keys=[known, own_failures], args=[network, _ms(remember), KNOWN_NETWORKS_PER_USER]
        )

    async def mailbox_bytes(self, address: str) -> int:
        """Bytes in a mailbox, as the delivery worker counts them (mailkube_core.mailbox)."""
        value = await self.redis.hget(mailbox_key(self.prefix, address), BYTES_FIELD)
        return int(value or 0)
