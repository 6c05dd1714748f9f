"""TLS-RPT data (RFC 8460 §4): every policy outcome of a session, counted per policy domain
per UTC day in Redis, for the daily report (tlsrpt.py) any worker may send.

Layout (one Redis Cluster hash tag per day): `{<prefix>:tlsrpt:<day>}` is the set of policy
domains with outcomes that day; `{<prefix>:tlsrpt:<day>}:<domain>` a hash from one outcome
(JSON: policy type, policy strings, MX patterns, result type or "success", receiving MX host
and IP) to its count. Both expire after `KEEP_DAYS`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from mailkube_core.redis_client import RedisClient

log = logging.getLogger(__name__)

KEEP_DAYS = 8


@dataclass(frozen=True)
class Outcome:
    policy_type: str  # sts | tlsa | no-policy-found
    policy_strings: tuple[str, ...]
    mx_patterns: tuple[str, ...]  # the MTA-STS policy's mx lines (RFC 8460 §4.3 mx-host)
    result: str  # "success" or an RFC 8460 §4.3 result type
    mx_host: str = ""
    ip: str = ""

    def field(self) -> str:
        return json.dumps([self.policy_type, list(self.policy_strings), list(self.mx_patterns),
                           self.result, self.mx_host, self.ip])  # fmt: skip

    @classmethod
    def from_field(cls, field: str | bytes) -> Outcome:
        kind, strings, patterns, result, host, ip = json.loads(field)
        return cls(kind, tuple(strings), tuple(patterns), result, host, ip)


def day_of(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d")


def day_key(prefix: str, day: str) -> str:
    return f"{{{prefix}:tlsrpt:{day}}}"


def domain_key(prefix: str, day: str, domain: str) -> str:
    return f"{day_key(prefix, day)}:{domain}"


class TlsRptStore:
    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    async def record(self, domain: str, outcome: Outcome, when: datetime | None = None) -> None:
        """Count one outcome; a Redis failure is logged, never a delivery's problem."""
        day = day_of(when or datetime.now(UTC))
        days, counts = day_key(self.prefix, day), domain_key(self.prefix, day, domain)
        ttl = KEEP_DAYS * 86400
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.sadd(days, domain)
                pipe.expire(days, ttl)
                pipe.hincrby(counts, outcome.field(), 1)
                pipe.expire(counts, ttl)
                await pipe.execute()
        except Exception as exc:  # reporting must never hold up a delivery
            log.warning("tls-rpt outcome not recorded", extra={"domain": domain,
                                                                "error": repr(exc)})  # fmt: skip

    async def domains(self, day: str) -> list[str]:
        members = await self.redis.smembers(day_key(self.prefix, day))
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    async def outcomes(self, day: str, domain: str) -> dict[Outcome, int]:
        raw = await self.redis.hgetall(domain_key(self.prefix, day, domain))
        return {Outcome.from_field(k): int(v) for k, v in raw.items()}
