"""The queue-depth gauge (mailkube_queue_messages) against a real Redis: ready, active and
deferred entries per lane, as /metrics shows them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import REGISTRY, generate_latest
from redis.asyncio import Redis

from mailkube_core.queue import Envelope, Queue, QueueAdmin, Recipient
from mailkube_worker.queue_depth import QueueDepth


def gauge(lane: str, state: str) -> float | None:
    for line in generate_latest(REGISTRY).decode().splitlines():
        if (line.startswith("mailkube_queue_messages{") and f'lane="{lane}"' in line
                and f'state="{state}"' in line):  # fmt: skip
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_the_gauge_counts_ready_active_and_deferred_per_lane(
    redis_url: str, telemetry: Any
) -> None:
    client = Redis.from_url(redis_url)
    queue = Queue(client, prefix=f"t{uuid.uuid4().hex[:8]}", partitions=3)
    await queue.ensure_groups()
    depth = QueueDepth(QueueAdmin.of(queue))
    try:
        for n in range(5):
            await queue.enqueue(
                Envelope(mail_from="a@remote.test",
                         recipients=[Recipient(address=f"r{n}@elsewhere.test")]),
                b"x", is_local=lambda _address: False,
            )  # fmt: skip
        await queue.enqueue(
            Envelope(mail_from="a@remote.test", recipients=[Recipient(address="u@ours.test")]),
            b"x", is_local=lambda _address: True,
        )  # fmt: skip
        claimed = []
        for partition in range(3):
            claimed += await queue.claim("w1", "remote", partition, count=1, block=None)
        later = datetime.now(UTC) + timedelta(hours=1)
        assert await queue.defer(claimed[0], later, "451 try later")

        await depth.refresh()
        active = len(claimed) - 1
        assert depth.values[("remote", "active")] == active
        assert depth.values[("remote", "deferred")] == 1
        assert depth.values[("remote", "ready")] == 5 - len(claimed)
        assert depth.values[("local", "ready")] == 1
        assert gauge("remote", "ready") == 5 - len(claimed)
        assert gauge("remote", "active") == active
        assert gauge("remote", "deferred") == 1
        assert gauge("local", "active") == 0
    finally:
        await client.aclose()
