"""What deliveries count, carried from the queue's partitions to the counters exactly once.

The queue records a delivery in one script on its partition's hash tag, and the same script
appends what the delivery counts to the partition's tally stream `{P:qN}:tally` (one entry per
script call, its items a JSON list). An item is appended only when its marker is new in the
message's hash, so a delivery recorded twice (a retry after a crash, two consumers racing on a
reclaimed entry) counts once:

- a copy stored in a mailbox (marker `c:<mailbox>`): one message and its bytes for
  `P:mailbox:<address>` (mailkube_core.mailbox), and one event in `P:events:message.received`;
- a recipient's outcome (marker `t:<index>`): one `delivered` or `bounced` for
  `<sender domain>:<outcome>` in `P:outcomes:<day>` (mailkube_core.queue.outcomes); a
  deferral counts once per attempt, by the consumer whose ack of the attempt lands.

The counters live on other hash tags (other Redis Cluster slots), so the recording script
cannot write them. The relay carries them over: it reads a partition's tally from its oldest
entry, adds the items to each counter key in one script per key, and trims what it read only
after every key has it. Each counter key remembers the last tally entry of each partition it
has counted in (`applied:q<N>`, in the key itself or, for the event stream, in a hash on the
stream's slot), so an entry carried twice (two relays at once, or a relay that died between
adding and trimming) counts once; entries are read in order and trimmed only once counted, so
no counter skips one. Any number of workers may run the relay at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from ..mailbox import (
    BYTES_FIELD,
    JOURNAL_PREFIX,
    MESSAGES_FIELD,
    RECOUNT_FIELD,
    RECOUNT_TTL_MS,
    mailbox_key,
)
from ..redis_client import RedisClient
from .keys import PartitionKeys
from .outcomes import KEEP, outcomes_key
from .scripts import AFTER

log = logging.getLogger(__name__)

#: the event stream's name under the prefix
RECEIVED = "message.received"


def events_key(prefix: str) -> str:
    """`P:events:message.received`: one entry per copy stored in a mailbox."""
    return f"{prefix}:events:{RECEIVED}"


def events_applied_key(prefix: str) -> str:
    """The last tally entry of each partition in the event stream. Its hash tag is the
    stream's whole name, the same slot as the stream on Redis Cluster (the prefix has no
    braces)."""
    return "{" + events_key(prefix) + "}:applied"


def applied_field(partition: int) -> str:
    return f"applied:q{partition}"


def _compact(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class MailboxCopy:
    """A message stored in a mailbox: what it counts, and the event that tells of it."""

    mailbox: str
    message_id: str
    size: int
    folder: str | None  # None: the inbox
    received_at: datetime

    @property
    def marker(self) -> str:
        return f"c:{self.mailbox}"

    def item(self) -> str:
        return _compact({
            "mailbox": self.mailbox, "message_id": self.message_id, "size": self.size,
            "folder": self.folder or "INBOX", "time": self.time_ms,
        })  # fmt: skip

    @property
    def time_ms(self) -> int:
        return int(self.received_at.timestamp() * 1000)

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> MailboxCopy:
        folder = str(item["folder"])
        return cls(str(item["mailbox"]), str(item["message_id"]), int(item["size"]),
                   None if folder == "INBOX" else folder,
                   datetime.fromtimestamp(int(item["time"]) / 1000, UTC))  # fmt: skip


@dataclass(frozen=True)
class OutcomeCount:
    """Recipients of one message with one outcome (delivered, deferred, bounced) that day."""

    day: date
    sender_domain: str
    outcome: str
    recipients: int = 1

    @property
    def field(self) -> str:
        return f"{self.sender_domain or '<>'}:{self.outcome}"

    def item(self) -> str:
        return _compact({"outcome": self.outcome, "domain": self.sender_domain,
                         "day": self.day.isoformat(), "n": self.recipients})  # fmt: skip

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> OutcomeCount:
        return cls(date.fromisoformat(item["day"]), str(item["domain"]), str(item["outcome"]),
                   int(item["n"]))  # fmt: skip


@dataclass(frozen=True)
class TallyEntry:
    id: str
    copies: list[MailboxCopy]
    outcomes: list[OutcomeCount]


def parse_entries(raw: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> list[TallyEntry]:
    """XRANGE's reply as entries. What is not ours to read counts nothing, and is logged."""
    entries = []
    for entry_id, fields in raw:
        entry = TallyEntry(entry_id.decode(), [], [])
        try:
            items = json.loads(fields[b"items"])
            if not isinstance(items, list):
                raise TypeError("not a list")
        except (KeyError, TypeError, ValueError) as exc:
            log.error("unreadable tally entry", extra={"entry": entry.id, "error": str(exc)})
            items = []
        for item in items:
            try:
                if "mailbox" in item:
                    entry.copies.append(MailboxCopy.from_item(item))
                else:
                    entry.outcomes.append(OutcomeCount.from_item(item))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("unreadable tally item",
                          extra={"entry": entry.id, "item": item, "error": str(exc)})  # fmt: skip
        entries.append(entry)
    return entries


