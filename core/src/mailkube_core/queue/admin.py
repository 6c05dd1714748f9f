"""The queue seen from outside: list, inspect, retry now, delete, count (docs/architecture.md
"Queue", Administration). `mailkube queue list|show|retry|delete|stats` (cli/queue_cmd.py) and
the worker's depth gauge (mailkube_worker/queue_depth.py) use it; producing and consuming
messages is `Queue` (queue/queue.py).

Nothing here is on a hot path: a listing reads the oldest messages one script each.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from ..redis_client import RedisClient
from ..settings import CommonSettings
from . import scripts
from .envelope import LANES, Envelope, Lane, RecipientResult
from .keys import GROUP, PartitionKeys, partition_of
from .queue import Queue, from_ms, message_fields, recipient_results, run_script


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


class QueueAdmin:
    """Looks at and manages the queue's messages, in every partition."""

    def __init__(self, redis: RedisClient, *, prefix: str = "mailkube", partitions: int = 1):
        self.redis = redis
        self.prefix = prefix
        self.partitions = partitions
        self._script: dict[str, AsyncScript] = {
            name: redis.register_script(getattr(scripts, name))
            for name in ("PEEK", "RETRY_NOW", "DELETE")
        }

    @classmethod
    def from_settings(cls, settings: CommonSettings, redis: RedisClient) -> QueueAdmin:
        return cls(redis, prefix=settings.key_prefix, partitions=settings.queue_partitions)

    @classmethod
    def of(cls, queue: Queue) -> QueueAdmin:
        """The administration of `queue`'s messages (its Redis, prefix and partitions)."""
        return cls(queue.redis, prefix=queue.prefix, partitions=queue.partitions)

    def keys(self, partition: int) -> PartitionKeys:
        return PartitionKeys(self.prefix, partition)

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await run_script(self.redis, self._script[name], keys, args)

    async def inspect(self, message_id: str) -> MessageInfo | None:
        """Everything about a message but its body (script PEEK); None if it is not queued."""
        keys = self.keys(partition_of(message_id))
        flat = await self._run(
            "PEEK",
            [keys.message(message_id)] + [keys.delayed(lane) for lane in LANES],
            [message_id],
        )
        if flat is None:
            return None
        fields = message_fields(flat)
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
            results=recipient_results(fields),
            next_attempt=from_ms(due) if due is not None else None,
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
        """Move a deferred message back to the stream; False if it was not deferred. (The
        schedule it skips: queue/retry_schedule.py.)"""
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
        return QueueStats(total, from_ms(oldest_ms) if oldest_ms else None, lanes)
