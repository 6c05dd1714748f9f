"""The filter pipeline: an ordered list of async stages that look at a received message before
it is queued. Each stage accepts (maybe adding headers), quarantines, defers or rejects; the
first stage that does not accept decides, and is named in logs and metrics.

Email authentication (SPF/DKIM/DMARC), DNSBLs, greylisting and spam scoring plug in here.
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
    """What a stage sees."""

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


class Pipeline:
    def __init__(self, stages: Sequence[Stage] = ()) -> None:
        self.stages = list(stages)

    async def run(self, message: Message) -> Outcome:
        headers: list[str] = []
        annotations: dict[str, str] = {}
        for stage in self.stages:
            verdict = await stage.check(message)
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
            return Outcome(verdict.action, stage.name, verdict.reply, tuple(headers), annotations)
        return Outcome(Action.ACCEPT, None, None, tuple(headers), annotations)
