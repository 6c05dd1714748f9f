"""A MailDomain's spam policy: spec.spam over the gateway's defaults (status.spam)."""

from __future__ import annotations

from mailkube_core.settings import OperatorSettings
from mailkube_operator.models import SpamSpec, SpamStatus
from mailkube_operator.spam import effective, routing_policy

DEFAULTS = OperatorSettings(hostname="op.example.test")


def test_unset_fields_are_the_gateway_defaults() -> None:
    assert effective(SpamSpec(), DEFAULTS) == SpamStatus(
        policy="reject", reject_score=None, junk_score=None, rewrite_subject=False,
        when_unavailable="defer", greylisting=False,
    )  # fmt: skip
    assert effective(SpamSpec(), DEFAULTS).dump() == {
        "policy": "reject", "rewriteSubject": False, "whenUnavailable": "defer",
        "greylisting": False,
    }  # fmt: skip


def test_own_fields_win_and_the_rest_follow_other_defaults() -> None:
    defaults = OperatorSettings(
        hostname="op.example.test", spam_policy="tag", spam_reject_score=15, spam_junk_score=5,
        spam_unavailable="accept", greylisting=True,
    )  # fmt: skip
    spec = SpamSpec.model_validate({"policy": "quarantine", "junkScore": 7, "greylisting": False})
    assert effective(spec, defaults).dump() == {
        "policy": "quarantine", "rejectScore": 15.0, "junkScore": 7.0, "rewriteSubject": False,
        "whenUnavailable": "accept", "greylisting": False,
    }  # fmt: skip


def test_routing_policy_keeps_unset_fields_unset() -> None:
    spec = SpamSpec.model_validate({"rewriteSubject": True, "whenUnavailable": "accept"})
    policy = routing_policy(spec)
    assert policy.rewrite_subject is True
    assert policy.when_unavailable == "accept"
    assert policy.policy is None
    assert policy.reject_score is None
    assert policy.greylisting is None
