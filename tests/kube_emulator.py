"""kmock's Kubernetes emulator with the gaps that matter to kopf filled in
(see /work/shared/notes/kopf-on-kmock.md):

- metadata.uid, creationTimestamp, resourceVersion (+1 on every write), generation (+1 when
  anything outside metadata and status changes), generateName;
- JSON patches apply as RFC 6902 with `test` ops answered 422 on mismatch; merge patches as
  RFC 7386;
- the status subresource: a write to /status changes only status, a write to the object
  never changes status;
- garbage collection of dependents (ownerReferences) when an owner is deleted;
- injected API errors (`fail(...)`) that, unlike a kmock reaction (`kmock[...] << 500`, which
  kmock answers after storing the write anyway), leave the stored state untouched, as a real
  API server does when it refuses a request.

Also: `mailkube_resources(emulator)` declares what the operator needs, and `KubeClient` is
the synchronous kubernetes client for tests (run it in a thread: the emulator serves from the
test's own event loop).
"""

from __future__ import annotations

import copy
import datetime
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import enums, k8s, rendering
from kmock._internal.dicts import merge_patch_dict

_versions = itertools.count(1)


class PatchTestFailed(k8s.KubernetesError):
    pass


@dataclass
class Fault:
    """Requests matching every field given are answered `status` instead of being served."""

    status: int
    action: str | None = None  # FETCH, LIST, WATCH, CREATE, UPDATE, DELETE
    plural: str | None = None
    name: str | None = None
    subresource: str | None = None
    #: the Status body's reason and message (what a real API server explains)
    reason: str = "InternalError"
    message: str = "injected by the test"
    #: when it answered each request (time.monotonic)
    times: list[float] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return len(self.times)

    def matches(self, request: rendering.Request) -> bool:
        resource = request.resource
        return (
            (self.action is None or (request.action is not None
                                     and request.action.value == self.action.upper()))
            and (self.plural is None or (resource is not None and resource.plural == self.plural))
            and (self.name is None or request.name == self.name)
            and (self.subresource is None or request.subresource == self.subresource)
        )  # fmt: skip


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    faults: list[Fault] = attrs.field(factory=list, init=False)

    def fail(
        self,
        status: int = 500,
        *,
        action: str | None = None,
        plural: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
        reason: str = "InternalError",
        message: str = "injected by the test",
    ) -> Fault:
        """Answer matching requests with `status` and a Status body of `reason` and `message`
        (and change nothing) until `heal(fault)`."""
        fault = Fault(status, action, plural, name, subresource, reason, message)
        self.faults.append(fault)
        return fault

    def heal(self, fault: Fault | None = None) -> None:
        """Stop injecting `fault` (None: every fault)."""
        self.faults[:] = [] if fault is None else [f for f in self.faults if f is not fault]

    async def _handle(self, request: rendering.Request) -> Any:
        fault = next((f for f in self.faults if f.matches(request)), None)
        if fault is not None:
            fault.times.append(time.monotonic())
            return await self._render_error(
                k8s.KubernetesError(fault.status, fault.reason, fault.message)
            )
        if request.resource is not None:
            async with self._lock:
                try:
                    await self._mutate(request)
                except k8s.KubernetesError as exc:
                    return await self._render_error(exc)
            # the state is stored; let the fallbacks render it (they only read)
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        return await super()._handle(request)

    async def _mutate(self, request: rendering.Request) -> None:
        resource = request.resource
        assert resource is not None
        bus = self._buses[resource]
        if request.action == enums.action.CREATE:
            obj = copy.deepcopy(request.data)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("namespace", request.namespace)
            if meta["namespace"] is None:
                del meta["namespace"]
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["resourceVersion"] = str(next(_versions))
            meta["generation"] = 1
            if "stringData" in obj:  # as the API server does for Secrets
                import base64

                data = obj.setdefault("data", {})
                for k, v in obj.pop("stringData").items():
                    data[k] = base64.b64encode(v.encode()).decode()
            key = (resource, request.namespace or meta.get("namespace"), meta["name"])
            if key in self._objects and not self._objects[key].deleted:
                raise k8s.KubernetesObjectConflictError()
            if key in self._objects:
                self._objects[key].create(obj)
            else:
                self._objects[key] = obj
            # the fallback renders by the request's URL name, which a create does not carry
            object.__setattr__(request, "name", meta["name"])
            object.__setattr__(request, "namespace", key[1])
            await bus.put({"type": "ADDED", "object": self._objects[key].raw})
        elif request.action == enums.action.UPDATE and request.name is not None:
            key = (resource, request.namespace, request.name)
            if key not in self._objects or self._objects[key].deleted:
                raise k8s.KubernetesObjectNotFoundError()
            old = copy.deepcopy(self._objects[key].raw)
            if isinstance(request.data, list):
                try:
                    new = jsonpatch.apply_patch(old, request.data, in_place=False)
                except jsonpatch.JsonPatchTestFailed:
                    raise k8s.KubernetesError(422, "Invalid", "patch test failed") from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    raise k8s.KubernetesError(422, "Invalid", str(exc)) from None
            else:
                new = dict(merge_patch_dict(old, request.data or {}))
            if request.subresource == "status":
                new = {**old, "status": new.get("status")}
                if new["status"] is None:
                    del new["status"]
            elif "status" in old or "status" in new:
                new["status"] = old.get("status")
                if new["status"] is None:
                    del new["status"]
            meta = new.setdefault("metadata", {})
            for fixed in ("uid", "creationTimestamp", "name", "namespace"):
                if fixed in old.get("metadata", {}):
                    meta[fixed] = old["metadata"][fixed]
            if _essence(new) != _essence(old):
                meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
            meta["resourceVersion"] = str(next(_versions))
            self._objects[key].create(new)  # a new version in the object's history
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                await self._remove(key)
            else:
                await bus.put({"type": "MODIFIED", "object": self._objects[key].raw})
        elif request.action == enums.action.DELETE and request.name is not None:
            key = (resource, request.namespace, request.name)
            if key not in self._objects or self._objects[key].deleted:
                raise k8s.KubernetesObjectNotFoundError()
            meta = self._objects[key].raw.get("metadata", {})
            if meta.get("deletionTimestamp"):
                return
            if meta.get("finalizers"):
                self._objects[key].patch(
                    {
                        "metadata": {
                            "deletionTimestamp": _now(),
                            "resourceVersion": str(next(_versions)),
                        }
                    }
                )
                await bus.put({"type": "MODIFIED", "object": self._objects[key].raw})
            else:
                await self._remove(key)

    async def _remove(self, key: Any) -> None:
        raw = self._objects[key].raw
        uid = raw.get("metadata", {}).get("uid")
        self._objects[key].delete()
        await self._buses[key[0]].put({"type": "DELETED", "object": raw})
        # garbage collection: dependents owned by the deleted object go too
        for other in list(self._objects):
            obj = self._objects[other]
            if obj.deleted:
                continue
            owners = obj.raw.get("metadata", {}).get("ownerReferences") or []
            if any(o.get("uid") == uid for o in owners):
                await self._remove(other)

    async def _serve_delete(self, request: rendering.Request) -> Any:
        key = (request.resource, request.namespace, request.name)
        return self._objects[key].last.raw if key in self._objects else {}

    async def _serve_update(self, request: rendering.Request) -> Any:
        key = (request.resource, request.namespace, request.name)
        return self._objects[key].last.raw


def _essence(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def mailkube_resources(emulator: kmock.KubernetesEmulator) -> None:
    """Declare the resources the operator watches, patches and posts to."""
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    emulator.resources["mailkube.io/v1alpha1/maildomains"] = kmock.ResourceInfo(
        kind="MailDomain", singular="maildomain", namespaced=True, verbs=verbs,
        subresources={"status"}, shortnames={"mdom"}, categories={"mail"},
    )  # fmt: skip
    emulator.resources["mailkube.io/v1alpha1/mailusers"] = kmock.ResourceInfo(
        kind="MailUser", singular="mailuser", namespaced=True, verbs=verbs,
        subresources={"status"}, shortnames={"muser"}, categories={"mail"},
    )  # fmt: skip
    emulator.resources["v1/secrets"] = kmock.ResourceInfo(
        kind="Secret", singular="secret", namespaced=True, verbs=verbs
    )
    emulator.resources["v1/events"] = kmock.ResourceInfo(
        kind="Event", singular="event", namespaced=True, verbs=verbs
    )
    emulator.resources["v1/namespaces"] = kmock.ResourceInfo(
        kind="Namespace", singular="namespace", namespaced=False, verbs=verbs
    )
