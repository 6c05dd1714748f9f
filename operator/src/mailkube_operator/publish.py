"""The reconciler: from kopf's indexes to the routing table in Redis and every object's status.

Any change to a MailDomain, MailUser or referenced Secret calls `request()`. Concurrent
requests coalesce: one reconcile runs at a time and a request is satisfied by any reconcile
that started after it. A reconcile:

1. reads the indexes (kopf fills them completely before any handler runs, so the first
   reconcile after a start or resume sees everything and publishes the full table);
2. refreshes password hashes and relay credentials whose Secrets changed;
3. builds the plan (plan.build) and replaces the routing table when it differs from the one
   last published (always on the first reconcile): atomic and versioned, by RoutingStore;
4. patches the status of each object whose desired status moved, and posts an Event when an
   object's Ready condition changes (a Warning for every failure).

A failure (Redis or the API unreachable) sets the conditions it can and schedules one retry
after `retry_delay`; nothing retries in a hot loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from mailkube_core.routing import RoutingStore, RoutingTable
from mailkube_core.settings import OperatorSettings

from .conditions import Status, find, set_condition
from .dkim import PublishedKey, keys_from_secret, secret_name, wanted_keys
from .dnsrecords import dns_records
from .kube import Kube, KubeError
from .models import DOMAINS, USERS, MailDomainSpec, MailUserSpec
from .plan import DomainOutcome, Key, ObjectRecord, Plan, UserOutcome, build
from .secrets import SecretValues

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConditionValue:
    status: Status
    reason: str
    message: str


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


@dataclass
class Reconciler:
    settings: OperatorSettings
    store: RoutingStore
    kube: Kube
    indexes: Indexes | None = None
    secrets: SecretValues = field(default_factory=SecretValues)
    #: MailDomain key -> why its DKIM Secret could not be made (set by the DKIM handler)
    dkim_errors: dict[Key, str] = field(default_factory=dict)
    #: MailDomain key -> DNSVerified (set by the DNS check timer)
    dns_results: dict[Key, ConditionValue] = field(default_factory=dict)
    #: the last table published, as JSON (None: nothing published since the start)
    published_json: str | None = None
    #: whether the last reconcile reached Redis (readiness)
    healthy: bool = False
    reconciles: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _requested: int = 0
    _done: int = 0
    _retry: asyncio.Task[None] | None = None

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
            finally:
                self._done = target

    def _schedule_retry(self) -> None:
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._retry_later(), name="mailkube-retry")

    async def _retry_later(self) -> None:
        await asyncio.sleep(self.settings.retry_delay.total_seconds())
        self._retry = None
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
        domains: list[ObjectRecord] = _all(self.indexes.domains)
        users: list[ObjectRecord] = _all(self.indexes.users)
        known = {key: _first(self.indexes.password_secrets, key) or {}
                 for key in list(self.indexes.password_secrets)}  # fmt: skip
        failed = False
        try:
            await self._refresh_secrets(domains, users, known)
        except KubeError as exc:
            log.warning("reading Secrets failed: %s", exc)
            failed = True
        plan = build(
            domains,
            users,
            passwords=lambda ns, ref: self.secrets.password(ns, ref, known),
            relay=lambda ns, ref: self.secrets.relay(ns, ref, known),
            dkim=self._dkim_keys,
        )
        publish_error = await self._publish(plan.table)
        try:
            await self._write_statuses(plan, domains, users, publish_error)
        except KubeError as exc:
            log.warning("status update failed: %s", exc)
            failed = True
        if failed or publish_error:
            self._schedule_retry()

    async def _refresh_secrets(
        self,
        domains: list[ObjectRecord],
        users: list[ObjectRecord],
        known: Mapping[tuple[str, str], Mapping[str, str]],
    ) -> None:
        for user in users:
            ref = user.spec.get("passwordSecretRef")
            if user.deleting or not isinstance(ref, dict) or "name" not in ref:
                continue
            try:
                spec = MailUserSpec.model_validate(user.spec)
            except ValueError:
                continue
            if spec.password_secret_ref is not None:
                await self.secrets.refresh_password(
                    self.kube, user.namespace, spec.password_secret_ref, known
                )
        for domain in domains:
            if domain.deleting or not isinstance(domain.spec.get("relay"), dict):
                continue
            try:
                dspec = MailDomainSpec.model_validate(domain.spec)
            except ValueError:
                continue
            if dspec.relay is not None and dspec.relay.credentials_secret_ref is not None:
                await self.secrets.refresh_relay(
                    self.kube, domain.namespace, dspec.relay.credentials_secret_ref, known
                )

    def _dkim_keys(self, record: ObjectRecord, spec: MailDomainSpec) -> list[PublishedKey]:
        assert self.indexes is not None
        data = _first(self.indexes.dkim_secrets, (record.namespace, secret_name(record.name)))
        if not data:
            return []
        return keys_from_secret(data, wanted_keys(spec.dkim.selector, spec.dkim.algorithm))

    async def _publish(self, table: RoutingTable) -> str | None:
        """Replace the table in Redis if it changed; the error, or None."""
        document = table.model_dump_json()
        if document == self.published_json:
            self.healthy = True
            return None
        try:
            version = await self.store.replace(table)
        except Exception as exc:
            self.healthy = False
            log.warning("publishing the routing table failed: %r", exc)
            return f"Redis: {type(exc).__name__}: {exc}"
        self.published_json = document
        self.healthy = True
        log.info(
            "routing table published",
            extra={"version": version, "domains": len(table.domains), "users": len(table.users)},
        )
        return None

    # -- status ---------------------------------------------------------------------------

    async def _write_statuses(
        self,
        plan: Plan,
        domains: list[ObjectRecord],
        users: list[ObjectRecord],
        publish_error: str | None,
    ) -> None:
        for record in domains:
            outcome = plan.domains.get(record.key)
            if outcome is not None:
                status = self._domain_status(record, outcome, publish_error)
                await self._apply(DOMAINS, record, status)
        for record in users:
            uoutcome = plan.users.get(record.key)
            if uoutcome is not None:
                status = self._user_status(record, uoutcome, publish_error)
                await self._apply(USERS, record, status)

    def _domain_status(
        self, record: ObjectRecord, outcome: DomainOutcome, publish_error: str | None
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
        values["DNSVerified"] = self.dns_results.get(record.key) or (
            ConditionValue("Unknown", "CheckDisabled", "the DNS check is off (dns_check_interval)")
            if not self.settings.dns_check_interval
            else ConditionValue("Unknown", "Pending", "not checked yet")
        )
        failing = [v for k, v in values.items() if k != "DNSVerified" and v.status != "True"]
        if outcome.warning is not None:
            failing.append(ConditionValue("False", outcome.warning.reason, outcome.warning.message))
        values["Ready"] = (
            ConditionValue("False", failing[0].reason, failing[0].message)
            if failing
            else ConditionValue("True", "Ready", f"serving {outcome.domain}")
        )
        status: dict[str, Any] = {
            "observedGeneration": gen,
            "conditions": self._conditions(record, values),
            "users": outcome.users,
            "dkimSecret": secret_name(record.name),
            "dnsRecords": [
                r.dump()
                for r in dns_records(
                    outcome.domain, outcome.spec, self.settings.mx_hostname(), outcome.keys
                )
            ]
            if outcome.spec is not None and outcome.domain is not None
            else [],
        }
        return status

    def _user_status(
        self, record: ObjectRecord, outcome: UserOutcome, publish_error: str | None
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
            "conditions": self._conditions(record, {"Ready": ready}),
            "mailbox": outcome.mailbox,
        }

    @staticmethod
    def _conditions(
        record: ObjectRecord, values: Mapping[str, ConditionValue]
    ) -> list[dict[str, Any]]:
        conditions: list[dict[str, Any]] = list(record.status.get("conditions") or [])
        for type_, value in values.items():
            conditions = set_condition(
                conditions, type_, value.status, value.reason, value.message, record.generation
            )
        return conditions

    async def _apply(self, plural: str, record: ObjectRecord, status: dict[str, Any]) -> None:
        current = {key: record.status.get(key) for key in status}
        if current == status:
            return
        await self.kube.patch_status(plural, record.namespace, record.name, status)
        old = find(record.status.get("conditions") or [], "Ready") or {}
        new = find(status["conditions"], "Ready") or {}
        if (old.get("status"), old.get("reason")) != (new.get("status"), new.get("reason")):
            self._event(record, new)

    @staticmethod
    def _event(record: ObjectRecord, ready: dict[str, Any]) -> None:
        body = kopf.Body(cast(kopf.RawBody, record.reference()))
        reason, message = ready["reason"], ready["message"]
        try:
            if ready.get("status") == "True":
                kopf.event(body, type="Normal", reason=reason, message=message)
            else:
                kopf.warn(body, reason=reason, message=message)
        except LookupError:  # outside kopf's per-object context (e.g. the start-up publish)
            log.info("%s: %s: %s", record, reason, message)
