"""Password hashes outlive the operator: a restarted operator publishes every unchanged
password's hash as it was (argon2id salts are random, so a re-hash would be a new string)
without reading its Secret again, because the fingerprint key is kept in a Secret and the
hashes in Redis. A changed password is hashed again; a deleted user's hash is dropped."""

from __future__ import annotations

import pytest
from kube_emulator import KubeEmulator
from operator_harness import Api, OperatorRun, condition, eventually, operator_settings
from redis.asyncio import Redis

from mailkube_core.routing import verify_password_sync
from mailkube_operator.secrets import FINGERPRINT_SECRET, hashes_key

pytestmark = pytest.mark.kmock(cls=KubeEmulator)


async def test_a_restart_rehashes_nothing_unchanged(
    kmock: KubeEmulator, api: Api, redis_url: str
) -> None:
    settings = operator_settings(redis_url, str(kmock.url))
    await api.create_secret("alice-pw", {"password": "alice-secret"})
    await api.create_secret("bob-pw", {"password": "bob-secret"})
    await api.apply("maildomains", "example", {"domain": "example.test"})
    for name in ("alice", "bob"):
        spec = {"address": f"{name}@example.test", "passwordSecretRef": {"name": f"{name}-pw"}}
        await api.apply("mailusers", name, spec)

    first = OperatorRun(settings)
    await first.start()
    try:

        async def hashed() -> dict[str, str]:
            table = (await first.table()).table
            found = {u.address: u.password_hash for u in table.users}
            assert len(found) == 2
            assert all(found.values()), found
            return {k: str(v) for k, v in found.items()}

        hashes = await eventually(hashed)
    finally:
        await first.stop()
    assert await api.secret(FINGERPRINT_SECRET) is not None

    # the restarted operator may not read the password Secrets: it has no need to
    unreadable = kmock.fail(500, action="FETCH", plural="secrets", name="alice-pw")
    second = OperatorRun(settings)
    await second.start()
    try:
        await api.patch("mailusers", "bob", {"spec": {"aliases": ["robert@example.test"]}})

        async def republished() -> None:
            table = (await second.table()).table
            assert [a for u in table.users for a in u.aliases] == ["robert@example.test"]
            assert {u.address: u.password_hash for u in table.users} == hashes
            ready = condition(await api.get("mailusers", "alice"), "Ready")
            assert ready["reason"] == "Published", ready

        await eventually(republished)
        assert unreadable.hits == 0

        # a changed password is hashed again, and the old hash is forgotten
        kmock.heal(unreadable)
        await api.delete("mailusers", "bob")
        await api.patch_secret("alice-pw", {"password": "bmV3LXNlY3JldA=="})  # new-secret

        async def rehashed() -> str:
            user = (await second.table()).user("alice@example.test")
            assert user is not None
            assert user.password_hash != hashes["alice@example.test"]
            assert verify_password_sync(user.password_hash, "new-secret")
            return str(user.password_hash)

        new_hash = await eventually(rehashed)

        async def stored_once() -> None:
            redis = Redis.from_url(redis_url)
            try:
                stored = await redis.hgetall(hashes_key(settings.key_prefix))
            finally:
                await redis.aclose()
            assert sorted(v.decode() for v in stored.values()) == [new_hash]

        await eventually(stored_once)
    finally:
        await second.stop()
