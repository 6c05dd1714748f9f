"""What rspamd's answer means for a message: every action under every policy, the score
thresholds, submissions, and rspamd unavailable."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from mailkube_core.settings import GatewaySettings
from mailkube_gateway.pipeline import Action
from mailkube_gateway.spam.headers import UNCHECKED
from mailkube_gateway.spam.policy import EffectivePolicy
from mailkube_gateway.spam.rspamd import RspamdAction, RspamdResult, Symbol
from mailkube_gateway.spam.verdict import (
    Unavailable,
    decide,
    effective_action,
    is_forced,
    reply_text,
)

SETTINGS = GatewaySettings()
POLICY = EffectivePolicy(
    policy="reject", reject_score=None, junk_score=None, rewrite_subject=False,
    when_unavailable="defer", greylisting=False,
)  # fmt: skip


def result(action: RspamdAction, score: float = 5.0, **changes: Any) -> RspamdResult:
    return replace(RspamdResult(action, score, 15.0), **changes)


def policy(name: str = "reject", **changes: Any) -> EffectivePolicy:
    return replace(POLICY, policy=name, **changes)


def inbound(scan: RspamdResult | Unavailable, **changes: Any) -> Any:
    return decide(SETTINGS, policy(**changes), scan, submission=False)


# (rspamd's action, policy) -> (our action, reply prefix, Subject rewritten when asked)
INBOUND = [
    ("reject", "reject", Action.REJECT, "554 5.7.1 ", False),
    ("reject", "quarantine", Action.QUARANTINE, None, True),
    ("reject", "tag", Action.ACCEPT, None, True),
    ("soft reject", "reject", Action.DEFER, "451 4.7.1 ", False),
    ("soft reject", "quarantine", Action.DEFER, "451 4.7.1 ", False),
    ("soft reject", "tag", Action.ACCEPT, None, True),
    ("add header", "reject", Action.QUARANTINE, None, True),
    ("add header", "quarantine", Action.QUARANTINE, None, True),
    ("add header", "tag", Action.ACCEPT, None, True),
    ("rewrite subject", "reject", Action.QUARANTINE, None, True),
    ("rewrite subject", "quarantine", Action.QUARANTINE, None, True),
    ("rewrite subject", "tag", Action.ACCEPT, None, True),
    ("no action", "reject", Action.ACCEPT, None, False),
    ("no action", "quarantine", Action.ACCEPT, None, False),
    ("no action", "tag", Action.ACCEPT, None, False),
    # rspamd's advice to greylist: the stage asks Mailkube's greylisting (below)
    ("greylist", "reject", Action.ACCEPT, None, False),
    ("greylist", "quarantine", Action.ACCEPT, None, False),
    ("greylist", "tag", Action.ACCEPT, None, False),
]


@pytest.mark.parametrize(("rspamd", "name", "action", "reply", "rewrites"), INBOUND)
@pytest.mark.parametrize("rewrite", [False, True])
def test_inbound_action_by_policy(
    rspamd: RspamdAction, name: str, action: Action, reply: str | None, rewrites: bool,
    rewrite: bool,
) -> None:  # fmt: skip
    decision = inbound(result(rspamd), name=name, rewrite_subject=rewrite)
    verdict = decision.verdict
    assert verdict.action is action
    if reply is None:
        assert verdict.reply is None
    else:
        assert verdict.reply is not None
        assert verdict.reply.startswith(reply)
    assert decision.rewrite_subject == (rewrites and rewrite)
    assert not decision.counts_against_user
    spam = rspamd not in ("no action", "greylist")
    assert ("X-Spam: Yes" in verdict.headers) == spam
    status = next(h for h in verdict.headers if h.startswith("X-Spam-Status:"))
    assert status.startswith("X-Spam-Status: Yes" if spam else "X-Spam-Status: No")
    assert any(h.startswith("X-Spamd-Result: ") for h in verdict.headers)
    assert decision.result == rspamd
    assert decision.greylist == (rspamd == "greylist" and name != "tag")


def test_the_reject_reply_carries_rspamds_message() -> None:
    verdict = inbound(result("reject", smtp_message="Gtube pattern")).verdict
    assert verdict.reply == "554 5.7.1 Gtube pattern"


def test_the_reject_reply_has_a_default() -> None:
    assert inbound(result("reject")).verdict.reply == "554 5.7.1 Message rejected as spam"


def test_the_soft_reject_reply() -> None:
    verdict = inbound(result("soft reject", smtp_message="Try again later")).verdict
    assert verdict.reply == "451 4.7.1 Try again later"
    assert inbound(result("soft reject")).verdict.reply == (
        "451 4.7.1 Message looks like spam, try again later"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "default"),
        ("", "default"),
        ("  \r\n ", "default"),
        ("Spam\r\n250 ok", "Spam 250 ok"),
        ("caf\u00e9 \x00 bad\ttab", "caf bad tab"),
        ("x" * 500, "x" * 200),
    ],
)
def test_rspamds_text_is_made_safe(text: str | None, expected: str) -> None:
    assert reply_text(text, "default") == expected


@pytest.mark.parametrize("name", ["reject", "quarantine", "tag"])
def test_unavailable_accept_is_unchecked(name: str) -> None:
    decision = inbound(Unavailable("refused"), name=name, when_unavailable="accept")
    assert decision.verdict.action is Action.ACCEPT
    assert decision.verdict.headers == (UNCHECKED,)
    assert decision.result == "unavailable"


@pytest.mark.parametrize("name", ["reject", "quarantine", "tag"])
def test_unavailable_defer(name: str) -> None:
    decision = inbound(Unavailable("timeout"), name=name, when_unavailable="defer")
    assert decision.verdict.action is Action.DEFER
    assert decision.verdict.reply == "451 4.3.0 Spam check unavailable, try again later"
    assert "timeout" in decision.verdict.reason


# --- thresholds -------------------------------------------------------------------------------

# (rspamd's action, score, reject_score, junk_score) -> the action decided on
THRESHOLDS = [
    # both set: the score alone decides
    ("no action", 20.0, 10.0, 5.0, "reject"),
    ("no action", 7.0, 10.0, 5.0, "add header"),
    ("reject", 7.0, 10.0, 5.0, "add header"),
    ("reject", 3.0, 10.0, 5.0, "no action"),
    ("add header", 3.0, 10.0, 5.0, "no action"),
    ("rewrite subject", 7.0, 10.0, 5.0, "rewrite subject"),
    ("greylist", 7.0, 10.0, 5.0, "add header"),
    ("reject", 10.0, 10.0, 5.0, "reject"),  # at the threshold
    ("no action", 5.0, 10.0, 5.0, "add header"),
    # reject_score only: rspamd's reject below it is still spam
    ("reject", 16.0, 20.0, None, "add header"),
    ("add header", 16.0, 12.0, None, "reject"),
    ("add header", 7.0, 12.0, None, "add header"),
    ("no action", 3.0, 12.0, None, "no action"),
    # junk_score only: rspamd's reject stays one
    ("reject", 16.0, None, 5.0, "reject"),
    ("add header", 7.0, None, 9.0, "no action"),
    ("no action", 9.5, None, 9.0, "add header"),
    # none: rspamd's action
    ("add header", 1.0, None, None, "add header"),
    ("greylist", 4.5, None, None, "greylist"),
    ("greylist", 4.5, 10.0, None, "no action"),  # score-based: the thresholds replace it
]


@pytest.mark.parametrize(("rspamd", "score", "reject", "junk", "expected"), THRESHOLDS)
def test_thresholds_replace_rspamds_score_based_action(
    rspamd: RspamdAction, score: float, reject: float | None, junk: float | None, expected: str
) -> None:
    assert effective_action(result(rspamd, score), reject, junk) == expected


@pytest.mark.parametrize(
    "forced",
    [
        result("reject", 0.0, is_skipped=True),  # GTUBE: a pre-filter's
        result("no action", 50.0, is_skipped=True),  # settings: skip the checks
        result("soft reject", 30.0),
        result("reject", 1.0, symbols=(Symbol("FORCE_ACTION_BLOCKLIST", 0.0),)),
    ],
)
def test_a_forced_action_is_kept_whatever_the_thresholds(forced: RspamdResult) -> None:
    assert is_forced(forced)
    assert effective_action(forced, 10.0, 5.0) == forced.action


def test_thresholds_decide_the_verdict_and_the_required_score() -> None:
    decision = inbound(result("no action", 12.0), reject_score=10.0, junk_score=5.0)
    assert decision.verdict.action is Action.REJECT
    assert "X-Spam-Status: Yes, score=12.00 required=10.00" in decision.verdict.headers
    decision = inbound(result("reject", 7.0), reject_score=10.0, junk_score=5.0)
    assert decision.verdict.action is Action.QUARANTINE
    decision = inbound(result("reject", 7.0), name="tag", reject_score=10.0, junk_score=5.0)
    assert decision.verdict.action is Action.ACCEPT
    assert "X-Spam: Yes" in decision.verdict.headers


def test_rspamds_required_score_without_a_reject_threshold() -> None:
    headers = inbound(result("no action", 1.0)).verdict.headers
    assert "X-Spam-Status: No, score=1.00 required=15.00" in headers


# --- submission -------------------------------------------------------------------------------


def submit(scan: RspamdResult | Unavailable, **settings: Any) -> Any:
    return decide(GatewaySettings(**settings), None, scan, submission=True)


def test_a_submitted_reject_is_refused_and_counted() -> None:
    decision = submit(result("reject", smtp_message="Gtube pattern"))
    assert decision.verdict.action is Action.REJECT
    assert decision.verdict.reply == "550 5.7.1 Gtube pattern"
    assert decision.counts_against_user


def test_a_submitted_soft_reject_is_deferred_not_counted() -> None:
    decision = submit(result("soft reject"))
    assert decision.verdict.action is Action.DEFER
    assert decision.verdict.reply is not None
    assert decision.verdict.reply.startswith("451 4.7.1 ")
    assert not decision.counts_against_user


@pytest.mark.parametrize("rspamd", ["add header", "rewrite subject"])
@pytest.mark.parametrize("name", ["reject", "tag"])
def test_submitted_spam_is_tagged(rspamd: RspamdAction, name: str) -> None:
    decision = submit(result(rspamd), submission_spam_policy=name)
    assert decision.verdict.action is Action.ACCEPT
    assert "X-Spam: Yes" in decision.verdict.headers
    assert not decision.rewrite_subject  # domains' Subject setting is for inbound mail
    assert not decision.counts_against_user


@pytest.mark.parametrize("rspamd", ["reject", "soft reject"])
def test_under_tag_a_submitted_reject_is_only_tagged(rspamd: RspamdAction) -> None:
    decision = submit(result(rspamd), submission_spam_policy="tag")
    assert decision.verdict.action is Action.ACCEPT
    assert "X-Spam: Yes" in decision.verdict.headers
    assert not decision.counts_against_user


@pytest.mark.parametrize("rspamd", ["no action", "greylist"])
def test_clean_submissions_get_nothing_added(rspamd: RspamdAction) -> None:
    decision = submit(result(rspamd))
    assert decision.verdict.action is Action.ACCEPT
    assert decision.verdict.headers == ()


def test_submissions_ignore_score_thresholds() -> None:
    settings = {"spam_reject_score": 1.0, "spam_junk_score": 0.5}
    decision = submit(result("no action", 9.0), **settings)
    assert decision.verdict.action is Action.ACCEPT
    assert decision.verdict.headers == ()


def test_submission_unavailable_follows_the_gateway_setting() -> None:
    deferred = submit(Unavailable("reset"), spam_unavailable="defer")
    assert deferred.verdict.action is Action.DEFER
    assert deferred.verdict.reply == "451 4.3.0 Spam check unavailable, try again later"
    accepted = submit(Unavailable("reset"), spam_unavailable="accept")
    assert accepted.verdict.action is Action.ACCEPT
    assert accepted.verdict.headers == ()
    assert accepted.result == "unavailable"
