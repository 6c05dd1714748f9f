"""The operator against a real Kubernetes API server (tests/kube_apiserver.py: etcd,
kube-apiserver and kube-controller-manager 1.20.2 on loopback, OwnerReferencesPermissionEnforcement
on), logged in with the token of the chart's own ServiceAccount, so the chart's RBAC is what
is tested: the chart as `helm template` renders it (what 1.20 knows of it), the examples
converging, updates, deletes with garbage collection, a refusal's message in the conditions,
restarts and kill -9, the API server going away (watches resumed from a version it no longer
has: 410, re-list) and a token file rotated under the operator.

What 1.20 lacks stays on the emulator and the schema validator: CEL rules
(tests/unit/operator/test_operator_crds.py), policy/v1 and autoscaling/v2 (tests/unit/chart).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_render import base_values, render
from kube_apiserver import ControlPlane
from kubernetes import client
from operator_harness import Api, OperatorRun, condition, eventually, operator_settings
from redis_servers import free_port

from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import RoutingSnapshot, RoutingStore, verify_password_sync
from mailkube_core.settings import OperatorSettings
from mailkube_operator import dkim, rotation

ROOT = Path(__file__).resolve().parents[2]
#: kinds of the chart that 1.20 does not serve (policy/v1 PDB, autoscaling/v2 HPA)
NEWER_THAN_1_20 = {"PodDisruptionBudget", "HorizontalPodAutoscaler"}
CONVERGE = 60.0


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("kube"))
    crds = render(base_values()).of_kind("CustomResourceDefinition")
    try:
        yield plane.start(crds)
    finally:
        plane.stop()


@dataclass
class Release:
    """The chart installed into one namespace of the shared control plane."""

    plane: ControlPlane
    namespace: str
    name: str
    account: str
    token_file: Path
    skipped: list[str]
    api: Api

    def settings(self, redis_url: str, **overrides: Any) -> OperatorSettings:
        values: dict[str, Any] = {
            "kube_api_server": self.plane.url,
            "kube_token_file": str(self.token_file),
            "kube_ca_file": str(self.plane.ca_file),
            "namespace": self.namespace,
            **overrides,
        }
        return operator_settings(redis_url, self.plane.url, **values)


def install(plane: ControlPlane, namespace: str, release: str, tmp_path: Path,
            values: dict[str, Any] | None = None) -> Release:  # fmt: skip
    """`helm template` of the chart (its hooks are not installed), applied as an admin would
    (the CRDs are there since the control plane started), and a token of the operator's
    ServiceAccount in a file."""
    core = plane.core()
    core.create_namespace({"metadata": {"name": namespace}})
    rendered = render(base_values(**(values or {})), release=release, namespace=namespace)
    manifests = [m for m in rendered.manifests
                 if "helm.sh/hook" not in (m["metadata"].get("annotations") or {})]  # fmt: skip
    skipped = plane.apply([m for m in manifests if m["kind"] != "CustomResourceDefinition"],
                          namespace)  # fmt: skip
    (account,) = [m["metadata"]["name"] for m in manifests if m["kind"] == "ServiceAccount"
                  and "operator" in m["metadata"]["name"]]  # fmt: skip
    token_file = tmp_path / f"{namespace}-token"
    token_file.write_text(plane.service_account_token(namespace, account))
    api = Api(plane.configuration(), namespace)
    return Release(plane, namespace, release, account, token_file, skipped, api)


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    return "t-" + request.node.name.removeprefix("test_").replace("_", "-")[:40].rstrip("-")


@pytest.fixture
def release(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Iterator[Release]:
    installed = install(control_plane, namespace, "mail", tmp_path)
    yield installed
    installed.api.close()


async def table_of(settings: OperatorSettings) -> RoutingSnapshot:
    redis = connect_redis(settings)
    try:
        return await RoutingStore(redis, settings.key_prefix).load()
    finally:
        await redis.aclose()


def examples(namespace: str) -> list[dict[str, Any]]:
    found = []
    for name in ("maildomain.yaml", "mailuser.yaml"):
        for document in yaml.safe_load_all((ROOT / "examples" / name).read_text()):
            if document:
                document["metadata"]["namespace"] = namespace
                found.append(document)
    return found


async def events_about(api: Api, name: str) -> list[tuple[str, str, str]]:
    return [(e["type"], e["reason"], e["message"]) for e in await api.events()
            if e["involvedObject"]["name"] == name]  # fmt: skip


# -- the chart's RBAC, the examples, updates, deletes --------------------------------------


async def test_examples_converge_with_the_charts_rbac_then_update_and_delete(
    release: Release, redis_url: str
) -> None:
    assert set(k.split("/")[0] for k in release.skipped) <= NEWER_THAN_1_20, release.skipped
    api = release.api
    settings = release.settings(redis_url)
    run = OperatorRun(settings)
    await run.start()
    try:
        release.plane.apply(examples(release.namespace), release.namespace)

        async def converged() -> dict[str, Any]:
            domain = await api.get("maildomains", "example-org")
            assert condition(domain, "Ready")["status"] == "True", domain.get("status")
            user = await api.get("mailusers", "alice")
            assert condition(user, "Ready")["status"] == "True", user.get("status")
            snapshot = await table_of(settings)
            alice = snapshot.user("alice@example.org")
            assert alice is not None
            assert verify_password_sync(alice.password_hash, "change-me-to-something-long")
            published = snapshot.domain("example.org")
            assert published is not None
            assert sorted(k.selector for k in published.signing_keys()) == [
                "mk2025", "mk2025-ed25519"]  # fmt: skip
            relayed = snapshot.domain("corp.example.org")  # the example's inboundRelay
            assert relayed is not None
            assert relayed.inbound_relay is not None
            assert (relayed.inbound_relay.host, relayed.inbound_relay.tls) == (
                "exchange.corp.example.org", "starttls")  # fmt: skip
            return domain

        domain = await eventually(converged, CONVERGE)
        # the DKIM Secret, owned by the MailDomain with blockOwnerDeletion: allowed under
        # OwnerReferencesPermissionEnforcement by the Role's maildomains/finalizers rule
        secret = await api.secret("example-org-dkim")
        assert secret is not None
        (owner,) = secret["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["blockOwnerDeletion"]) == (
            "MailDomain", domain["metadata"]["uid"], True)  # fmt: skip
        assert domain["status"]["observedGeneration"] == domain["metadata"]["generation"]

        # an update: a new alias is published, the status follows the generation
        await api.patch("mailusers", "alice", {"spec": {"aliases": ["sales@example.org"]}})

        async def updated() -> None:
            alice = (await table_of(settings)).user("alice@example.org")
            assert alice is not None
            assert alice.aliases == ["sales@example.org"]
            user = await api.get("mailusers", "alice")
            assert user["status"]["observedGeneration"] == user["metadata"]["generation"] == 2

        await eventually(updated, CONVERGE)

        # a delete: out of the table, and the garbage collector takes the DKIM Secret
        await api.delete("maildomains", "example-org")

        async def gone() -> None:
            snapshot = await table_of(settings)
            assert snapshot.domain("example.org") is None
            assert await api.secret("example-org-dkim") is None
            user = await api.get("mailusers", "alice")
            assert condition(user, "Ready")["reason"] == "DomainNotFound"

        await eventually(gone, CONVERGE)
    finally:
        await run.stop()


async def test_a_refusal_carries_the_servers_message(release: Release, redis_url: str) -> None:
    """Without `update` on maildomains/finalizers (the chart before this fix), the API server
    refuses the DKIM Secret's blockOwnerDeletion; the condition and the Event say why."""
    rbac = client.RbacAuthorizationV1Api(release.plane.api_client())
    role = rbac.read_namespaced_role(f"{release.name}-mailkube-operator", release.namespace)
    full_rules = rbac.api_client.sanitize_for_serialization(role.rules)
    without = [r for r in full_rules if r["resources"] != ["maildomains/finalizers"]]
    assert len(without) == len(full_rules) - 1
    rbac.patch_namespaced_role(role.metadata.name, release.namespace, {"rules": without})
    api = release.api
    settings = release.settings(redis_url, retry_delay="1s")
    run = OperatorRun(settings)
    await run.start()
    try:
        await api.apply("maildomains", "refused", {"domain": "refused.test"})

        async def refused() -> str:
            keys = condition(await api.get("maildomains", "refused"), "DKIMKeyReady")
            assert (keys["status"], keys["reason"]) == ("False", "DKIMSecretFailed"), keys
            return str(keys["message"])

        message = await eventually(refused, CONVERGE)
        assert message.startswith("Secret refused-dkim: Kubernetes API 403 Forbidden: ")
        assert "cannot set blockOwnerDeletion" in message, message

        async def announced() -> None:  # the Event is posted after the status is written
            assert ("Warning", "DKIMSecretFailed", message) in await events_about(api, "refused")

        await eventually(announced, CONVERGE)

        # the rule back: the next retry makes the keys
        rbac.patch_namespaced_role(role.metadata.name, release.namespace, {"rules": full_rules})

        async def made() -> None:
            ready = condition(await api.get("maildomains", "refused"), "Ready")
            assert ready["status"] == "True", ready

        await eventually(made, CONVERGE)
    finally:
        await run.stop()


