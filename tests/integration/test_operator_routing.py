"""The operator against kmock's Kubernetes emulator and a real Redis: domains, users,
Secrets and conflicts, with the routing table in Redis and the statuses checked after each
step."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import kmock
import pytest
from kube_emulator import KubeEmulator
from operator_harness import Api, OperatorRun, condition, events, eventually, operator_settings

from mailkube_core.routing import verify_password_sync

pytestmark = pytest.mark.kmock(cls=KubeEmulator)


@pytest.fixture
async def operator(
    kmock: kmock.KubernetesEmulator, api: Api, redis_url: str
) -> AsyncIterator[OperatorRun]:
    run = OperatorRun(operator_settings(redis_url, str(kmock.url)))
    await run.start()
    yield run
    await run.stop()


async def test_domain_and_user_reach_the_routing_table(api: Api, operator: OperatorRun) -> None:
    await api.create_secret("alice-pw", {"password": "s3cret-alice"})
    await api.apply("maildomains", "example", {"domain": "example.test"})
    await api.apply("mailusers", "alice", {
        "address": "alice@example.test", "passwordSecretRef": {"name": "alice-pw"},
        "aliases": ["info@example.test"], "quota": "1Gi"})  # fmt: skip

    async def published() -> None:
        snapshot = await operator.table()
        assert [d.name for d in snapshot.table.domains] == ["example.test"]
        user = snapshot.user("alice@example.test")
        assert user is not None
        assert user.aliases == ["info@example.test"]
        assert user.quota == 2**30
        assert verify_password_sync(user.password_hash, "s3cret-alice")

    await eventually(published)

    async def user_ready() -> None:
        alice = await api.get("mailusers", "alice")
        ready = condition(alice, "Ready")
        assert ready["status"] == "True"
        assert alice["status"]["mailbox"] == "example.test/alice/"
        assert "s3cret-alice" not in str(alice)

    await eventually(user_ready)


async def test_secret_created_after_the_user_then_changed_then_deleted(
    api: Api, operator: OperatorRun
) -> None:
    await api.apply("maildomains", "example", {"domain": "example.test"})
    await api.apply("mailusers", "bob", {"address": "bob@example.test",
                                         "passwordSecretRef": {"name": "bob-pw"}})  # fmt: skip

    async def missing() -> None:
        snapshot = await operator.table()
        user = snapshot.user("bob@example.test")
        assert user is not None  # mail is still delivered
        assert user.password_hash is None  # but nobody can log in
        bob = await api.get("mailusers", "bob")
        ready = condition(bob, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "PasswordSecretMissing")
        assert "bob-pw" in ready["message"]

    await eventually(missing)

    await api.create_secret("bob-pw", {"password": "first-password"})

    async def hashed(password: str) -> None:
        user = (await operator.table()).user("bob@example.test")
        assert user is not None
        assert verify_password_sync(user.password_hash, password)
        ready = condition(await api.get("mailusers", "bob"), "Ready")
        assert ready["status"] == "True"

    await eventually(lambda: hashed("first-password"))

    await api.patch_secret("bob-pw", {"password": base64.b64encode(b"second-password").decode()})
    await eventually(lambda: hashed("second-password"))

    await api.delete_secret("bob-pw")
    await eventually(missing)

    async def warned() -> None:
        events = await api.events()
        reasons = [(e["involvedObject"]["name"], e["type"], e["reason"]) for e in events]
        assert ("bob", "Warning", "PasswordSecretMissing") in reasons
        for event in events:
            assert "password" not in event.get("message", "").replace("bob-pw", "")

    await eventually(warned)


async def test_conflicts_the_earlier_user_keeps_working(api: Api, operator: OperatorRun) -> None:
    await api.apply("maildomains", "example", {"domain": "example.test"})
    await api.apply("mailusers", "alice", {"address": "alice@example.test"})
    await eventually(lambda: _ready(api, "alice"))
    await api.apply("mailusers", "alice-again", {"address": "Alice@example.test"})
    await api.apply("mailusers", "carol", {"address": "carol@example.test",
                                           "aliases": ["alice@example.test"]})  # fmt: skip

    async def conflicts() -> None:
        for name in ("alice-again", "carol"):
            ready = condition(await api.get("mailusers", name), "Ready")
            assert (ready["status"], ready["reason"]) == ("False", "AddressConflict")
            assert "MailUser mail/alice" in ready["message"]
            assert ("Warning", "AddressConflict") in await events(api, name)
        snapshot = await operator.table()
        assert [u.address for u in snapshot.table.users] == ["alice@example.test"]
        assert ("Warning", "AddressConflict") not in await events(api, "alice")

    await eventually(conflicts)
    await _ready(api, "alice")

    # the earlier one goes: the next in line takes the address
    await api.delete("mailusers", "alice")

    async def taken_over() -> None:
        snapshot = await operator.table()
        assert sorted(u.address for u in snapshot.table.users) == ["alice@example.test"]
        await _ready(api, "alice-again")
        ready = condition(await api.get("mailusers", "carol"), "Ready")
        assert ready["reason"] == "AddressConflict"
        assert "alice-again" in ready["message"]

    await eventually(taken_over)


async def test_domain_not_found_until_the_domain_appears_and_after_it_goes(
    api: Api, operator: OperatorRun
) -> None:
    await api.apply("mailusers", "dave", {"address": "dave@later.test"})

    async def not_found() -> None:
        ready = condition(await api.get("mailusers", "dave"), "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "DomainNotFound")
        assert (await operator.table()).user("dave@later.test") is None

    await eventually(not_found)
    await api.apply("maildomains", "later", {"domain": "later.test"})

    async def found() -> None:
        assert (await operator.table()).user("dave@later.test") is not None
        await _ready(api, "dave")
        assert await events(api, "dave") == [
            ("Warning", "DomainNotFound"), ("Normal", "Published")]  # fmt: skip

    await eventually(found)

    await api.delete("maildomains", "later")

    async def gone() -> None:
        snapshot = await operator.table()
        assert snapshot.table.domains == []
        assert snapshot.table.users == []
        await not_found()

    await eventually(gone)


async def test_user_update_is_published(api: Api, operator: OperatorRun) -> None:
    await api.apply("maildomains", "example", {"domain": "example.test"})
    await api.apply("mailusers", "erin", {"address": "erin@example.test"})
    await eventually(lambda: _ready(api, "erin"))
    await api.patch("mailusers", "erin", {"spec": {"suspended": True,
                                                   "forwardTo": ["erin@remote.test"]}})  # fmt: skip

    async def updated() -> None:
        user = (await operator.table()).user("erin@example.test")
        assert user is not None
        assert user.suspended
        assert user.forward_to == ["erin@remote.test"]
        erin = await api.get("mailusers", "erin")
        assert erin["status"]["observedGeneration"] == erin["metadata"]["generation"] == 2

    await eventually(updated)


async def _ready(api: Api, name: str) -> None:
    ready = condition(await api.get("mailusers", name), "Ready")
    assert ready["status"] == "True", ready


async def test_tls_policies_and_mta_sts_of_the_settings_and_specs_are_published(
    kmock: kmock.KubernetesEmulator, api: Api, redis_url: str
) -> None:
    """The operator's tls_policies and a MailDomain's spec.mtaSts reach the table in Redis,
    where the worker and the gateway read them."""
    settings = operator_settings(redis_url, str(kmock.url), tls_policies="partner.example=dane")
    run = OperatorRun(settings)
    await run.start()
    try:
        await api.apply("maildomains", "sts", {
            "domain": "sts.test", "mtaSts": {"mode": "enforce", "maxAge": 86400}})  # fmt: skip

        async def published() -> None:
            snapshot = await run.table()
            assert snapshot.tls_policy("partner.example") == "dane"
            domain = snapshot.domain("sts.test")
            assert domain is not None
            assert domain.mta_sts is not None
            assert (domain.mta_sts.mode, domain.mta_sts.mx) == ("enforce", ["mx.example.test"])

        await eventually(published)
    finally:
        await run.stop()