# KEYS[1] mailbox hash. ARGV[1] applied field, ARGV[2] recount TTL (ms); then per copy: tally
# entry id, message id, size (entry ids ascending). While a recount runs, each copy counted in
# is noted in its journal (mailkube_core.recount).
APPLY_COPIES = (
    AFTER
    + f"""
local seen = redis.call('HGET', KEYS[1], ARGV[1])
local journal = false
local recount = redis.call('HGET', KEYS[1], '{RECOUNT_FIELD}')
if recount then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  journal = now - tonumber(string.match(recount, '^(%d+)')) < tonumber(ARGV[2])
end
local n, size, last = 0, 0, false
for i = 3, #ARGV, 3 do
  if after(ARGV[i], seen) then
    n = n + 1
    size = size + tonumber(ARGV[i + 2])
    last = ARGV[i]
    if journal then redis.call('HSET', KEYS[1], '{JOURNAL_PREFIX}' .. ARGV[i + 1], ARGV[i + 2]) end
  end
end
if last then
  redis.call('HINCRBY', KEYS[1], '{MESSAGES_FIELD}', n)
  redis.call('HINCRBY', KEYS[1], '{BYTES_FIELD}', size)
  redis.call('HSET', KEYS[1], ARGV[1], last)
end
return n
"""
)

# KEYS[1] event stream, KEYS[2] its applied hash. ARGV[1] applied field, ARGV[2] MAXLEN ~;
# then per event: tally entry id, mailbox, message id, size, folder, time (ms).
APPLY_EVENTS = (
    AFTER
    + """
local seen = redis.call('HGET', KEYS[2], ARGV[1])
local n, last = 0, false
for i = 3, #ARGV, 6 do
  if after(ARGV[i], seen) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'mailbox', ARGV[i + 1],
               'message_id', ARGV[i + 2], 'size', ARGV[i + 3], 'folder', ARGV[i + 4],
               'time', ARGV[i + 5])
    n = n + 1
    last = ARGV[i]
  end
end
if last then redis.call('HSET', KEYS[2], ARGV[1], last) end
return n
"""
)

