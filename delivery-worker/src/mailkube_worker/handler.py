"""The queue handler: deliver a claimed message's pending recipients on its lane, record each
outcome as soon as it is known (the queue counts it in the same step), settle, and warn the
sender of a long delay.

One span per attempt, a child of the SMTP session's span (the envelope carries its W3C trace
context), so one trace runs from acceptance to final delivery.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from mailkube_core.queue import (
    Claimed,
    Forward,
    MailboxCopy,
    Queue,
    RecipientResult,
    RecipientStatus,
)
from mailkube_core.queue.outcomes import sender_domain
from mailkube_core.telemetry import extract_trace_context, spans_exported

from .bounces import Bouncer
from .counters import Counters
from .dsn import Action
from .local import LocalDelivery
from .remote import RemoteDelivery

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("mailkube.worker")


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

    async def batch(self, batch: list[Claimed]) -> None:
        """A claimed batch (one lane and partition): the common case together, the rest one
        by one through __call__."""
        if batch[0].lane == "local":
            await self._local_batch(batch)
        else:
            await self._remote_batch(batch)

    async def _local_batch(self, batch: list[Claimed]) -> None:
        """LocalDelivery's deliver_batch, then one script records and settles them all (and
        queues their forwards)."""
        assert self.local is not None, "a local batch in a worker without the local role"
        done, slow = await self.local.deliver_batch(batch)
        if done:
            await self.queue.finish_delivered(
                [(d.claimed, d.indexes, d.copies) for d in done],
                {d.claimed.id: d.forwards for d in done},
            )
            for delivered in done:
                self.counters.recorded(delivered.copies)
            self._finished([(d.claimed, len(d.indexes)) for d in done], "local")
        await self._one_by_one(slow)

    async def _remote_batch(self, batch: list[Claimed]) -> None:
        """RemoteDelivery's deliver_batch: messages to one destination share its sessions,
        one transaction after another; as each destination's messages are done, those wholly
        delivered are settled by one script, the others as __call__ settles one."""
        remote = self.remote
        assert remote is not None, "a remote batch in a worker without that role"

        def together(claimed: Claimed) -> bool:
            return _batchable(claimed) and remote.one_destination(claimed)

        simple = [c for c in batch if together(c)]
        slow = [c for c in batch if not together(c)]

        async def settle(outcomes: list[tuple[Claimed, dict[int, RecipientResult]]]) -> None:
            whole = [_all_delivered(r) for _, r in outcomes]
            done = [o for o, w in zip(outcomes, whole, strict=True) if w]
            rest = [o for o, w in zip(outcomes, whole, strict=True) if not w]
            if done:
                await self.queue.finish_delivered([(c, sorted(r), []) for c, r in done])
                self._finished([(c, len(r)) for c, r in done], "remote")
            if rest:
                await asyncio.gather(*(self._settle_one(c, r) for c, r in rest))

        # both run to the end before an error is raised: a claim still being delivered must
        # not be settled by QueueConsumer's fallback meanwhile
        outcomes = await asyncio.gather(
            remote.deliver_batch(simple, settle), self._one_by_one(slow), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def _finished(self, done: list[tuple[Claimed, int]], lane: str) -> None:
        """Counters, a span and a log line for each claim a batch script settled."""
        by_domain: Counter[str] = Counter()
        exported = spans_exported()  # else a span would reach no one: none is made
        for claimed, delivered in done:
            by_domain[sender_domain(claimed.envelope.mail_from)] += delivered
            if exported:  # one span per attempt, as __call__ makes, in the message's trace
                _tracer.start_span(
                    f"deliver {lane}",
                    context=extract_trace_context(claimed.envelope.trace_context),
                    kind=SpanKind.CONSUMER,
                    attributes={"mailkube.message_id": claimed.id, "mailkube.lane": lane,
                                "mailkube.attempt": claimed.attempts + 1,
                                "mailkube.recipients": len(claimed.envelope.recipients),
                                "mailkube.outcome": "done"},
                ).end()  # fmt: skip
            log.info("delivery attempt",
                     extra={"message_id": claimed.id, "lane": lane, "outcome": "done",
                            "delivered": delivered})  # fmt: skip
        for domain, count in by_domain.items():
            self.counters.outcomes(lane, domain, Counter(delivered=count))

    async def _settle_one(self, claimed: Claimed, results: dict[int, RecipientResult]) -> None:
        """A batched claim not wholly delivered: recorded and settled as __call__ does."""
        try:
            with _tracer.start_as_current_span(
                f"deliver {claimed.lane}",
                context=extract_trace_context(claimed.envelope.trace_context),
                kind=SpanKind.CONSUMER,
                attributes={"mailkube.message_id": claimed.id, "mailkube.lane": claimed.lane,
                            "mailkube.attempt": claimed.attempts + 1,
                            "mailkube.recipients": len(claimed.envelope.recipients)},
            ) as span:  # fmt: skip
                await self.queue.record(claimed, results)
                delivered = sum(r.status is RecipientStatus.DELIVERED for r in results.values())
                await self._conclude(claimed, span, Counter(delivered=delivered), [])
        except Exception:  # as QueueConsumer does for one claim
            log.exception("delivery handler failed",
                          extra={"message_id": claimed.id, "lane": claimed.lane})  # fmt: skip
            await self.queue.settle(claimed)

    async def _one_by_one(self, slow: list[Claimed]) -> None:
        if not slow:
            return
        outcomes = await asyncio.gather(*(self(c) for c in slow), return_exceptions=True)
        for claimed, outcome in zip(slow, outcomes, strict=True):
            if isinstance(outcome, Exception):  # as QueueConsumer does for one claim
                log.error("delivery handler failed", exc_info=outcome,
                          extra={"message_id": claimed.id, "lane": claimed.lane})  # fmt: skip
                await self.queue.settle(claimed)
            elif isinstance(outcome, BaseException):
                raise outcome

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

            async def record(
                results: Mapping[int, RecipientResult],
                copies: Sequence[MailboxCopy] = (),
                forwards: Sequence[Forward] = (),
            ) -> None:
                await self.queue.record(claimed, results, copies, forwards)
                self.counters.recorded(copies)
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
            await self._conclude(claimed, span, outcomes, succeeded)

    async def _conclude(
        self,
        claimed: Claimed,
        span: Span,
        outcomes: Counter[str],
        succeeded: Sequence[tuple[int, Action]],
    ) -> None:
        """Settle an attempt whose results are recorded: success notices, the retry or the
        bounce, a delay warning, counters and the log line."""
        settlement = await self.queue.settle(claimed)
        try:
            await self.bouncer.notify_success(claimed, list(succeeded))
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
        self.counters.outcomes(claimed.lane, sender_domain(claimed.envelope.mail_from), outcomes)
        log.info(
            "delivery attempt",
            extra={"message_id": claimed.id, "lane": claimed.lane,
                   "outcome": settlement.outcome, **dict(outcomes)},
        )  # fmt: skip


def _all_delivered(results: Mapping[int, RecipientResult]) -> bool:
    return all(r.status is RecipientStatus.DELIVERED for r in results.values())


def _batchable(claimed: Claimed) -> bool:
    """A remote claim RemoteDelivery.deliver_batch takes: no failure waiting to be reported
    (settle's job), no success notice asked for (ours to send when the next hop has no DSN)."""
    if any(r.status is not RecipientStatus.DELIVERED for r in claimed.results.values()):
        return False
    return not any(claimed.envelope.wants_dsn(i, "success") for i in claimed.pending())
