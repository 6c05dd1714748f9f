"""A small typed face on the `kubernetes` client for what kopf does not do for us: reading
Secrets, creating the DKIM Secret, patching other objects' status, removing an annotation,
posting Events. Calls run in a thread (the client is synchronous) with a timeout; every
failure, an HTTP error or the API server out of reach, comes back as KubeError (status 0 when
there was no HTTP answer)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import kopf
import urllib3
from kubernetes import client

from .models import GROUP, VERSION

MERGE_PATCH = "application/merge-patch+json"
#: (connect, read) seconds for every API call: a hung API server must not hold the reconcile
REQUEST_TIMEOUT = (10.0, 30.0)
#: objects per page of a LIST
LIST_PAGE = 500
#: the Event API's limit on message length
EVENT_MESSAGE_MAX = 1024


class KubeError(Exception):
    """An API call that failed: the HTTP status (0: no answer) and what the server said."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API {status} {message}".rstrip() if status else
                         f"Kubernetes API {message}")  # fmt: skip
        self.status = status

    @classmethod
    def from_api(cls, exc: client.ApiException) -> KubeError:
        """From the client's exception, with the explanation of the server's Status body
        (which permission or field was refused): `403 Forbidden: secrets "x" is forbidden: ...`."""
        status = int(exc.status or 0)
        reason, message = str(exc.reason or "").strip(), ""
        try:
            body = json.loads(exc.body) if exc.body else None
        except (TypeError, ValueError):
            body = None
        if isinstance(body, dict):
            reason = str(body.get("reason") or reason)
            message = str(body.get("message") or "")
        elif isinstance(exc.body, str | bytes) and exc.body:
            text = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
            message = text.strip()[:EVENT_MESSAGE_MAX]
        return cls(status, f"{reason}: {message}" if message else reason)


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
            raise KubeError.from_api(exc) from None
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

    async def patch_secret_data(
        self, namespace: str, name: str, data: Mapping[str, str | None]
    ) -> None:
        """Add or replace keys (base64 values) of a Secret's data, remove those given as None;
        other keys are untouched."""
        await self._call(
            self._core.patch_namespaced_secret, name, namespace, {"data": data},
            _content_type=MERGE_PATCH,
        )  # fmt: skip

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any]
    ) -> str | None:
        """Merge `status` into the object's status; the resourceVersion the write made."""
        result = await self._call(
            self._custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, plural, name, {"status": status},
            _content_type=MERGE_PATCH,
        )  # fmt: skip
        return _resource_version(result)

    async def remove_annotation(
        self, plural: str, namespace: str, name: str, annotation: str
    ) -> str | None:
        """Remove an annotation; the resourceVersion the write made."""
        result = await self._call(
            self._custom.patch_namespaced_custom_object,
            GROUP, VERSION, namespace, plural, name,
            {"metadata": {"annotations": {annotation: None}}},
            _content_type=MERGE_PATCH,
        )  # fmt: skip
        return _resource_version(result)

    async def _list_pages(self, fn: Any, *args: Any) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        version = ""
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            response = await self._call(fn, *args, **kwargs)
            page = cast(dict[str, Any], json.loads(response.data))
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            token = meta.get("continue")
            if not token:
                return items, version

    async def list_objects(
        self, plural: str, namespace: str | None
    ) -> tuple[list[dict[str, Any]], str]:
        """Every object of a mailkube.io resource (namespace None: everywhere), and the list's
        resourceVersion."""
        if namespace is None:
            return await self._list_pages(
                self._custom.list_cluster_custom_object, GROUP, VERSION, plural
            )
        return await self._list_pages(
            self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural
        )

    async def list_secrets(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        if namespace is None:
            return await self._list_pages(self._core.list_secret_for_all_namespaces)
        return await self._list_pages(self._core.list_namespaced_secret, namespace)

    async def list_secrets_labelled(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """The Secrets of `namespace` matching the label `selector`."""
        items, _ = await self._list_pages(
            functools.partial(self._core.list_namespaced_secret, label_selector=selector),
            namespace,
        )
        return items

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
        await self._call(self._create_event, namespace, body)

    def _create_event(self, namespace: str, body: dict[str, Any], **kwargs: Any) -> None:
        # the answer is read and dropped: turning it into a V1Event (dates parsed) costs more
        # CPU than the request, thousands of times over at a first start; read, so that the
        # connection goes back to the pool
        create: Any = self._core.create_namespaced_event  # typed as answering a CoreV1Event
        response = create(namespace, body, _preload_content=False, **kwargs)
        response.drain_conn()
        response.release_conn()


def _resource_version(obj: Any) -> str | None:
    """metadata.resourceVersion of an object the API server returned (None if it has none)."""
    if not isinstance(obj, dict):
        return None
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return str(version) if version is not None else None