async def test_dkim_rotation_with_the_charts_rbac(release: Release, redis_url: str) -> None:
    """A rotation asked for by annotation, on the real API server with the chart's Role: the
    annotation is removed (patch on maildomains), the next key and the state are written to
    the Secret, and after the overlap the old key leaves it (a merge patch with null)."""
    api = release.api
    settings = release.settings(redis_url)
    run = OperatorRun(settings)
    await run.start()
    try:
        timed = {"propagationDelay": "0s", "overlap": "2s"}
        await api.apply("maildomains", "rot", {"domain": "rot.test",
                        "dkim": {"selector": "mk", "rotation": timed}})  # fmt: skip

        async def signing() -> list[str]:
            published = (await table_of(settings)).domain("rot.test")
            assert published is not None
            return sorted(k.selector for k in published.signing_keys())

        async def keys() -> list[str]:
            secret = await api.secret("rot-dkim")
            assert secret is not None
            return sorted(k for k in dkim.decode_data(secret["data"]) if k != rotation.STATE_KEY)

        async def ready() -> None:
            assert condition(await api.get("maildomains", "rot"), "Ready")["status"] == "True"
            assert await signing() == ["mk"]

        await eventually(ready, CONVERGE)
        annotate = {"metadata": {"annotations": {rotation.ROTATE_ANNOTATION: "now"}}}
        await api.patch("maildomains", "rot", annotate)

        async def rotated() -> None:
            obj = await api.get("maildomains", "rot")
            assert rotation.ROTATE_ANNOTATION not in (obj["metadata"].get("annotations") or {})
            assert await signing() == ["mk-2"]
            assert await keys() == ["mk-2.rsa-sha256"]
            done = condition(obj, rotation.CONDITION)
            assert (done["status"], done["reason"]) == ("False", "Idle"), done
            reasons = [r for _, r, _ in await events_about(api, "rot")]
            assert {"DKIMRotationStarted", "DKIMKeySwitched", "DKIMKeyRetired"} <= set(reasons)

        await eventually(rotated, CONVERGE)
    finally:
        await run.stop()


