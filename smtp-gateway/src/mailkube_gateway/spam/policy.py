"""The spam policy in effect for one message: each recipient domain's own `spam` settings
(routing table), else the gateway's; when the recipient domains of one message differ, the
strictest value wins (one DATA reply answers for every recipient), as for DMARC."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mailkube_core.routing import Domain, SpamPolicy
from mailkube_core.settings import GatewaySettings

PolicyName = Literal["off", "tag", "quarantine", "reject"]
#: from the most lenient to the strictest
_STRICTNESS: tuple[PolicyName, ...] = ("off", "tag", "quarantine", "reject")


@dataclass(frozen=True)
class EffectivePolicy:
    policy: PolicyName
    #: score thresholds that replace rspamd's actions; None: rspamd's action decides
    reject_score: float | None
    junk_score: float | None
    rewrite_subject: bool
    when_unavailable: Literal["accept", "defer"]
    greylisting: bool


def effective_spam_policy(
    settings: GatewaySettings, domains: Sequence[Domain | None]
) -> EffectivePolicy:
    """`domains`: the recipients' domains (None for a recipient that is not ours: relayed
    mail, which only authenticated users send, has no domain policy)."""
    own = [domain.spam for domain in domains if domain is not None] or [SpamPolicy()]

    def values(name: str, default: Any) -> list[Any]:
        """Each domain's value of `name`, or the gateway's `default` where it has none."""
        found = [getattr(policy, name) for policy in own]
        return [default if value is None else value for value in found]

    policies = values("policy", settings.spam_policy)
    unavailable = values("when_unavailable", settings.spam_unavailable)
    return EffectivePolicy(
        policy=max(policies, key=_STRICTNESS.index),
        reject_score=_lowest(values("reject_score", settings.spam_reject_score)),
        junk_score=_lowest(values("junk_score", settings.spam_junk_score)),
        rewrite_subject=any(values("rewrite_subject", settings.spam_rewrite_subject)),
        when_unavailable="defer" if "defer" in unavailable else "accept",
        greylisting=any(values("greylisting", settings.greylisting)),
    )


def _lowest(values: list[float | None]) -> float | None:
    """The strictest threshold: the lowest one set (a threshold left to rspamd's action is
    not stricter than one set)."""
    numbers = [value for value in values if value is not None]
    return min(numbers) if numbers else None
