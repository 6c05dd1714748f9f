"""MTA-STS policies as the sender uses them (RFC 8461 §5.1): the `_mta-sts` TXT record says
whether a policy exists and which version (`id`); the policy itself is fetched over HTTPS and
cached in Redis for its `max_age`, shared by every worker.

- A cached policy is used until it expires, even when the TXT record disappears (§5.1).
- A new `id` in the TXT record means a new policy: fetched before use.
- A policy past half its `max_age` is fetched again (proactive refresh, §10.2), by one worker
  at a time (a Redis lock), at most every `REFRESH_RETRY` seconds while the fetch fails.
- A failed fetch keeps the cached policy (§5.1: "senders SHOULD continue to use the cached
  policy"); with none cached, there is no policy (and the failure is reported).
- `mode: none` is cached too, so the old policy is forgotten and not fetched again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mailkube_core.redis_client import RedisClient

from .mta_sts import PolicyError, StsPolicy, StsRecord, parse_policy
from .sts_fetch import FetchError

log = logging.getLogger(__name__)

REFRESH_RETRY = 300  # seconds between refresh attempts of a cached policy
#: how long this process remembers a fetch it made, for deliveries that asked before it was
#: stored in Redis (their read of the cache came too early to see it)
_RECENT = 60.0

#: the domain's TXT record: StsRecord, None when no valid record is published; raises
#: LookupError on a temporary DNS failure
RecordLookup = Callable[[str], Awaitable[StsRecord | None]]
#: the domain's policy fetched now, with its text; raises FetchError
PolicyFetch = Callable[[str], Awaitable[tuple[StsPolicy, str]]]


@dataclass(frozen=True)
class StsState:
    """What a delivery to a domain goes by: the policy in force (None: none), and what went
    wrong finding it (for TLS-RPT), if anything."""

    policy: StsPolicy | None
    failure: FetchError | None = None

    @property
    def active(self) -> StsPolicy | None:
        """The policy unless its mode is none."""
        return self.policy if self.policy is not None and self.policy.mode != "none" else None


@dataclass(frozen=True)
class _Cached:
    id: str
    text: str
    fetched: float
    expires: float

    def policy(self) -> StsPolicy | None:
        try:
            return parse_policy(self.text)
        except PolicyError:
            return None


class StsPolicies:
    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        record: RecordLookup,
        fetch: PolicyFetch,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.record = record
        self.fetch = fetch
        self.clock = clock
        self._fetching: dict[str, asyncio.Future[tuple[StsPolicy, str]]] = {}
        #: domain -> (when it was stored, the record id, the fetch): the last fetch of each
        #: domain, for `_RECENT` seconds
        self._fetched: dict[str, tuple[float, str, tuple[StsPolicy, str]]] = {}

    def key(self, domain: str) -> str:
        return f"{self.prefix}:sts:{domain}"

    async def state(self, domain: str) -> StsState:
        now = self.clock()
        cached = await self._load(domain, now)
        try:
            record = await self.record(domain)
        except LookupError as exc:
            # DNS trouble: the cached policy still holds; without one, there is none we know
            log.info("mta-sts record lookup failed", extra={"domain": domain, "error": str(exc)})
            return StsState(cached.policy() if cached else None)
        if record is None:
            return StsState(cached.policy() if cached else None)
        if cached is not None and cached.id == record.id:
            policy = cached.policy()
            half_life = cached.fetched + (cached.expires - cached.fetched) / 2
            if policy is not None and (now < half_life or not await self._may_refresh(domain)):
                return StsState(policy)
        elif cached is not None and not await self._may_refresh(domain):
            # another worker is fetching the new policy (or failed to, just now)
            return StsState(cached.policy())
        try:
            policy, _ = await self._fetch_once(domain, record.id, now)
        except FetchError as exc:
            log.info("mta-sts policy fetch failed", extra={"domain": domain, "error": str(exc)})
            return StsState(cached.policy() if cached else None, exc)
        return StsState(policy)

    async def _fetch_once(self, domain: str, record_id: str, asked: float) -> tuple[StsPolicy, str]:
        """One fetch per domain at a time in this process: a burst of messages to a domain
        not yet cached waits for the same answer, and one that asked (at `asked`) before the
        last fetch was stored takes that fetch, though its read of the cache missed it."""
        recent = self._fetched.get(domain)
        if recent is not None and recent[0] > asked and recent[1] == record_id:
            return recent[2]
        running = self._fetching.get(domain)
        if running is None:
            running = asyncio.ensure_future(self._fetch_and_store(domain, record_id, asked))
            self._fetching[domain] = running
            running.add_done_callback(lambda _: self._fetching.pop(domain, None))
        return await asyncio.shield(running)

    async def _fetch_and_store(
        self, domain: str, record_id: str, asked: float
    ) -> tuple[StsPolicy, str]:
        policy, text = await self.fetch(domain)
        await self._store(domain, _Cached(record_id, text, asked, asked + policy.max_age))
        await self.redis.delete(self._lock(domain))  # only failures wait REFRESH_RETRY
        stored = self.clock()
        self._fetched[domain] = (stored, record_id, (policy, text))
        asyncio.get_running_loop().call_later(_RECENT, self._forget, domain, stored)
        return policy, text

    def _forget(self, domain: str, stored: float) -> None:
        recent = self._fetched.get(domain)
        if recent is not None and recent[0] == stored:
            del self._fetched[domain]

    async def _load(self, domain: str, now: float) -> _Cached | None:
        raw = await self.redis.get(self.key(domain))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            cached = _Cached(str(data["id"]), str(data["text"]), float(data["fetched"]),
                             float(data["expires"]))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None
        return cached if now < cached.expires else None

    async def _store(self, domain: str, cached: _Cached) -> None:
        ttl = int(cached.expires - cached.fetched)
        value = json.dumps(cached.__dict__)
        if ttl > 0:
            await self.redis.set(self.key(domain), value, ex=ttl)
        else:
            await self.redis.delete(self.key(domain))

    async def _may_refresh(self, domain: str) -> bool:
        """One worker at a time, and not again for a while after it failed."""
        return bool(await self.redis.set(self._lock(domain), "1", nx=True, ex=REFRESH_RETRY))

    def _lock(self, domain: str) -> str:
        return f"{self.prefix}:sts-refresh:{domain}"
