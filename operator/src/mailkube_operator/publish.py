"""The reconciler: from kopf's indexes to the routing table in Redis and every object's status.

Any change to a MailDomain, MailUser or referenced Secret calls `request()`. Concurrent
requests coalesce: one reconcile runs at a time and a request is satisfied by any reconcile
that started after it. A reconcile:

1. reads the indexes (kopf fills them completely before any handler runs, so the first
   reconcile after a start or resume sees everything and publishes the full table);
2. refreshes password hashes and relay credentials whose Secrets changed;
3. builds the plan (plan.build), and makes the DKIM keys a served domain lacks (creating its
   Secret, or adding the keys of a new selector; never overwriting one), then plans again;
4. replaces the routing table when it differs from the one last published (always on the
   first reconcile): atomic and versioned, by RoutingStore;
5. patches the status of each object whose desired status moved, and posts an Event when an
   object's Ready (or a MailDomain's DNSVerified) condition changes: a Warning for every
   failure, a Normal one on the way back.

A failure (Redis or the API unreachable, an API error) sets the conditions it can, and
schedules one retry after `retry_delay`; nothing retries in a hot loop. `check_redis`, run
periodically, notices Redis going away (readiness), coming back, and losing or replacing the
table (then the table is published again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mailkube_core.routing import RoutingStore, RoutingTable
from mailkube_core.settings import OperatorSettings

from . import dkim
from .conditions import Status, find, set_condition
from .dkim import PublishedKey, keys_from_secret, secret_name, wanted_keys
from .dnsrecords import dns_records
from .kube import Kube, KubeError
from .models import DOMAINS, USERS, MailDomainSpec, MailUserSpec
from .plan import DomainOutcome, Key, ObjectRecord, Plan, UserOutcome, build
from .secrets import SecretValues

log = logging.getLogger(__name__)

#: conditions whose changes are posted as Events
EVENT_CONDITIONS = ("Ready", "DNSVerified")


@dataclass(frozen=True)
class ConditionValue:
    status: Status
    reason: str
    message: str


@dataclass(frozen=True)
class DnsResult:
    """What the DNS check found for the records it checked, and when (time.monotonic)."""

    records: tuple[tuple[str, str, str], ...]
    value: ConditionValue
    checked_at: float = field(default=0.0, compare=False)


def record_keys(records: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, str, str], ...]:
    return tuple((str(r.get("type")), str(r.get("name")), str(r.get("value"))) for r in records)


@dataclass
class Indexes:
    """kopf's live indexes (handed to every handler as keyword arguments)."""

    domains: Mapping[Any, Iterable[ObjectRecord]]
    users: Mapping[Any, Iterable[ObjectRecord]]
    password_secrets: Mapping[Any, Iterable[dict[str, str]]]
    dkim_secrets: Mapping[Any, Iterable[dict[str, str]]]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Indexes:
        return cls(
            domains=kwargs["maildomains_idx"],
            users=kwargs["mailusers_idx"],
            password_secrets=kwargs["password_secrets_idx"],
            dkim_secrets=kwargs["dkim_secrets_idx"],
        )


def _all(index: Mapping[Any, Iterable[Any]]) -> list[Any]:
    return [value for key in list(index) for value in index[key]]


def _first(index: Mapping[Any, Iterable[Any]], key: Any) -> Any:
    if key not in index:
        return None
    return next(iter(index[key]), None)


@dataclass(frozen=True)
class _Applied:
    """A status we wrote, and the object's resourceVersion in the index when we wrote it: while
    the index still shows that version, it has not seen our write yet."""

    uid: str
    resource_version: str
    status: dict[str, Any]


