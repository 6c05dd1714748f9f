"""Users suspended for submission because they sent spam: one definition for every component.

The gateway counts each message from an authenticated user that content scanning refused;
a user with `threshold` refusals within `window` is suspended for submission (MAIL answers
550 5.7.1) until an administrator lifts it: `mailkube spam unsuspend ADDRESS`, or the
operator when the MailUser is annotated (docs/spam.md). The operator reports suspensions as
the MailUser's `SubmissionSuspended` condition.

Keys share one Redis Cluster hash tag (refusals are rare; one slot is plenty):

  {<prefix>:spam}:rejections:<address>   refusals in the current window (expires with it)
  {<prefix>:spam}:suspended              hash: address -> JSON {since, rejections, reason}

Suspensions are written to the AOF like any other write: they must survive a restart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .redis_client import RedisClient

#: why a user is suspended, as the operator's condition says it
REASON = "SpamRejections"

# KEYS[1] the user's refusal counter, KEYS[2] the suspension hash. ARGV[1] address,
# ARGV[2] window ms, ARGV[3] threshold (0: never). Returns {refusals, newly suspended 0/1}.
_RECORD = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
local threshold = tonumber(ARGV[3])
if threshold > 0 and n >= threshold then
  local t = redis.call('TIME')
  local entry = cjson.encode({since = tonumber(t[1]), rejections = n, reason = 'spam'})
  return {n, redis.call('HSETNX', KEYS[2], ARGV[1], entry)}
end
return {n, 0}
"""


@dataclass(frozen=True)
class Suspension:
    address: str
    since: datetime
    #: refusals counted when the suspension began
    rejections: int

    @property
    def message(self) -> str:
        return (
            f"{self.rejections} messages refused as spam within the window; submission "
            f"suspended since {self.since.isoformat(timespec='seconds')}"
        )


def _tag(prefix: str) -> str:
    return f"{{{prefix}:spam}}"


def rejections_key(prefix: str, address: str) -> str:
    return f"{_tag(prefix)}:rejections:{address}"


def suspended_key(prefix: str) -> str:
    return f"{_tag(prefix)}:suspended"


def _parse(address: str, raw: Any) -> Suspension:
    try:
        data = json.loads(raw)
        since = datetime.fromtimestamp(int(data["since"]), UTC)
        count = int(data.get("rejections", 0))
    except (ValueError, TypeError, KeyError):  # written by hand: still a suspension
        since, count = datetime.fromtimestamp(0, UTC), 0
    return Suspension(address, since, count)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def record_spam_rejection(
    redis: RedisClient, prefix: str, address: str, window: timedelta, threshold: int
) -> tuple[int, bool]:
    """Count one refused message of `address`: (refusals in the window, newly suspended)."""
    window_ms = max(1, int(window.total_seconds() * 1000))
    count, new = await redis.eval(
        _RECORD, 2, rejections_key(prefix, address), suspended_key(prefix),
        address, window_ms, threshold,
    )  # fmt: skip
    return int(count), bool(new)


async def is_suspended(redis: RedisClient, prefix: str, address: str) -> bool:
    return await redis.hget(suspended_key(prefix), address) is not None


async def list_suspensions(redis: RedisClient, prefix: str) -> list[Suspension]:
    entries = await redis.hgetall(suspended_key(prefix))
    return sorted(
        (_parse(_text(address), raw) for address, raw in entries.items()),
        key=lambda s: s.address,
    )


async def lift(redis: RedisClient, prefix: str, address: str) -> bool:
    """End a suspension (and its count); False if `address` was not suspended."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hdel(suspended_key(prefix), address)
        pipe.delete(rejections_key(prefix, address))
        removed, _ = await pipe.execute()
    return bool(removed)
