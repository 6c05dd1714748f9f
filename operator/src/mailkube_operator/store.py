"""What the operator knows of the objects it watches: its own indexes, filled by one LIST of
each kind at start-up (paginated) and then kept up to date by kopf's watch events.

kopf's own indexes (`kopf.index`) hold every handler back until each object listed at start
has been indexed, and that barrier grows with the cube of the number of objects: every
object's worker waits on one condition that every other object's arrival wakes, and each
wake-up walks all of them. 1,200 objects took 12 s to start; 12,000 did not start within
10 minutes. A LIST per kind gives the same guarantee (the first reconcile sees every object)
in seconds, and the events keep it: a copy replaces the one kept only if its resourceVersion
is not older.

The LIST runs before kopf starts watching, so an object deleted in between would linger: the
stores are listed again every RESYNC_INTERVAL, and what the list lacks is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from . import dkim
from .kube import Kube
from .models import DOMAINS, USERS
from .plan import Key, ObjectRecord
from .secrets import fingerprints

log = logging.getLogger(__name__)

V = TypeVar("V")


def _older(candidate: str, kept: str) -> bool:
    """Whether resourceVersion `candidate` is older than `kept` (they are etcd revisions;
    if one is not a number, nothing is taken as older)."""
    try:
        return int(candidate) < int(kept)
    except ValueError:
        return False


def _key(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _version(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return str(meta.get("uid") or ""), str(meta.get("resourceVersion") or "")


K = TypeVar("K")


class TrackedDict(dict[K, V]):
    """A dict recording the keys set or deleted (by item assignment or `del`) since the last
    `take`: a reconcile visits only those, not every object (issue 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed: set[K] = set()

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.changed.add(key)

    def __delitem__(self, key: K) -> None:
        super().__delitem__(key)
        self.changed.add(key)

    def set_unrecorded(self, key: K, value: V) -> None:
        """Set without recording the key as changed (a change recorded before stays)."""
        super().__setitem__(key, value)

    def take(self) -> set[K]:
        """The keys changed since the last call."""
        changed, self.changed = self.changed, set()
        return changed


class TrackedIndex(TrackedDict[Key, list[V]]):
    """An index (key -> [value]) that records the keys changed."""


class Store(Generic[V]):
    """Objects of one kind by (namespace, name), as `index`: key -> [value], the shape the
    reconciler reads (reconciler.Indexes), recording the keys that changed (TrackedIndex)."""

    def __init__(self, make: Callable[[Mapping[str, Any]], V]) -> None:
        self._make = make
        self.index: TrackedIndex[V] = TrackedIndex()
        self._versions: dict[Key, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def put(self, body: Mapping[str, Any], *, echo: bool = False) -> bool:
        """Keep this copy unless an object of that uid with a newer version is kept, or that
        very version (a periodic LIST brings back every object: the unchanged ones are neither
        copied again nor recorded as changed); whether it was taken. `echo`: the copy only
        brings back the operator's own status write, and is not recorded as changed (a
        reconcile has nothing to look at again for it)."""
        key = _key(body)
        uid, version = _version(body)
        kept = self._versions.get(key)
        if (
            kept is not None
            and kept[0] == uid
            and (_older(version, kept[1]) or (version != "" and version == kept[1]))
        ):
            return False
        if echo:
            self.index.set_unrecorded(key, [self._make(body)])
        else:
            self.index[key] = [self._make(body)]
        self._versions[key] = (uid, version)
        return True

    def remove(self, body: Mapping[str, Any]) -> bool:
        key = _key(body)
        kept = self._versions.get(key)
        if kept is None or (kept[0] and _version(body)[0] not in ("", kept[0])):
            return False  # not kept, or another object of that name made since
        del self.index[key]
        del self._versions[key]
        return True

    def replace_all(self, bodies: Iterable[Mapping[str, Any]], list_version: str) -> bool:
        """Take a fresh list: each copy as put() would, and drop what the list lacks unless it
        is newer than the list; whether anything changed."""
        changed = False
        listed: set[Key] = set()
        for body in bodies:
            listed.add(_key(body))
            before = self._versions.get(_key(body))
            if self.put(body) and before != self._versions.get(_key(body)):
                changed = True
        for key in [k for k in self._versions if k not in listed]:
            if list_version and _older(list_version, self._versions[key][1]):
                continue  # made after the list was taken
            del self.index[key]
            del self._versions[key]
            changed = True
        return changed


@dataclass
class Stores:
    """MailDomains, MailUsers, and Secrets in two parts: the fingerprints of those a MailUser
    or MailDomain may refer to, and the keys of DKIM Secrets (those with dkim.DKIM_LABEL)."""

    fingerprint_key: Callable[[], bytes]
    domains: Store[ObjectRecord] = field(default_factory=lambda: Store(ObjectRecord.from_body))
    users: Store[ObjectRecord] = field(default_factory=lambda: Store(ObjectRecord.from_body))
    password_secrets: Store[dict[str, str]] = field(init=False)
    dkim_secrets: Store[dict[str, str]] = field(init=False)

    def __post_init__(self) -> None:
        self.password_secrets = Store(
            lambda body: fingerprints(body.get("data"), self.fingerprint_key())
        )
        self.dkim_secrets = Store(lambda body: dkim.decode_data(body.get("data")))

    @staticmethod
    def is_dkim(body: Mapping[str, Any]) -> bool:
        return dkim.DKIM_LABEL in ((body.get("metadata") or {}).get("labels") or {})

    def secret_event(self, event: str | None, body: Mapping[str, Any]) -> None:
        if event == "DELETED":
            self.password_secrets.remove(body)
            self.dkim_secrets.remove(body)
        elif self.is_dkim(body):
            self.password_secrets.remove(body)  # the label may have just been added
            self.dkim_secrets.put(body)
        else:
            self.dkim_secrets.remove(body)
            self.password_secrets.put(body)

    @staticmethod
    def object_event(store: Store[ObjectRecord], event: str | None,
                     body: Mapping[str, Any], *, echo: bool = False) -> None:  # fmt: skip
        """`echo`: the event only brings back our own status write (Reconciler.is_echo)."""
        if event == "DELETED":
            store.remove(body)
        else:
            store.put(body, echo=echo)

    async def load(self, kube: Kube, namespace: str | None) -> bool:
        """LIST every kind (namespace None: everywhere); whether anything changed."""
        changed = False
        for plural, store in ((DOMAINS, self.domains), (USERS, self.users)):
            items, version = await kube.list_objects(plural, namespace)
            changed = store.replace_all(items, version) or changed
        secrets, version = await kube.list_secrets(namespace)
        changed = self.dkim_secrets.replace_all(
            [s for s in secrets if self.is_dkim(s)], version
        ) or changed  # fmt: skip
        changed = self.password_secrets.replace_all(
            [s for s in secrets if not self.is_dkim(s)], version
        ) or changed  # fmt: skip
        log.info(
            "listed",
            extra={"domains": len(self.domains), "users": len(self.users),
                   "secrets": len(secrets)},
        )  # fmt: skip
        return changed
