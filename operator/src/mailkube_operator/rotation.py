"""Staged DKIM key rotation, as a pure function of the rotation state, the spec and the time.

A MailDomain with spec.dkim.rotation (or annotated mailkube.io/rotate-dkim) has a rotation
state, kept next to the keys in its DKIM Secret (data key `rotation-state.json`), so that the
keys and the state change in one write. The state names key *generations*: a selector and an
algorithm (with algorithm both, two keys: <selector> and <selector>-ed25519).

- `active` signs.
- `next` is listed in status.dnsRecords and does not sign until its records are published:
  the DNS check found them (when it is on), or `propagationDelay` has passed since it was
  listed (when it is off). Then it becomes active, and the active one starts retiring.
- `retiring` generations stay listed (not signing) for `overlap`, then their keys are removed
  from the Secret: a verifier of mail signed before the switch still finds the key
  (RFC 6376 §3.6.1: the record must outlive the mail signed with it).

A rotation starts when the active generation has signed for `every`, on the annotation, or
when spec.dkim's selector or algorithm differs from the active generation's: the new
generation takes the spec's selector when that is unused, else `<selector>-<n>`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, ValidationError

from mailkube_core.settings import parse_duration

from .conditions import ConditionValue
from .dkim import WantedKey, parse_data_key, wanted_keys
from .models import DkimRotationSpec, DkimSpec

#: the Secret data key holding the state (not a key: parse_data_key ignores it)
STATE_KEY = "rotation-state.json"
#: annotation on a MailDomain asking for a rotation now (any value; removed when handled)
ROTATE_ANNOTATION = "mailkube.io/rotate-dkim"
#: the condition reporting the rotation
CONDITION = "DKIMRotation"
#: how soon to look again whether a next key's records are listed in status
LISTING_RECHECK = timedelta(seconds=1)
#: longest selector whose Ed25519 twin (<selector>-ed25519) is still one DNS label
_MAX_SELECTOR = 63 - len("-ed25519")


class Generation(BaseModel):
    """One key generation: its selector, the spec selector it was made for, its algorithm,
    and since when it is in its current role (made, signing, or retiring)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    selector: str
    base: str
    algorithm: str
    since: datetime

    def dkim_keys(self) -> list[WantedKey]:
        return wanted_keys(self.selector, self.algorithm)

    def selectors(self) -> list[str]:
        return [k.selector for k in self.dkim_keys()]


class RotationState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    active: Generation
    next: Generation | None = None
    retiring: list[Generation] = []

    def dump(self) -> str:
        return self.model_dump_json()


def load_state(data: dict[str, str]) -> RotationState | None:
    """The state kept in a DKIM Secret's (decoded) data; None when absent or unreadable."""
    text = data.get(STATE_KEY)
    if not text:
        return None
    try:
        return RotationState.model_validate(json.loads(text))
    except (ValueError, ValidationError):
        return None


def seconds(duration: str) -> timedelta:
    value = parse_duration(duration)
    assert isinstance(value, timedelta)
    return value


@dataclass(frozen=True)
class Wait:
    """What the next generation waits for before it signs, and when to look again (None: a
    change will say, e.g. the DNS check's)."""

    message: str
    until: datetime | None = None


@dataclass
class Step:
    """What a reconcile does about one domain's rotation."""

    state: RotationState | None
    #: keys the Secret must hold (made when missing)
    needed: list[WantedKey] = field(default_factory=list)
    #: data keys to remove from the Secret
    remove: list[str] = field(default_factory=list)
    #: Events to post: (reason, message)
    events: list[tuple[str, str]] = field(default_factory=list)
    #: the DKIMRotation condition (None: no rotation configured or running)
    condition: ConditionValue | None = None
    #: when to look again (a timed step is due), or None
    due: datetime | None = None
    #: whether the annotation asking for a rotation is handled
    annotation_handled: bool = False


