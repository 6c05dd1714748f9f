"""The reconciler: from the operator's indexes to the routing table in Redis and every
object's status.

Any change to a MailDomain, MailUser or referenced Secret calls `request()`. Concurrent
requests coalesce: one reconcile runs at a time and a request is satisfied by any reconcile
that started after it. A reconcile:

1. reads the indexes (store.Stores, filled by a LIST of every kind before kopf watches, so
   the first reconcile after a start sees everything and publishes the full table); when
   they say only MailUsers changed, it looks at those alone;
2. refreshes password hashes and relay credentials whose Secrets changed;
3. builds the plan (plan.build), and has the DKIM-keys step (dkim_keys.DkimKeys) make the
   keys a served domain lacks or take its rotation's step, then plans again if it did;
4. lifts the submission suspensions asked for by annotation;
5. publishes the routing table's entries that differ from the ones last published (on the
   first reconcile, and after the table in Redis moved behind our back: those that differ
   from the ones stored): atomic and versioned, by RoutingStore;
6. patches the status of each object whose desired status (status.py, pure) moved, and posts
   an Event when an object's Ready (or a MailDomain's DNSVerified) condition changes: a
   Warning for every failure, a Normal one on the way back;
7. forgets what it kept for objects gone.

A failure (Redis or the API unreachable, an API error) sets the conditions it can, and
schedules one retry after `retry_delay`; nothing retries in a hot loop. `check_redis`, run
periodically, notices Redis going away (readiness), coming back, and losing or replacing the
table (then the table is published again). A DKIM rotation's timed step gets a reconcile when
it is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

from mailkube_core.redis_client import RedisClient
from mailkube_core.routing import DomainEntry, RoutingStore, TableGlobals, VersionConflict
from mailkube_core.settings import OperatorSettings

from . import conditions
from .conditions import find, is_true
from .dane import DaneKeys
from .dkim_keys import DkimKeys
from .dnscheck import DnsResult
from .kube import Kube, KubeError
from .models import DOMAINS, USERS, MailDomainSpec, MailUserSpec
from .plan import (
    DomainOutcome,
    Key,
    ObjectRecord,
    Plan,
    PlanCache,
    Problem,
    UserOutcome,
    build,
)
from .secrets import SecretValues
from .status import dns_checked, domain_status, user_status
from .store import TrackedDict, TrackedIndex
from .suspensions import (
    LIFT_ANNOTATION,
    LIFTED_BY_ANNOTATION,
    SUBMISSION_SUSPENDED,
    SuspensionState,
)

log = logging.getLogger(__name__)

#: status patches (with their Events) in flight at once
STATUS_WRITERS = 8
#: a reconcile writing at least this many statuses sets `bulk_written` (their watch echoes
#: leave thousands of new copies in the heap: handlers/lifecycle.py freezes it again)
BULK_WRITES = 1000
#: conditions whose changes are posted as Events -> the status that is a failure (a Warning).
#: Getting out of it is a Normal Event; for Ready and DNSVerified, so is turning True at all.
EVENT_CONDITIONS = {"Ready": "False", "DNSVerified": "False", SUBMISSION_SUSPENDED: "True"}


@dataclass
class Indexes:
    """The operator's live indexes (store.Stores): key -> [value]."""

    domains: Mapping[Any, Iterable[ObjectRecord]]
    users: Mapping[Any, Iterable[ObjectRecord]]
    password_secrets: Mapping[Any, Iterable[dict[str, str]]]
    dkim_secrets: Mapping[Any, Iterable[dict[str, str]]]


def _all(index: Mapping[Any, Iterable[Any]]) -> list[Any]:
    return [value for values in list(index.values()) for value in values]


def _first(index: Mapping[Any, Iterable[Any]], key: Any) -> Any:
    if key not in index:
        return None
    return next(iter(index[key]), None)


class _Firsts(Mapping[Any, Any]):
    """An index read as key -> its first value, without copying it (a reconcile of a few
    changed users looks up only their Secrets)."""

    def __init__(self, index: Mapping[Any, Iterable[Any]]) -> None:
        self._index = index

    def __getitem__(self, key: Any) -> Any:
        if key not in self._index:
            raise KeyError(key)
        return _first(self._index, key) or {}

    def __iter__(self) -> Iterator[Any]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


#: seconds after which a reconcile walks every object even if the stores say only a few
#: changed (a safety sweep; the periodic LIST (store.RESYNC_INTERVAL) also marks what moved).
#: By time, not by count: at 10,000 users a sweep costs ~1 s of CPU, and every 100th
#: reconcile made that a share of each change's cost, growing with the number of objects.
FULL_SWEEP_INTERVAL = 300.0


