"""The filter pipeline: an ordered list of async stages that look at a received message before
it is queued. Each stage accepts (maybe adding headers), quarantines, defers or rejects; the
first stage that does not accept decides, and is named in logs and metrics.

The stages, in order (app.py builds the list): email authentication (mailauth/: SPF, DKIM,
ARC, DMARC), greylisting and content scanning with rspamd (spam/), then DKIM signing of
submitted mail. Connection-level checks (DNS lists, early talkers, reverse DNS: screening/)
run before any content is read; what they learnt reaches the stages as `Message.client`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import metrics

from mailkube_core.telemetry import Tally

log = logging.getLogger(__name__)
_verdicts = Tally(
    metrics.get_meter("mailkube.gateway"), "mailkube.gateway.filter_verdicts",
    unit="{message}", description="Filter pipeline decisions, by stage and action",
)  # fmt: skip


STAGE_FAILED = "451 4.3.0 Message could not be checked now, try again later"


class Action(enum.Enum):
    ACCEPT = "accept"
    QUARANTINE = "quarantine"
    DEFER = "defer"
    REJECT = "reject"


@dataclass(frozen=True)
class Verdict:
    action: Action = Action.ACCEPT
    #: header fields to add, each a complete "Name: value" without CRLF
    headers: tuple[str, ...] = ()
    #: the SMTP reply for DEFER/REJECT (e.g. "550 5.7.1 ..."); a default otherwise
    reply: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class ClientFacts:
    """What the connection-level checks (screening/) learnt about the client."""

    #: the client's reverse name (PTR), if it has one, and whether it resolves back to the
    #: client's address (forward-confirmed reverse DNS)
    reverse_name: str | None = None
    reverse_verified: bool = False
    #: that lookup's RFC 8601 iprev result (pass, fail, temperror, permerror); None when it
    #: was not made (client_rdns off, not the MX listener)
    iprev: str | None = None
    #: DNS list weights added up (negative: allow-listed), and each listing as
    #: "zone=answer*weight"
    dnsbl_score: int = 0
    dnsbl_hits: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthFacts:
    """The email-authentication stage's results, for the stages after it (rspamd is told them
    instead of checking again; greylisting passes SPF-authorised senders of known domains)."""

    spf: str
    #: the domain SPF checked (MAIL FROM's, or HELO's for <>)
    spf_domain: str
    #: (signing domain, result) of each DKIM signature
    dkim: tuple[tuple[str, str], ...]
    dmarc: str
    #: the RFC5322.From domain
    from_domain: str
    #: what the From domain's DMARC policy asks for this message: none, quarantine, reject
    #: (rspamd weighs a DMARC fail by it)
    dmarc_disposition: str = "none"


@dataclass
class Message:
    """What a stage sees. A stage may replace `content` (e.g. to remove forged header fields);
    the stages after it, and the queue, get the new content."""

    mail_from: str
    recipients: list[str]
    client_ip: str
    helo: str
    auth_user: str | None
    listener: str
    content: bytes
    annotations: dict[str, str] = field(default_factory=dict)
    #: the transaction's id (in Received:, logs and rspamd's Queue-Id)
    queue_id: str = ""
    client: ClientFacts = field(default_factory=ClientFacts)
    #: set by the email-authentication stage when it ran
    auth: AuthFacts | None = None


class Stage(Protocol):
    name: str

    async def check(self, message: Message) -> Verdict: ...


@dataclass(frozen=True)
class Outcome:
    action: Action
    stage: str | None
    reply: str | None
    headers: tuple[str, ...]
    annotations: dict[str, str]
    #: the message as the stages left it
    content: bytes


class Pipeline:
    def __init__(self, stages: Sequence[Stage] = ()) -> None:
        self.stages = list(stages)

    async def run(self, message: Message) -> Outcome:
        headers: list[str] = []
        annotations: dict[str, str] = {}
        for stage in self.stages:
            try:
                verdict = await stage.check(message)
            except Exception:
                # a stage's bug must not turn into a lost or a wrongly accepted message
                log.exception("filter stage failed", extra={"stage": stage.name})
                verdict = Verdict(Action.DEFER, reply=STAGE_FAILED, reason="stage failed")
            headers.extend(verdict.headers)
            _verdicts.add(1, {"stage": stage.name, "action": verdict.action.value})
            if verdict.action is Action.ACCEPT:
                continue
            log.info(
                "filter decided",
                extra={"stage": stage.name, "action": verdict.action.value,
                       "reason": verdict.reason},
            )  # fmt: skip
            if verdict.action is Action.QUARANTINE:
                # delivered, but into the recipient's Junk folder (the worker reads this)
                annotations["quarantine"] = stage.name
                continue
            return Outcome(
                verdict.action, stage.name, verdict.reply, tuple(headers), annotations,
                message.content,
            )  # fmt: skip
        return Outcome(Action.ACCEPT, None, None, tuple(headers), annotations, message.content)
