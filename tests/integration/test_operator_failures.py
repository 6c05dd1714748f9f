"""Failure paths of the operator: each one a condition and an Event on the object, retried after
retry_delay (never in a hot loop), and nothing lost once the failure is over. Redis going away
and coming back (empty, too), Kubernetes API errors injected into the emulator, a relay
credentials Secret created after its MailDomain, the DKIM Secret deleted by hand and garbage-
collected with its MailDomain."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest
from kube_emulator import Fault, KubeEmulator
from operator_harness import (
    Api,
    OperatorRun,
    condition,
    events,
    eventually,
    operator_settings,
)
from redis_servers import RedisServer

from mailkube_core.routing import verify_password_sync
from mailkube_core.settings import OperatorSettings
from mailkube_operator import dkim

pytestmark = pytest.mark.kmock(cls=KubeEmulator)

RETRY_DELAY = 0.5


def settings(redis_url: str, kube_url: str) -> OperatorSettings:
    return operator_settings(redis_url, kube_url, retry_delay=f"{RETRY_DELAY}s")


@pytest.fixture
async def operator(kmock: KubeEmulator, api: Api, redis_url: str) -> AsyncIterator[OperatorRun]:
    run = OperatorRun(settings(redis_url, str(kmock.url)))
    await run.start()
    yield run
    await run.stop()


async def reason(api: Api, plural: str, name: str, type_: str = "Ready") -> tuple[str, str]:
    found = condition(await api.get(plural, name), type_)
    return found["status"], found["reason"]


async def test_redis_down_while_resources_change_then_back_then_empty(
    kmock: KubeEmulator, api: Api, private_redis: RedisServer
) -> None:
    run = OperatorRun(settings(private_redis.url, str(kmock.url)))
    await run.start()
    try:
        await api.apply("maildomains", "example", {"domain": "example.test"})
        await api.apply("mailusers", "alice", {"address": "alice@example.test"})

        async def alice_ready() -> None:
            assert (await run.table()).user("alice@example.test") is not None
            assert await reason(api, "mailusers", "alice") == ("True", "Published")

        await eventually(alice_ready)
        assert run.state.reconciler is not None
        assert run.state.reconciler.healthy

        await asyncio.to_thread(private_redis.kill)
        await api.apply("mailusers", "bob", {"address": "bob@example.test"})

        async def says_so() -> None:
            bob = condition(await api.get("mailusers", "bob"), "Ready")
            assert (bob["status"], bob["reason"]) == ("False", "RedisUnavailable"), bob
            assert bob["message"].startswith("Redis: ")
            domain = await api.get("maildomains", "example")
            assert condition(domain, "Published")["reason"] == "RedisUnavailable"
            assert condition(domain, "Ready")["status"] == "False"
            assert ("Warning", "RedisUnavailable") in await events(api, "bob")
            assert ("Warning", "RedisUnavailable") in await events(api, "example")
            assert run.state.reconciler is not None
            assert not run.state.reconciler.healthy

        await eventually(says_so)

        await asyncio.to_thread(private_redis.restart)

        async def published_when_back() -> None:
            snapshot = await run.table()
            assert sorted(u.address for u in snapshot.table.users) == [
                "alice@example.test", "bob@example.test"]  # fmt: skip
            assert await reason(api, "mailusers", "bob") == ("True", "Published")
            assert await reason(api, "maildomains", "example") == ("True", "Ready")
            assert ("Normal", "Published") in await events(api, "bob")
            assert run.state.reconciler is not None
            assert run.state.reconciler.healthy

        await eventually(published_when_back)

        # Redis loses everything (a new, empty Redis): the operator publishes the table again
        # without any resource changing
        client = private_redis.client()
        try:
            await asyncio.to_thread(client.flushall)
        finally:
            client.close()

        async def republished() -> None:
            snapshot = await run.table()
            assert snapshot.version >= 1
            assert len(snapshot.table.users) == 2

        await eventually(republished)
    finally:
        await run.stop()


async def test_api_errors_are_conditions_events_and_slow_retries(
    kmock: KubeEmulator, api: Api, operator: OperatorRun
) -> None:
    # the password Secret cannot be read
    await api.create_secret("alice-pw", {"password": "alice-secret"})
    unreadable = kmock.fail(500, action="FETCH", plural="secrets", name="alice-pw")
    await api.apply("maildomains", "example", {"domain": "example.test"})
    await api.apply("mailusers", "alice", {"address": "alice@example.test",
                                           "passwordSecretRef": {"name": "alice-pw"}})  # fmt: skip

    async def cannot_read() -> None:
        ready = condition(await api.get("mailusers", "alice"), "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "PasswordSecretMissing"), ready
        assert "Secret alice-pw could not be read (Kubernetes API 500" in ready["message"]
        assert ("Warning", "PasswordSecretMissing") in await events(api, "alice")
        user = (await operator.table()).user("alice@example.test")
        assert user is not None
        assert user.password_hash is None

    await eventually(cannot_read)
    await no_hot_loop(unreadable)
    kmock.heal(unreadable)

    async def readable() -> None:
        assert await reason(api, "mailusers", "alice") == ("True", "Published")
        user = (await operator.table()).user("alice@example.test")
        assert user is not None
        assert verify_password_sync(user.password_hash, "alice-secret")
        assert ("Normal", "Published") in await events(api, "alice")

    await eventually(readable)

    # the DKIM Secret cannot be created
    forbidden = 'secrets is forbidden: User "system:serviceaccount:mail:op" cannot create'
    refused = kmock.fail(
        403, action="CREATE", plural="secrets", reason="Forbidden", message=forbidden
    )
    await api.apply("maildomains", "other", {"domain": "other.test"})

    async def no_keys() -> None:
        obj = await api.get("maildomains", "other")
        keys = condition(obj, "DKIMKeyReady")
        assert (keys["status"], keys["reason"]) == ("False", "DKIMSecretFailed"), keys
        # the server's explanation, not only its status
        said = f"Secret other-dkim: Kubernetes API 403 Forbidden: {forbidden}"
        assert keys["message"] == said
        assert condition(obj, "Ready")["message"] == said
        posted = [e["message"] for e in await api.events()
                  if e["involvedObject"]["name"] == "other" and e["type"] == "Warning"]  # fmt: skip
        assert posted == [said]

    await eventually(no_keys)
    await no_hot_loop(refused)
    kmock.heal(refused)

    async def keys_made() -> None:
        assert await reason(api, "maildomains", "other") == ("True", "Ready")
        assert await api.secret("other-dkim") is not None
        domain = (await operator.table()).domain("other.test")
        assert domain is not None
        assert [k.selector for k in domain.signing_keys()] == ["mailkube"]

    await eventually(keys_made)

    # status patches fail: the routing table does not wait for them
    patches = kmock.fail(500, action="UPDATE", plural="mailusers", subresource="status")
    await api.apply("mailusers", "carol", {"address": "carol@example.test"})

    async def published_without_status() -> None:
        assert (await operator.table()).user("carol@example.test") is not None
        assert patches.hits >= 1
        assert "status" not in await api.get("mailusers", "carol")

    await eventually(published_without_status)
    await no_hot_loop(patches)
    kmock.heal(patches)
    await eventually(lambda: expect(api, "mailusers", "carol", ("True", "Published")))


async def expect(api: Api, plural: str, name: str, wanted: tuple[str, str]) -> None:
    assert await reason(api, plural, name) == wanted


async def no_hot_loop(fault: Fault) -> None:
    """The failing request is tried again, but never sooner than retry_delay after the last
    try, whatever else happens meanwhile (a hot loop would try again in milliseconds)."""

    async def retried() -> None:
        assert fault.hits >= 2

    await eventually(retried)
    gaps = [b - a for a, b in zip(fault.times, fault.times[1:], strict=False)]
    assert min(gaps) >= RETRY_DELAY * 0.9, gaps


async def test_relay_credentials_secret_missing_then_created_then_changed(
    api: Api, operator: OperatorRun
) -> None:
    await api.apply("maildomains", "relayed", {"domain": "relayed.test", "relay": {
        "host": "smtp.relay.test", "credentialsSecretRef": {"name": "relay-creds"}}})  # fmt: skip

    async def missing() -> None:
        obj = await api.get("maildomains", "relayed")
        ready = condition(obj, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "RelaySecretMissing"), ready
        assert ready["message"] == "Secret relay-creds not found"
        assert condition(obj, "Published")["status"] == "True"  # inbound mail still works
        domain = (await operator.table()).domain("relayed.test")
        assert domain is not None
        assert domain.relay is not None
        assert (domain.relay.host, domain.relay.username) == ("smtp.relay.test", None)
        assert ("Warning", "RelaySecretMissing") in await events(api, "relayed")

    await eventually(missing)

    await api.create_secret("relay-creds", {"username": "relay-user", "password": "relay-pw"})

    async def credentials(password: str) -> None:
        assert await reason(api, "maildomains", "relayed") == ("True", "Ready")
        domain = (await operator.table()).domain("relayed.test")
        assert domain is not None
        assert domain.relay is not None
        assert domain.relay.username == "relay-user"
        assert domain.relay.password is not None
        assert domain.relay.password.get_secret_value() == password

    await eventually(lambda: credentials("relay-pw"))
    assert ("Normal", "Ready") in await events(api, "relayed")
    obj = await api.get("maildomains", "relayed")
    assert "relay-pw" not in str(obj)

    await api.patch_secret("relay-creds", {"password": base64.b64encode(b"new-pw").decode()})
    await eventually(lambda: credentials("new-pw"))


async def test_dkim_secret_deleted_is_made_again_and_goes_with_its_domain(
    api: Api, operator: OperatorRun
) -> None:
    await api.apply("maildomains", "example", {"domain": "example.test"})
    uid = (await api.get("maildomains", "example"))["metadata"]["uid"]

    async def keys() -> dict[str, str]:
        secret = await api.secret("example-dkim")
        assert secret is not None
        owner = secret["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("MailDomain", "example", uid)
        assert owner["controller"] is True
        data = dkim.decode_data(secret["data"])
        obj = await api.get("maildomains", "example")
        assert condition(obj, "Ready")["status"] == "True"
        (record,) = [r for r in obj["status"]["dnsRecords"] if r["purpose"] == "dkim"]
        assert record["value"] == dkim.public_record("rsa-sha256", data["mailkube.rsa-sha256"])
        return data

    first = await eventually(keys)

    # deleted by hand: a new key is made (the old one is gone for good), and said so
    await api.delete_secret("example-dkim")

    async def new_keys() -> dict[str, str]:
        data = await keys()
        assert data != first
        created = [e for e in await events(api, "example") if e[1] == "DKIMKeyCreated"]
        assert len(created) == 2
        return data

    second = await eventually(new_keys)
    domain = (await operator.table()).domain("example.test")
    assert domain is not None
    assert [k.private_key.get_secret_value() for k in domain.dkim] == [
        second["mailkube.rsa-sha256"]
    ]

    # the MailDomain goes: its Secret goes with it (ownerReference), and is not made again
    await api.delete("maildomains", "example")
    await api.apply("maildomains", "later", {"domain": "later.test"})

    async def collected() -> None:
        assert await api.secret("later-dkim") is not None  # a reconcile after the delete ran
        assert await api.secret("example-dkim") is None
        assert [d.name for d in (await operator.table()).table.domains] == ["later.test"]

    await eventually(collected)