async def test_cluster_wide_with_the_charts_cluster_role(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, redis_url: str
) -> None:
    installed = install(control_plane, namespace, "wide", tmp_path,
                        {"operator": {"clusterWide": True}})  # fmt: skip
    elsewhere = f"{namespace}-tenant"
    control_plane.core().create_namespace({"metadata": {"name": elsewhere}})
    tenant = Api(control_plane.configuration(), elsewhere)
    settings = installed.settings(redis_url, cluster_wide=True)
    run = OperatorRun(settings)
    await run.start()
    try:
        await tenant.apply("maildomains", "tenant", {"domain": "tenant.test"})
        await tenant.apply("mailusers", "bob", {"address": "bob@tenant.test"})

        async def served() -> None:
            snapshot = await table_of(settings)
            assert snapshot.domain("tenant.test") is not None
            assert snapshot.user("bob@tenant.test") is not None
            assert condition(await tenant.get("maildomains", "tenant"), "Ready")["status"] == "True"
            assert await tenant.secret("tenant-dkim") is not None

        await eventually(served, CONVERGE)
    finally:
        await run.stop()
        tenant.close()
        installed.api.close()


# -- restarts, kill -9, the API server going away, a rotated token -------------------------


class OperatorProcess:
    """`python -m mailkube_operator` as in its pod, settings from the environment."""

    def __init__(self, settings: OperatorSettings, log: Path) -> None:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("MAILKUBE_")}  # fmt: skip
        for name in ("redis_url", "kube_api_server", "kube_token_file", "kube_ca_file",
                     "namespace", "hostname", "public_hostname", "retry_delay",
                     "initial_publish_delay", "watch_timeout"):  # fmt: skip
            value = getattr(settings, name)
            if hasattr(value, "total_seconds"):
                value = f"{value.total_seconds()}s"
            env[f"MAILKUBE_{name.upper()}"] = str(value)
        env["MAILKUBE_TELEMETRY_LISTEN"] = f"127.0.0.1:{free_port()}"
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailkube_operator"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self) -> int:
        self.process.terminate()
        return self.process.wait(30)


