"""The queue handler: deliver a claimed message's pending recipients on its lane, record each
outcome as soon as it is known, settle, count, and warn the sender of a long delay.

One span per attempt, a child of the SMTP session's span (the envelope carries its W3C trace
context), so one trace runs from acceptance to final delivery.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from mailkube_core.addresses import split_address
from mailkube_core.queue import Claimed, Queue, RecipientResult, RecipientStatus
from mailkube_core.telemetry import extract_trace_context

from .bounces import Bouncer
from .counters import Counters
from .local import LocalDelivery
from .remote import RemoteDelivery

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("mailkube.worker")


def sender_domain(mail_from: str) -> str:
    try:
        return split_address(mail_from)[1].lower()
    except ValueError:
        return ""


class DeliveryHandler:
    def __init__(
        self,
        queue: Queue,
        bouncer: Bouncer,
        counters: Counters,
        local: LocalDelivery | None,
        remote: RemoteDelivery | None,
    ) -> None:
        self.queue = queue
        self.bouncer = bouncer
        self.counters = counters
        self.local = local
        self.remote = remote

    async def __call__(self, claimed: Claimed) -> None:
        envelope = claimed.envelope
        attributes: dict[str, str | int] = {
            "mailkube.message_id": claimed.id,
            "mailkube.lane": claimed.lane,
            "mailkube.attempt": claimed.attempts + 1,
            "mailkube.recipients": len(envelope.recipients),
        }
        with _tracer.start_as_current_span(
            f"deliver {claimed.lane}",
            context=extract_trace_context(envelope.trace_context),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            outcomes: Counter[str] = Counter()

            async def record(results: Mapping[int, RecipientResult]) -> None:
                await self.queue.record(claimed, results)
                for result in results.values():
                    if result.status is RecipientStatus.DELIVERED:
                        outcomes["delivered"] += 1

            pending = claimed.pending()
            if claimed.lane == "local":
                assert self.local is not None, "a local claim in a worker without the local role"
                succeeded = await self.local.deliver_all(claimed, pending, record)
            else:
                assert self.remote is not None, "a remote claim in a worker without that role"
                succeeded = await self.remote.deliver_all(claimed, pending, record)
            settlement = await self.queue.settle(claimed)
            try:
                await self.bouncer.notify_success(claimed, succeeded)
            except Exception:
                log.exception("success DSN failed", extra={"message_id": claimed.id})
            outcomes["bounced"] += settlement.failed
            if settlement.outcome == "deferred":
                outcomes["deferred"] += len(claimed.pending())
                try:
                    await self.bouncer.warn_if_delayed(claimed)
                except Exception:
                    log.exception("delay DSN failed", extra={"message_id": claimed.id})
            span.set_attribute("mailkube.outcome", settlement.outcome)
            self.counters.outcomes(claimed.lane, sender_domain(envelope.mail_from), outcomes)
            log.info(
                "delivery attempt",
                extra={"message_id": claimed.id, "lane": claimed.lane,
                       "outcome": settlement.outcome, **dict(outcomes)},
            )  # fmt: skip
