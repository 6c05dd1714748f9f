"""What the worker counts for other components and for operators.

Keys (mailkube_core.queue.tally carries them, one single-key script each, so any layout works
on Redis Cluster):
  <prefix>:mailbox:<address>          hash  messages, bytes stored in the mailbox (the
                                      gateway's quota check reads `bytes`)
  <prefix>:events:message.received    stream  mailbox, message_id, size, folder, time (ms),
                                      for IMAP indexers and notifications; capped (MAXLEN ~)
  <prefix>:outcomes:<YYYY-MM-DD>      hash  recipients by sender domain and outcome that day
                                      (mailkube_core.queue.outcomes; `mailkube queue stats`)

The queue counts each delivery in the script that records it, in the tally of the message's
partition; every worker runs the tally relay every `flush_every` (100 ms by default), which
carries whatever all workers recorded since to these keys, exactly once, in a few round trips
whatever the number of deliveries. A worker that dies loses no count: the next relay, this
worker's or another's, carries what it recorded. The quota check adds the bytes this worker
recorded that no relay of its own has carried yet.

The OpenTelemetry counters of outcomes are this process's own, as every metric is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import date

from opentelemetry import metrics

from mailkube_core.mailbox import MailboxUsage, read_usage
from mailkube_core.queue import MailboxCopy, TallyRelay
from mailkube_core.queue.outcomes import read_outcomes
from mailkube_core.queue.tally import events_key
from mailkube_core.redis_client import RedisClient

log = logging.getLogger(__name__)
_meter = metrics.get_meter("mailkube.worker")
_sender_outcomes = _meter.create_counter(
    "mailkube.worker.sender_outcomes",
    unit="{recipient}",
    description="Recipient outcomes (delivered, deferred, bounced) by sender domain: the "
    "bounce rate of each of our domains (other senders are counted as sender_domain=other)",
)
_recipients = _meter.create_counter(
    "mailkube.worker.recipients",
    unit="{recipient}",
    description="Recipient outcomes by lane and outcome (delivered, deferred, bounced)",
)


class Counters:
    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        events_max_length: int = 100000,
        flush_every: float = 0.1,
        is_ours: Callable[[str], bool] = lambda domain: False,
        *,
        partitions: int = 1,
    ) -> None:
        self.redis = redis
        #: our own mail domains get their own metric series; other senders share one
        self.is_ours = is_ours
        self.prefix = prefix
        self.events_key = events_key(prefix)
        self.flush_every = flush_every
        self.relay = TallyRelay(redis, prefix, partitions, events_max_length=events_max_length)
        # recorded by this worker, not yet carried by a relay pass of its own
        self._messages: Counter[str] = Counter()
        self._bytes: Counter[str] = Counter()

    async def usage(self, address: str) -> MailboxUsage:
        """What the mailbox holds, as counted (including this worker's uncarried copies)."""
        counted = await read_usage(self.redis, self.prefix, address)
        return MailboxUsage(
            counted.messages + self._messages[address], counted.bytes + self._bytes[address]
        )

    def recorded(self, copies: Sequence[MailboxCopy]) -> None:
        """Copies the queue has just recorded (and counted in its tally)."""
        for copy in copies:
            self._messages[copy.mailbox] += 1
            self._bytes[copy.mailbox] += copy.size

    def outcomes(self, lane: str, sender_domain: str, counts: Counter[str]) -> None:
        """Recipients delivered / deferred / bounced in one attempt, by sender domain, as
        metrics (the queue counts them in Redis itself)."""
        # the metric's sender_domain is bounded: ours by name, everyone else as "other"
        domain_label = sender_domain if sender_domain and self.is_ours(sender_domain) else "other"
        for outcome, n in (+counts).items():
            _recipients.add(n, {"lane": lane, "outcome": outcome})
            _sender_outcomes.add(n, {"sender_domain": domain_label, "outcome": outcome})

    async def outcome_stats(self, day: date) -> dict[str, dict[str, int]]:
        """{sender domain: {delivered, deferred, bounced}} for one day."""
        return await read_outcomes(self.redis, self.prefix, day)

    async def flush(self) -> None:
        """One relay pass: everything recorded before it starts reaches the counters. If Redis
        fails, the next pass carries it."""
        messages, size = +self._messages, +self._bytes
        await self.relay.relay()
        self._messages.subtract(messages)
        self._bytes.subtract(size)
        self._messages, self._bytes = +self._messages, +self._bytes

    async def run(self, stop: asyncio.Event) -> None:
        """Flush every `flush_every` until `stop`, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.flush_every)
            try:
                await self.flush()
            except Exception:
                log.warning("counters not carried; will retry", exc_info=True)
