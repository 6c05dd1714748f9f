"""Status conditions in the metav1.Condition shape, with observedGeneration.

`set_condition` keeps lastTransitionTime when the status does not change, so rewriting the
same conditions is a no-op and a status patch only happens when something really moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class ConditionValue:
    """What a condition says, before it is stamped with times and generations."""

    status: Status
    reason: str
    message: str


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: Status,
    reason: str,
    message: str,
    generation: int | None,
    *,
    at: str | None = None,
) -> list[dict[str, Any]]:
    """A new list with `type_` set (others kept, in order; a new type goes last)."""
    previous = find(conditions, type_)
    changed = previous is None or previous.get("status") != status
    since = (at or now()) if previous is None or changed else previous["lastTransitionTime"]
    condition: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    result = [condition if c.get("type") == type_ else c for c in conditions]
    if previous is None:
        result.append(condition)
    return result


def find(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: list[dict[str, Any]], type_: str) -> bool:
    condition = find(conditions, type_)
    return condition is not None and condition.get("status") == "True"
