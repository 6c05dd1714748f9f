"""A small typed face on the `kubernetes` client for what kopf does not do for us: reading
Secrets, creating the DKIM Secret, patching other objects' status, posting Events. Calls run in
a thread (the client is synchronous) with a timeout; every failure, an HTTP error or the API
server out of reach, comes back as KubeError (status 0 when there was no HTTP answer)."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from typing import Any, cast

import kopf
import urllib3
from kubernetes import client

from .models import GROUP, VERSION

MERGE_PATCH = "application/merge-patch+json"
#: (connect, read) seconds for every API call: a hung API server must not hold the reconcile
REQUEST_TIMEOUT = (10.0, 30.0)
#: the Event API's limit on message length
EVENT_MESSAGE_MAX = 1024


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API {status}: {message}" if status else
                         f"Kubernetes API {message}")  # fmt: skip
        self.status = status


def configuration_from(info: kopf.ConnectionInfo) -> client.Configuration:
    """The kubernetes client's configuration for the connection kopf logged in with."""
    config = client.Configuration()
    config.host = info.server
    config.verify_ssl = not info.insecure
    if info.ca_path:
        config.ssl_ca_cert = os.fsdecode(info.ca_path)
    if info.certificate_path:
        config.cert_file = os.fsdecode(info.certificate_path)
    if info.private_key_path:
        config.key_file = os.fsdecode(info.private_key_path)
    if info.token:
        config.api_key = {"BearerToken": f"{info.scheme or 'Bearer'} {info.token}"}
    if info.username:
        config.username = info.username
    if info.password:
        config.password = info.password
    return config


class Kube:
    def __init__(self, config: client.Configuration) -> None:
        self._api = client.ApiClient(config)
        self._core = client.CoreV1Api(self._api)
        self._custom = client.CustomObjectsApi(self._api)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except client.ApiException as exc:
            raise KubeError(int(exc.status or 0), str(exc.reason)) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeError(0, f"unreachable ({type(exc).__name__})") from None

    async def read_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's data (base64 values), or None if it does not exist."""
        try:
            secret = await self._call(
                self._core.read_namespaced_secret, name, namespace, _preload_content=False
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        body = cast(dict[str, Any], json.loads(secret.data))
        return dict(body.get("data") or {})

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> None:
        await self._call(self._core.create_namespaced_secret, namespace, body)

    async def patch_secret_data(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """Add keys (base64 values) to a Secret's data; other keys are untouched."""
        await self._call(
            self._core.patch_namespaced_secret, name, namespace, {"data": data},
            _content_type=MERGE_PATCH,
        )  # fmt: skip

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        await self._call(
            self._custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, plural, name, {"status": status},
            _content_type=MERGE_PATCH,
        )  # fmt: skip

    async def count(self, plural: str, namespace: str | None) -> int:
        """How many objects of a mailkube.io resource exist (namespace None: everywhere)."""
        if namespace is None:
            result = await self._call(
                self._custom.list_cluster_custom_object, GROUP, VERSION, plural
            )
        else:
            result = await self._call(
                self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural
            )
        return len(cast(dict[str, Any], result).get("items") or [])

    async def post_event(
        self, involved: dict[str, Any], *, type_: str, reason: str, message: str, source: str
    ) -> None:
        """An Event about `involved` (apiVersion, kind, namespace, name, uid), as
        `kubectl describe` shows it."""
        namespace = str(involved.get("namespace") or "default")
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved.get('name')}.", "namespace": namespace},
            "involvedObject": involved,
            "type": type_,
            "reason": reason,
            "message": message[:EVENT_MESSAGE_MAX],
            "source": {"component": "mailkube-operator", "host": source},
            "reportingComponent": "mailkube-operator",
            "reportingInstance": source,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        await self._call(self._core.create_namespaced_event, namespace, body)
