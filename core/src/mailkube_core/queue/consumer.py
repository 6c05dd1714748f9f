"""A worker's side of the queue: claim loops per lane and partition, the due-mover, reclaim
of entries whose consumer died, claim heartbeats, and at most `concurrency` handlers at once.
The delivery worker supplies the handler; everything about queue mechanics stays here.

When Redis does not answer (down, frozen, out of reach: a claim fails with a connection error
or past redis_timeout), the consumer stops claiming and is not `ready` until a PING answers
again: every claim sent into a frozen Redis may still run when it wakes up, and take messages
for a request nobody waits for any more. Those messages (entries of this consumer that no
handler holds) are taken back when Redis answers, before claiming starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .envelope import Lane
from .queue import Claimed, Queue

log = logging.getLogger(__name__)

#: Redis did not answer (as opposed to answering with an error)
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)
#: the longest wait between two PINGs while Redis does not answer
PROBE_INTERVAL_MAX = timedelta(seconds=5)

#: The handler delivers what it can, `record`s each recipient and `settle`s the claim.
Handler = Callable[[Claimed], Awaitable[None]]
#: Handles a whole claimed batch (one lane and partition) in one task: settles every claim.
BatchHandler = Callable[[list[Claimed]], Awaitable[None]]
#: local batches of one claim loop in flight at once: one being delivered while the next is
#: claimed and written. More would split the same arrivals into smaller batches, each paying
#: the per-batch round trips and fsyncs. Other lanes' batches wait on remote hosts, not on
#: the disk: as many as there are slots, so one slow destination does not stop the lane.
BATCHES_IN_FLIGHT = 2
#: how long an orphan (a claim whose reply was lost while Redis did not answer) has been idle
#: before the maintenance loop takes it back; far longer than a claim takes to reach its handler
ORPHAN_MIN_IDLE = timedelta(seconds=10)
ZERO = timedelta(0)


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
        batch_handler: BatchHandler | None = None,
        batch_lanes: Sequence[Lane] = (),
        batch_size: int = 1,
        batch_sizes: Mapping[Lane, int] | None = None,
        orphan_min_idle: timedelta = ORPHAN_MIN_IDLE,
        batch_wait: timedelta = ZERO,
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
        #: lanes whose claims go to `batch_handler` together, up to `batch_size` per claim;
        #: a batch takes one of the `concurrency` slots (one task, like one delivery)
        self.batch_handler = batch_handler
        self.batch_lanes = frozenset(batch_lanes) if batch_handler is not None else frozenset()
        self.batch_size = batch_size
        #: per lane, where it differs from batch_size
        self.batch_sizes = dict(batch_sizes or {})
        #: after a claim that did not fill a batch, a batched lane's loop waits this long
        #: before it claims again (see _claim_loop)
        self.batch_wait = batch_wait
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: dict[asyncio.Task[None], list[Claimed]] = {}
        self.running = False
        #: set while Redis answers; cleared when it does not (see the module docstring)
        self._available = asyncio.Event()
        self._available.set()
        self._probe: asyncio.Task[None] | None = None
        #: orphans (see _take_back_orphans) may be left: there was no free slot for them
        self._orphans_left = False
        self.orphan_min_idle = orphan_min_idle

    @property
    def ready(self) -> bool:
        """Claiming: running, and Redis answers."""
        return self.running and self._available.is_set()

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
        self.running = True
        try:
            await stop.wait()
        finally:
            self.running = False
            if self._probe is not None:
                loops.append(self._probe)
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            if self._inflight:
                _, late = await asyncio.wait(list(self._inflight), timeout=drain.total_seconds())
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)

    async def _claim_loop(self, stop: asyncio.Event, lane: Lane, partition: int) -> None:
        batched = lane in self.batch_lanes
        in_flight = asyncio.Semaphore(
            BATCHES_IN_FLIGHT if lane == "local" else max(1, self.concurrency)
        )
        while not stop.is_set():
            if not self._available.is_set():
                await _first(stop, self._available)
                continue
            if batched:
                await in_flight.acquire()
            try:
                await self._slots.acquire()
            except BaseException:
                if batched:
                    in_flight.release()
                raise
            # then every other slot free right now: one XREADGROUP (and one load script)
            # claims a batch instead of one entry per round trip, and never more than this
            # process can start at once, so idle consumers elsewhere still get their share
            slots = 1
            while not batched and not self._slots.locked():
                await self._slots.acquire()
                slots += 1
            count = self.batch_sizes.get(lane, self.batch_size) if batched else slots
            try:
                batch = await self.queue.claim(
                    self.consumer, lane, partition, count=count, block=self.poll
                )
            except BaseException as error:
                for _ in range(slots):
                    self._slots.release()
                if batched:
                    in_flight.release()
                if isinstance(error, UNAVAILABLE):
                    self._unavailable(stop, error)
                    continue
                if not isinstance(error, Exception):
                    raise
                log.exception("claim failed", extra={"lane": lane, "partition": partition})
                await _wait(stop, self.poll)
                continue
            if batched:
                if batch:
                    self._start_batch(batch).add_done_callback(lambda _: in_flight.release())
                    if len(batch) < count and self.batch_wait > ZERO:
                        # Under a steady trickle each claim would take a message or two,
                        # and every claim and settlement is a Redis write: an AOF fsync
                        # (appendfsync always) that the gateway's next enqueue waits behind.
                        # Waiting lets arrivals gather into one batch: fewer fsyncs in Redis
                        # and in the maildirs, at most batch_wait more per message.
                        await _wait(stop, self.batch_wait)
                else:
                    self._slots.release()
                    in_flight.release()
                continue
            for _ in range(slots - len(batch)):
                self._slots.release()
            for claimed in batch:
                self._start(claimed)

    def _start(self, claimed: Claimed) -> None:
        """Run the handler for a claim that already holds a slot."""
        task = asyncio.create_task(self._handle(claimed))
        self._inflight[task] = [claimed]
        task.add_done_callback(self._done)

    def _start_batch(self, batch: list[Claimed]) -> asyncio.Task[None]:
        """Run the batch handler for claims that together hold one slot."""
        task = asyncio.create_task(self._handle_batch(batch))
        self._inflight[task] = batch
        task.add_done_callback(self._done)
        return task

    async def _handle_batch(self, batch: list[Claimed]) -> None:
        assert self.batch_handler is not None
        # a claim that keeps crashing its handler is deferred on its own, as in _handle
        crashing = [c for c in batch if c.deliveries > self.max_deliveries]
        for claimed in crashing:
            await self._handle(claimed)
        batch = [c for c in batch if c.deliveries <= self.max_deliveries]
        if not batch:
            return
        try:
            await self.batch_handler(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch delivery handler failed",
                          extra={"lane": batch[0].lane, "messages": len(batch)})  # fmt: skip
            for claimed in batch:
                with contextlib.suppress(Exception):
                    await self.queue.settle(claimed)

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

    # --- Redis not answering ------------------------------------------------------------

    def _unavailable(self, stop: asyncio.Event, error: BaseException) -> None:
        """Stop claiming, and PING until Redis answers."""
        if not self._available.is_set():
            return
        self._available.clear()
        log.warning("Redis does not answer; claiming stops until it does",
                    extra={"error": repr(error)})  # fmt: skip
        self._probe = asyncio.create_task(self._probe_until_available(stop))

    async def _probe_until_available(self, stop: asyncio.Event) -> None:
        interval = self.poll
        longest = max(self.poll, PROBE_INTERVAL_MAX)
        while not stop.is_set():
            await _wait(stop, interval)
            if stop.is_set():
                return
            try:
                await self.queue.redis.ping()
                self._orphans_left = not await self._take_back_orphans(stop)
            except UNAVAILABLE as error:
                log.debug("Redis still does not answer", extra={"error": repr(error)})
                interval = min(interval * 2, longest)
                continue
            except Exception:  # Redis answers: whatever is left waits for the visibility timeout
                log.exception("taking back claims failed")
            log.info("Redis answers again; claiming")
            self._available.set()
            return

    async def _take_back_orphans(self, stop: asyncio.Event, min_idle: timedelta = ZERO) -> bool:
        """Entries this consumer holds in Redis that no handler of this process holds: a claim
        that failed here and ran in Redis all the same. Started now rather than after the
        visibility timeout, when another consumer would take them over; as many as there are
        free slots. True when none is left; False when the slots ran out first: the
        maintenance loop takes back the rest, waiting for slots, those idle for `min_idle`
        (ORPHAN_MIN_IDLE), so that an entry a claim loop has just claimed and is about to
        start is not taken for one. (From the probe, the claim loops wait, so no entry of
        this consumer that no handler holds is on its way to one: no minimum there.)"""
        left = False
        for lane in self.lanes:
            for partition in range(self.queue.partitions):
                while not stop.is_set():
                    if self._slots.locked() and not min_idle:
                        return False  # the probe does not wait; the maintenance loop does
                    await self._slots.acquire()
                    held = {c.entry_id for cs in self._inflight.values() for c in cs}
                    try:
                        batch = await self.queue.reclaim_own(
                            self.consumer, lane, partition, exclude=held, count=1,
                            min_idle=min_idle,
                        )  # fmt: skip
                    except BaseException:
                        self._slots.release()
                        raise
                    if not batch:
                        self._slots.release()
                        if min_idle and await self.queue.holds_others(
                            self.consumer, lane, partition, held
                        ):
                            left = True  # not idle for min_idle yet: a later pass
                        break
                    log.warning("took back a message claimed while Redis did not answer",
                                extra={"message_id": batch[0].id, "lane": lane})  # fmt: skip
                    self._start(batch[0])
        return not left and not stop.is_set()

    # --- maintenance ---------------------------------------------------------------------

    async def _maintenance_loop(self, stop: asyncio.Event) -> None:
        reclaim_every = max(self.poll, self.visibility_timeout / 2)
        since_reclaim = reclaim_every  # reclaim at start: a restarted pod's own leftovers
        while not stop.is_set():
            if not self._available.is_set():  # the claim loops' probe watches Redis
                await _first(stop, self._available)
                continue
            try:
                for lane in self.lanes:
                    for partition in range(self.queue.partitions):
                        await self.queue.move_due(lane, partition)
                if self._orphans_left:
                    left = not await self._take_back_orphans(stop, self.orphan_min_idle)
                    self._orphans_left = left
                if since_reclaim >= reclaim_every:
                    since_reclaim = timedelta(0)
                    await self._reclaim(stop)
            except UNAVAILABLE as error:
                self._unavailable(stop, error)
                continue
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
            for claimed in [c for cs in list(self._inflight.values()) for c in cs]:
                try:
                    lost = not await self.queue.extend(claimed)
                    # a claim settled while we asked is not lost: it is done
                    if lost and any(c is claimed for cs in self._inflight.values() for c in cs):
                        log.warning("lost a claim to another consumer",
                                    extra={"message_id": claimed.id})  # fmt: skip
                except Exception:
                    log.exception("claim heartbeat failed", extra={"message_id": claimed.id})


async def _wait(stop: asyncio.Event, period: timedelta) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), period.total_seconds())


async def _first(*events: asyncio.Event) -> None:
    """Until one of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
