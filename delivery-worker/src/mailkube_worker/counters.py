"""What the worker counts in Redis for other components and for operators.

Keys (each its own single-key operation, so any layout works on Redis Cluster):
  <prefix>:mailbox:<address>          hash  messages, bytes delivered into the mailbox (the
                                      gateway's quota check reads `bytes`)
  <prefix>:events:message.received    stream  mailbox, message_id, size, folder, time (ms),
                                      for IMAP indexers and notifications; capped (MAXLEN ~)
  <prefix>:outcomes:<YYYY-MM-DD>      hash  recipients by sender domain and outcome that day
                                      (mailkube_core.queue.outcomes; `mailkube queue stats`)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from opentelemetry import metrics

from mailkube_core.queue.envelope import utcnow
from mailkube_core.queue.outcomes import add_outcomes, read_outcomes
from mailkube_core.redis_client import RedisClient

_meter = metrics.get_meter("mailkube.worker")
_recipients = _meter.create_counter(
    "mailkube.worker.recipients",
    unit="{recipient}",
    description="Recipient outcomes by lane and outcome (delivered, deferred, bounced)",
)


@dataclass(frozen=True)
class MailboxUsage:
    messages: int
    bytes: int


class Counters:
    def __init__(self, redis: RedisClient, prefix: str, events_max_length: int = 100000):
        self.redis = redis
        self.prefix = prefix
        self.events_max_length = events_max_length
        self.events_key = f"{prefix}:events:message.received"

    def mailbox_key(self, address: str) -> str:
        return f"{self.prefix}:mailbox:{address}"

    def outcomes_key(self, day: date) -> str:
        return f"{self.prefix}:outcomes:{day.isoformat()}"

    async def usage(self, address: str) -> MailboxUsage:
        values: Any = await self.redis.hmget(self.mailbox_key(address), ["messages", "bytes"])
        return MailboxUsage(int(values[0] or 0), int(values[1] or 0))

    async def received(
        self, address: str, message_id: str, size: int, folder: str | None, at: datetime
    ) -> None:
        """A message landed in a mailbox: count it and tell whoever listens."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.mailbox_key(address), "messages", 1)
            pipe.hincrby(self.mailbox_key(address), "bytes", size)
            pipe.xadd(
                self.events_key,
                {"mailbox": address, "message_id": message_id, "size": size,
                 "folder": folder or "INBOX", "time": int(at.timestamp() * 1000)},
                maxlen=self.events_max_length,
                approximate=True,
            )  # fmt: skip
            await pipe.execute()

    async def outcomes(self, lane: str, sender_domain: str, counts: Counter[str]) -> None:
        """Recipients delivered / deferred / bounced in one attempt, by sender domain."""
        counts = +counts  # drop zeros
        if not counts:
            return
        for outcome, n in counts.items():
            _recipients.add(n, {"lane": lane, "outcome": outcome})
        await add_outcomes(self.redis, self.prefix, utcnow().date(), sender_domain, counts)

    async def outcome_stats(self, day: date) -> dict[str, dict[str, int]]:
        """{sender domain: {delivered, deferred, bounced}} for one day."""
        return await read_outcomes(self.redis, self.prefix, day)
