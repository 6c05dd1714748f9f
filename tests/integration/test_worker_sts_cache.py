"""MTA-STS policies cached in a real Redis (tlspolicy/sts_cache.py, RFC 8461 §5.1, §10.2):
what the TXT record id, a failed fetch, max_age and mode none do to the cached policy. The
record and the fetch are stand-ins here; test_worker_sts_fetch.py runs the real ones."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from mailkube_core.redis_client import RedisClient, connect_redis
from mailkube_core.settings import WorkerSettings
from mailkube_worker.tlspolicy.mta_sts import StsPolicy, StsRecord, parse_policy
from mailkube_worker.tlspolicy.sts_cache import StsPolicies
from mailkube_worker.tlspolicy.sts_fetch import FetchError

DOMAIN = "example.test"


def text(mode: str, mx: str, max_age: int = 1000) -> str:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: {max_age}\n"


class World:
    """The published record and policy, a clock, and the fetches made."""

    def __init__(self) -> None:
        self.record: StsRecord | LookupError | None = StsRecord("1")
        self.policy: str | FetchError = text("enforce", "mx1.example.test")
        self.now = 1_000_000.0
        self.fetches = 0

    async def lookup(self, domain: str) -> StsRecord | None:
        if isinstance(self.record, LookupError):
            raise self.record
        return self.record

    async def fetch(self, domain: str) -> tuple[StsPolicy, str]:
        self.fetches += 1
        if isinstance(self.policy, FetchError):
            raise self.policy
        return parse_policy(self.policy), self.policy


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    client = connect_redis(WorkerSettings(redis_url=redis_url))
    yield client
    await client.aclose()


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def policies(redis: RedisClient, world: World) -> StsPolicies:
    return StsPolicies(redis, f"t{uuid.uuid4().hex[:8]}", world.lookup, world.fetch,
                       clock=lambda: world.now)  # fmt: skip


async def mx(policies: StsPolicies) -> tuple[str, ...] | None:
    state = await policies.state(DOMAIN)
    return state.policy.mx if state.policy else None


async def test_fetched_once_then_cached(policies: StsPolicies, world: World) -> None:
    assert await mx(policies) == ("mx1.example.test",)
    assert await mx(policies) == ("mx1.example.test",)
    assert world.fetches == 1


async def test_a_new_id_fetches_the_new_policy(policies: StsPolicies, world: World) -> None:
    await mx(policies)
    world.policy = text("enforce", "mx2.example.test")
    assert await mx(policies) == ("mx1.example.test",)  # same id: the cached one
    world.record = StsRecord("2")
    assert await mx(policies) == ("mx2.example.test",)
    assert world.fetches == 2


async def test_a_failed_fetch_keeps_the_cached_policy(policies: StsPolicies,
                                                      world: World) -> None:  # fmt: skip
    await mx(policies)
    world.record, world.policy = StsRecord("2"), FetchError("down")
    state = await policies.state(DOMAIN)
    assert state.policy is not None
    assert state.policy.mx == ("mx1.example.test",)
    assert state.failure is not None


async def test_no_record_or_dns_trouble_keeps_the_cached_policy_until_it_expires(
    policies: StsPolicies, world: World
) -> None:
    await mx(policies)
    world.record = None
    assert await mx(policies) == ("mx1.example.test",)
    world.record = LookupError("SERVFAIL")
    assert await mx(policies) == ("mx1.example.test",)
    world.now += 1001  # past max_age
    assert await mx(policies) is None


async def test_refreshed_past_half_its_max_age_once_per_retry_period(
    policies: StsPolicies, world: World
) -> None:
    await mx(policies)
    world.now += 400
    await mx(policies)
    assert world.fetches == 1
    world.now += 200  # past 500 of 1000 s
    world.policy = text("enforce", "mx3.example.test", max_age=5000)
    assert await mx(policies) == ("mx3.example.test",)
    assert world.fetches == 2
    world.now += 2600  # past half of the new policy's 5000 s: refresh, which fails
    world.policy = FetchError("down")
    assert await mx(policies) == ("mx3.example.test",)
    assert await mx(policies) == ("mx3.example.test",)
    assert world.fetches == 3  # the second use found the refresh lock: no new fetch


async def test_mode_none_forgets_the_policy(policies: StsPolicies, world: World) -> None:
    await mx(policies)
    world.record, world.policy = StsRecord("2"), text("none", "mx1.example.test")
    state = await policies.state(DOMAIN)
    assert state.policy is not None
    assert state.policy.mode == "none"
    assert state.active is None
    assert (await policies.state(DOMAIN)).active is None
    assert world.fetches == 2


async def test_no_record_and_nothing_cached_is_no_policy(policies: StsPolicies,
                                                         world: World) -> None:  # fmt: skip
    world.record = None
    assert (await policies.state(DOMAIN)).policy is None
    assert world.fetches == 0


async def test_a_delivery_that_read_the_cache_before_a_fetch_was_stored_takes_that_fetch(
    redis: RedisClient, world: World
) -> None:
    """Two deliveries to a domain not cached: the second reads the cache while the first's
    fetch is under way, and reaches the fetch after it is stored. It takes that fetch instead
    of fetching again (the race behind a flaky "fetched once for three messages")."""
    fetching, fetched = asyncio.Event(), asyncio.Event()
    second_looking, looked_up = asyncio.Event(), asyncio.Event()
    calls = 0

    async def lookup(domain: str) -> StsRecord | None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second delivery's lookup ends after the first stored its fetch
            second_looking.set()
            await looked_up.wait()
        return await world.lookup(domain)

    async def fetch(domain: str) -> tuple[StsPolicy, str]:
        fetching.set()
        await fetched.wait()
        return await world.fetch(domain)

    policies = StsPolicies(redis, f"t{uuid.uuid4().hex[:8]}", lookup, fetch,
                           clock=lambda: world.now)  # fmt: skip
    first = asyncio.create_task(policies.state(DOMAIN))
    await asyncio.wait_for(fetching.wait(), 10)
    second = asyncio.create_task(policies.state(DOMAIN))
    # the second has read the (still empty) cache and is looking up the record
    await asyncio.wait_for(second_looking.wait(), 10)
    world.now += 1
    fetched.set()
    assert (await first).policy is not None
    looked_up.set()
    assert (await second).policy is not None
    assert world.fetches == 1
