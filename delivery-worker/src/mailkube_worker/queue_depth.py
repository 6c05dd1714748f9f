"""The queue's depth as a gauge, for dashboards and for autoscaling the workers on it (an HPA
on an external metric: docs/kubernetes.md, "Autoscaling the workers").

`mailkube.queue.messages{lane, state}`, summed over the partitions: `ready` (in the lane's
stream, not claimed yet), `active` (claimed by a worker: the consumer group's pending
entries), `deferred` (waiting for a retry). Every worker reads it from Redis every
`queue_stats_interval` (a scrape only reads the last values: the SDK calls the gauge's callback
synchronously), so every worker pod shows the same values: aggregate them with max, not sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Iterable
from datetime import timedelta

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from mailkube_core.queue import QueueAdmin

log = logging.getLogger(__name__)

STATES = ("ready", "active", "deferred")

_readers: weakref.WeakSet[QueueDepth] = weakref.WeakSet()


def _observe(_options: CallbackOptions) -> Iterable[Observation]:
    for reader in list(_readers):
        for (lane, state), value in reader.values.items():
            yield Observation(value, {"lane": lane, "state": state})


metrics.get_meter("mailkube.worker").create_observable_gauge(
    "mailkube.queue.messages",
    callbacks=[_observe],
    unit="{message}",
    description="Messages in the queue by lane and state (ready, active, deferred), summed "
    "over the partitions; the same in every worker: aggregate with max",
)


class QueueDepth:
    def __init__(self, admin: QueueAdmin) -> None:
        self.admin = admin
        #: (lane, state) -> messages, as last read (empty until the first read)
        self.values: dict[tuple[str, str], int] = {}
        _readers.add(self)

    async def refresh(self) -> None:
        stats = await self.admin.stats()
        values: dict[tuple[str, str], int] = {
            (lane.lane, state): 0 for lane in stats.lanes for state in STATES
        }
        for lane in stats.lanes:
            values[(lane.lane, "ready")] += lane.ready
            values[(lane.lane, "active")] += lane.active
            values[(lane.lane, "deferred")] += lane.deferred
        self.values = values

    async def run(self, stopping: asyncio.Event, interval: timedelta) -> None:
        """Refresh every `interval` until `stopping`; a failed read keeps the last values."""
        while not stopping.is_set():
            try:
                await self.refresh()
            except Exception as exc:  # Redis away: readiness says so; keep the last values
                log.debug("queue depth not read: %r", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval.total_seconds()):
                    await stopping.wait()
