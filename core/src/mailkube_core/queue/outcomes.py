"""Delivery outcomes per sender domain and day: the bounce rate an operator watches to catch a
compromised account or a bad list before the big receivers do.

The queue counts each recipient's outcome where it records it, and the tally relay adds it to
`<prefix>:outcomes:<YYYY-MM-DD>` (UTC, the day it was recorded), a hash of
"<sender domain>:<delivered|deferred|bounced>" -> recipients (and the relay's `applied:q<N>`
fields), kept 40 days; `mailkube queue stats` reads it. One key per day, single-key scripts
only, so it works on Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta
from typing import Any

from ..addresses import split_address
from ..redis_client import RedisClient

OUTCOMES = ("delivered", "deferred", "bounced")
KEEP = timedelta(days=40)


def sender_domain(mail_from: str) -> str:
    """What a message's outcomes are counted under: its sender's domain, lower-cased; `<>`
    for the null sender (bounces) and for a sender without a readable domain."""
    try:
        return split_address(mail_from)[1].lower() or "<>"
    except ValueError:
        return "<>"


def outcomes_key(prefix: str, day: date) -> str:
    return f"{prefix}:outcomes:{day.isoformat()}"


async def read_outcomes(redis: RedisClient, prefix: str, day: date) -> dict[str, dict[str, int]]:
    """{sender domain: {delivered, deferred, bounced}} for one day."""
    raw: Any = await redis.hgetall(outcomes_key(prefix, day))
    stats: dict[str, dict[str, int]] = {}
    for field, value in raw.items():
        domain, _, outcome = field.decode().rpartition(":")
        if outcome in OUTCOMES:
            stats.setdefault(domain, dict.fromkeys(OUTCOMES, 0))[outcome] = int(value)
    return stats


def bounce_rate(counts: Mapping[str, int]) -> float | None:
    """Bounced / (delivered + bounced); None before anything was final."""
    final = counts.get("delivered", 0) + counts.get("bounced", 0)
    return counts.get("bounced", 0) / final if final else None
