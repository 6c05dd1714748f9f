"""Submission suspensions (mailkube_core.suspensions) as each MailUser's `SubmissionSuspended`
condition, and lifting them with an annotation.

The gateway records suspensions in one Redis hash. `check_loop` reads all of it with one
HGETALL every `suspension_check_interval` (a timer per MailUser would be thousands of Redis
calls at hosting scale) and asks for a reconcile only when the set changed; the reconcile then
patches the MailUsers whose condition moved, and no others. While Redis does not answer, the
last set read stays in force and the loop tries again after `retry_delay`.

The condition: True, reason SpamRejections (suspensions.REASON), while the user is suspended;
False, reason Lifted, once a suspension ended (by the annotation, or by `mailkube spam
unsuspend`), until the next one; False, reason NotSuspended, for everyone else. Before the
hash was first read, the condition is left as it is.

Lifting: the annotation `mailkube.io/lift-submission-suspension` (any value) on a MailUser
makes the reconciler lift the suspension in Redis and remove the annotation
(Reconciler._lift_suspensions).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mailkube_core import suspensions
from mailkube_core.addresses import normalize_address
from mailkube_core.redis_client import RedisClient
from mailkube_core.settings import OperatorSettings
from mailkube_core.suspensions import Suspension

from .conditions import ConditionValue, find

log = logging.getLogger(__name__)

SUBMISSION_SUSPENDED = "SubmissionSuspended"
LIFT_ANNOTATION = "mailkube.io/lift-submission-suspension"
SUSPENDED = suspensions.REASON
LIFTED = "Lifted"
NOT_SUSPENDED = "NotSuspended"
LIFTED_BY_ANNOTATION = f"lifted by the annotation {LIFT_ANNOTATION}"
LIFTED_ELSEWHERE = "lifted: no longer suspended in Redis (e.g. `mailkube spam unsuspend`)"

Key = tuple[str, str]


def _normal(address: str) -> str:
    try:
        return normalize_address(address)
    except ValueError:  # written by hand: compare as it is
        return address.strip().lower()


@dataclass
class SuspensionState:
    """What the operator knows of the gateway's suspensions."""

    #: normalised address -> its suspension; None until the hash has been read once
    known: dict[str, Suspension] | None = None
    #: normalised address -> the fields of the hash that name it (lifted together)
    fields: dict[str, set[str]] = field(default_factory=dict)
    #: bumped by every lift: a read that started before it is out of date
    epoch: int = 0
    #: MailUser -> the message of a lift its status does not show yet
    lifted: dict[Key, str] = field(default_factory=dict)

    def update(self, found: Iterable[Suspension], epoch: int) -> bool:
        """Take a read of the hash that started at `epoch`; whether the set changed."""
        if epoch != self.epoch:
            return False  # a lift came in between: the next read will tell
        known: dict[str, Suspension] = {}
        fields: dict[str, set[str]] = {}
        for suspension in found:
            address = _normal(suspension.address)
            known.setdefault(address, suspension)
            fields.setdefault(address, set()).add(suspension.address)
        changed = known != self.known
        self.known, self.fields = known, fields
        return changed

    async def lift(self, redis: RedisClient, prefix: str, address: str) -> bool:
        """End the suspension of `address` (normalised) in Redis; whether there was one."""
        self.epoch += 1
        lifted = False
        for name in sorted(self.fields.get(address, set()) | {address}):
            lifted = await suspensions.lift(redis, prefix, name) or lifted
        if self.known is not None:
            self.known.pop(address, None)
        self.fields.pop(address, None)
        return lifted

    def condition(
        self, key: Key, address: str | None, conditions: list[dict[str, Any]]
    ) -> ConditionValue | None:
        """SubmissionSuspended of the MailUser `key`, given its current conditions; None to
        leave it as it is (the hash has not been read yet)."""
        if self.known is None:
            return None
        suspension = self.known.get(address) if address is not None else None
        if suspension is not None:
            return ConditionValue("True", SUSPENDED, suspension.message)
        if key in self.lifted:
            return ConditionValue("False", LIFTED, self.lifted[key])
        previous = find(conditions, SUBMISSION_SUSPENDED) or {}
        if previous.get("status") == "True":
            return ConditionValue("False", LIFTED, LIFTED_ELSEWHERE)
        if previous.get("reason") == LIFTED:
            return ConditionValue("False", LIFTED, str(previous.get("message") or LIFTED_ELSEWHERE))
        return ConditionValue("False", NOT_SUSPENDED, "not suspended for submission")


def lift_requested(annotations: Mapping[str, str]) -> bool:
    return LIFT_ANNOTATION in annotations


async def check_loop(
    state: SuspensionState,
    redis: RedisClient,
    settings: OperatorSettings,
    changed: Callable[[], Awaitable[None]],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Read the suspensions every suspension_check_interval and call `changed` when the set
    moved (runs until cancelled)."""
    interval = settings.suspension_check_interval.total_seconds()
    retry = settings.retry_delay.total_seconds()
    failing = False
    while True:
        epoch = state.epoch
        try:
            found = await suspensions.list_suspensions(redis, settings.key_prefix)
        except Exception as exc:  # Redis away, or a bug: say so, try again later
            if not failing:
                log.warning("reading the submission suspensions failed: %r", exc)
            failing = True
            await sleep(retry)
            continue
        if failing:
            log.info("the submission suspensions can be read again")
            failing = False
        if state.update(found, epoch):
            log.info("submission suspensions changed", extra={"suspended": len(found)})
            try:
                await changed()
            except Exception:  # a bug: say so, keep checking
                log.exception("the reconcile after a suspension change failed")
        await sleep(interval)
