"""The durable delivery queue on Redis Streams (docs/architecture.md "Queue").

A message is a hash (envelope, body, per-recipient results) plus an entry in its lane's stream
while it waits for a worker, or a member of its lane's delayed set while it waits for a retry.
The gateway calls `enqueue`; workers `claim`, `record` each recipient's outcome and `settle`
(a retry's schedule: queue/retry_schedule.py); the CLI lists, inspects, retries and deletes
through `QueueAdmin` (queue/admin.py). Recording and deferring also count the delivery
(mailbox copies, outcomes) in the partition's tally, which `TallyRelay` carries to the counters.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from opentelemetry import metrics
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from ..redis_client import RedisClient
from ..redis_multiplexed import transaction
from ..settings import CommonSettings, GatewaySettings, WorkerSettings
from ..telemetry.tally import Tally
from . import scripts
from .envelope import LANES, Envelope, Lane, RecipientResult, RecipientStatus, utcnow
from .keys import GROUP, PartitionKeys, new_message_id
from .outcomes import sender_domain
from .replicas import enqueue_acknowledged
from .retry_schedule import RetryPolicy
from .tally import MailboxCopy, OutcomeCount

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
class Forward:
    """A new message for the remote lane that delivering recipient `index` made (forward_to
    a remote address), queued by the script that records that delivery."""

    index: int
    envelope: Envelope
    body: bytes


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


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(value: float | bytes | str) -> datetime:
    """A time Redis holds in milliseconds (a sorted set's score, a hash field)."""
    return datetime.fromtimestamp(float(value) / 1000, UTC)


def message_fields(flat: Sequence[bytes]) -> dict[str, bytes]:
    """A message hash's fields from HGETALL's flat reply (or a script's, as PEEK's)."""
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


def hash_fields(reply: Sequence[bytes] | Mapping[bytes, bytes]) -> dict[str, bytes]:
    """A message hash's fields from HGETALL: redis-py's dict, or a flat list as Redis sends it
    (a MultiplexedRedis transaction)."""
    if isinstance(reply, Mapping):
        return {name.decode(): value for name, value in reply.items()}
    return message_fields(reply)


def recipient_results(fields: Mapping[str, bytes]) -> dict[int, RecipientResult]:
    """The recipients' recorded outcomes (`r:<index>` fields), by recipient index."""
    return {
        int(name[2:]): RecipientResult.model_validate_json(value)
        for name, value in fields.items()
        if name.startswith("r:")
    }


async def run_script(
    redis: RedisClient, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
) -> Any:
    """EVALSHA as AsyncScript sends it, without its per-call checks (the enqueue hot path),
    loading the script again when Redis does not know it (a restart, a failover)."""
    try:
        return await redis.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        script.sha = await redis.script_load(script.script)
        return await redis.evalsha(script.sha, len(keys), *keys, *args)


class Queue:
    """The producer (`enqueue`, the gateway) and the consumer (`claim`, `record`, `settle`,
    `defer`, `move_due`: the worker). Looking at and managing the queue from outside (the CLI,
    the worker's depth gauge) is `QueueAdmin` (queue/admin.py)."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "mailkube",
        partitions: int = 1,
        retry: RetryPolicy | None = None,
        on_failure: FailureHook | None = None,
        replicas: int = 0,
        replica_timeout: timedelta = timedelta(seconds=2.5),
    ) -> None:
        if replicas and isinstance(redis, RedisCluster):
            raise ValueError("enqueue_replicas (Redis WAIT) is not supported on Redis Cluster")
        self.redis = redis
        self.prefix = prefix
        self.partitions = partitions
        self.retry = retry or RetryPolicy()
        self.on_failure = on_failure
        self.replicas = replicas
        self.replica_timeout = replica_timeout
        self._script: dict[str, AsyncScript] = {
            name: redis.register_script(getattr(scripts, name))
            for name in (
                "DROP_ENTRY", "EXTEND", "RECORD", "FINISH",
                "FINISH_DELIVERED", "DEFER", "MOVE_DUE", "PEEK",
            )
        }  # fmt: skip

    @classmethod
    def from_settings(
        cls, settings: CommonSettings, redis: RedisClient, on_failure: FailureHook | None = None
    ) -> Queue:
        retry = None
        replicas: dict[str, Any] = {}
        if isinstance(settings, GatewaySettings) and settings.enqueue_replicas:
            replicas = {
                "replicas": settings.enqueue_replicas,
                "replica_timeout": settings.replica_ack_timeout(),
            }
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
            **replicas,
        )

    def keys(self, partition: int) -> PartitionKeys:
        return PartitionKeys(self.prefix, partition)

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await run_script(self.redis, self._script[name], keys, args)

    # --- producer -------------------------------------------------------------------------

    async def enqueue(
        self, envelope: Envelope, body: bytes, *, is_local: Callable[[str], bool]
    ) -> list[str]:
        """Queue a message atomically: one message per lane its recipients need (local
        mailboxes, remote hosts), all in one transaction (MULTI/EXEC). Durable when it
        returns, given Redis runs with `appendfsync always` (and `replicas` replicas
        acknowledged it, if set). Returns the message ids.

        Plain commands, not a script: a script's arguments become Lua strings, which Redis
        hashes byte by byte, so a 100 KiB body cost Redis ~0.2 ms more per message (bench:
        253 against 57 µs). On the gateway's client (redis_multiplexed.multiplexed) the
        transaction goes down the process's shared connection with the sessions' other
        hot-path commands. With `replicas`, it and its WAIT go down a pooled connection of
        their own (queue/replicas.py): a WAIT there would hold up every session's commands."""
        by_lane: dict[Lane, list[int]] = {}
        for index, recipient in enumerate(envelope.recipients):
            lane: Lane = "local" if is_local(recipient.address) else "remote"
            by_lane.setdefault(lane, []).append(index)
        partition = random.randrange(self.partitions)  # noqa: S311
        keys = self.keys(partition)
        now = _ms(utcnow())
        commands: list[tuple[Any, ...]] = []
        ids = []
        for lane, indexes in by_lane.items():
            part = envelope
            if len(by_lane) > 1:
                part = envelope.model_copy(
                    update={"recipients": [envelope.recipients[i] for i in indexes]}
                )
            message_id = new_message_id(partition)
            ids.append(message_id)
            commands += [
                ("HSET", keys.message(message_id), "envelope", part.model_dump_json(),
                 "body", body, "lane", lane, "attempts", 0, "deliveries", 0),
                ("ZADD", keys.messages, now, message_id),
                ("XADD", keys.stream(lane), "*", "id", message_id),
            ]  # fmt: skip
        if self.replicas and isinstance(self.redis, Redis):
            # a RedisError like any other outage when too few acknowledge: the gateway
            # answers 451 (the primary's copy may then be delivered too: at-least-once)
            await enqueue_acknowledged(
                self.redis,
                commands,
                replicas=self.replicas,
                timeout_ms=max(1, int(self.replica_timeout.total_seconds() * 1000)),
            )
        else:
            await transaction(self.redis, commands)
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

    async def reclaim_own(
        self,
        consumer: str,
        lane: Lane,
        partition: int,
        *,
        exclude: Collection[bytes] = (),
        count: int = 100,
        min_idle: timedelta = timedelta(0),
    ) -> list[Claimed]:
        """Claim again entries `consumer` already holds, but for the entry ids in `exclude`
        (those its handlers hold) and those claimed less than `min_idle` ago: a claim whose
        reply never reached it. Up to `count`."""
        stream = self.keys(partition).stream(lane)
        idle = int(min_idle.total_seconds() * 1000)
        try:
            pending: Any = await self.redis.xpending_range(
                stream, GROUP, min="-", max="+", count=count + len(exclude),
                consumername=consumer, idle=idle or None,
            )  # fmt: skip
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return []
        ids = [p["message_id"] for p in pending if p["message_id"] not in exclude][:count]
        if not ids:
            return []
        reply: Any = await self.redis.xclaim(stream, GROUP, consumer, idle, ids)
        entries = [item for item in reply if item[1] is not None]
        return await self._load(consumer, lane, partition, entries)

    async def holds_others(
        self, consumer: str, lane: Lane, partition: int, exclude: Collection[bytes]
    ) -> bool:
        """Whether `consumer` holds entries besides those in `exclude`, however recent."""
        stream = self.keys(partition).stream(lane)
        try:
            pending: Any = await self.redis.xpending_range(
                stream, GROUP, min="-", max="+", count=len(exclude) + 1, consumername=consumer
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return False
        return any(p["message_id"] not in exclude for p in pending)

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
        hashes = [keys.message(i) for i in ids]
        # the marks by script (only on messages still there), the messages by HGETALL, all in
        # one transaction: a body read inside Lua would be hashed there byte by byte. EVAL, not
        # EVALSHA: inside MULTI a NOSCRIPT would come only after the reads had run.
        _marked, *loaded = await transaction(
            self.redis,
            [("EVAL", scripts.LOAD_CLAIMED, len(hashes), *hashes, consumer, _ms(utcnow())),
             *(("HGETALL", key) for key in hashes)],
        )  # fmt: skip
        for (entry_id, _), message_id, found in zip(entries, ids, loaded, strict=True):
            if not found:  # deleted from the CLI: drop its leftover stream entry
                await self._run("DROP_ENTRY", [keys.stream(lane)], [entry_id])
                continue
            fields = hash_fields(found)
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
                    results=recipient_results(fields),
                )
            )
        return claimed

    async def extend(self, claimed: Claimed) -> bool:
        """Reset the claim's idle time; False if another consumer has taken it over."""
        stream = self.keys(claimed.partition).stream(claimed.lane)
        return bool(await self._run("EXTEND", [stream], [claimed.entry_id, claimed.consumer]))

    async def record(
        self,
        claimed: Claimed,
        results: Mapping[int, RecipientResult],
        copies: Sequence[MailboxCopy] = (),
        forwards: Sequence[Forward] = (),
    ) -> bool:
        """Store recipients' outcomes now, so a crash before `settle` does not deliver to them
        again, and count them in the same script (queue/tally.py): the copies stored in
        mailboxes, recipients delivered, failures once reported. Recording a result or a copy
        again counts nothing more. `forwards`: new messages for the remote lane that delivering
        these recipients made, queued in the same script, each once however often recorded.
        False if the message was deleted meanwhile."""
        if not results and not copies and not forwards:
            return True
        claimed.results.update(results)
        fields: list[str] = []
        tallies: list[str] = []
        day, domain = utcnow().date(), sender_domain(claimed.envelope.mail_from)
        for index, result in results.items():
            fields += [f"r:{index}", result.model_dump_json()]
            if result.status is RecipientStatus.DELIVERED:
                tallies += [f"t:{index}", OutcomeCount(day, domain, "delivered").item()]
            elif result.status is RecipientStatus.FAILED and result.reported:
                tallies += [f"t:{index}", OutcomeCount(day, domain, "bounced").item()]
        for copy in copies:
            tallies += [copy.marker, copy.item()]
        keys = self.keys(claimed.partition)
        script_keys = [keys.message(claimed.id), keys.tally, keys.messages, keys.stream("remote")]
        args: list[Any] = [len(results), len(tallies) // 2, len(forwards), _ms(utcnow())]
        args += fields + tallies
        for forward in forwards:
            message_id = new_message_id(claimed.partition)
            script_keys.append(keys.message(message_id))
            args += [f"f:{forward.index}", message_id, forward.envelope.model_dump_json(),
                     forward.body]  # fmt: skip
        found = int(await self._run("RECORD", script_keys, args))
        if found > 1:
            _enqueued.add(found - 1, {"lane": "remote"})
        return found > 0

    async def finish_delivered(
        self,
        batch: Sequence[tuple[Claimed, Sequence[int], Sequence[MailboxCopy]]],
        forwards: Mapping[str, Sequence[Forward]] | None = None,
    ) -> int:
        """Record and settle, in one round trip, claims of one partition and lane whose every
        pending recipient was delivered now (`indexes`, with the mailbox `copies` stored for
        them): what `record` then `settle` would do, without storing the results, since the
        message is removed in the same script. Counts as `record` does (once per marker,
        whatever an earlier attempt already counted). `forwards` (by claim id): new messages
        for the remote lane a delivery made, queued in the same script, and only if their
        claim's message is still there (so exactly once). Returns how many were still queued."""
        if not batch:
            return 0
        forwards = forwards or {}
        first = batch[0][0]
        keys = self.keys(first.partition)
        script_keys = [keys.tally, keys.messages, keys.stream(first.lane),
                       keys.delayed(first.lane), keys.stream("remote")]  # fmt: skip
        new_keys: list[str] = []
        args: list[Any] = [len(batch), _ms(utcnow())]
        day = utcnow().date()
        queued = 0
        for claimed, indexes, copies in batch:
            assert (claimed.partition, claimed.lane) == (first.partition, first.lane)
            script_keys.append(keys.message(claimed.id))
            delivered = OutcomeCount(day, sender_domain(claimed.envelope.mail_from), "delivered")
            item = delivered.item()
            new = forwards.get(claimed.id, ())
            args += [claimed.entry_id, claimed.id, len(indexes) + len(copies), len(new)]
            for index in indexes:
                args += [f"t:{index}", item]
            for copy in copies:
                args += [copy.marker, copy.item()]
            for forward in new:
                message_id = new_message_id(first.partition)
                new_keys.append(keys.message(message_id))
                args += [message_id, forward.envelope.model_dump_json(), forward.body]
            queued += len(new)
        found = int(await self._run("FINISH_DELIVERED", script_keys + new_keys, args))
        _settled.add(len(batch), {"lane": first.lane, "outcome": "done"})
        if queued:
            _enqueued.add(queued, {"lane": "remote"})
        return found

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
        claimed.results = recipient_results(message_fields(flat))
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
        """Out of the stream until `due`, its pending recipients counted as deferred once.
        False if someone else settled it first."""
        keys = self.keys(claimed.partition)
        deferred = OutcomeCount(utcnow().date(), sender_domain(claimed.envelope.mail_from),
                                "deferred", len(claimed.pending()))  # fmt: skip
        return bool(
            await self._run(
                "DEFER",
                [keys.message(claimed.id), keys.stream(claimed.lane), keys.delayed(claimed.lane),
                 keys.tally],
                [claimed.entry_id, claimed.id, _ms(due), error[:500], deferred.item()],
            )
        )  # fmt: skip

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
