"""What rspamd's answer means for one message: data in, pipeline verdict out (docs/spam.md,
"Policy per domain" and "Submission").

Inbound mail (unauthenticated, MX) follows the recipient domains' effective policy:

  rspamd's action (after the      reject policy     quarantine policy   tag policy
  score thresholds)
  reject                          554 5.7.1         Junk, tagged        tagged
  soft reject                     451 4.7.1         451 4.7.1           tagged
  add header, rewrite subject     Junk, tagged      Junk, tagged        tagged
  greylist                        greylisted (451 4.7.1)     greylisted    X-Spam-Status: No
  no action                       X-Spam-Status: No
  unavailable                     when_unavailable: accept (X-Spam-Status: unchecked) or
                                  451 4.3.0

rspamd's "greylist" is its advice to greylist a message that looks doubtful (by default a
score from 4 to 6), which its own greylist module would carry out. Mailkube greylists instead
(spam/greylist.py, whatever the domain's `greylisting`): the message is deferred unless its
triplets passed before, so the retry, which rspamd advises the same way, goes through.
Deferring on the advice alone would defer the message on every retry, forever.

Submitted mail (authenticated) follows `submission_spam_policy`: under reject, rspamd's
reject is refused (550 5.7.1) and counted against the user, a soft reject deferred; spam is
tagged; nothing else is added to a user's outgoing mail.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailkube_core.settings import GatewaySettings

from .. import replies
from ..pipeline import Action, Verdict
from .headers import UNCHECKED, tag_headers
from .policy import EffectivePolicy
from .rspamd import RspamdResult

#: what rspamd's reply text may be in ours
MAX_REPLY_TEXT = 200
SPAM_ACTIONS = frozenset({"reject", "soft reject", "add header", "rewrite subject"})


@dataclass(frozen=True)
class Unavailable:
    """No verdict from rspamd (down, slow, or garbage)."""

    reason: str


Scan = RspamdResult | Unavailable


@dataclass(frozen=True)
class SpamDecision:
    verdict: Verdict
    #: for the metric: the action decided on (after the thresholds), or "unavailable"
    result: str
    #: prefix or replace the Subject (rspamd's subject when it sent one)
    rewrite_subject: bool = False
    #: a submission refused as spam: it counts towards the user's suspension
    counts_against_user: bool = False
    #: rspamd advises greylisting: the stage asks Mailkube's greylisting about the message
    greylist: bool = False


def is_forced(result: RspamdResult) -> bool:
    """An action rspamd did not take by the score: a pre-filter's (GTUBE, settings:
    is_skipped), the force_actions module's (FORCE_ACTION_<rule> symbols), or a soft reject
    (rspamd has no score for it by default: it comes from a module)."""
    return (
        result.is_skipped
        or result.action == "soft reject"
        or any(symbol.name.startswith("FORCE_ACTION_") for symbol in result.symbols)
    )


def effective_action(
    result: RspamdResult, reject_score: float | None, junk_score: float | None
) -> str:
    """rspamd's action, with the score thresholds in place of rspamd's own where they are
    set: score >= reject_score is a reject, score >= junk_score spam ("add header"), and
    under junk_score not spam. With only reject_score, rspamd's reject below it is spam; with
    only junk_score, rspamd's reject stays one. A forced action is kept as it is."""
    action = result.action
    if is_forced(result):
        return action
    if action == "greylist" and (reject_score is not None or junk_score is not None):
        action = "no action"  # a score-based advice: the thresholds replace it
    if reject_score is not None:
        if result.score >= reject_score:
            return "reject"
        if action == "reject":
            action = "add header"
    elif action == "reject":
        return "reject"
    if junk_score is not None:
        if result.score < junk_score:
            return "no action"
        return action if action in ("add header", "rewrite subject") else "add header"
    return action


