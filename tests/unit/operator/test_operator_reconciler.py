"""The reconciler on plain dicts, with a fake API and a fake routing store: statuses and events
written once however often it runs before the index catches up, failed steps not tried again
before retry_delay, an unexpected error retried, an unreachable API a KubeError."""

from __future__ import annotations

import socket
from typing import Any, cast

import pytest

from mailkube_core.routing import RoutingStore, RoutingTable
from mailkube_core.settings import OperatorSettings
from mailkube_operator.kube import Kube, KubeError
from mailkube_operator.plan import ObjectRecord
from mailkube_operator.publish import Indexes, Reconciler


class FakeKube:
    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, str]] = {}
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.events: list[tuple[str, str, str]] = []
        self.fail_create: Exception | None = None
        self.fail_patch: Exception | None = None
        self.creates = 0

    async def read_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> None:
        self.creates += 1
        if self.fail_create is not None:
            raise self.fail_create
        self.secrets[body["metadata"]["name"]] = dict(body["data"])

    async def patch_secret_data(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.secrets[name].update(data)

    async def patch_status(self, plural: str, namespace: str, name: str,
                           status: dict[str, Any]) -> None:  # fmt: skip
        if self.fail_patch is not None:
            raise self.fail_patch
        self.patches.append((plural, name, status))

    async def post_event(self, involved: dict[str, Any], *, type_: str, reason: str,
                         message: str, source: str) -> None:  # fmt: skip
        self.events.append((involved["name"], type_, reason))


class FakeStore:
    def __init__(self) -> None:
        self.tables: list[RoutingTable] = []

    async def replace(self, table: RoutingTable) -> int:
        self.tables.append(table)
        return len(self.tables)

    async def version(self) -> int:
        return len(self.tables)


def record(kind: str, name: str, spec: dict[str, Any], *, rv: str = "1",
           status: dict[str, Any] | None = None) -> ObjectRecord:  # fmt: skip
    return ObjectRecord.from_body({
        "apiVersion": "mailkube.io/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": "mail", "uid": f"uid-{name}", "generation": 1,
                     "creationTimestamp": "2025-01-01T00:00:00Z", "resourceVersion": rv},
        "spec": spec, "status": status or {}})  # fmt: skip


DOMAIN = {"domain": "example.test", "dkim": {"algorithm": "ed25519"}}


def reconciler(domains: list[ObjectRecord], users: list[ObjectRecord]) -> Reconciler:
    settings = OperatorSettings.model_validate(
        {"hostname": "op.example.test", "retry_delay": "30s", "log_format": "text"}
    )
    result = Reconciler(
        settings=settings, store=cast(RoutingStore, FakeStore()), kube=cast(Kube, FakeKube())
    )
    set_index(result, domains, users)
    return result


def set_index(r: Reconciler, domains: list[ObjectRecord], users: list[ObjectRecord]) -> None:
    r.indexes = Indexes(
        domains={d.key: [d] for d in domains}, users={u.key: [u] for u in users},
        password_secrets={}, dkim_secrets={},
    )  # fmt: skip


def fake(r: Reconciler) -> FakeKube:
    return cast(FakeKube, r.kube)


async def test_status_and_events_once_while_the_index_lags_behind() -> None:
    domain = record("MailDomain", "example", DOMAIN)
    user = record("MailUser", "alice", {"address": "alice@example.test"})
    r = reconciler([domain], [user])
    try:
        await r.request()
        await r.request()  # the index has not seen the status writes yet
        kube = fake(r)
        assert [(plural, name) for plural, name, _ in kube.patches] == [
            ("maildomains", "example"), ("mailusers", "alice")]  # fmt: skip
        assert kube.events == [
            ("example", "Normal", "DKIMKeyCreated"),
            ("example", "Normal", "Ready"),
            ("alice", "Normal", "Published"),
        ]
        assert len(cast(FakeStore, r.store).tables) == 1

        # the index catches up (a new resourceVersion, our status): nothing to write
        written = {name: status for _, name, status in kube.patches}
        set_index(
            r,
            [record("MailDomain", "example", DOMAIN, rv="2", status=written["example"])],
            [record("MailUser", "alice", {"address": "alice@example.test"}, rv="2",
                    status=written["alice"])],
        )  # fmt: skip
        await r.request()
        assert len(kube.patches) == 2
        assert len(kube.events) == 3
    finally:
        await r.close()


async def test_a_failed_step_waits_for_retry_delay() -> None:
    r = reconciler([record("MailDomain", "example", DOMAIN)], [])
    kube = fake(r)
    kube.fail_create = KubeError(403, "Forbidden")
    try:
        await r.request()
        await r.request()
        await r.request()
        assert kube.creates == 1  # not again before retry_delay, however often asked
        status = kube.patches[-1][2]
        keys = next(c for c in status["conditions"] if c["type"] == "DKIMKeyReady")
        assert (keys["status"], keys["reason"]) == ("False", "DKIMSecretFailed")
        assert keys["message"] == "Secret example-dkim: Kubernetes API 403: Forbidden"
        assert kube.events == [("example", "Warning", "DKIMSecretFailed")]
        assert r._retry is not None
        assert not r._retry.done()

        kube.fail_create = None
        r.not_before.clear()  # retry_delay has passed
        await r.request()
        assert kube.creates == 2
        assert ("example", "Normal", "Ready") in kube.events
    finally:
        await r.close()


async def test_an_unexpected_error_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    r = reconciler([record("MailDomain", "example", DOMAIN)], [])
    fake(r).fail_patch = RuntimeError("a bug")
    try:
        await r.request()
        assert "reconcile failed; retrying" in caplog.text
        assert r._retry is not None
        assert not r._retry.done()
    finally:
        await r.close()


async def test_an_unreachable_api_is_a_kube_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from kubernetes import client

    config = client.Configuration()
    config.host = f"http://127.0.0.1:{port}"
    kube = Kube(config)
    try:
        with pytest.raises(KubeError) as raised:
            await kube.read_secret_data("mail", "x")
        assert raised.value.status == 0
        assert "unreachable" in str(raised.value)
    finally:
        kube.close()
