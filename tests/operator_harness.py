"""The operator against kmock's Kubernetes emulator and a real Redis, for tests.

- `OperatorRun`: run_operator in its own thread (kopf's advice), stopped by a flag
- `Api`: the synchronous kubernetes client, every call in a thread (the emulator serves from
  the test's event loop)
- `eventually`: poll an assertion until it holds or a deadline passes
- `events`: (kind/name, type, reason) of the Events posted, to assert on
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import kmock
import pytest
from conditions import eventually as poll
from kube_emulator import mailkube_resources
from kubernetes import client

from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import RoutingSnapshot, RoutingStore
from mailkube_core.settings import OperatorSettings
from mailkube_operator.app import run_operator
from mailkube_operator.state import OperatorState

GROUP, VERSION, NS = "mailkube.io", "v1alpha1", "mail"
MERGE = "application/merge-patch+json"
T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """check() until it stops raising AssertionError (or KeyError, ...), and its result; after
    the deadline, check()'s own error. The polling is conditions.eventually's."""
    results: list[T] = []

    async def probe() -> bool:
        try:
            results[:] = [await check()]
        except (AssertionError, KeyError, IndexError, TypeError):
            return False
        return True

    try:
        await poll(probe, timeout)
    except AssertionError:
        return await check()  # fails with what was wrong at the end
    return results[0]


def operator_settings(redis_url: str, kube_url: str, **overrides: Any) -> OperatorSettings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "kube_api_server": kube_url,
        "namespace": NS,
        "hostname": "op.example.test",
        "public_hostname": "mx.example.test",
        "telemetry_listen": "",
        "initial_publish_delay": "0.2s",
        "retry_delay": "1s",
        "log_format": "text",
        **overrides,
    }
    return OperatorSettings.model_validate(values)


class OperatorRun:
    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.state = OperatorState(settings)
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.thread = threading.Thread(
            target=run_operator,
            kwargs={
                "settings": settings,
                "stop_flag": self.stop_flag,
                "ready_flag": self.ready_flag,
                "state": self.state,
            },
            daemon=True,
        )

    async def start(self) -> None:
        self.thread.start()
        ready = await asyncio.to_thread(self.ready_flag.wait, 30)
        assert ready, "kopf did not start"

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 30)
        assert not self.thread.is_alive(), "kopf did not stop"

    async def table(self) -> RoutingSnapshot:
        redis = connect_redis(self.settings)
        try:
            return await RoutingStore(redis, self.settings.key_prefix).load()
        finally:
            await redis.aclose()


class Api:
    """kubectl, more or less: against the emulator (a URL) or a real API server (a client
    configuration), in one namespace."""

    def __init__(self, url: str | client.Configuration, namespace: str = NS) -> None:
        if isinstance(url, str):
            config = client.Configuration()
            config.host = url
        else:
            config = url
        self.namespace = namespace
        self._client = client.ApiClient(config)
        self.core = client.CoreV1Api(self._client)
        self.custom = client.CustomObjectsApi(self._client)

    def close(self) -> None:
        self._client.close()

    async def apply(self, plural: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}",
                "kind": "MailDomain" if plural == "maildomains" else "MailUser",
                "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}  # fmt: skip
        await asyncio.to_thread(
            self.custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            plural,
            body,
        )

    async def patch(self, plural: str, name: str, patch: dict[str, Any]) -> None:
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object, GROUP, VERSION, self.namespace, plural,
            name, patch, _content_type=MERGE,
        )  # fmt: skip

    async def delete(self, plural: str, name: str) -> None:
        await asyncio.to_thread(
            self.custom.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            plural,
            name,
        )

    async def get(self, plural: str, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(  # type: ignore[no-any-return]
            self.custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace, plural, name
        )

    async def create_secret(
        self, name: str, data: dict[str, str], labels: dict[str, str] | None = None
    ) -> None:
        meta = {"name": name, "namespace": self.namespace, "labels": labels or {}}
        body = {"apiVersion": "v1", "kind": "Secret", "stringData": data, "metadata": meta}
        await asyncio.to_thread(self.core.create_namespaced_secret, self.namespace, body)

    async def patch_secret(self, name: str, data_b64: dict[str, str]) -> None:
        await asyncio.to_thread(
            self.core.patch_namespaced_secret,
            name,
            self.namespace,
            {"data": data_b64},
            _content_type=MERGE,
        )

    async def delete_secret(self, name: str) -> None:
        await asyncio.to_thread(self.core.delete_namespaced_secret, name, self.namespace)

    async def secret(self, name: str) -> dict[str, Any] | None:
        try:
            result = await asyncio.to_thread(
                self.core.read_namespaced_secret, name, self.namespace, _preload_content=False
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        import json

        return json.loads(result.data)  # type: ignore[no-any-return]

    async def events(self) -> list[dict[str, Any]]:
        result = await asyncio.to_thread(
            self.core.list_namespaced_event, self.namespace, _preload_content=False
        )
        import json

        return list(json.loads(result.data).get("items") or [])


@pytest.fixture
async def api(kmock: kmock.KubernetesEmulator) -> AsyncIterator[Api]:
    """kubectl against the emulator, with Mailkube's resources declared (the conftest.py of
    tests/integration and tests/e2e import this fixture)."""
    mailkube_resources(kmock)
    kubectl = Api(str(kmock.url))
    yield kubectl
    kubectl.close()


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    raise AssertionError(f"no {type_} condition in {obj.get('status')}")


async def events(api: Api, name: str) -> list[tuple[str, str]]:
    """(type, reason) of the Events about the object `name`, oldest first."""
    return [(e["type"], e["reason"]) for e in await api.events()
            if e["involvedObject"]["name"] == name]  # fmt: skip
