"""Sending DSNs: the queue's failure hook (bounces) and delay warnings.

A DSN is an ordinary queued message from the null sender `<>` to the original envelope
sender, so it is retried like any other and lands in a local maildir when the sender is one
of ours. A message from `<>` never gets one (RFC 5321 §4.5.5: no bounce of a bounce), and each
recipient's NOTIFY decides whether it is reported (RFC 3461 §4.1; `Envelope.wants_dsn`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from mailkube_core.queue import (
    Claimed,
    Envelope,
    FailedRecipients,
    Notify,
    Queue,
    Recipient,
    RecipientStatus,
)
from mailkube_core.queue.envelope import utcnow
from mailkube_core.routing import RoutingSnapshot
from mailkube_core.settings import WorkerSettings

from .dsn import Action, DsnRecipient, build_dsn

log = logging.getLogger(__name__)


class Bouncer:
    def __init__(self, settings: WorkerSettings, routing: Callable[[], RoutingSnapshot]):
        self.settings = settings
        self.routing = routing
        self.queue: Queue | None = None

    def attach(self, queue: Queue) -> None:
        self.queue = queue

    async def on_failure(self, failed: FailedRecipients) -> None:
        """The queue's failure hook: one bounce for the recipients that want one."""
        envelope = failed.envelope
        wanted = [
            DsnRecipient(envelope.recipients[index], result)
            for index, result in failed.failed
            if envelope.wants_dsn(index, "failure")
        ]
        if wanted:
            await self._send(failed.message_id, envelope, failed.body, wanted, "failed")

    async def notify_success(self, claimed: Claimed, succeeded: list[tuple[int, Action]]) -> None:
        """Success notices for the recipients that asked for them (NOTIFY=SUCCESS): one DSN
        per action. Best effort: a crash right after the delivery sends none."""
        envelope = claimed.envelope
        by_action: dict[Action, list[DsnRecipient]] = {}
        for index, action in succeeded:
            if envelope.wants_dsn(index, "success"):
                result = claimed.results[index]
                by_action.setdefault(action, []).append(
                    DsnRecipient(envelope.recipients[index], result)
                )
        for action, recipients in by_action.items():
            await self._send(claimed.id, envelope, claimed.body, recipients, action)

    def delay_key(self, message_id: str) -> str:
        return f"{self.settings.key_prefix}:dsn-delayed:{message_id}"

    async def warn_if_delayed(self, claimed: Claimed, now: datetime | None = None) -> bool:
        """After a deferral: one `Action: delayed` DSN per message once it has waited
        `delay_warning_after`, for the recipients that asked for one (NOTIFY=DELAY, or no
        NOTIFY: RFC 3461 §4.1 leaves delay notices to the MTA then, and Postfix sends them)."""
        assert self.queue is not None
        now = now or utcnow()
        envelope = claimed.envelope
        if now - envelope.received_at < self.settings.delay_warning_after:
            return False
        wanted = [
            DsnRecipient(envelope.recipients[index], result)
            for index, result in sorted(claimed.results.items())
            if result.status is RecipientStatus.DEFERRED and envelope.wants_dsn(index, "delay")
        ]
        if not wanted:
            return False
        # once per message, whichever worker gets there first
        ttl = self.settings.bounce_after + self.settings.delay_warning_after
        if not await self.queue.redis.set(self.delay_key(claimed.id), 1, nx=True, ex=ttl):
            return False
        until = envelope.received_at + self.settings.bounce_after
        await self._send(claimed.id, envelope, claimed.body, wanted, "delayed", until)
        return True

    async def _send(
        self,
        message_id: str,
        envelope: Envelope,
        body: bytes,
        recipients: Sequence[DsnRecipient],
        action: Action,
        retry_until: datetime | None = None,
    ) -> None:
        assert self.queue is not None
        if not envelope.mail_from:  # never bounce a bounce
            return
        report = build_dsn(
            reporting_mta=self.settings.hostname,
            queue_id=message_id,
            envelope=envelope,
            body=body,
            recipients=recipients,
            action=action,
            now=utcnow(),
            full_limit=self.settings.dsn_full_limit,
            retry_until=retry_until,
        )
        dsn_envelope = Envelope(
            mail_from="",
            recipients=[Recipient(address=envelope.mail_from, notify=frozenset({Notify.NEVER}))],
            smtputf8=not envelope.mail_from.isascii(),
            body_type="8BITMIME" if not report.isascii() else "7BIT",
            trace_context=envelope.trace_context,
            # RFC 8689 §5: the report of a REQUIRETLS message (its headers, or all of it
            # under RET=FULL) goes back under REQUIRETLS too
            requiretls=envelope.requiretls,
        )
        ids = await self.queue.enqueue(dsn_envelope, report, is_local=self.routing().is_local)
        log.info(
            "DSN queued",
            extra={"message_id": message_id, "dsn_id": ids[0], "action": action,
                   "recipients": len(recipients)},
        )  # fmt: skip
