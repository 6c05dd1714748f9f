"""A worker's side of the queue: claim loops per lane and partition, the due-mover, reclaim
of entries whose consumer died, claim heartbeats, and at most `concurrency` handlers at once.
The delivery worker supplies the handler; everything about queue mechanics stays here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from .envelope import Lane
from .queue import Claimed, Queue

log = logging.getLogger(__name__)

#: The handler delivers what it can, `record`s each recipient and `settle`s the claim.
Handler = Callable[[Claimed], Awaitable[None]]


class QueueConsumer:
    def __init__(
        self,
        queue: Queue,
        consumer: str,
        lanes: Sequence[Lane],
        handler: Handler,
        *,
        concurrency: int = 4,
        visibility_timeout: timedelta = timedelta(minutes=5),
        poll: timedelta = timedelta(seconds=1),
        max_deliveries: int = 5,
    ) -> None:
        self.queue = queue
        self.consumer = consumer
        self.lanes = list(lanes)
        self.handler = handler
        self.concurrency = concurrency
        self.visibility_timeout = visibility_timeout
        self.poll = poll
        #: claims without a settlement (the worker crashed on it) before it counts as a
        #: failed attempt and is deferred without being handled again
        self.max_deliveries = max_deliveries
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: dict[asyncio.Task[None], Claimed] = {}
        self.ready = False

    async def run(self, stop: asyncio.Event, *, drain: timedelta = timedelta(seconds=25)) -> None:
        """Consume until `stop` is set, then wait up to `drain` for handlers in flight. Any
        still running are cancelled; their entries are reclaimed after the visibility timeout."""
        await self.queue.ensure_groups()
        loops = [
            asyncio.create_task(self._claim_loop(stop, lane, partition))
            for lane in self.lanes
            for partition in range(self.queue.partitions)
        ]
        loops += [
            asyncio.create_task(self._maintenance_loop(stop)),
            asyncio.create_task(self._heartbeat_loop(stop)),
        ]
        self.ready = True
        try:
            await stop.wait()
        finally:
            self.ready = False
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            if self._inflight:
                _, late = await asyncio.wait(list(self._inflight), timeout=drain.total_seconds())
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)

    async def _claim_loop(self, stop: asyncio.Event, lane: Lane, partition: int) -> None:
        while not stop.is_set():
            await self._slots.acquire()
            # then every other slot free right now: one XREADGROUP (and one load script)
            # claims a batch instead of one entry per round trip, and never more than this
            # process can start at once, so idle consumers elsewhere still get their share
            slots = 1
            while not self._slots.locked():
                await self._slots.acquire()
                slots += 1
            try:
                batch = await self.queue.claim(
                    self.consumer, lane, partition, count=slots, block=self.poll
                )
            except Exception:
                for _ in range(slots):
                    self._slots.release()
                log.exception("claim failed", extra={"lane": lane, "partition": partition})
                await _wait(stop, self.poll)
                continue
            for _ in range(slots - len(batch)):
                self._slots.release()
            for claimed in batch:
                self._start(claimed)

    def _start(self, claimed: Claimed) -> None:
        """Run the handler for a claim that already holds a slot."""
        task = asyncio.create_task(self._handle(claimed))
        self._inflight[task] = claimed
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._slots.release()

    async def _handle(self, claimed: Claimed) -> None:
        context = {"message_id": claimed.id, "lane": claimed.lane}
        if claimed.deliveries > self.max_deliveries:
            log.error("message keeps crashing its handler; deferring it", extra=context)
            await self.queue.settle(claimed)
            return
        try:
            await self.handler(claimed)
        except asyncio.CancelledError:
            raise
        except Exception:
            # pending recipients are retried on the schedule rather than after the timeout
            log.exception("delivery handler failed", extra=context)
            with contextlib.suppress(Exception):
                await self.queue.settle(claimed)

    async def _maintenance_loop(self, stop: asyncio.Event) -> None:
        reclaim_every = max(self.poll, self.visibility_timeout / 2)
        since_reclaim = reclaim_every  # reclaim at start: a restarted pod's own leftovers
        while not stop.is_set():
            try:
                for lane in self.lanes:
                    for partition in range(self.queue.partitions):
                        await self.queue.move_due(lane, partition)
                if since_reclaim >= reclaim_every:
                    since_reclaim = timedelta(0)
                    await self._reclaim(stop)
            except Exception:
                log.exception("queue maintenance failed")
            await _wait(stop, self.poll)
            since_reclaim += self.poll

    async def _reclaim(self, stop: asyncio.Event) -> None:
        for lane in self.lanes:
            for partition in range(self.queue.partitions):
                while not stop.is_set():
                    await self._slots.acquire()
                    batch = await self._claim_stale(lane, partition)
                    if not batch:
                        self._slots.release()
                        break
                    log.warning("reclaimed a message from a dead consumer",
                                extra={"message_id": batch[0].id, "lane": lane})  # fmt: skip
                    self._start(batch[0])

    async def _claim_stale(self, lane: Lane, partition: int) -> list[Claimed]:
        try:
            return await self.queue.reclaim(
                self.consumer, lane, partition, min_idle=self.visibility_timeout, count=1
            )
        except Exception:
            self._slots.release()
            raise

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        every = self.visibility_timeout / 3
        while not stop.is_set():
            await _wait(stop, every)
            for claimed in list(self._inflight.values()):
                try:
                    lost = not await self.queue.extend(claimed)
                    # a claim settled while we asked is not lost: it is done
                    if lost and any(c is claimed for c in self._inflight.values()):
                        log.warning("lost a claim to another consumer",
                                    extra={"message_id": claimed.id})  # fmt: skip
                except Exception:
                    log.exception("claim heartbeat failed", extra={"message_id": claimed.id})


async def _wait(stop: asyncio.Event, period: timedelta) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), period.total_seconds())
