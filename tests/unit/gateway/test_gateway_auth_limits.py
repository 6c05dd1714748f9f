"""The AUTH state in Redis (ratelimit.Limits' authentication part): failures counted per
network, per user and per user from a network; networks remembered per user, with an expiry
and a bound; the user's keys under one hash tag (Redis Cluster), the user's name hashed."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from conditions import eventually
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from mailkube_core.redis_multiplexed import multiplexed
from mailkube_gateway.auth_throttle import AuthHistory
from mailkube_gateway.ratelimit import KNOWN_NETWORKS_PER_USER, Limits

WINDOW = timedelta(minutes=15)
REMEMBER = timedelta(days=30)


@pytest.fixture
async def limits(redis_url: str) -> Any:
    client = multiplexed(Redis.from_url(redis_url))
    try:
        yield Limits(client, f"t{uuid.uuid4().hex[:6]}")
    finally:
        await client.aclose()


async def test_failures_are_counted_per_network_per_user_and_per_user_from_a_network(
    limits: Limits,
) -> None:
    assert await limits.auth_history("a@x.test", "192.0.2.1/32") == AuthHistory()
    first = await limits.record_auth_failure("a@x.test", "192.0.2.1/32", WINDOW, AuthHistory())
    assert first == AuthHistory(network_failures=1, user_failures=1, own_failures=1)
    await limits.record_auth_failure("b@x.test", "192.0.2.1/32", WINDOW, AuthHistory())
    await limits.record_auth_failure("a@x.test", "192.0.2.2/32", WINDOW, AuthHistory())
    assert await limits.auth_history("a@x.test", "192.0.2.1/32") == AuthHistory(
        network_failures=2, user_failures=2, own_failures=1
    )
    assert await limits.auth_history("a@x.test", "192.0.2.3/32") == AuthHistory(
        network_failures=0, user_failures=2, own_failures=0
    )
    # the history's known flag is carried over, not read again
    known = AuthHistory(known=True)
    counted = await limits.record_auth_failure("a@x.test", "192.0.2.3/32", WINDOW, known)
    assert counted.known


async def test_failures_are_forgotten_after_the_window(limits: Limits) -> None:
    await limits.record_auth_failure("a@x.test", "192.0.2.1/32", timedelta(milliseconds=50),
                                     AuthHistory())  # fmt: skip

    async def forgotten() -> bool:
        return await limits.auth_history("a@x.test", "192.0.2.1/32") == AuthHistory()

    await eventually(forgotten)


async def test_a_login_remembers_the_network_and_clears_its_own_failures(limits: Limits) -> None:
    await limits.record_auth_failure("a@x.test", "192.0.2.1/32", WINDOW, AuthHistory())
    await limits.record_auth_success("a@x.test", "192.0.2.1/32", REMEMBER)
    assert await limits.auth_history("a@x.test", "192.0.2.1/32") == AuthHistory(
        network_failures=1, user_failures=1, own_failures=0, known=True
    )
    # for that user only, from that network only
    assert not (await limits.auth_history("b@x.test", "192.0.2.1/32")).known
    assert not (await limits.auth_history("a@x.test", "192.0.2.2/32")).known


async def test_a_remembered_network_expires(limits: Limits) -> None:
    await limits.record_auth_success("a@x.test", "192.0.2.1/32", timedelta(milliseconds=50))

    async def forgotten() -> bool:
        return not (await limits.auth_history("a@x.test", "192.0.2.1/32")).known

    await eventually(forgotten)
    # renewed by the next login
    await limits.record_auth_success("a@x.test", "192.0.2.1/32", REMEMBER)
    assert (await limits.auth_history("a@x.test", "192.0.2.1/32")).known


async def test_remembered_networks_are_bounded_the_oldest_go_first(limits: Limits) -> None:
    for n in range(KNOWN_NETWORKS_PER_USER + 5):
        await limits.record_auth_success("a@x.test", f"10.0.{n // 256}.{n % 256}/32", REMEMBER)
    [key] = [k for k in await limits.redis.keys(f"*{limits.prefix}:authuser:*") if b"known" in k]
    assert await limits.redis.zcard(key) == KNOWN_NETWORKS_PER_USER
    assert not (await limits.auth_history("a@x.test", "10.0.0.0/32")).known
    assert (await limits.auth_history("a@x.test", "10.0.0.5/32")).known
    newest = KNOWN_NETWORKS_PER_USER + 4
    assert (await limits.auth_history("a@x.test", f"10.0.0.{newest}/32")).known


async def test_keys_name_no_user_and_share_the_users_hash_tag(limits: Limits) -> None:
    await limits.record_auth_failure("Secret-Name", "192.0.2.1/32", WINDOW, AuthHistory())
    await limits.record_auth_success("Secret-Name", "192.0.2.2/32", REMEMBER)
    keys = sorted(k.decode() for k in await limits.redis.keys(f"*{limits.prefix}:auth*"))
    assert not [k for k in keys if "secret" in k.lower()]
    user_keys = [k for k in keys if ":authuser:" in k]
    assert len(user_keys) == 3  # failures, of which from 192.0.2.1, known networks
    assert len({k[: k.index("}") + 1] for k in user_keys}) == 1
    assert f"{{{limits.prefix}:authfail:192.0.2.1/32}}" in keys


@pytest.mark.cluster
async def test_auth_state_on_a_redis_cluster(redis_cluster: Any) -> None:
    cluster = ClusterClient.from_url(redis_cluster.url)
    limits = Limits(cluster, f"c{uuid.uuid4().hex[:6]}")
    try:
        for n in range(3):
            await limits.record_auth_failure(f"u{n}@x.test", f"2001:db8:{n}::/64", WINDOW,
                                             AuthHistory())  # fmt: skip
        await limits.record_auth_success("u0@x.test", "2001:db8:0::/64", REMEMBER)
        assert await limits.auth_history("u0@x.test", "2001:db8:0::/64") == AuthHistory(
            network_failures=1, user_failures=1, own_failures=0, known=True
        )
        assert await limits.auth_history("u1@x.test", "2001:db8:0::/64") == AuthHistory(
            network_failures=1, user_failures=1, own_failures=0, known=False
        )
    finally:
        await cluster.aclose()
