"""What the worker counts in Redis for other components and for operators.

Keys (single-key commands only, so any layout works on Redis Cluster):
  <prefix>:mailbox:<address>          hash  messages, bytes delivered into the mailbox (the
                                      gateway's quota check reads `bytes`)
  <prefix>:events:message.received    stream  mailbox, message_id, size, folder, time (ms),
                                      for IMAP indexers and notifications; capped (MAXLEN ~)
  <prefix>:outcomes:<YYYY-MM-DD>      hash  recipients by sender domain and outcome that day
                                      (mailkube_core.queue.outcomes; `mailkube queue stats`)

Updates are collected in memory and written in one pipeline every `flush_every` (100 ms by
default) instead of one round trip per message: at a few hundred deliveries a second that is
most of the worker's Redis traffic. The price: a worker that crashes loses the updates of its
last 100 ms (counters are approximate anyway; the maildir is the truth), and the quota check
of this worker adds its own unwritten bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from opentelemetry import metrics

from mailkube_core.mailbox import BYTES_FIELD, MESSAGES_FIELD, mailbox_key
from mailkube_core.queue.envelope import utcnow
from mailkube_core.queue.outcomes import KEEP, outcomes_key, read_outcomes
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


@dataclass(frozen=True)
class MailboxUsage:
    messages: int
    bytes: int


@dataclass
class _Pending:
    """Updates not written yet."""

    messages: Counter[str]
    bytes: Counter[str]
    events: list[dict[str, str | int]]
    outcomes: Counter[tuple[date, str, str]]

    @classmethod
    def empty(cls) -> _Pending:
        return cls(Counter(), Counter(), [], Counter())

    def __bool__(self) -> bool:
        return bool(self.messages or self.events or self.outcomes)


class Counters:
    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        events_max_length: int = 100000,
        flush_every: float = 0.1,
        is_ours: Callable[[str], bool] = lambda domain: False,
    ) -> None:
        self.redis = redis
        #: our own mail domains get their own metric series; other senders share one
        self.is_ours = is_ours
        self.prefix = prefix
        self.events_max_length = events_max_length
        self.events_key = f"{prefix}:events:message.received"
        self.flush_every = flush_every
        self._pending = _Pending.empty()

    def mailbox_key(self, address: str) -> str:
        return mailbox_key(self.prefix, address)

    async def usage(self, address: str) -> MailboxUsage:
        """What the mailbox holds, as counted (including this worker's unwritten updates)."""
        values: Any = await self.redis.hmget(
            self.mailbox_key(address), [MESSAGES_FIELD, BYTES_FIELD]
        )
        return MailboxUsage(
            int(values[0] or 0) + self._pending.messages[address],
            int(values[1] or 0) + self._pending.bytes[address],
        )

    def received(
        self, address: str, message_id: str, size: int, folder: str | None, at: datetime
    ) -> None:
        """A message landed in a mailbox: count it and tell whoever listens."""
        self._pending.messages[address] += 1
        self._pending.bytes[address] += size
        self._pending.events.append(
            {"mailbox": address, "message_id": message_id, "size": size,
             "folder": folder or "INBOX", "time": int(at.timestamp() * 1000)}
        )  # fmt: skip

    def outcomes(self, lane: str, sender_domain: str, counts: Counter[str]) -> None:
        """Recipients delivered / deferred / bounced in one attempt, by sender domain."""
        day = utcnow().date()
        # the metric's sender_domain is bounded: ours by name, everyone else as "other"
        domain_label = sender_domain if sender_domain and self.is_ours(sender_domain) else "other"
        for outcome, n in (+counts).items():
            _recipients.add(n, {"lane": lane, "outcome": outcome})
            _sender_outcomes.add(n, {"sender_domain": domain_label, "outcome": outcome})
            self._pending.outcomes[(day, sender_domain or "<>", outcome)] += n

    async def outcome_stats(self, day: date) -> dict[str, dict[str, int]]:
        """{sender domain: {delivered, deferred, bounced}} for one day."""
        return await read_outcomes(self.redis, self.prefix, day)

    async def flush(self) -> None:
        """Write what was counted since the last flush, in one pipeline. If Redis fails, the
        updates are kept for the next flush."""
        pending, self._pending = self._pending, _Pending.empty()
        if not pending:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for address, n in pending.messages.items():
                    pipe.hincrby(self.mailbox_key(address), MESSAGES_FIELD, n)
                    pipe.hincrby(self.mailbox_key(address), BYTES_FIELD, pending.bytes[address])
                for event in pending.events:
                    pipe.xadd(self.events_key, event,  # type: ignore[arg-type]
                              maxlen=self.events_max_length, approximate=True)  # fmt: skip
                days = set()
                for (day, domain, outcome), n in pending.outcomes.items():
                    pipe.hincrby(outcomes_key(self.prefix, day), f"{domain}:{outcome}", n)
                    days.add(day)
                for day in days:
                    pipe.expire(outcomes_key(self.prefix, day), KEEP)
                await pipe.execute()
        except Exception:
            # a partial write counts some updates twice: better than losing them all
            self._pending.messages.update(pending.messages)
            self._pending.bytes.update(pending.bytes)
            self._pending.events[:0] = pending.events
            self._pending.outcomes.update(pending.outcomes)
            raise

    async def run(self, stop: asyncio.Event) -> None:
        """Flush every `flush_every` until `stop`, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.flush_every)
            try:
                await self.flush()
            except Exception:
                log.warning("counters not written; will retry", exc_info=True)
