"""The filter pipeline: an ordered list of async stages that look at a received message before
it is queued. Each stage accepts (maybe adding headers), quarantines, defers or rejects; the
first stage that does not accept decides, and is named in logs and metrics.

Email authentication (mailauth/: SPF, DKIM, ARC, DMARC, DKIM signing) is the first user; DNSBLs,
greylisting and spam scoring plug in the same way.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import metrics

log = logging.getLogger(__name__)
_verdicts = metrics.get_meter("mailkube.gateway").create_counter(
    "mailkube.gateway.filter_verdicts",
    unit="{message}",
    description="Filter pipeline decisions other than accept, by stage and action",
)


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
            if verdict.action is Action.ACCEPT:
                continue
            _verdicts.add(1, {"stage": stage.name, "action": verdict.action.value})
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