def _fmt(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_selector(base: str, taken: Collection[str]) -> str:
    """The spec's selector if no key uses it (nor its Ed25519 twin), else <selector>-<n>."""

    def free(candidate: str) -> bool:
        return candidate not in taken and f"{candidate}-ed25519" not in taken

    if free(base):
        return base
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = base[: _MAX_SELECTOR - len(suffix)].rstrip("-") + suffix
        if free(candidate):
            return candidate
        n += 1


def advance(
    state: RotationState | None,
    spec: DkimSpec,
    *,
    data_keys: Collection[str],
    now: datetime,
    requested: bool,
    published: Callable[[Generation], Wait | None],
) -> Step:
    """One step of the rotation. `published(next)` says whether the next generation's records
    are published: None when they are, else what is awaited (for the condition's message).
    Without state, rotation configured and no request, the caller's legacy rules apply (a
    Step with state None)."""
    rotation = spec.rotation
    if state is None and rotation is None and not requested:
        return Step(state=None)
    rotation = rotation or DkimRotationSpec()
    events: list[tuple[str, str]] = []
    remove: list[str] = []
    if state is None:
        first = Generation(selector=spec.selector, base=spec.selector, algorithm=spec.algorithm,
                           since=now)  # fmt: skip
        state = RotationState(active=first)
    overlap = seconds(rotation.overlap)

    # retiring generations whose overlap is over go
    kept: list[Generation] = []
    for old in state.retiring:
        if now >= old.since + overlap:
            gone = [k.data_key for k in old.dkim_keys() if k.data_key in data_keys]
            remove += gone
            events.append(("DKIMKeyRetired", (
                f"removed DKIM key {', '.join(old.selectors())} after the overlap of "
                f"{rotation.overlap}; its TXT record can be deleted from DNS")))  # fmt: skip
        else:
            kept.append(old)
    state = state.model_copy(update={"retiring": kept})

    # a published next generation signs; the active one retires
    awaiting: Wait | None = None
    if state.next is not None:
        awaiting = published(state.next)
        if awaiting is None:
            old = state.active.model_copy(update={"since": now})
            new = state.next.model_copy(update={"since": now})
            state = RotationState(active=new, next=None, retiring=[*state.retiring, old])
            events.append(("DKIMKeySwitched", (
                f"signing with {', '.join(new.selectors())}; {', '.join(old.selectors())} stays "
                f"published until {_fmt(now + overlap)}")))  # fmt: skip

    # a rotation starts: the spec asks for another key, the schedule, or the annotation
    target = (spec.selector, spec.algorithm)
    current = state.next or state.active
    why: str | None = None
    if (current.base, current.algorithm) != target:
        why = f"spec.dkim is now selector {spec.selector}, algorithm {spec.algorithm}"
        if state.next is not None:  # never signed: dropped
            remove += [k.data_key for k in state.next.dkim_keys() if k.data_key in data_keys]
            state = state.model_copy(update={"next": None})
    elif state.next is None and requested:
        why = f"requested by the annotation {ROTATE_ANNOTATION}"
    elif (
        state.next is None
        and rotation.every is not None
        and now >= state.active.since + seconds(rotation.every)
    ):
        why = f"the key has signed for {rotation.every}"
    elif requested:
        events.append(("DKIMRotationInProgress", (
            f"not rotating again: {', '.join(state.next.selectors())} "  # type: ignore[union-attr]
            "is already waiting to be published")))  # fmt: skip
    if why is not None:
        removed = set(remove)
        taken = {w.selector for k in data_keys if k not in removed
                 and (w := parse_data_key(k)) is not None}  # fmt: skip
        taken |= {s for g in (state.active, *state.retiring) for s in g.selectors()}
        selector = _new_selector(spec.selector, taken)
        nxt = Generation(selector=selector, base=spec.selector, algorithm=spec.algorithm,
                         since=now)  # fmt: skip
        state = state.model_copy(update={"next": nxt})
        awaiting = published(nxt)
        events.append(("DKIMRotationStarted", (
            f"made DKIM key {', '.join(nxt.selectors())} ({why}); publish its record "
            f"(status.dnsRecords): it signs once {_once(awaiting)}")))  # fmt: skip

    needed = state.active.dkim_keys() + (state.next.dkim_keys() if state.next is not None else [])
    return Step(
        state=state,
        needed=needed,
        remove=remove,
        events=events,
        condition=_condition(state, rotation, awaiting, overlap),
        due=_due(state, rotation, overlap, awaiting),
        annotation_handled=requested,
    )


def _condition(
    state: RotationState, rotation: DkimRotationSpec, awaiting: Wait | None, overlap: timedelta
) -> ConditionValue:
    active = ", ".join(state.active.selectors())
    if state.next is not None:
        return ConditionValue("True", "WaitingForPublication", (
            f"signing with {active}; the next key {', '.join(state.next.selectors())} is listed "
            f"in status.dnsRecords and signs once {_once(awaiting)}"))  # fmt: skip
    if state.retiring:
        old = ", ".join(s for g in state.retiring for s in g.selectors())
        until = max(g.since for g in state.retiring) + overlap
        return ConditionValue("True", "Overlap", (
            f"signing with {active} since {_fmt(state.active.since)}; {old} stays published "
            f"until {_fmt(until)}"))  # fmt: skip
    if rotation.every is not None:
        return ConditionValue("False", "Scheduled", (
            f"signing with {active} since {_fmt(state.active.since)}; next rotation at "
            f"{_fmt(state.active.since + seconds(rotation.every))}"))  # fmt: skip
    return ConditionValue("False", "Idle", (
        f"signing with {active} since {_fmt(state.active.since)}; rotates on the annotation "
        f"{ROTATE_ANNOTATION} or a change of spec.dkim"))  # fmt: skip


def _once(awaiting: Wait | None) -> str:
    return awaiting.message if awaiting is not None else "published"


def _due(
    state: RotationState, rotation: DkimRotationSpec, overlap: timedelta, awaiting: Wait | None
) -> datetime | None:
    """When a timed step comes: a retiring key's end, the next key's wait, the schedule."""
    times = [g.since + overlap for g in state.retiring]
    if state.next is not None:
        if awaiting is not None and awaiting.until is not None:
            times.append(awaiting.until)
    elif rotation.every is not None:
        times.append(state.active.since + seconds(rotation.every))
    return min(times) if times else None


def propagation_wait(
    next_gen: Generation,
    *,
    now: datetime,
    rotation: DkimRotationSpec | None,
    listed: bool,
    dns_check: bool,
    dns_missing: Callable[[list[str]], list[str]],
) -> Wait | None:
    """None when the next generation's records may be taken as published, else what is
    awaited. `dns_missing(selectors)` names those the DNS check has not found (yet)."""
    if not listed:  # the status listing it is written by this very reconcile
        return Wait("its records are listed in status", now + LISTING_RECHECK)
    if dns_check:  # the DNS check asks for a reconcile when what it found changes
        missing = dns_missing(next_gen.selectors())
        if missing:
            return Wait(f"the DNS check finds {', '.join(missing)}")
        return None
    delay = seconds((rotation or DkimRotationSpec()).propagation_delay)
    if now < next_gen.since + delay:
        at = next_gen.since + delay
        return Wait(f"{_fmt(at)} (propagationDelay, the DNS check being off)", at)
    return None