@dataclass(frozen=True)
class _Applied:
    """A status we wrote, the object's resourceVersion in the index when we wrote it, and the
    one our write made (None if the server did not say)."""

    uid: str
    resource_version: str
    written_version: str | None
    status: dict[str, Any]

    def seen_in(self, record: ObjectRecord) -> bool:
        """Whether the index's copy of the object includes our write.

        An event for a write made before ours can reach the index after our write (our own
        annotation removal, say): a copy whose version is neither the one we wrote over nor
        ours is older than ours if its revision is lower. Kubernetes resourceVersions are
        opaque, but they are etcd revisions; if one is not a number, a new version is taken
        as seen, as before.
        """
        if record.uid != self.uid:
            return True  # deleted and made again: the write was to another object
        current, written = record.resource_version, self.written_version
        if current == self.resource_version:
            return False
        if written is None or current == written:
            return True
        try:
            return int(current) > int(written)
        except ValueError:
            return True


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Reconciler:
    settings: OperatorSettings
    store: RoutingStore
    kube: Kube
    #: for lifting submission suspensions (None: nothing can be lifted)
    redis: RedisClient | None = None
    indexes: Indexes | None = None
    #: the gateway's submission suspensions, as last read (suspensions.check_loop)
    suspensions: SuspensionState = field(default_factory=SuspensionState)
    secrets: SecretValues = field(default_factory=SecretValues)
    clock: Callable[[], datetime] = _now
    #: a step that failed (DKIM keys or status of an object) -> when it may be tried again
    not_before: dict[tuple[str, Key], float] = field(default_factory=dict)
    #: the gateway's TLS keys, for the TLSA records every MailDomain lists (dane.check_loop)
    dane_keys: DaneKeys | None = None
    #: MailDomain key -> the records its status lists, for the DNS check (dnscheck.py)
    dns_wanted: dict[Key, list[dict[str, Any]]] = field(default_factory=dict)
    #: MailDomain key -> DNSVerified and the records it was found for (the DNS check); the
    #: keys changed since the last reconcile are recorded (their statuses are looked at)
    dns_results: TrackedDict[Key, DnsResult] = field(default_factory=TrackedDict)
    #: set when records to check changed
    dns_wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: the entries of the last table published (domain -> the entry and its JSON), and its
    #: globals' JSON: what the table at published_version holds
    published_entries: dict[str, tuple[DomainEntry, str]] = field(default_factory=dict)
    published_globals: str | None = None
    #: the plan's globals that JSON was made from (the same object: the same JSON)
    _published_globals_of: TableGlobals | None = None
    #: its version in Redis (None: nothing published since the start)
    published_version: int | None = None
    #: the next publish compares with what Redis holds, not with what we published last
    #: (the first one, and after the table in Redis moved behind our back)
    resync: bool = True
    #: set once a table has been published
    published: asyncio.Event = field(default_factory=asyncio.Event)
    #: set after a reconcile wrote BULK_WRITES statuses or more (the first start's)
    bulk_written: asyncio.Event = field(default_factory=asyncio.Event)
    #: whether Redis answered the last publish or check (readiness)
    healthy: bool = False
    reconciles: int = 0
    _applied: dict[tuple[str, Key], _Applied] = field(default_factory=dict)
    #: the DKIM-keys step, made at construction: it shares settings, kube, clock, not_before
    #: and dns_results (none of them is to be replaced afterwards)
    dkim_keys: DkimKeys = field(init=False)
    #: each object's spec as last checked, and the table entries made (plan.PlanCache)
    _plan_cache: PlanCache = field(default_factory=PlanCache)
    #: object -> what its status was last found right for (_status_inputs): with the same
    #: inputs, it is not worked out again
    _settled: dict[tuple[str, Key], tuple[Any, ...]] = field(default_factory=dict)
    #: MailUser -> the copy and the verdict its _settled inputs were taken from, and what
    #: every user's status was last worked out with (the publish error, the suspensions):
    #: while they are the same objects, the user is not looked at again (thousands of users)
    _settled_users: dict[Key, tuple[ObjectRecord, UserOutcome]] = field(default_factory=dict)
    _users_context: tuple[Any, ...] | None = None
    #: MailUsers whose status was not found right at the last look (a write pending or failed)
    _unsettled_users: set[Key] = field(default_factory=set)
    #: how many users _forget_gone last saw (it looks for users gone when this moves)
    _users_count: int = -1
    #: MailUser -> its resourceVersion in the index when its lift annotation was handled: while
    #: the index still shows that version, the annotation it shows is already gone
    _lift_handled: dict[Key, str] = field(default_factory=dict)
    #: the next reconcile walks every object (the first, and after a failure or a bug)
    _full_next: bool = True
    #: when the last reconcile that walked every object started (time.monotonic)
    _swept_at: float = 0.0
    #: what every MailDomain's status was last worked out with (the publish error, the
    #: gateway's TLS keys): while it is the same, a reconcile of changed users looks only at
    #: the MailDomains whose verdict, DKIM step or DNS check moved
    _domains_context: tuple[Any, ...] | None = None
    _due_task: asyncio.Task[None] | None = None
    _due_at: datetime | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _requested: int = 0
    _done: int = 0
    _retry: asyncio.Task[None] | None = None
    _pending: bool = False

    def __post_init__(self) -> None:
        self.secrets.retry_delay = self.settings.retry_delay.total_seconds()
        self.dkim_keys = DkimKeys(
            settings=self.settings, kube=self.kube, event=self._event,
            indexed=self._indexed_dkim_secret, written_status=partial(self._base_status, DOMAINS),
            dns_results=self.dns_results, not_before=self.not_before, clock=self.clock,
        )  # fmt: skip

    def _may_try(self, step: tuple[str, Key]) -> bool:
        return time.monotonic() >= self.not_before.get(step, 0.0)

    def _failed(self, step: tuple[str, Key]) -> None:
        self.not_before[step] = time.monotonic() + self.settings.retry_delay.total_seconds()

    async def request(self) -> None:
        """Reconcile now, or wait for the reconcile that will cover this request."""
        self._requested += 1
        ticket = self._requested
        async with self._lock:
            if self._done >= ticket:
                return
            target = self._requested
            try:
                await self._reconcile()
            except Exception:  # a bug: say so, and do not give up on the objects
                log.exception("reconcile failed; retrying after %s", self.settings.retry_delay)
                self._schedule_retry()
            finally:
                self._done = target

    def _schedule_retry(self) -> None:
        """One reconcile retry_delay from now (a retry planned earlier is moved: the steps that
        just failed may not be tried again sooner anyway)."""
        self._pending = True
        if self._retry is not None and self._retry is not asyncio.current_task():
            self._retry.cancel()  # sleeping, or waiting for the reconcile that called us
        self._retry = asyncio.create_task(self._retry_later(), name="mailkube-retry")

    async def _retry_later(self) -> None:
        await asyncio.sleep(self.settings.retry_delay.total_seconds())
        await self.request()

    async def check_redis(self) -> None:
        """Is Redis there, with our table? Readiness follows the answer; a table lost (Redis
        restarted empty) or replaced behind our back is published again, and a reconcile that
        is waiting for its retry runs at once."""
        async with self._lock:
            try:
                version = await self.store.version()
            except Exception as exc:
                if self.healthy:
                    log.warning("Redis is unreachable: %r", exc)
                self.healthy = False
                return
            stale = self.published_version is not None and version != self.published_version
            if stale:
                log.warning(
                    "the routing table in Redis is at version %d, not %d: publishing it again",
                    version, self.published_version,
                )  # fmt: skip
                self.resync = True
            elif not self._pending:
                if not self.healthy and self.published_version is not None:
                    log.info("Redis is reachable again, with our routing table")
                self.healthy = self.published_version is not None
            again = stale or (self._pending and not self.healthy)
        if again:
            await self.request()

    async def close(self) -> None:
        for task in (self._retry, self._due_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _schedule_due(self) -> None:
        """One reconcile when the earliest timed rotation step is due."""
        due = min(self.dkim_keys.rotation_due.values(), default=None)
        if due == self._due_at and (due is None or self._due_task is not None):
            return
        if self._due_task is not None and self._due_task is not asyncio.current_task():
            self._due_task.cancel()
        self._due_task, self._due_at = None, due
        if due is not None:
            delay = max(0.0, (due - self.clock()).total_seconds())
            self._due_task = asyncio.create_task(self._wake_at(delay), name="mailkube-rotation")

    async def _wake_at(self, delay: float) -> None:
        await asyncio.sleep(delay + 0.01)  # timestamps are whole seconds: be past them
        self._due_task, self._due_at = None, None
        await self.request()

    # -- one reconcile --------------------------------------------------------------------

    async def _reconcile(self) -> None:
        if self.indexes is None:
            return
        self.reconciles += 1
        self._pending = False
        changed = self._changed_users()
        self._full_next = True  # until this one is done
        domains: list[ObjectRecord] = _all(self.indexes.domains)
        users: list[ObjectRecord] | None
        known: Mapping[tuple[str, str], Mapping[str, str]]
        if changed is None:  # every object
            self._swept_at = time.monotonic()
            users = _all(self.indexes.users)
            known = {key: _first(self.indexes.password_secrets, key) or {}
                     for key in list(self.indexes.password_secrets)}  # fmt: skip
            failed = await self._refresh_secrets(domains, users, known)
        else:  # only the users the stores say changed (and nothing else did)
            users = None
            known = _Firsts(self.indexes.password_secrets)
            failed = await self._refresh_secrets(
                [], [r for r in changed.values() if r is not None], known, prune=False
            )
        fresh: dict[Key, dict[str, str]] = {}
        plan = self._plan(domains, users, known, fresh, changed)
        # no MailDomain or Secret changed: only the DKIM steps pending are looked at
        watch = None if changed is None else set(self.dkim_keys.watch)
        dkim_domains = domains if watch is None else [
            r for key in watch if (r := _first(self.indexes.domains, key)) is not None
        ]  # fmt: skip
        if await self.dkim_keys.ensure(dkim_domains, plan, fresh):
            users = users if users is not None else _all(self.indexes.users)
            first, plan = plan, self._plan(domains, users, known, fresh, None)
            if plan.redone is not None:  # the users either plan redid
                plan.redone = None if first.redone is None else first.redone | plan.redone
        failed = failed or any(key in plan.domains for key in self.dkim_keys.errors)
        if users is None and changed is not None:
            index = self.indexes.users
            lifting = [r for r in changed.values() if r is not None] + [
                r for key in self._lift_handled
                if key not in changed and (r := _first(index, key)) is not None
            ]  # fmt: skip
            failed = await self._lift_suspensions(lifting, plan) or failed
        else:
            failed = await self._lift_suspensions(users or [], plan) or failed
        publish_error = await self._publish(plan)
        context = (publish_error, self.dane_keys)
        dns_changed = self.dns_results.take()
        if (
            changed is not None
            and plan.redone_domains is not None
            and (context == self._domains_context)
        ):  # only the MailDomains whose verdict, DKIM step or DNS check may have moved
            index = self.indexes.domains
            dkim_keys = self.dkim_keys
            keys = (plan.redone_domains | (watch or set()) | dkim_keys.watch | dns_changed
                    | set(dkim_keys.errors) | set(dkim_keys.rotation_conditions))  # fmt: skip
            status_domains = [r for key in keys if (r := _first(index, key)) is not None]
        else:
            status_domains = domains
        self._domains_context = context
        failed = await self._write_statuses(plan, status_domains, users, publish_error) or failed
        self._forget_gone(
            domains, users,
            gone_users=None if changed is None else {k for k, r in changed.items() if r is None},
        )  # fmt: skip
        self._schedule_due()
        self._full_next = bool(failed or publish_error)
        if failed or publish_error:
            self._schedule_retry()

    def _changed_users(self) -> dict[Key, ObjectRecord | None] | None:
        """The MailUsers changed since the last reconcile (key -> its copy, None: gone) if
        they are all that changed; None if this reconcile must walk every object: the
        indexes do not record changes, a MailDomain or Secret changed, the last reconcile
        failed, or it is time for a safety sweep (FULL_SWEEP_INTERVAL)."""
        assert self.indexes is not None
        indexes = (self.indexes.domains, self.indexes.users, self.indexes.password_secrets,
                   self.indexes.dkim_secrets)  # fmt: skip
        if not all(isinstance(index, TrackedIndex) for index in indexes):
            return None
        domains, users, passwords, dkim_secrets = (
            cast(TrackedIndex[Any], index).take() for index in indexes
        )
        if (self._full_next or domains or passwords or dkim_secrets
                or time.monotonic() - self._swept_at >= FULL_SWEEP_INTERVAL):  # fmt: skip
            return None
        index = self.indexes.users
        return {key: _first(index, key) for key in users}

    def _plan(
        self,
        domains: list[ObjectRecord],
        users: list[ObjectRecord] | None,
        known: Mapping[tuple[str, str], Mapping[str, str]],
        fresh: Mapping[Key, dict[str, str]],
        changed: Mapping[Key, ObjectRecord | None] | None,
    ) -> Plan:
        if users is None:  # a plan of the changed users (it does not read the list)
            assert changed is not None
            users = [r for r in changed.values() if r is not None]
        return build(
            domains,
            users,
            changed_users=changed,
            passwords=lambda ns, ref: self.secrets.password(ns, ref, known),
            relay=lambda ns, ref: self.secrets.relay(ns, ref, known),
            dkim=lambda record, spec: self.dkim_keys.keys(record, spec, fresh),
            mx_hostname=self.settings.mx_hostname(),
            tls_policies=self.settings.tls_policies,
            cache=self._plan_cache,
        )

    async def _refresh_secrets(
        self,
        domains: list[ObjectRecord],
        users: list[ObjectRecord],
        known: Mapping[tuple[str, str], Mapping[str, str]],
        *,
        prune: bool = True,
    ) -> bool:
        """Re-hash changed passwords, re-read changed relay credentials; whether a read failed
        (the failure is in the object's condition). `prune`: `users` are all of them, and the
        hashes no user's Secret holds any more are dropped."""
        failed = False
        used: set[str] = set()
        for user in users:
            ref = user.spec.get("passwordSecretRef")
            if ref is None or user.deleting or not isinstance(ref, dict) or "name" not in ref:
                continue
            cached = self._plan_cache.users.get(user.key)
            if cached is not None and cached[0] is user.spec and not isinstance(cached[1], Problem):
                spec = cached[1].spec  # checked by the last plan already
            else:
                try:
                    spec = MailUserSpec.model_validate(user.spec)
                except ValueError:
                    continue
            if spec.password_secret_ref is not None:
                secret_ref = spec.password_secret_ref
                current = (known.get((user.namespace, secret_ref.name)) or {}).get(secret_ref.key)
                if current is not None:
                    used.add(current)
                try:
                    await self.secrets.refresh_password(
                        self.kube, user.namespace, secret_ref, known
                    )
                except KubeError:  # logged by SecretValues, named in the user's status
                    failed = True
        if not failed and prune:
            await self.secrets.prune(used)
        for domain in domains:
            if domain.deleting or not isinstance(domain.spec.get("relay"), dict):
                continue
            try:
                dspec = MailDomainSpec.model_validate(domain.spec)
            except ValueError:
                continue
            if dspec.relay is not None and dspec.relay.credentials_secret_ref is not None:
                try:
                    await self.secrets.refresh_relay(
                        self.kube, domain.namespace, dspec.relay.credentials_secret_ref, known
                    )
                except KubeError:  # logged by SecretValues, named in the domain's status
                    failed = True
        return failed

    async def _publish(self, plan: Plan) -> str | None:
        """Write the entries that changed since the last publish, and drop the domains gone;
        the error, or None. Only a changed entry is serialised (the plan keeps the same
        object for an unchanged one; a plan of changed users names the entries it made, and
        only those are looked at)."""
        changed: dict[str, str] = {}
        names: Iterable[str]
        if (plan.redone_entries is not None and not self.resync
                and self.published_globals is not None
                and plan.globals is self._published_globals_of):  # fmt: skip
            documents = dict(self.published_entries)  # the others: the same, none gone
            names, deleted, globals_json = plan.redone_entries, [], self.published_globals
        else:
            documents, names = {}, plan.entries
            globals_json = plan.globals.model_dump_json()
        for name in names:
            entry = plan.entries[name]
            before = self.published_entries.get(name)
            if before is not None and before[0] is entry:
                documents[name] = before
                continue
            document = entry.model_dump_json()
            documents[name] = (entry, document)
            if before is None or before[1] != document:
                changed[name] = document
        if names is plan.entries:
            deleted = [name for name in self.published_entries if name not in documents]
        if (not self.resync and not changed and not deleted
                and globals_json == self.published_globals):  # fmt: skip
            self.published_entries = documents  # the same JSON, newer objects
            return None
        try:
            if self.resync or self.published_version is None:
                raise VersionConflict("compare with the table in Redis")
            version = await self.store.apply(
                changed, deleted, globals_json, expected_version=self.published_version
            )
            written = len(changed) + len(deleted)
        except VersionConflict:
            # the first publish, or the table moved behind our back: what Redis holds
            try:
                version, written = await self.store.replace_entries(
                    {name: document for name, (_, document) in documents.items()}, globals_json
                )
            except Exception as exc:
                return self._publish_failed(exc)
        except Exception as exc:
            return self._publish_failed(exc)
        self.published_entries = documents
        self.published_globals = globals_json
        self._published_globals_of = plan.globals
        self.published_version = version
        self.resync = False
        self.published.set()
        self.healthy = True
        log.info(
            "routing table published",
            extra={"version": version, "domains": len(plan.entries), "written": written,
                   "users": plan.published_users},
        )  # fmt: skip
        return None

    def _publish_failed(self, exc: Exception) -> str:
        self.healthy = False
        self.resync = True  # a write may have been done without our seeing its answer
        log.warning("publishing the routing table failed: %r", exc)
        return f"Redis: {type(exc).__name__}: {exc}"

    async def _lift_suspensions(self, users: list[ObjectRecord], plan: Plan) -> bool:
        """Lift the submission suspension of each MailUser annotated for it, and remove the
        annotation; whether a step failed (it is tried again after retry_delay)."""
        failed = False
        handled = self._lift_handled
        for user in users:
            if LIFT_ANNOTATION not in user.annotations or user.deleting:
                if handled:
                    handled.pop(user.key, None)
                continue
            if self._lift_handled.get(user.key) == user.resource_version:
                continue
            step = ("lift", user.key)
            if not self._may_try(step):
                failed = True  # failed a moment ago: the scheduled retry tries again
                continue
            outcome = plan.users.get(user.key)
            address = outcome.address if outcome is not None else None
            was_suspended = is_true(self._base_status(USERS, user).get("conditions") or [],
                                    SUBMISSION_SUSPENDED)  # fmt: skip
            lifted = False
            if address is not None:
                try:
                    if self.redis is None:
                        raise RuntimeError("no Redis connection")
                    lifted = await self.suspensions.lift(
                        self.redis, self.settings.key_prefix, address
                    )
                except Exception as exc:
                    log.warning("%s: lifting the submission suspension failed: %r", user, exc)
                    self._failed(step)
                    failed = True
                    continue
                if lifted or was_suspended:
                    self.suspensions.lifted[user.key] = LIFTED_BY_ANNOTATION
                lifted = lifted or user.key in self.suspensions.lifted
            try:
                await self.kube.remove_annotation(USERS, user.namespace, user.name, LIFT_ANNOTATION)
            except KubeError as exc:
                log.warning("%s: removing the annotation %s failed: %s", user, LIFT_ANNOTATION, exc)
                self._failed(step)
                failed = True
                continue
            self.not_before.pop(step, None)
            self._lift_handled[user.key] = user.resource_version
            if address is None:
                await self._event(user, "Warning", "Invalid",
                                  "nothing lifted: the MailUser has no usable address")  # fmt: skip
            elif not was_suspended:  # otherwise the condition's change says it
                reason, message = (
                    ("Lifted", LIFTED_BY_ANNOTATION) if lifted
                    else ("NotSuspended", f"nothing to lift: {address} is not suspended")
                )  # fmt: skip
                await self._event(user, "Normal", reason, message)
        return failed

    def _forget_gone(
        self, domains: list[ObjectRecord], users: list[ObjectRecord] | None, *,
        gone_users: set[Key] | None = None,
    ) -> None:  # fmt: skip
        """Drop what is kept for objects gone: for MailDomains at every reconcile that walks
        them; what is kept for every MailUser (thousands) when their number moved, and every
        100th time (`users` None: the index's). `gone_users`: no MailDomain changed, and
        these are the only users gone (a reconcile of changed users)."""
        assert self.indexes is not None
        if gone_users is not None:
            self._users_count = len(self.indexes.users)
            for key in gone_users:
                for step in ((USERS, key), ("lift", key)):
                    self._applied.pop(step, None)
                    self.not_before.pop(step, None)
                    self._settled.pop(step, None)
                for kept in (self.suspensions.lifted, self._lift_handled, self._settled_users):
                    kept.pop(key, None)
                self._unsettled_users.discard(key)
            return
        count = len(self.indexes.users) if users is None else len(users)
        every = count != self._users_count or self.reconciles % 100 == 0
        user_keys = (
            None if not every
            else set(self.indexes.users) if users is None
            else {u.key for u in users}
        )  # fmt: skip
        self._users_count = count
        domain_keys = {d.key for d in domains}

        def gone(plural: str, key: Key) -> bool:
            if plural == DOMAINS:
                return key not in domain_keys
            return user_keys is not None and key not in user_keys

        for step in [k for k in self._applied if gone(*k)]:
            del self._applied[step]
        owners = {"dkim": DOMAINS, "lift": USERS}
        for step in [k for k in self.not_before if gone(owners.get(k[0], k[0]), k[1])]:
            del self.not_before[step]
        for user_key in [k for k in self.suspensions.lifted if gone(USERS, k)]:
            del self.suspensions.lifted[user_key]
        for user_key in [k for k in self._lift_handled if gone(USERS, k)]:
            del self._lift_handled[user_key]
        if every:
            for step in [k for k in self._settled if gone(*k)]:
                del self._settled[step]
            for user_key in [k for k in self._settled_users if gone(USERS, k)]:
                del self._settled_users[user_key]
            self._unsettled_users.intersection_update(user_keys or ())
        self.dkim_keys.forget_gone(domain_keys)
        for domain_key in [k for k in self.dns_results if k not in domain_keys]:
            del self.dns_results[domain_key]
        for domain_key in [k for k in self.dns_wanted if k not in domain_keys]:
            del self.dns_wanted[domain_key]

    # -- status ---------------------------------------------------------------------------

    async def _write_statuses(
        self,
        plan: Plan,
        domains: list[ObjectRecord],
        users: list[ObjectRecord] | None,
        publish_error: str | None,
    ) -> bool:
        """Patch every status that moved, STATUS_WRITERS at a time (a first start writes every
        object's status and Event: one at a time, the API server's round trips add up to
        minutes at 10,000 objects); whether a patch failed."""
        failed = False
        writes: list[tuple[str, ObjectRecord, dict[str, Any], dict[str, Any]]] = []
        context = (publish_error, self.suspensions.known)
        same_context = self._users_context == context
        self._users_context = context
        lifted, settled_users = self.suspensions.lifted, self._settled_users
        unsettled = self._unsettled_users
        if same_context and plan.redone is not None and self.indexes is not None:
            # only the users planned again, and those not found right at the last look
            index = self.indexes.users
            users = [r for key in (plan.redone | unsettled | set(lifted))
                     if (r := _first(index, key)) is not None]  # fmt: skip
        elif users is None:
            assert self.indexes is not None
            users = _all(self.indexes.users)
        for plural, records in ((DOMAINS, domains), (USERS, users)):
            for record in records:
                if plural == USERS and same_context:
                    seen = settled_users.get(record.key)
                    if (seen is not None and seen[0] is record
                            and seen[1] is plan.users.get(record.key)
                            and record.key not in lifted):  # fmt: skip
                        unsettled.discard(record.key)
                        continue  # nothing its status is made from changed
                base = self._base_status(plural, record)
                step = (plural, record.key)
                outcome: DomainOutcome | UserOutcome | None = (
                    plan.domains.get(record.key)
                    if plural == DOMAINS
                    else plan.users.get(record.key)
                )
                if outcome is None:
                    continue
                inputs = self._status_inputs(record, outcome, publish_error)
                if self._settled.get(step) == inputs:
                    # the same object, the same verdict: its status is right already
                    if isinstance(outcome, UserOutcome):
                        settled_users[record.key] = (record, outcome)
                        unsettled.discard(record.key)
                    continue
                if isinstance(outcome, DomainOutcome):
                    status = self._domain_status(record, base, outcome, publish_error)
                else:
                    status = user_status(
                        record, base, outcome, publish_error=publish_error,
                        suspensions=self.suspensions, at=conditions.now(),
                    )  # fmt: skip
                if {key: base.get(key) for key in status} == status:
                    self._written(step)
                    self._settled[step] = inputs
                    if isinstance(outcome, UserOutcome):
                        settled_users[record.key] = (record, outcome)
                        unsettled.discard(record.key)
                    continue
                self._settled.pop(step, None)
                if plural == USERS:
                    settled_users.pop(record.key, None)
                    unsettled.add(record.key)
                if not self._may_try(step):
                    failed = True  # failed a moment ago: the scheduled retry tries again
                    continue
                writes.append((plural, record, base, status))
        pending = iter(writes)

        async def writer() -> bool:
            failed = False
            for plural, record, base, status in pending:  # shared: each write taken once
                try:
                    await self._apply(plural, record, base, status)
                except KubeError as exc:
                    log.warning("%s: status update failed: %s", record, exc)
                    self._failed((plural, record.key))
                    failed = True
                else:
                    self._written((plural, record.key))
            return failed

        results = await asyncio.gather(*(writer() for _ in range(min(STATUS_WRITERS, len(writes)))))
        if len(writes) >= BULK_WRITES:
            self.bulk_written.set()
        return failed or any(results)

    def is_echo(self, plural: str, body: Mapping[str, Any], event: str | None = None) -> bool:
        """Whether a watch event only brings back our own status write (its resourceVersion is
        the one our patch made): nothing to plan again for it. A deletion never is, whatever
        version its last copy carries (an API server may send the copy as last written)."""
        if event == "DELETED":
            return False
        meta = body.get("metadata") or {}
        applied = self._applied.get((plural, (str(meta.get("namespace") or ""),
                                              str(meta.get("name") or ""))))  # fmt: skip
        return (
            applied is not None
            and applied.written_version is not None
            and applied.uid == str(meta.get("uid") or "")
            and applied.written_version == str(meta.get("resourceVersion") or "")
        )

    def _status_inputs(
        self, record: ObjectRecord, outcome: DomainOutcome | UserOutcome, publish_error: str | None
    ) -> tuple[Any, ...]:
        """Everything an object's desired status is made from, besides its own copy (which
        its resourceVersion stands for)."""
        common = (record.uid, record.resource_version, outcome, publish_error)
        if isinstance(outcome, DomainOutcome):
            dkim_keys = self.dkim_keys
            return (*common, dkim_keys.errors.get(record.key), self.dns_results.get(record.key),
                    dkim_keys.rotation_conditions.get(record.key), self.dane_keys)  # fmt: skip
        known = self.suspensions.known
        suspension = known.get(outcome.address) if known and outcome.address else None
        return (*common, known is None, suspension, self.suspensions.lifted.get(record.key))

    def _written(self, step: tuple[str, Key]) -> None:
        """The object's status is what it should be."""
        self.not_before.pop(step, None)
        if step[0] == USERS:
            self.suspensions.lifted.pop(step[1], None)  # the status says it now

    def _indexed_dkim_secret(self, key: Key) -> dict[str, str] | None:
        assert self.indexes is not None
        data: dict[str, str] | None = _first(self.indexes.dkim_secrets, key)
        return data

    def _base_status(self, plural: str, record: ObjectRecord) -> dict[str, Any]:
        """The object's status as last written: the index's, unless it has not seen our
        latest write yet."""
        applied = self._applied.get((plural, record.key))
        if applied is not None:
            if not applied.seen_in(record):
                return applied.status
            del self._applied[(plural, record.key)]
        return record.status

    def _domain_status(
        self,
        record: ObjectRecord,
        base: dict[str, Any],
        outcome: DomainOutcome,
        publish_error: str | None,
    ) -> dict[str, Any]:
        result = domain_status(
            record, base, outcome, settings=self.settings, publish_error=publish_error,
            dkim_error=self.dkim_keys.errors.get(record.key),
            signing_wanted=self.dkim_keys.signing_wanted.get(record.key),
            rotation_condition=self.dkim_keys.rotation_conditions.get(record.key),
            dns=self.dns_results.get(record.key), dane_keys=self.dane_keys, at=conditions.now(),
        )  # fmt: skip
        self._want_dns_check(record.key, result["dnsRecords"])
        return result

    def _want_dns_check(self, key: Key, records: list[dict[str, Any]]) -> None:
        """Hand the records the status lists to the DNS check (dnscheck.check_loop), waking
        it when they are not the ones it checked."""
        if not self.settings.dns_check_interval:
            return
        if not records:
            self.dns_wanted.pop(key, None)
            return
        self.dns_wanted[key] = records
        if not dns_checked(records, self.dns_results.get(key)):
            self.dns_wake.set()

    async def _apply(
        self, plural: str, record: ObjectRecord, base: dict[str, Any], status: dict[str, Any]
    ) -> None:
        if {key: base.get(key) for key in status} == status:
            return
        written = await self.kube.patch_status(plural, record.namespace, record.name, status)
        self._applied[(plural, record.key)] = _Applied(
            record.uid, record.resource_version, written, {**base, **status}
        )
        for type_, failure in EVENT_CONDITIONS.items():
            old = find(base.get("conditions") or [], type_) or {}
            new = find(status["conditions"], type_)
            if new is None or (old.get("status"), old.get("reason")) == (
                new.get("status"),
                new.get("reason"),
            ):
                continue
            if new["status"] == failure:
                await self._event(record, "Warning", new["reason"], new["message"])
            elif new["status"] != "Unknown" and (
                failure == "False" or old.get("status") == failure
            ):
                await self._event(record, "Normal", new["reason"], new["message"])

    async def _event(self, record: ObjectRecord, type_: str, reason: str, message: str) -> None:
        """Post an Event on the object; a failure to post is logged, not retried."""
        log.log(
            logging.WARNING if type_ == "Warning" else logging.INFO,
            "%s: %s: %s", record, reason, message,
        )  # fmt: skip
        try:
            await self.kube.post_event(
                record.reference(), type_=type_, reason=reason, message=message,
                source=self.settings.hostname,
            )  # fmt: skip
        except KubeError as exc:
            log.warning("%s: posting the event %s failed: %s", record, reason, exc)
