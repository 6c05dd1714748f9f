"""A MailDomain's spam policy: `spec.spam` as the routing table's SpamPolicy (unset fields stay
None, so the gateway applies its own default), and the policy in effect that `status.spam`
shows (unset fields taken from the gateway's defaults, which the operator reads from the same
settings: DomainSpamDefaults)."""

from __future__ import annotations

from typing import TypeVar

from mailkube_core.routing import SpamPolicy
from mailkube_core.settings import DomainSpamDefaults

from .models import SpamSpec, SpamStatus

T = TypeVar("T")


def routing_policy(spec: SpamSpec) -> SpamPolicy:
    return SpamPolicy(
        policy=spec.policy,
        reject_score=spec.reject_score,
        junk_score=spec.junk_score,
        rewrite_subject=spec.rewrite_subject,
        when_unavailable=spec.when_unavailable,
        greylisting=spec.greylisting,
    )


def _pick(own: T | None, default: T) -> T:
    return default if own is None else own


def effective(spec: SpamSpec, defaults: DomainSpamDefaults) -> SpamStatus:
    return SpamStatus(
        policy=_pick(spec.policy, defaults.spam_policy),
        reject_score=_pick(spec.reject_score, defaults.spam_reject_score),
        junk_score=_pick(spec.junk_score, defaults.spam_junk_score),
        rewrite_subject=_pick(spec.rewrite_subject, defaults.spam_rewrite_subject),
        when_unavailable=_pick(spec.when_unavailable, defaults.spam_unavailable),
        greylisting=_pick(spec.greylisting, defaults.greylisting),
    )
