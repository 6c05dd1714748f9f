"""Clients that talked before the greeting, remembered for `early_talker_block` so that every
gateway refuses them: RFC 5321 §4.3.1 says a client waits for the 220; spam bots that send
their whole transaction at once do not.

    {P:early:<ip>}   set while the address is remembered (expires on its own)

Soft state, as the rate limits (ratelimit.py): replicated but kept out of the AOF, and time
is Redis's (the key's expiry). Each script touches one key with its own hash tag (Redis
Cluster); on a standalone Redis they go down the hot path's shared connection, so the check at
connect leaves in the same write as the connection lease.
"""

from __future__ import annotations

from datetime import timedelta

from mailkube_core.redis_client import RedisClient

from ..ratelimit import Script

_REMEMBER = """
redis.set_repl(redis.REPL_REPLICA)
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
"""
# milliseconds left, or a negative number when not remembered
_RECALL = "return redis.call('PTTL', KEYS[1])\n"


class EarlyTalkers:
    def __init__(self, redis: RedisClient, prefix: str, block: timedelta) -> None:
        self.prefix = prefix
        self.block_ms = max(1, int(block.total_seconds() * 1000))
        self._remember = Script(redis, _REMEMBER)
        self._recall = Script(redis, _RECALL)

    def key(self, ip: str) -> str:
        return f"{{{self.prefix}:early:{ip}}}"

    async def remember(self, ip: str) -> None:
        await self._remember(keys=[self.key(ip)], args=[self.block_ms])

    async def remembered(self, ip: str) -> bool:
        return int(await self._recall(keys=[self.key(ip)], args=[])) > 0