# KEYS[1] a day's outcomes hash. ARGV[1] applied field, ARGV[2] seconds to keep it; then per
# outcome: tally entry id, field, recipients.
APPLY_OUTCOMES = (
    AFTER
    + """
local seen = redis.call('HGET', KEYS[1], ARGV[1])
local last = false
for i = 3, #ARGV, 3 do
  if after(ARGV[i], seen) then
    redis.call('HINCRBY', KEYS[1], ARGV[i + 1], ARGV[i + 2])
    last = ARGV[i]
  end
end
if last then
  redis.call('HSET', KEYS[1], ARGV[1], last)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)

_Call = tuple[AsyncScript, list[str], list[Any]]
#: scripts in flight at once on a Redis Cluster (its client fails past max_connections a node)
_CLUSTER_AT_ONCE = 16


class TallyRelay:
    """Carries every partition's tally to the counters (see the module's docstring)."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        partitions: int,
        *,
        events_max_length: int = 100000,
        batch: int = 1000,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.partitions = partitions
        self.events_max_length = events_max_length
        self.batch = batch
        self._copies = redis.register_script(APPLY_COPIES)
        self._events = redis.register_script(APPLY_EVENTS)
        self._outcomes = redis.register_script(APPLY_OUTCOMES)

    def tally_key(self, partition: int) -> str:
        return PartitionKeys(self.prefix, partition).tally

    async def relay(self) -> int:
        """One pass over every partition until each tally is empty (or holds only entries
        added meanwhile); returns the entries carried. A Redis error ends the pass: what was
        not trimmed is carried by the next one, and counted once."""
        carried = 0
        partitions = list(range(self.partitions))
        while partitions:
            async with self.redis.pipeline(transaction=False) as pipe:
                for partition in partitions:
                    pipe.xrange(self.tally_key(partition), count=self.batch)
                replies: list[Any] = await pipe.execute()
            calls: list[_Call] = []
            trims: list[tuple[int, str]] = []
            full = []
            for partition, raw in zip(partitions, replies, strict=True):
                if not raw:
                    continue
                entries = parse_entries(raw)
                calls += self._applications(partition, entries)
                trims.append((partition, entries[-1].id))
                carried += len(entries)
                if len(entries) >= self.batch:
                    full.append(partition)
            if not trims:
                break
            await self._evaluate(calls)
            async with self.redis.pipeline(transaction=False) as pipe:
                for partition, last in trims:
                    ms, _, seq = last.partition("-")
                    pipe.xtrim(self.tally_key(partition), minid=f"{ms}-{int(seq) + 1}",
                               approximate=False)  # fmt: skip
                await pipe.execute()
            partitions = full
        return carried

    def _applications(self, partition: int, entries: list[TallyEntry]) -> list[_Call]:
        copies: dict[str, list[Any]] = defaultdict(list)
        events: list[Any] = []
        outcomes: dict[date, list[Any]] = defaultdict(list)
        for entry in entries:
            for copy in entry.copies:
                copies[copy.mailbox] += [entry.id, copy.message_id, copy.size]
                events += [entry.id, copy.mailbox, copy.message_id, copy.size,
                           copy.folder or "INBOX", copy.time_ms]  # fmt: skip
            for count in entry.outcomes:
                outcomes[count.day] += [entry.id, count.field, count.recipients]
        field = applied_field(partition)
        calls: list[_Call] = [
            (self._copies, [mailbox_key(self.prefix, mailbox)], [field, RECOUNT_TTL_MS, *args])
            for mailbox, args in copies.items()
        ]
        if events:
            calls.append((self._events,
                          [events_key(self.prefix), events_applied_key(self.prefix)],
                          [field, self.events_max_length, *events]))  # fmt: skip
        keep = int(KEEP.total_seconds())
        for day, args in outcomes.items():
            calls.append((self._outcomes, [outcomes_key(self.prefix, day)], [field, keep, *args]))
        return calls

    async def _evaluate(self, calls: list[_Call]) -> None:
        """All the scripts, in one pipeline on a standalone Redis (one round trip); on a
        Cluster, whose pipelines take no scripts, a few at a time on each node's connections.
        If Redis has forgotten the scripts (a restart, SCRIPT FLUSH), load them and run the
        whole batch again: it counts nothing twice."""
        for attempt in (1, 2):
            try:
                if isinstance(self.redis, RedisCluster):
                    for start in range(0, len(calls), _CLUSTER_AT_ONCE):
                        await asyncio.gather(*(
                            self.redis.evalsha(script.sha, len(keys), *keys, *args)
                            for script, keys, args in calls[start : start + _CLUSTER_AT_ONCE]
                        ))  # fmt: skip
                else:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for script, keys, args in calls:
                            pipe.evalsha(script.sha, len(keys), *keys, *args)
                        await pipe.execute()
                return
            except NoScriptError:
                if attempt == 2:
                    raise
                for script in (self._copies, self._events, self._outcomes):
                    script.sha = await self.redis.script_load(script.script)