@dataclass
class Reconciler:
    settings: OperatorSettings
    store: RoutingStore
    kube: Kube
    indexes: Indexes | None = None
    secrets: SecretValues = field(default_factory=SecretValues)
    #: MailDomain key -> why its DKIM keys could not be made
    dkim_errors: dict[Key, str] = field(default_factory=dict)
    #: a step that failed (DKIM keys or status of an object) -> when it may be tried again
    not_before: dict[tuple[str, Key], float] = field(default_factory=dict)
    #: MailDomain key -> the records its status lists, for the DNS check (dnscheck.py)
    dns_wanted: dict[Key, list[dict[str, Any]]] = field(default_factory=dict)
    #: MailDomain key -> DNSVerified and the records it was found for (the DNS check)
    dns_results: dict[Key, DnsResult] = field(default_factory=dict)
    #: set when records to check changed
    dns_wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: the last table published, as JSON (None: nothing published since the start)
    published_json: str | None = None
    #: its version in Redis
    published_version: int | None = None
    #: whether Redis answered the last publish or check (readiness)
    healthy: bool = False
    reconciles: int = 0
    _applied: dict[tuple[str, Key], _Applied] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _requested: int = 0
    _done: int = 0
    _retry: asyncio.Task[None] | None = None
    _pending: bool = False

    def __post_init__(self) -> None:
        self.secrets.retry_delay = self.settings.retry_delay.total_seconds()

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
                self.published_json = None
            elif not self._pending:
                if not self.healthy and self.published_version is not None:
                    log.info("Redis is reachable again, with our routing table")
                self.healthy = self.published_version is not None
            again = stale or (self._pending and not self.healthy)
        if again:
            await self.request()

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry

    # -- one reconcile --------------------------------------------------------------------

    async def _reconcile(self) -> None:
        if self.indexes is None:
            return
        self.reconciles += 1
        self._pending = False
        domains: list[ObjectRecord] = _all(self.indexes.domains)
        users: list[ObjectRecord] = _all(self.indexes.users)
        known = {key: _first(self.indexes.password_secrets, key) or {}
                 for key in list(self.indexes.password_secrets)}  # fmt: skip
        failed = await self._refresh_secrets(domains, users, known)
        fresh: dict[Key, dict[str, str]] = {}
        plan = self._plan(domains, users, known, fresh)
        if await self._ensure_dkim_keys(domains, plan, fresh):
            plan = self._plan(domains, users, known, fresh)
        failed = failed or any(key in self.dkim_errors for key in plan.domains)
        publish_error = await self._publish(plan.table)
        failed = await self._write_statuses(plan, domains, users, publish_error) or failed
        self._forget_gone(domains, users)
        if failed or publish_error:
            self._schedule_retry()

    def _plan(
        self,
        domains: list[ObjectRecord],
        users: list[ObjectRecord],
        known: Mapping[tuple[str, str], Mapping[str, str]],
        fresh: Mapping[Key, dict[str, str]],
    ) -> Plan:
        return build(
            domains,
            users,
            passwords=lambda ns, ref: self.secrets.password(ns, ref, known),
            relay=lambda ns, ref: self.secrets.relay(ns, ref, known),
            dkim=lambda record, spec: self._dkim_keys(record, spec, fresh),
        )

    async def _refresh_secrets(
        self,
        domains: list[ObjectRecord],
        users: list[ObjectRecord],
        known: Mapping[tuple[str, str], Mapping[str, str]],
    ) -> bool:
        """Re-hash changed passwords, re-read changed relay credentials; whether a read failed
        (the failure is in the object's condition)."""
        failed = False
        for user in users:
            ref = user.spec.get("passwordSecretRef")
            if user.deleting or not isinstance(ref, dict) or "name" not in ref:
                continue
            try:
                spec = MailUserSpec.model_validate(user.spec)
            except ValueError:
                continue
            if spec.password_secret_ref is not None:
                try:
                    await self.secrets.refresh_password(
                        self.kube, user.namespace, spec.password_secret_ref, known
                    )
                except KubeError:  # logged by SecretValues, named in the user's status
                    failed = True
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

    def _dkim_data(self, record: ObjectRecord, fresh: Mapping[Key, dict[str, str]]) -> Any:
        key = (record.namespace, secret_name(record.name))
        if key in fresh:
            return fresh[key]
        assert self.indexes is not None
        return _first(self.indexes.dkim_secrets, key)

    def _dkim_keys(
        self, record: ObjectRecord, spec: MailDomainSpec, fresh: Mapping[Key, dict[str, str]]
    ) -> list[PublishedKey]:
        data = self._dkim_data(record, fresh)
        if not data:
            return []
        return keys_from_secret(data, wanted_keys(spec.dkim.selector, spec.dkim.algorithm))

    async def _ensure_dkim_keys(
        self, domains: list[ObjectRecord], plan: Plan, fresh: dict[Key, dict[str, str]]
    ) -> bool:
        """Make the keys each served MailDomain lacks (its Secret read through the API: the
        index may lag behind our own writes); whether any Secret was read or written."""
        changed = False
        for record in domains:
            outcome = plan.domains.get(record.key)
            if outcome is None or outcome.spec is None or not outcome.published:
                self.dkim_errors.pop(record.key, None)
                continue
            wanted = wanted_keys(outcome.spec.dkim.selector, outcome.spec.dkim.algorithm)
            have = self._dkim_data(record, fresh) or {}
            if all(w.data_key in have for w in wanted):
                self.dkim_errors.pop(record.key, None)
                continue
            secret = secret_name(record.name)
            if not self._may_try(("dkim", record.key)):
                continue  # failed a moment ago: the scheduled retry tries again
            try:
                fresh[(record.namespace, secret)] = await self._ensure_secret(record, wanted)
            except KubeError as exc:
                log.warning("%s: DKIM Secret %s: %s", record, secret, exc)
                self.dkim_errors[record.key] = f"Secret {secret}: {exc}"
                self._failed(("dkim", record.key))
            else:
                self.dkim_errors.pop(record.key, None)
                self.not_before.pop(("dkim", record.key), None)
                changed = True
        return changed

    async def _ensure_secret(
        self, record: ObjectRecord, wanted: list[dkim.WantedKey]
    ) -> dict[str, str]:
        """Create the DKIM Secret or add the missing keys; its data (decoded) afterwards."""
        secret = secret_name(record.name)
        data = await self.kube.read_secret_data(record.namespace, secret)
        if data is None:
            new = await asyncio.to_thread(dkim.missing_keys, {}, wanted)
            body = dkim.secret_body(
                namespace=record.namespace, domain_name=record.name, domain_uid=record.uid,
                data=new,
            )  # fmt: skip
            await self.kube.create_secret(record.namespace, body)
            message = f"generated DKIM keys {', '.join(new)} into Secret {secret}"
            await self._event(record, "Normal", "DKIMKeyCreated", message)
            return new
        current = dkim.decode_data(data)
        new = await asyncio.to_thread(dkim.missing_keys, current, wanted)
        if new:
            encoded = dkim.secret_body(
                namespace=record.namespace, domain_name=record.name, domain_uid=record.uid,
                data=new,
            )["data"]  # fmt: skip
            await self.kube.patch_secret_data(record.namespace, secret, encoded)
            message = f"added DKIM keys {', '.join(new)} to Secret {secret}"
            await self._event(record, "Normal", "DKIMKeyAdded", message)
        return {**current, **new}

    async def _publish(self, table: RoutingTable) -> str | None:
        """Replace the table in Redis if it changed; the error, or None."""
        document = table.model_dump_json()
        if document == self.published_json:
            return None
        try:
            version = await self.store.replace(table)
        except Exception as exc:
            self.healthy = False
            log.warning("publishing the routing table failed: %r", exc)
            return f"Redis: {type(exc).__name__}: {exc}"
        self.published_json = document
        self.published_version = version
        self.healthy = True
        log.info(
            "routing table published",
            extra={"version": version, "domains": len(table.domains), "users": len(table.users)},
        )
        return None

    def _forget_gone(self, domains: list[ObjectRecord], users: list[ObjectRecord]) -> None:
        live = {(DOMAINS, d.key) for d in domains} | {(USERS, u.key) for u in users}
        for key in [k for k in self._applied if k not in live]:
            del self._applied[key]
        for step in [k for k in self.not_before if (DOMAINS if k[0] == "dkim" else k[0],
                                                    k[1]) not in live]:  # fmt: skip
            del self.not_before[step]
        for domain_key in [k for k in self.dns_results if (DOMAINS, k) not in live]:
            del self.dns_results[domain_key]
        for domain_key in [k for k in self.dns_wanted if (DOMAINS, k) not in live]:
            del self.dns_wanted[domain_key]
        for domain_key in [k for k in self.dkim_errors if (DOMAINS, k) not in live]:
            del self.dkim_errors[domain_key]

    # -- status ---------------------------------------------------------------------------

    async def _write_statuses(
        self,
        plan: Plan,
        domains: list[ObjectRecord],
        users: list[ObjectRecord],
        publish_error: str | None,
    ) -> bool:
        """Patch every status that moved; whether a patch failed."""
        failed = False
        for plural, records in ((DOMAINS, domains), (USERS, users)):
            for record in records:
                base = self._base_status(plural, record)
                if plural == DOMAINS:
                    outcome = plan.domains.get(record.key)
                    if outcome is None:
                        continue
                    status = self._domain_status(record, base, outcome, publish_error)
                else:
                    uoutcome = plan.users.get(record.key)
                    if uoutcome is None:
                        continue
                    status = self._user_status(record, base, uoutcome, publish_error)
                step = (plural, record.key)
                if {key: base.get(key) for key in status} == status:
                    self.not_before.pop(step, None)
                    continue
                if not self._may_try(step):
                    failed = True  # failed a moment ago: the scheduled retry tries again
                    continue
                try:
                    await self._apply(plural, record, base, status)
                except KubeError as exc:
                    log.warning("%s: status update failed: %s", record, exc)
                    self._failed(step)
                    failed = True
                else:
                    self.not_before.pop(step, None)
        return failed

    def _base_status(self, plural: str, record: ObjectRecord) -> dict[str, Any]:
        """The object's status as last written: the index's, unless it has not seen our
        latest write yet."""
        applied = self._applied.get((plural, record.key))
        if applied is not None:
            if applied.uid == record.uid and applied.resource_version == record.resource_version:
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
        gen = record.generation
        values: dict[str, ConditionValue] = {}
        if outcome.rejected is not None:
            values["Published"] = ConditionValue(
                "False", outcome.rejected.reason, outcome.rejected.message
            )
        elif publish_error is not None:
            values["Published"] = ConditionValue("False", "RedisUnavailable", publish_error)
        else:
            values["Published"] = ConditionValue(
                "True", "Published", f"{outcome.domain} is in the routing table"
            )
        signing = [k.key.selector for k in outcome.keys if k.key.signing]
        wanted = (
            wanted_keys(outcome.spec.dkim.selector, outcome.spec.dkim.algorithm)
            if outcome.spec
            else []
        )
        if record.key in self.dkim_errors:
            values["DKIMKeyReady"] = ConditionValue(
                "False", "DKIMSecretFailed", self.dkim_errors[record.key]
            )
        elif wanted and len(signing) >= len(wanted):
            values["DKIMKeyReady"] = ConditionValue(
                "True", "KeysReady", f"signing with selector {', '.join(signing)}"
            )
        else:
            values["DKIMKeyReady"] = ConditionValue(
                "False", "KeysPending", f"waiting for the keys in Secret {secret_name(record.name)}"
            )
        records = (
            [r.dump() for r in dns_records(
                outcome.domain, outcome.spec, self.settings.mx_hostname(), outcome.keys)]
            if outcome.spec is not None and outcome.domain is not None
            else []
        )  # fmt: skip
        values["DNSVerified"] = self._dns_verified(record.key, records)
        failing = [v for k, v in values.items() if k != "DNSVerified" and v.status != "True"]
        if outcome.warning is not None:
            failing.append(ConditionValue("False", outcome.warning.reason, outcome.warning.message))
        values["Ready"] = (
            ConditionValue("False", failing[0].reason, failing[0].message)
            if failing
            else ConditionValue("True", "Ready", f"serving {outcome.domain}")
        )
        return {
            "observedGeneration": gen,
            "conditions": self._conditions(record, base, values),
            "users": outcome.users,
            "dkimSecret": secret_name(record.name),
            "dnsRecords": records,
        }

    def _dns_verified(self, key: Key, records: list[dict[str, Any]]) -> ConditionValue:
        if not self.settings.dns_check_interval:
            return ConditionValue(
                "Unknown", "CheckDisabled", "the DNS check is off (dns_check_interval)"
            )
        if not records:
            self.dns_wanted.pop(key, None)
            return ConditionValue("Unknown", "Pending", "no records to check")
        self.dns_wanted[key] = records
        result = self.dns_results.get(key)
        if result is None or result.records != record_keys(records):
            self.dns_wake.set()
            return ConditionValue("Unknown", "Pending", "not checked yet")
        return result.value

    def _user_status(
        self,
        record: ObjectRecord,
        base: dict[str, Any],
        outcome: UserOutcome,
        publish_error: str | None,
    ) -> dict[str, Any]:
        if outcome.problem is not None:
            ready = ConditionValue("False", outcome.problem.reason, outcome.problem.message)
        elif publish_error is not None:
            ready = ConditionValue("False", "RedisUnavailable", publish_error)
        elif not outcome.can_login:
            ready = ConditionValue(
                "True",
                "Published",
                "in the routing table; cannot log in (no password or suspended)",
            )
        else:
            ready = ConditionValue("True", "Published", "in the routing table")
        return {
            "observedGeneration": record.generation,
            "conditions": self._conditions(record, base, {"Ready": ready}),
            "mailbox": outcome.mailbox,
        }

    @staticmethod
    def _conditions(
        record: ObjectRecord, base: dict[str, Any], values: Mapping[str, ConditionValue]
    ) -> list[dict[str, Any]]:
        conditions: list[dict[str, Any]] = list(base.get("conditions") or [])
        for type_, value in values.items():
            conditions = set_condition(
                conditions, type_, value.status, value.reason, value.message, record.generation
            )
        return conditions

    async def _apply(
        self, plural: str, record: ObjectRecord, base: dict[str, Any], status: dict[str, Any]
    ) -> None:
        if {key: base.get(key) for key in status} == status:
            return
        await self.kube.patch_status(plural, record.namespace, record.name, status)
        self._applied[(plural, record.key)] = _Applied(
            record.uid, record.resource_version, {**base, **status}
        )
        for type_ in EVENT_CONDITIONS:
            old = find(base.get("conditions") or [], type_) or {}
            new = find(status["conditions"], type_)
            if new is None or (old.get("status"), old.get("reason")) == (
                new.get("status"),
                new.get("reason"),
            ):
                continue
            if new["status"] == "True":
                await self._event(record, "Normal", new["reason"], new["message"])
            elif new["status"] == "False":
                await self._event(record, "Warning", new["reason"], new["message"])

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