def reply_text(suggested: str | None, default: str) -> str:
    """rspamd's suggested text as it may go into our reply: printable ASCII on one line,
    at most MAX_REPLY_TEXT characters; `default` when there is none."""
    if not suggested:
        return default
    text = " ".join("".join(c if " " <= c <= "~" else " " for c in suggested).split())
    return text[:MAX_REPLY_TEXT].rstrip() or default


def decide(
    settings: GatewaySettings,
    policy: EffectivePolicy | None,
    scan: Scan,
    *,
    submission: bool,
) -> SpamDecision:
    """`policy`: the recipient domains' (inbound mail); None for a submission."""
    if submission or policy is None:
        return _submission(settings, scan)
    return _inbound(policy, scan)


def _inbound(policy: EffectivePolicy, scan: Scan) -> SpamDecision:
    if isinstance(scan, Unavailable):
        if policy.when_unavailable == "defer":
            verdict = Verdict(Action.DEFER, reply=replies.SPAM_CHECK_UNAVAILABLE,
                              reason=f"rspamd unavailable: {scan.reason}")  # fmt: skip
        else:
            verdict = Verdict(headers=(UNCHECKED,), reason="rspamd unavailable")
        return SpamDecision(verdict, "unavailable")
    action = effective_action(scan, policy.reject_score, policy.junk_score)
    required = scan.required_score if policy.reject_score is None else policy.reject_score
    spam = action in SPAM_ACTIONS
    headers = tag_headers(scan, action=action, spam=spam, required=required)
    reason = f"rspamd {action} (score {scan.score:.2f})"
    strict = policy.policy in ("quarantine", "reject")
    if not spam:
        advised = action == "greylist" and strict
        return SpamDecision(Verdict(headers=headers), action, greylist=advised)
    if action == "reject" and policy.policy == "reject":
        text = reply_text(scan.smtp_message, replies.SPAM_REJECTED_TEXT)
        verdict = Verdict(Action.REJECT, headers, replies.SPAM_REJECTED.format(text=text), reason)
        return SpamDecision(verdict, action)
    if action == "soft reject" and strict:
        text = reply_text(scan.smtp_message, replies.SPAM_DEFERRED_TEXT)
        verdict = Verdict(Action.DEFER, headers, replies.SPAM_DEFERRED.format(text=text), reason)
        return SpamDecision(verdict, action)
    verdict = Verdict(Action.QUARANTINE if strict else Action.ACCEPT, headers, reason=reason)
    return SpamDecision(verdict, action, rewrite_subject=policy.rewrite_subject)


def _submission(settings: GatewaySettings, scan: Scan) -> SpamDecision:
    if isinstance(scan, Unavailable):
        if settings.spam_unavailable == "defer":
            verdict = Verdict(Action.DEFER, reply=replies.SPAM_CHECK_UNAVAILABLE,
                              reason=f"rspamd unavailable: {scan.reason}")  # fmt: skip
        else:
            verdict = Verdict(reason="rspamd unavailable")
        return SpamDecision(verdict, "unavailable")
    action = effective_action(scan, None, None)
    if action not in SPAM_ACTIONS:
        return SpamDecision(Verdict(), action)
    headers = tag_headers(scan, action=action, spam=True, required=scan.required_score)
    reason = f"rspamd {action} (score {scan.score:.2f})"
    if settings.submission_spam_policy == "reject":
        if action == "reject":
            text = reply_text(scan.smtp_message, replies.SPAM_REJECTED_TEXT)
            reply = replies.SUBMISSION_SPAM_REJECTED.format(text=text)
            verdict = Verdict(Action.REJECT, headers, reply, reason)
            return SpamDecision(verdict, action, counts_against_user=True)
        if action == "soft reject":
            text = reply_text(scan.smtp_message, replies.SPAM_DEFERRED_TEXT)
            reply = replies.SPAM_DEFERRED.format(text=text)
            return SpamDecision(Verdict(Action.DEFER, headers, reply, reason), action)
    return SpamDecision(Verdict(headers=headers, reason=reason), action)
