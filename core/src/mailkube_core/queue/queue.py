"""The durable delivery queue on Redis Streams (ARCHITECTURE.md "Queue").

A message is a hash (envelope, body, per-recipient results) plus an entry in its lane's stream
while it waits for a worker, or a member of its lane's delayed set while it waits for a retry.
The gateway calls `enqueue`; workers `claim`, `record` each recipient's outcome and `settle`;
the CLI lists, inspects, retries and deletes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from opentelemetry import metrics
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..redis_client import RedisClient
from ..settings import CommonSettings, WorkerSettings
from ..telemetry.tally import Tally
from . import scripts
from .envelope import LANES, Envelope, Lane, RecipientResult, RecipientStatus, utcnow
from .keys import GROUP, PartitionKeys, new_message_id, partition_of
from .schedule import RetryPolicy

log = logging.getLogger(__name__)

# The API's proxy meter binds these to the process's provider once run_service sets it up.
_meter = metrics.get_meter("mailkube.queue")
_enqueued = Tally(
    _meter, "mailkube.queue.enqueued", unit="{message}", description="Messages queued, by lane"
)
_settled = _meter.create_counter(
    "mailkube.queue.settled", unit="{message}", description="Settlements, by lane and outcome"
)
_failed = _meter.create_counter(
    "mailkube.queue.failed_recipients", unit="{recipient}", description="Recipients failed"
)
_reclaimed = _meter.create_counter(
    "mailkube.queue.reclaimed", unit="{message}", description="Claims taken from dead consumers"
)


@dataclass(frozen=True)
class FailedRecipients:
    """What the failure hook gets: recipients that failed for good and are not yet reported."""

    message_id: str
    envelope: Envelope
    body: bytes
    failed: list[tuple[int, RecipientResult]]


#: Called once for each batch of failed recipients, before the message may be removed. The
#: delivery worker sends the RFC 3464 bounce from here. If it raises, the message stays claimed
#: and comes back after the visibility timeout, so no bounce is lost.
FailureHook = Callable[[FailedRecipients], Awaitable[None]]


@dataclass
class Claimed:
    """A message a consumer holds until it settles, defers or loses the claim."""

    id: str
    partition: int
    lane: Lane
    entry_id: bytes
    consumer: str
    envelope: Envelope
    body: bytes
    attempts: int
    deliveries: int
    results: dict[int, RecipientResult] = field(default_factory=dict)

    def pending(self) -> list[int]:
        """Indexes of recipients not yet delivered or failed."""
        return [
            i
            for i in range(len(self.envelope.recipients))
            if i not in self.results or not self.results[i].final
        ]


@dataclass(frozen=True)
class Settlement:
    outcome: Literal["done", "deferred", "gone"]
    next_attempt: datetime | None = None
    failed: int = 0


@dataclass(frozen=True)
class MessageInfo:
    """One message as the CLI shows it."""

    id: str
    lane: Lane
    state: Literal["queued", "active", "deferred"]
    envelope: Envelope
    size: int
    attempts: int
    deliveries: int
    results: dict[int, RecipientResult]
    next_attempt: datetime | None
    claimed_by: str | None
    last_error: str | None


@dataclass(frozen=True)
class LaneStats:
    partition: int
    lane: Lane
    ready: int
    active: int
    deferred: int


@dataclass(frozen=True)
class QueueStats:
    messages: int
    oldest: datetime | None
    lanes: list[LaneStats]


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _from_ms(value: float | bytes | str) -> datetime:
    return datetime.fromtimestamp(float(value) / 1000, UTC)


def _pairs(flat: Sequence[bytes]) -> dict[str, bytes]:
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


def _results(fields: Mapping[str, bytes]) -> dict[int, RecipientResult]:
    return {
        int(name[2:]): RecipientResult.model_validate_json(value)
        for name, value in fields.items()
        if name.startswith("r:")
    }


class Queue:
    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "mailkube",
        partitions: int = 1,
        retry: RetryPolicy | None = None,
        on_failure: FailureHook | None = None,
        min_replicas: int = 0,
        replica_timeout: timedelta = timedelta(seconds=5),
    ) -> None:
        if min_replicas and isinstance(redis, RedisCluster):
            raise ValueError("queue_min_replicas (Redis WAIT) is not supported on Redis Cluster")
        self.redis = redis
        self.prefix = prefix
        self.partitions = partitions
        self.retry = retry or RetryPolicy()
        self.on_failure = on_failure
        self.min_replicas = min_replicas
        self.replica_timeout = replica_timeout
        self._script: dict[str, AsyncScript] = {
            name: redis.register_script(getattr(scripts, name))
            for name in (
                "ENQUEUE", "LOAD_CLAIMED", "DROP_ENTRY", "EXTEND", "RECORD", "FINISH",
                "DEFER", "MOVE_DUE", "RETRY_NOW", "DELETE", "PEEK",
            )
        }  # fmt: skip

    @classmethod
    def from_settings(
        cls, settings: CommonSettings, redis: RedisClient, on_failure: FailureHook | None = None
    ) -> Queue:
        retry = None
        if isinstance(settings, WorkerSettings):
            retry = RetryPolicy(
                intervals=settings.retry_intervals,
                max_retries=settings.max_retries,
                bounce_after=settings.bounce_after,
                jitter=settings.retry_jitter,
            )
        return cls(
            redis,
            prefix=settings.key_prefix,
            partitions=settings.queue_partitions,
            retry=retry,
            on_failure=on_failure,
            min_replicas=settings.queue_min_replicas,
        )

    def keys(self, partition: int) -> PartitionKeys:
        return PartitionKeys(self.prefix, partition)

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        # EVALSHA as AsyncScript sends it, without its per-call checks (the enqueue hot path)
        script = self._script[name]
        try:
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            script.sha = await self.redis.script_load(script.script)
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)

    # --- producer -------------------------------------------------------------------------

    async def enqueue(
        self, envelope: Envelope, body: bytes, *, is_local: Callable[[str], bool]
    ) -> list[str]:
        """Queue a message atomically: one message per lane its recipients need (local
        mailboxes, remote hosts), all in one script. Durable when it returns, given Redis runs
        with `appendfsync always` (and `min_replicas` replicas acknowledged it, if set).
        Returns the message ids."""
        by_lane: dict[Lane, list[int]] = {}
        for index, recipient in enumerate(envelope.recipients):
            lane: Lane = "local" if is_local(recipient.address) else "remote"
            by_lane.setdefault(lane, []).append(index)
        partition = random.randrange(self.partitions)  # noqa: S311
        keys = self.keys(partition)
        script_keys: list[str] = [keys.messages]
        args: list[Any] = [_ms(utcnow()), body]
        ids = []
        for lane, indexes in by_lane.items():
            part = envelope
            if len(by_lane) > 1:
                part = envelope.model_copy(
                    update={"recipients": [envelope.recipients[i] for i in indexes]}
                )
            message_id = new_message_id(partition)
            ids.append(message_id)
            script_keys += [keys.message(message_id), keys.stream(lane)]
            args += [message_id, lane, part.model_dump_json()]
        if self.min_replicas and isinstance(self.redis, Redis):
            # WAIT counts the writes of this connection, so both go down one pipeline
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._script["ENQUEUE"](keys=script_keys, args=args, client=pipe)
                timeout_ms = int(self.replica_timeout.total_seconds() * 1000)
                pipe.execute_command("WAIT", self.min_replicas, timeout_ms)
                _, acked = await pipe.execute()
            if acked < self.min_replicas:
                # a RedisError like any other outage: the gateway answers 451 and the client
                # retries (the copy on the primary may then be delivered too: at-least-once)
                raise RedisTimeoutError(
                    f"only {acked} of {self.min_replicas} replicas hold the message"
                )
        else:
            await self._run("ENQUEUE", script_keys, args)
        for lane in by_lane:
            _enqueued.add(1, {"lane": lane})
        return ids

    # --- consumer -------------------------------------------------------------------------

    async def ensure_groups(self) -> None:
        """Create every stream's consumer group (idempotent). From id 0, so entries added
        before the group existed are delivered too."""
        for partition in range(self.partitions):
            for lane in LANES:
                try:
                    await self.redis.xgroup_create(
                        self.keys(partition).stream(lane), GROUP, id="0", mkstream=True
                    )
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    async def claim(
        self, consumer: str, lane: Lane, partition: int, *, count: int = 1, block: timedelta | None
    ) -> list[Claimed]:
        """New entries for this consumer; waits up to `block` when there are none."""
        stream = self.keys(partition).stream(lane)
        block_ms = None if block is None else max(1, int(block.total_seconds() * 1000))
        try:
            reply: Any = await self.redis.xreadgroup(
                GROUP, consumer, {stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # the stream is gone (a Redis without persistence restarted, or a flush)
            await self.ensure_groups()
            return []
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        for _stream, items in reply or []:
            entries.extend(items)
        return await self._load(consumer, lane, partition, entries)

    async def reclaim(
        self,
        consumer: str,
        lane: Lane,
        partition: int,
        *,
        min_idle: timedelta,
        count: int = 100,
    ) -> list[Claimed]:
        """Take over entries other consumers claimed more than `min_idle` ago and never settled
        (their pod died). Follows XAUTOCLAIM's cursor until `count` entries or the end."""
        stream = self.keys(partition).stream(lane)
        cursor: bytes | str = "0-0"
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        while len(entries) < count:
            try:
                reply: Any = await self.redis.xautoclaim(
                    stream,
                    GROUP,
                    consumer,
                    int(min_idle.total_seconds() * 1000),
                    start_id=cursor,
                    count=count - len(entries),
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                return []
            cursor, items = reply[0], reply[1]
            entries.extend(item for item in items if item[1] is not None)
            if cursor in (b"0-0", "0-0"):
                break
        if entries:
            _reclaimed.add(len(entries), {"lane": lane})
        return await self._load(consumer, lane, partition, entries)

    async def _load(
        self,
        consumer: str,
        lane: Lane,
        partition: int,
        entries: Sequence[tuple[bytes, dict[bytes, bytes]]],
    ) -> list[Claimed]:
        if not entries:
            return []
        keys = self.keys(partition)
        claimed = []
        ids = [entry[b"id"].decode() for _, entry in entries]
        loaded = await self._run(
            "LOAD_CLAIMED", [keys.message(i) for i in ids], [consumer, _ms(utcnow())]
        )
        for (entry_id, _), message_id, flat in zip(entries, ids, loaded, strict=True):
            if not flat:  # deleted from the CLI: drop its leftover stream entry
                await self._run("DROP_ENTRY", [keys.stream(lane)], [entry_id])
                continue
            fields = _pairs(flat)
            claimed.append(
                Claimed(
                    id=message_id,
                    partition=partition,
                    lane=lane,
                    entry_id=entry_id,
                    consumer=consumer,
                    envelope=Envelope.model_validate_json(fields["envelope"]),
                    body=fields["body"],
                    attempts=int(fields["attempts"]),
                    deliveries=int(fields["deliveries"]),
                    results=_results(fields),
                )
            )
        return claimed

    async def extend(self, claimed: Claimed) -> bool:
        """Reset the claim's idle time; False if another consumer has taken it over."""
        stream = self.keys(claimed.partition).stream(claimed.lane)
        return bool(await self._run("EXTEND", [stream], [claimed.entry_id, claimed.consumer]))

    async def record(self, claimed: Claimed, results: Mapping[int, RecipientResult]) -> bool:
        """Store recipients' outcomes now, so a crash before `settle` does not deliver to them
        again. False if the message was deleted meanwhile."""
        if not results:
            return True
        claimed.results.update(results)
        args: list[str] = []
        for index, result in results.items():
            args += [f"r:{index}", result.model_dump_json()]
        key = self.keys(claimed.partition).message(claimed.id)
        return bool(await self._run("RECORD", [key], args))

    async def settle(self, claimed: Claimed, *, now: datetime | None = None) -> Settlement:
        """After an attempt: report new failures to the failure hook, then remove the message
        when every recipient is final, or defer the rest on the retry schedule. Recipients
        still pending when retries or time run out fail with 4.4.7 (RFC 3463)."""
        now = now or utcnow()
        if all(r.status is RecipientStatus.DELIVERED for r in self._every_result(claimed)):
            # the common case, in one round trip: nothing to report, nothing left to do
            await self.ack(claimed)
            _settled.add(1, {"lane": claimed.lane, "outcome": "done"})
            return Settlement("done")
        keys = self.keys(claimed.partition)
        flat = await self._run("PEEK", [keys.message(claimed.id)], [claimed.id])
        if flat is None:
            await self._run("DROP_ENTRY", [keys.stream(claimed.lane)], [claimed.entry_id])
            return Settlement("gone")
        # fresh from Redis: another consumer that reclaimed the entry may have recorded more
        claimed.results = _results(_pairs(flat))
        pending = claimed.pending()
        expired = bool(pending) and self.retry.expired(
            claimed.attempts, claimed.envelope.received_at, now
        )
        if expired:
            await self.record(claimed, {i: self._expired_result(claimed, i, now) for i in pending})
            pending = []
        unreported = [
            (i, r)
            for i, r in sorted(claimed.results.items())
            if r.status is RecipientStatus.FAILED and not r.reported
        ]
        if unreported:
            if self.on_failure is not None:
                await self.on_failure(
                    FailedRecipients(claimed.id, claimed.envelope, claimed.body, unreported)
                )
            await self.record(
                claimed, {i: r.model_copy(update={"reported": True}) for i, r in unreported}
            )
        if unreported:
            _failed.add(len(unreported), {"lane": claimed.lane})
        if not pending:
            await self.ack(claimed)
            _settled.add(1, {"lane": claimed.lane, "outcome": "done"})
            return Settlement("done", failed=len(unreported))
        due = now + self.retry.delay(claimed.attempts + 1)
        await self.defer(claimed, due, self._last_error(claimed, pending))
        _settled.add(1, {"lane": claimed.lane, "outcome": "deferred"})
        return Settlement("deferred", next_attempt=due, failed=len(unreported))

    @staticmethod
    def _every_result(claimed: Claimed) -> list[RecipientResult]:
        """Results for every recipient as this consumer knows them; PENDING for the rest."""
        pending = RecipientResult(status=RecipientStatus.PENDING)
        return [claimed.results.get(i, pending) for i in range(len(claimed.envelope.recipients))]

    def _expired_result(self, claimed: Claimed, index: int, now: datetime) -> RecipientResult:
        last = claimed.results.get(index)
        reason = (
            "retry limit reached"
            if claimed.attempts >= self.retry.max_retries
            else ("message expired in the queue")
        )
        return RecipientResult(
            status=RecipientStatus.FAILED,
            enhanced_code="4.4.7",
            smtp_code=last.smtp_code if last else None,
            diagnostic=f"{reason}; last error: {last.diagnostic}" if last else reason,
            remote_mta=last.remote_mta if last else None,
            at=now,
        )

    @staticmethod
    def _last_error(claimed: Claimed, pending: list[int]) -> str:
        for index in pending:
            result = claimed.results.get(index)
            if result and result.diagnostic:
                return result.diagnostic
        return ""

    async def ack(self, claimed: Claimed) -> None:
        """Remove the message: nothing left to do for any recipient."""
        keys = self.keys(claimed.partition)
        await self._run(
            "FINISH",
            [keys.message(claimed.id), keys.stream(claimed.lane), keys.messages,
             keys.delayed(claimed.lane)],
            [claimed.entry_id, claimed.id],
        )  # fmt: skip

    async def defer(self, claimed: Claimed, due: datetime, error: str = "") -> bool:
        """Out of the stream until `due`. False if someone else settled it first."""
        keys = self.keys(claimed.partition)
        return bool(
            await self._run(
                "DEFER",
                [keys.message(claimed.id), keys.stream(claimed.lane), keys.delayed(claimed.lane)],
                [claimed.entry_id, claimed.id, _ms(due), error[:500]],
            )
        )

    async def move_due(
        self, lane: Lane, partition: int, *, now: datetime | None = None, limit: int = 500
    ) -> int:
        """Return deferred messages whose time has come to the stream; returns how many."""
        keys = self.keys(partition)
        return int(
            await self._run(
                "MOVE_DUE", [keys.delayed(lane), keys.stream(lane)], [_ms(now or utcnow()), limit]
            )
        )

    # --- administration -------------------------------------------------------------------

    async def inspect(self, message_id: str) -> MessageInfo | None:
        keys = self.keys(partition_of(message_id))
        flat = await self._run(
            "PEEK",
            [keys.message(message_id)] + [keys.delayed(lane) for lane in LANES],
            [message_id],
        )
        if flat is None:
            return None
        fields = _pairs(flat)
        due = fields.get("due")
        claimed_by = fields.get("claimed_by")
        state: Literal["queued", "active", "deferred"] = (
            "deferred" if due is not None else "active" if claimed_by else "queued"
        )
        lane: Lane = "local" if fields["lane"] == b"local" else "remote"
        return MessageInfo(
            id=message_id,
            lane=lane,
            state=state,
            envelope=Envelope.model_validate_json(fields["envelope"]),
            size=int(fields["body_size"]),
            attempts=int(fields["attempts"]),
            deliveries=int(fields["deliveries"]),
            results=_results(fields),
            next_attempt=_from_ms(due) if due is not None else None,
            claimed_by=claimed_by.decode() if claimed_by else None,
            last_error=fields["last_error"].decode() if fields.get("last_error") else None,
        )

    async def body(self, message_id: str) -> bytes | None:
        key = self.keys(partition_of(message_id)).message(message_id)
        value: Any = await self.redis.hget(key, "body")
        return bytes(value) if value is not None else None

    async def list_messages(self, limit: int = 100) -> list[MessageInfo]:
        """The oldest `limit` messages across partitions."""
        oldest: list[tuple[float, str]] = []
        for partition in range(self.partitions):
            members: Any = await self.redis.zrange(
                self.keys(partition).messages, 0, limit - 1, withscores=True
            )
            oldest.extend((score, member.decode()) for member, score in members)
        infos = []
        for _, message_id in sorted(oldest)[:limit]:
            info = await self.inspect(message_id)
            if info is not None:
                infos.append(info)
        return infos

    async def retry_now(self, message_id: str) -> bool:
        """Move a deferred message back to the stream; False if it was not deferred."""
        info = await self.inspect(message_id)
        if info is None or info.state != "deferred":
            return False
        keys = self.keys(partition_of(message_id))
        return bool(
            await self._run(
                "RETRY_NOW", [keys.delayed(info.lane), keys.stream(info.lane)], [message_id]
            )
        )

    async def delete(self, message_id: str) -> bool:
        """Remove a message without delivering or bouncing it."""
        keys = self.keys(partition_of(message_id))
        return bool(
            await self._run(
                "DELETE",
                [keys.message(message_id), keys.messages] + [keys.delayed(ln) for ln in LANES],
                [message_id],
            )
        )

    async def stats(self) -> QueueStats:
        total, oldest_ms, lanes = 0, None, []
        for partition in range(self.partitions):
            keys = self.keys(partition)
            total += await self.redis.zcard(keys.messages)
            first = await self.redis.zrange(keys.messages, 0, 0, withscores=True)
            if first:
                oldest_ms = first[0][1] if oldest_ms is None else min(oldest_ms, first[0][1])
            for lane in LANES:
                length = await self.redis.xlen(keys.stream(lane))
                try:
                    pending = (await self.redis.xpending(keys.stream(lane), GROUP))["pending"]
                except ResponseError:  # no group yet: nothing claimed
                    pending = 0
                deferred = await self.redis.zcard(keys.delayed(lane))
                lanes.append(LaneStats(partition, lane, length - pending, pending, deferred))
        return QueueStats(total, _from_ms(oldest_ms) if oldest_ms else None, lanes)
