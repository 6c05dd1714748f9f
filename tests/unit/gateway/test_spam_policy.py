"""The spam policy of one message: domain settings over the gateway's, strictest wins."""

from __future__ import annotations

from mailkube_core.routing import Domain, SpamPolicy
from mailkube_core.settings import GatewaySettings
from mailkube_gateway.spam.policy import effective_spam_policy

SETTINGS = GatewaySettings(spam_policy="quarantine", spam_junk_score=8.0, spam_unavailable="accept")


def test_no_domain_gets_the_gateway_defaults() -> None:
    policy = effective_spam_policy(SETTINGS, [None])
    assert policy.policy == "quarantine"
    assert policy.junk_score == 8.0
    assert policy.reject_score is None
    assert policy.when_unavailable == "accept"
    assert not policy.greylisting
    assert not policy.rewrite_subject


def test_a_domain_setting_overrides_the_default() -> None:
    domain = Domain(name="a.test", spam=SpamPolicy(policy="tag", junk_score=12, greylisting=True))
    policy = effective_spam_policy(SETTINGS, [domain])
    assert policy.policy == "tag"
    assert policy.junk_score == 12
    assert policy.greylisting


def test_the_strictest_of_several_domains_wins() -> None:
    lax = Domain(
        name="a.test", spam=SpamPolicy(policy="off", junk_score=20, when_unavailable="accept")
    )
    strict = Domain(
        name="b.test",
        spam=SpamPolicy(
            policy="reject", reject_score=10, when_unavailable="defer", rewrite_subject=True
        ),
    )
    policy = effective_spam_policy(SETTINGS, [lax, strict])
    assert policy.policy == "reject"
    assert policy.reject_score == 10
    assert policy.junk_score == 8.0  # b.test has none of its own: the gateway's 8 < 20
    assert policy.when_unavailable == "defer"
    assert policy.rewrite_subject
