"""The DKIM-keys step of a reconcile: each served MailDomain's keys, in its DKIM Secret.

`keys` gives the plan a MailDomain's keys as its Secret holds them, parsed once per content
(an RSA key takes ~30 ms to parse), in the order its status lists them. `ensure` makes the
keys a served MailDomain lacks: creating its Secret, or adding the keys of a new selector
(never overwriting one). With `spec.dkim.rotation`, or the annotation `mailkube.io/rotate-dkim`,
it takes the rotation's steps instead (rotation.py decides them, pure): each in one write of
the Secret, with its Events. A Secret that cannot be read or written is named in the
MailDomain's status (`errors`) and not tried again before `retry_delay` has passed.

What the status builder (status.py) needs of it is kept per MailDomain: `errors`,
`signing_wanted`, `rotation_conditions`; `rotation_due` says when a reconcile must take a
rotation's timed step, and `watch` which MailDomains to look at even when nothing changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailkube_core.settings import OperatorSettings

from . import dkim, rotation
from .conditions import ConditionValue
from .dkim import PublishedKey, keys_from_secret, secret_name, wanted_keys
from .dnscheck import DnsResult
from .kube import Kube, KubeError
from .models import DOMAINS, DkimRotationSpec, MailDomainSpec
from .plan import DomainOutcome, Key, ObjectRecord, Plan

log = logging.getLogger(__name__)

#: a DKIM Secret's data, spec.dkim, and the keys parsed from it
_ParsedKeys = tuple[dict[str, str], Any, list[PublishedKey]]


@dataclass
class DkimKeys:
    """The DKIM-keys step; the reconciler holds one, and gives it what it shares."""

    settings: OperatorSettings
    kube: Kube
    #: post an Event on an object (logged; a failure to post is not raised)
    event: Callable[[ObjectRecord, str, str, str], Awaitable[None]]
    #: a DKIM Secret's data in the index, by (namespace, name); None: not there
    indexed: Callable[[Key], dict[str, str] | None]
    #: a MailDomain's status as last written (the DNS records it lists)
    written_status: Callable[[ObjectRecord], Mapping[str, Any]]
    #: the DNS check's results, by MailDomain (what it found published)
    dns_results: Mapping[Key, DnsResult]
    #: the reconciler's: a step that failed -> when it may be tried again; ours are
    #: ("dkim", MailDomain key)
    not_before: dict[tuple[str, Key], float]
    clock: Callable[[], datetime]
    #: MailDomain key -> why its DKIM keys could not be made
    errors: dict[Key, str] = field(default_factory=dict)
    #: MailDomain key -> its DKIMRotation condition (rotation.py), when it has one
    rotation_conditions: dict[Key, ConditionValue] = field(default_factory=dict)
    #: MailDomain key -> when its rotation has a timed step (a reconcile is planned for then)
    rotation_due: dict[Key, datetime] = field(default_factory=dict)
    #: MailDomain -> the keys that sign (the active generation's, or spec.dkim's)
    signing_wanted: dict[Key, list[dkim.WantedKey]] = field(default_factory=dict)
    #: MailDomains whose DKIM step must be looked at again even when nothing changed (keys
    #: missing or failed, a rotation under way): all a reconcile of changed users visits
    watch: set[Key] = field(default_factory=set)
    #: MailDomain -> its DKIM Secret's data, the keys wanted, and the keys parsed from it
    _parsed: dict[Key, _ParsedKeys] = field(default_factory=dict)
    #: MailDomain -> its resourceVersion when its rotate annotation was handled
    _rotate_handled: dict[Key, str] = field(default_factory=dict)

    def _may_try(self, key: Key) -> bool:
        return time.monotonic() >= self.not_before.get(("dkim", key), 0.0)

    def _failed(self, key: Key, error: str) -> None:
        self.errors[key] = error
        self.not_before[("dkim", key)] = (
            time.monotonic() + self.settings.retry_delay.total_seconds()
        )

    def _succeeded(self, key: Key) -> None:
        self.errors.pop(key, None)
        self.not_before.pop(("dkim", key), None)

    def forget_gone(self, domains: Collection[Key]) -> None:
        """Drop what is kept for the MailDomains not in `domains` (all there are)."""
        self.watch.intersection_update(domains)
        for kept in (self.errors, self._parsed, self.signing_wanted, self._rotate_handled,
                     self.rotation_conditions, self.rotation_due):  # fmt: skip
            for key in [k for k in kept if k not in domains]:
                del kept[key]

    def _data(
        self, record: ObjectRecord, fresh: Mapping[Key, dict[str, str]]
    ) -> dict[str, str] | None:
        key = (record.namespace, secret_name(record.name))
        if key in fresh:
            return fresh[key]
        return self.indexed(key)

    def keys(
        self, record: ObjectRecord, spec: MailDomainSpec, fresh: Mapping[Key, dict[str, str]]
    ) -> list[PublishedKey]:
        """The MailDomain's keys, as its Secret holds them (plan.build asks)."""
        data = self._data(record, fresh)
        if not data:
            self._parsed.pop(record.key, None)
            self.signing_wanted.pop(record.key, None)
            return []
        cached = self._parsed.get(record.key)
        if cached is not None and cached[0] == data:
            if cached[1] is spec.dkim:
                return cached[2]
            if cached[1] == spec.dkim:  # equal: compared by identity next time
                self._parsed[record.key] = (cached[0], spec.dkim, cached[2])
                return cached[2]
        state = rotation.load_state(data)
        if state is None:
            wanted = wanted_keys(spec.dkim.selector, spec.dkim.algorithm)
            keys = keys_from_secret(data, wanted)
        else:
            wanted = state.active.dkim_keys()
            keys = _rotation_keys(keys_from_secret(data, wanted), state, spec)
        self.signing_wanted[record.key] = wanted
        self._parsed[record.key] = (dict(data), spec.dkim, keys)
        return keys

    async def ensure(
        self, domains: list[ObjectRecord], plan: Plan, fresh: dict[Key, dict[str, str]]
    ) -> bool:
        """Make the keys each served MailDomain of `domains` lacks, or take its rotation's
        step (its Secret read through the API: the index may lag behind our own writes; what
        is read or written goes into `fresh`); whether any Secret was read or written."""
        changed = False
        watch = self.watch
        for record in domains:
            watch.discard(record.key)
            outcome = plan.domains.get(record.key)
            if outcome is None or outcome.spec is None or not outcome.published:
                self.errors.pop(record.key, None)
                continue
            have = self._data(record, fresh) or {}
            step = self._rotation_step(record, outcome, have)
            if step.state is not None:
                watch.add(record.key)
                changed = await self._rotate(record, outcome, step, have, fresh) or changed
                continue
            self.rotation_conditions.pop(record.key, None)
            self.rotation_due.pop(record.key, None)
            wanted = wanted_keys(outcome.spec.dkim.selector, outcome.spec.dkim.algorithm)
            if all(w.data_key in have for w in wanted):
                self.errors.pop(record.key, None)
                continue
            watch.add(record.key)
            secret = secret_name(record.name)
            if not self._may_try(record.key):
                continue  # failed a moment ago: the scheduled retry tries again
            try:
                fresh[(record.namespace, secret)] = await self._ensure_secret(record, wanted)
            except KubeError as exc:
                log.warning("%s: DKIM Secret %s: %s", record, secret, exc)
                self._failed(record.key, f"Secret {secret}: {exc}")
            else:
                self._succeeded(record.key)
                changed = True
        return changed

    def _rotation_step(
        self, record: ObjectRecord, outcome: DomainOutcome, data: Mapping[str, str]
    ) -> rotation.Step:
        assert outcome.spec is not None
        assert outcome.domain is not None
        spec, domain = outcome.spec, outcome.domain
        requested = (
            rotation.ROTATE_ANNOTATION in record.annotations
            and self._rotate_handled.get(record.key) != record.resource_version
        )
        if spec.dkim.rotation is None and not requested and rotation.STATE_KEY not in data:
            return rotation.Step(state=None)  # the legacy rules, at no cost
        now = self.clock()
        published = {k.key.selector: k.record for k in outcome.keys}
        dns = self.dns_results.get(record.key)

        def name(selector: str) -> str:
            return f"{selector}._domainkey.{domain}."

        def missing(selectors: list[str]) -> list[str]:
            seen = dns.seen if dns is not None else frozenset()
            return [name(s) for s in selectors
                    if ("TXT", name(s), published.get(s, "")) not in seen]  # fmt: skip

        def wait(gen: rotation.Generation) -> rotation.Wait | None:
            base = self.written_status(record)
            listed = {(str(r.get("name")), str(r.get("value")))
                      for r in base.get("dnsRecords") or []
                      if r.get("purpose") == "dkim"}  # fmt: skip
            is_listed = all(
                s in published and (name(s), published[s]) in listed for s in gen.selectors()
            )
            return rotation.propagation_wait(
                gen, now=now, rotation=spec.dkim.rotation, listed=is_listed,
                dns_check=bool(self.settings.dns_check_interval), dns_missing=missing,
            )  # fmt: skip

        return rotation.advance(
            rotation.load_state(dict(data)), spec.dkim, data_keys=set(data), now=now,
            requested=requested, published=wait,
        )  # fmt: skip

    async def _rotate(
        self,
        record: ObjectRecord,
        outcome: DomainOutcome,
        step: rotation.Step,
        have: Mapping[str, str],
        fresh: dict[Key, dict[str, str]],
    ) -> bool:
        """Carry out a rotation step: make the keys it needs, remove the retired ones and keep
        its state, in one write of the DKIM Secret (read through the API first: the index may
        lag behind our own writes); then its Events. Whether the Secret was written."""
        assert step.state is not None
        secret = secret_name(record.name)
        if not self._needs_write(step, have) and not step.annotation_handled:
            self._rotation_done(record, step)
            self.errors.pop(record.key, None)
            return False
        if not self._may_try(record.key):
            self.rotation_due.pop(record.key, None)
            return False  # failed a moment ago: the scheduled retry tries again
        wrote = False
        try:
            current = await self.kube.read_secret_data(record.namespace, secret)
            data = dkim.decode_data(current) if current is not None else {}
            if data != dict(have):
                step = self._rotation_step(record, outcome, data)  # the index was behind
                assert step.state is not None
            if self._needs_write(step, data):
                assert step.state is not None
                new = await asyncio.to_thread(dkim.missing_keys, data, step.needed)
                changes: dict[str, str | None] = {
                    **new, rotation.STATE_KEY: step.state.dump(),
                    **dict.fromkeys(step.remove),
                }  # fmt: skip
                if current is None:
                    body = dkim.secret_body(
                        namespace=record.namespace, domain_name=record.name,
                        domain_uid=record.uid,
                        data={k: v for k, v in changes.items() if v is not None},
                    )  # fmt: skip
                    await self.kube.create_secret(record.namespace, body)
                    message = f"generated DKIM keys {', '.join(new)} into Secret {secret}"
                    await self.event(record, "Normal", "DKIMKeyCreated", message)
                else:
                    encoded = {k: None if v is None else dkim.b64(v) for k, v in changes.items()}
                    await self.kube.patch_secret_data(record.namespace, secret, encoded)
                data = {k: v for k, v in {**data, **changes}.items() if v is not None}
                fresh[(record.namespace, secret)] = data
                wrote = True
            for reason, message in step.events:
                await self.event(record, "Normal", reason, message)
            if step.annotation_handled:
                await self.kube.remove_annotation(
                    DOMAINS, record.namespace, record.name, rotation.ROTATE_ANNOTATION
                )
                self._rotate_handled[record.key] = record.resource_version
        except KubeError as exc:
            log.warning("%s: DKIM Secret %s: %s", record, secret, exc)
            self._failed(record.key, f"Secret {secret}: {exc}")
            self.rotation_due.pop(record.key, None)  # the retry after retry_delay covers it
            return wrote
        self._succeeded(record.key)
        self._rotation_done(record, step)
        return wrote

    @staticmethod
    def _needs_write(step: rotation.Step, data: Mapping[str, str]) -> bool:
        assert step.state is not None
        return (
            bool(step.remove)
            or any(w.data_key not in data for w in step.needed)
            or data.get(rotation.STATE_KEY) != step.state.dump()
        )

    def _rotation_done(self, record: ObjectRecord, step: rotation.Step) -> None:
        if step.condition is not None:
            self.rotation_conditions[record.key] = step.condition
        if step.due is not None:
            # a step due now has been taken: what is still due later waits for something else
            self.rotation_due[record.key] = max(step.due, self.clock() + rotation.LISTING_RECHECK)
        else:
            self.rotation_due.pop(record.key, None)

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
            await self.event(record, "Normal", "DKIMKeyCreated", message)
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
            await self.event(record, "Normal", "DKIMKeyAdded", message)
        return {**current, **new}