async def test_restart_kill9_and_api_outage_converge(
    release: Release, redis_url: str, tmp_path: Path
) -> None:
    api = release.api
    settings = release.settings(redis_url, retry_delay="1s")
    log = tmp_path / "operator.log"
    await api.apply("maildomains", "example", {"domain": "example.test"})
    await api.apply("mailusers", "alice", {"address": "alice@example.test"})

    running: list[OperatorProcess] = []

    def aliases_are(expected: list[str]) -> Any:
        async def check() -> None:
            code = running[-1].process.poll()
            assert code is None, f"the operator exited ({code}):\n{log.read_text()[-4000:]}"
            alice = (await table_of(settings)).user("alice@example.test")
            assert alice is not None
            assert alice.aliases == expected, log.read_text()[-4000:]
            user = await api.get("mailusers", "alice")
            assert user["status"]["observedGeneration"] == user["metadata"]["generation"]

        return check

    process = OperatorProcess(settings, log)
    running.append(process)
    try:
        await eventually(aliases_are([]), CONVERGE)
        # kill -9, a change while it is down, a new process: it catches up
        process.kill9()
        await api.patch("mailusers", "alice", {"spec": {"aliases": ["a1@example.test"]}})
        process = OperatorProcess(settings, log)
        running.append(process)
        await eventually(aliases_are(["a1@example.test"]), CONVERGE)

        # the API server dies and comes back; the operator's watches resume from versions the
        # new server's watch cache does not have (410 Gone), so kopf lists again
        release.plane.kill_apiserver()
        await asyncio.to_thread(release.plane.start_apiserver)
        await api.patch("mailusers", "alice", {"spec": {"aliases": ["a2@example.test"]}})
        await eventually(aliases_are(["a2@example.test"]), CONVERGE)

        # SIGTERM: a clean exit; a restarted operator publishes the same table again
        assert process.terminate() == 0
        version = (await table_of(settings)).version
        process = OperatorProcess(settings, log)

        async def republished() -> None:
            snapshot = await table_of(settings)
            assert snapshot.version > version
            alice = snapshot.user("alice@example.test")
            assert alice is not None
            assert alice.aliases == ["a2@example.test"]

        await eventually(republished, CONVERGE)
    finally:
        if process.process.poll() is None:
            process.kill9()


async def test_a_rotated_token_file_is_read_again(
    release: Release, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The token in the file is replaced and the old one revoked (its Secret deleted): our
    client picks the new one up, and kopf, refused (401), logs in again with it."""
    caplog.set_level(logging.INFO, logger="kopf")
    core = release.plane.core()
    old_token = release.token_file.read_text()
    second = f"{release.account}-rotated"
    core.create_namespaced_secret(release.namespace, {
        "metadata": {"name": second, "annotations": {
            "kubernetes.io/service-account.name": release.account}},
        "type": "kubernetes.io/service-account-token",
    })  # fmt: skip
    new_token = release.plane.secret_token(release.namespace, second)
    assert new_token != old_token
    api = release.api
    settings = release.settings(redis_url, retry_delay="1s", watch_timeout="2s")
    run = OperatorRun(settings)
    await run.start()
    try:
        await api.apply("maildomains", "example", {"domain": "example.test"})

        async def served() -> None:
            assert (await table_of(settings)).domain("example.test") is not None

        await eventually(served, CONVERGE)
        release.token_file.write_text(new_token)
        for secret in core.list_namespaced_secret(release.namespace).items:
            annotations = secret.metadata.annotations or {}
            if (annotations.get("kubernetes.io/service-account.name") == release.account
                    and secret.metadata.name != second):  # fmt: skip
                core.delete_namespaced_secret(secret.metadata.name, release.namespace)

        async def revoked() -> None:  # once the API server's cache has seen the deletion
            assert not await asyncio.to_thread(release.plane.token_works, old_token)

        await eventually(revoked, CONVERGE)

        await api.apply("mailusers", "alice", {"address": "alice@example.test"})

        async def relogged_and_published() -> None:
            assert any("Re-authentication has been initiated" in r.getMessage()
                       for r in caplog.records)  # fmt: skip
            assert (await table_of(settings)).user("alice@example.test") is not None
            user = await api.get("mailusers", "alice")
            assert condition(user, "Ready")["status"] == "True"

        await eventually(relogged_and_published, CONVERGE)
    finally:
        await run.stop()
