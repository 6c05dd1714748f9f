"""A mailbox's counters set from its maildir (`mailkube mailbox recount`), exactly, while
deliveries go on.

The walk counts what the worker counts: every file in new/ and cur/ of the maildir and of
each Maildir++ folder (.Junk, .Sent, ...) is one message of its size on disk; tmp/ is not
mail yet. The difficulty is the deliveries that land meanwhile: the counters hear of a copy
some time after its file exists (the queue records it, then the tally relay adds it,
mailkube_core.queue.tally). When the walk ends, some files it saw are not counted yet and will
be, and some copies counted during the walk have files it did not see. So:

1. begin: the mailbox's hash gets `recount` (start time and a token); from then on the relay
   notes in a journal, in the same hash, each copy it counts in (`j:<message id>` -> size).
2. walk the maildir: files, bytes, and the message id of each file Mailkube named
   (mailkube_core.mailbox.delivery_name).
3. in flight: of the files walked, those whose copy is not counted yet. Either the message is
   still queued and its hash has no `c:<mailbox>` marker (stored, not recorded yet: a worker
   is about to record it, or died and its retry will), or the copy is recorded but still in a
   partition's tally, after the mailbox's `applied:q<N>`. Read in that order (markers, tallies,
   applied), a copy moving on meanwhile is never missed: at worst it is taken for in flight
   and then found in the journal.
4. finish, in one script on the mailbox's slot: the counters become the walked files and
   bytes, minus the copies in flight that the journal does not have (their count is still to
   come), plus the copies in the journal the walk did not see (counted while their file
   landed in a directory already walked). The journal and `recount` go. If the journal grew
   since it was read, read it and finish again.

A second recount of the same mailbox started meanwhile makes the first one fail (its token is
gone), as does a walk longer than an hour (the relay stops keeping the journal). Not exact:
files an IMAP client moves between folders during the walk (seen in both, or in neither), and
a stored copy whose record never comes (its message deleted with `mailkube queue delete`, or
expired, before an attempt recorded it): a later recount counts it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from redis.exceptions import NoScriptError

from .mailbox import (
    BYTES_FIELD,
    JOURNAL_PREFIX,
    MESSAGES_FIELD,
    RECOUNT_FIELD,
    RECOUNT_TTL_MS,
    MailboxUsage,
    delivered_message,
    mailbox_dir,
    mailbox_key,
    read_usage,
)
from .queue.keys import PartitionKeys, enqueued_ms, partition_of
from .queue.tally import applied_field, parse_entries
from .redis_client import RedisClient

#: message ids whose time is this much before the oldest queued message may still be queued
#: (the gateway takes the id's time and the queue's score a moment apart)
_CLOCK_SLACK_MS = 1000
_BATCH = 1000

# KEYS[1] mailbox hash. ARGV[1] token. Returns the `recount` value (start ms and token).
BEGIN = f"""
local J, stale = '{JOURNAL_PREFIX}', {{}}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, #J) == J then stale[#stale + 1] = f end
end
for i = 1, #stale, 1000 do
  redis.call('HDEL', KEYS[1], unpack(stale, i, math.min(i + 999, #stale)))
end
local t = redis.call('TIME')
local value = (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) .. ':' .. ARGV[1]
redis.call('HSET', KEYS[1], '{RECOUNT_FIELD}', value)
return value
"""

# KEYS[1] mailbox hash. ARGV[1] the `recount` value, ARGV[2] journal entries read, ARGV[3]
# messages, ARGV[4] bytes (walked, plus the journal's copies the walk did not see), ARGV[5]
# TTL (ms); then per copy in flight: message id, size.
# Returns {messages, bytes}; 0 when the journal grew (read it again); -1 when this recount was
# replaced by another; -2 when it took longer than the TTL.
FINISH = f"""
if redis.call('HGET', KEYS[1], '{RECOUNT_FIELD}') ~= ARGV[1] then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now - tonumber(string.match(ARGV[1], '^(%d+)')) >= tonumber(ARGV[5]) then return -2 end
local J, journal = '{JOURNAL_PREFIX}', {{}}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, #J) == J then journal[#journal + 1] = f end
end
if #journal ~= tonumber(ARGV[2]) then return 0 end
local messages, bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 6, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], J .. ARGV[i]) == 0 then
    messages = messages - 1
    bytes = bytes - tonumber(ARGV[i + 1])
  end
end
redis.call('HSET', KEYS[1], '{MESSAGES_FIELD}', messages, '{BYTES_FIELD}', bytes)
journal[#journal + 1] = '{RECOUNT_FIELD}'
for i = 1, #journal, 1000 do
  redis.call('HDEL', KEYS[1], unpack(journal, i, math.min(i + 999, #journal)))
end
return {{messages, bytes}}
"""


class RecountFailed(Exception):
    """The recount could not finish; the counters were left as they were."""


@dataclass
class Walked:
    """What a maildir holds, counted as the worker counts copies."""

    messages: int = 0
    bytes: int = 0
    #: message id -> file size, for the files Mailkube named
    sizes: dict[str, int] = field(default_factory=dict)


def walk_maildir(box: Path) -> Walked:
    """new/ and cur/ of `box` and of its Maildir++ folders (blocking: run it in a thread).
    A file moved from new/ to cur/ during the walk (an IMAP client read it) counts once: its
    name in cur/ is its name in new/ plus ':2,<flags>' (maildir(5))."""
    walked = Walked()
    try:
        with os.scandir(box) as entries:
            # Maildir++ folders: .Junk, .Sent, .Archive.2026 (flat, dot-separated)
            subfolders = [
                Path(e.path) for e in entries
                if e.name.startswith(".") and e.is_dir(follow_symlinks=False)
            ]  # fmt: skip
    except FileNotFoundError:
        return walked
    for folder in [box, *subfolders]:
        seen: set[str] = set()
        for sub in ("new", "cur"):
            try:
                with os.scandir(folder / sub) as entries:
                    for entry in entries:
                        base = entry.name.split(":", 1)[0]
                        if entry.name.startswith(".") or base in seen:
                            continue
                        try:
                            if not entry.is_file(follow_symlinks=False):
                                continue
                            size = entry.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:  # deleted or moved meanwhile
                            continue
                        seen.add(base)
                        walked.messages += 1
                        walked.bytes += size
                        message_id = delivered_message(entry.name)
                        if message_id is not None:
                            walked.sizes[message_id] = size
            except (FileNotFoundError, NotADirectoryError):
                continue
    return walked


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq)


@dataclass(frozen=True)
class Recounted:
    address: str
    before: MailboxUsage
    after: MailboxUsage


class Recount:
    """One mailbox's recount, step by step (see the module's docstring)."""

    def __init__(
        self, redis: RedisClient, prefix: str, partitions: int, mail_root: Path, address: str
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.partitions = partitions
        self.address = address
        self.box = mail_root / mailbox_dir(address)
        self.key = mailbox_key(prefix, address)
        self.token = ""
        self._begin = redis.register_script(BEGIN)
        self._finish = redis.register_script(FINISH)

    async def run(self, attempts: int = 10) -> Recounted:
        before = await read_usage(self.redis, self.prefix, self.address)
        await self.begin()
        walked = await self.walk()
        in_flight = await self.in_flight(walked)
        for _ in range(attempts):
            after = await self.finish(walked, in_flight)
            if after is not None:
                return Recounted(self.address, before, after)
        raise RecountFailed(f"{self.address}: copies kept arriving while it finished; run again")

    async def begin(self) -> None:
        self.token = (await self._script(self._begin, [secrets.token_hex(8)])).decode()

    async def walk(self) -> Walked:
        return await asyncio.to_thread(walk_maildir, self.box)

    async def in_flight(self, walked: Walked) -> dict[str, int]:
        """Message id -> size of the walked copies not counted yet."""
        unrecorded = await self._unrecorded(walked)
        pending = await self._pending()
        applied: Any = await self.redis.hmget(
            self.key, [applied_field(p) for p in range(self.partitions)]
        )
        in_flight = {mid: walked.sizes[mid] for mid in unrecorded}
        for partition, entry_id, message_id, size in pending:
            last = applied[partition]
            if message_id in walked.sizes and (
                last is None or _stream_id(entry_id) > _stream_id(last.decode())
            ):
                in_flight[message_id] = size
        return in_flight

    async def _unrecorded(self, walked: Walked) -> list[str]:
        """Walked copies whose message is still queued, without this mailbox's marker."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition in range(self.partitions):
                pipe.zrange(PartitionKeys(self.prefix, partition).messages, 0, 0, withscores=True)
            firsts: list[Any] = await pipe.execute()
        scores = [first[0][1] for first in firsts if first]
        if not scores:
            return []
        oldest = min(scores) - _CLOCK_SLACK_MS
        candidates = [
            mid for mid in walked.sizes
            if enqueued_ms(mid) >= oldest and partition_of(mid) < self.partitions
        ]  # fmt: skip
        unrecorded = []
        for start in range(0, len(candidates), _BATCH):
            chunk = candidates[start : start + _BATCH]
            async with self.redis.pipeline(transaction=False) as pipe:
                for mid in chunk:
                    pipe.hmget(PartitionKeys(self.prefix, partition_of(mid)).message(mid),
                               ["lane", f"c:{self.address}"])  # fmt: skip
                replies: list[Any] = await pipe.execute()
            unrecorded += [mid for mid, (lane, marker) in zip(chunk, replies, strict=True)
                           if lane is not None and marker is None]  # fmt: skip
        return unrecorded

    async def _pending(self) -> list[tuple[int, str, str, int]]:
        """(partition, tally entry id, message id, size) of this mailbox's copies in the
        partitions' tallies."""
        found = []
        for partition in range(self.partitions):
            key = PartitionKeys(self.prefix, partition).tally
            start = "-"
            while True:
                raw: Any = await self.redis.xrange(key, min=start, count=_BATCH)
                for entry in parse_entries(raw):
                    found += [(partition, entry.id, c.message_id, c.size)
                              for c in entry.copies if c.mailbox == self.address]  # fmt: skip
                if len(raw) < _BATCH:
                    break
                start = "(" + raw[-1][0].decode()
        return found

    async def journal(self) -> dict[str, int]:
        """Message id -> size of the copies counted in since `begin`."""
        fields: Any = await self.redis.hgetall(self.key)
        return {name.decode()[len(JOURNAL_PREFIX) :]: int(value)
                for name, value in fields.items()
                if name.startswith(JOURNAL_PREFIX.encode())}  # fmt: skip

    async def finish(
        self, walked: Walked, in_flight: dict[str, int], counted: dict[str, int] | None = None
    ) -> MailboxUsage | None:
        """Set the counters, given the journal as read now (or `counted`); None if the journal
        has grown since (call again)."""
        if counted is None:
            counted = await self.journal()
        unseen = [size for mid, size in counted.items() if mid not in walked.sizes]
        args: list[Any] = [self.token, len(counted), walked.messages + len(unseen),
                           walked.bytes + sum(unseen), RECOUNT_TTL_MS]  # fmt: skip
        for mid, size in in_flight.items():
            args += [mid, size]
        reply = await self._script(self._finish, args)
        if reply == 0:
            return None
        if reply == -1:
            raise RecountFailed(f"{self.address}: another recount of this mailbox started")
        if reply == -2:
            raise RecountFailed(f"{self.address}: the recount took longer than an hour")
        return MailboxUsage(int(reply[0]), int(reply[1]))

    async def _script(self, script: Any, args: list[Any]) -> Any:
        try:
            return await self.redis.evalsha(script.sha, 1, self.key, *args)
        except NoScriptError:
            script.sha = await self.redis.script_load(script.script)
            return await self.redis.evalsha(script.sha, 1, self.key, *args)


def maildirs(mail_root: Path) -> list[str]:
    """Addresses of the maildirs under `mail_root` (<domain>/<local part>/ holding new/ or
    cur/), local parts decoded as mailbox_dir encodes them."""
    found = []
    try:
        domains = sorted(p for p in mail_root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    for domain in domains:
        for box in sorted(p for p in domain.iterdir() if p.is_dir()):
            if (box / "new").is_dir() or (box / "cur").is_dir():
                found.append(f"{unquote(box.name)}@{domain.name}")
    return found