NEXT_NOTE = (
    "next key: not signing yet; publish this record, the key signs once it is found "
    "in DNS (or after propagationDelay)"
)


def _rotation_keys(
    keys: list[PublishedKey], state: rotation.RotationState, spec: MailDomainSpec
) -> list[PublishedKey]:
    """The keys in the order status lists them (signing, next, retiring, others), the ones
    that do not sign with a note saying why they are listed."""
    overlap = rotation.seconds((spec.dkim.rotation or DkimRotationSpec()).overlap)
    notes: dict[str, tuple[int, str]] = {}
    if state.next is not None:
        for selector in state.next.selectors():
            notes[selector] = (1, NEXT_NOTE)
    for old in state.retiring:
        until = (old.since + overlap).strftime("%Y-%m-%dT%H:%M:%SZ")
        for selector in old.selectors():
            notes[selector] = (2, f"retiring key: no longer signs; the operator removes it at "
                                  f"{until}, then delete this record")  # fmt: skip
    ordered = sorted(keys, key=lambda k: 0 if k.key.signing
                     else notes.get(k.key.selector, (3, ""))[0])  # fmt: skip
    return [
        k
        if k.key.signing or k.key.selector not in notes
        else PublishedKey(k.key, k.record, notes[k.key.selector][1])
        for k in ordered
    ]
