"""The routing table in Redis, one entry per domain: a writer changes the domains that changed
(and drops the deleted ones) atomically with a new version and a change notification; readers
keep a snapshot in memory and fetch only the domains whose version moved.

Keys (one hash tag, so the scripts are atomic on Redis Cluster too):
  {<prefix>:routing}:version          an integer, +1 per write
  {<prefix>:routing}:domains          hash: domain -> DomainEntry JSON (the domain, its users)
  {<prefix>:routing}:domain_versions  hash: domain -> the version that last wrote its entry
  {<prefix>:routing}:globals          TableGlobals JSON (tls_policies, the domains' order);
                                      written by every write: it marks this layout
  <prefix>:routing:changed            pub/sub channel; the message is the new version
  {<prefix>:routing}:table            the whole table as JSON: the layout before this one
                                      (read when :globals is missing; never written)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from ..redis_client import RedisClient
from .models import DomainEntry, RoutingTable, TableGlobals, join_table, split_table
from .snapshot import RoutingSnapshot

log = logging.getLogger(__name__)

# KEYS[1] version, KEYS[2] domains, KEYS[3] domain_versions, KEYS[4] globals.
# ARGV[1] expected version or '', ARGV[2] channel, ARGV[3] globals JSON, ARGV[4] n changed,
# then n (domain, entry JSON) pairs, then the deleted domains.
# Returns {new version, 1}, or {current version, 0} on a version conflict.
_APPLY = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= current then return {current, 0} end
local version = current + 1
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[2], ARGV[5 + 2 * i], ARGV[6 + 2 * i])
  redis.call('HSET', KEYS[3], ARGV[5 + 2 * i], version)
end
for i = 5 + 2 * n, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
redis.call('SET', KEYS[4], ARGV[3])
redis.call('SET', KEYS[1], version)
redis.call('PUBLISH', ARGV[2], version)
return {version, 1}
"""

# KEYS[1] version, KEYS[2] domain_versions, KEYS[3] globals, KEYS[4] the old table key.
# Returns {version, globals JSON or '', [domain, version, ...], whether the old table exists}.
_STATE = """
local globals = redis.call('GET', KEYS[3])
return {redis.call('GET', KEYS[1]) or '0', globals or '', redis.call('HGETALL', KEYS[2]),
        (not globals) and redis.call('EXISTS', KEYS[4]) or 0}
"""

# KEYS[1] version, KEYS[2] domains, KEYS[3] globals. ARGV[1] the version the caller saw,
# ARGV[2..] domains. Returns {version, 1, globals JSON, [entry JSON or false, ...]}, or
# {version, 0} when the version moved since (the caller reads the state again).
_FETCH = """
local version = redis.call('GET', KEYS[1]) or '0'
if version ~= ARGV[1] then return {version, 0} end
local entries = {}
if #ARGV > 1 then entries = redis.call('HMGET', KEYS[2], unpack(ARGV, 2)) end
return {version, 1, redis.call('GET', KEYS[3]) or '', entries}
"""

# KEYS[1] version, KEYS[2] domains, KEYS[3] globals: everything, in one consistent read.
_LOAD = """
return {redis.call('GET', KEYS[1]) or '0', redis.call('GET', KEYS[3]) or '',
        redis.call('HGETALL', KEYS[2])}
"""

# KEYS[1] the old table key, KEYS[2] version: the layout before this one.
_LOAD_OLD = "return {redis.call('GET', KEYS[2]) or '0', redis.call('GET', KEYS[1]) or ''}"

#: domains per HMGET script call: a fetch of thousands is cut into calls of this many
FETCH_BATCH = 500
#: a reload that sees the version move under it this many times in a row gives up until the
#: next notification or check
RELOAD_ATTEMPTS = 5


class VersionConflict(Exception):
    """Someone else wrote the table since the version the writer started from."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class StoredTable:
    """The table as stored: its version, each domain's entry JSON, the globals JSON ('' when
    nothing is stored in this layout)."""

    version: int
    entries: dict[str, str]
    globals: str


@dataclass(frozen=True)
class TableState:
    """What a reader checks first: the version, each domain's version, the globals JSON
    ('' if none), and whether only the old single-key table is there."""

    version: int
    domain_versions: dict[str, int]
    globals: str
    old_layout: bool


class RoutingStore:
    def __init__(self, redis: RedisClient, prefix: str = "mailkube") -> None:
        self.redis = redis
        tag = f"{{{prefix}:routing}}"
        self.version_key = f"{tag}:version"
        self.domains_key = f"{tag}:domains"
        self.domain_versions_key = f"{tag}:domain_versions"
        self.globals_key = f"{tag}:globals"
        #: the layout before per-domain entries (read only, as a fallback)
        self.table_key = f"{tag}:table"
        self.channel = f"{prefix}:routing:changed"
        self._apply = redis.register_script(_APPLY)
        self._state = redis.register_script(_STATE)
        self._fetch = redis.register_script(_FETCH)
        self._load = redis.register_script(_LOAD)
        self._load_old = redis.register_script(_LOAD_OLD)

    # -- writing --------------------------------------------------------------------------

    async def apply(
        self,
        changed: Mapping[str, str],
        deleted: Iterable[str],
        globals_json: str,
        *,
        expected_version: int | None = None,
    ) -> int:
        """Write the entries of the domains that changed (domain -> DomainEntry JSON), drop
        the deleted ones, set the globals: one new version; returns it. With
        `expected_version`, raise VersionConflict instead of writing over a newer table."""
        expected = "" if expected_version is None else str(expected_version)
        args: list[str | int] = [expected, self.channel, globals_json, len(changed)]
        for name, document in changed.items():
            args += [name, document]
        args += list(deleted)
        version, done = await self._apply(
            keys=[self.version_key, self.domains_key, self.domain_versions_key,
                  self.globals_key],
            args=args,
        )  # fmt: skip
        if not done:
            raise VersionConflict(f"routing table is at version {version}, not {expected}")
        return int(version)

    async def replace_entries(
        self,
        entries: Mapping[str, str],
        globals_json: str,
        *,
        expected_version: int | None = None,
    ) -> tuple[int, int]:
        """Make the stored table these entries (domain -> DomainEntry JSON) and globals,
        writing only the domains whose entry differs from the stored one and dropping the
        others; (the new version, how many domains were written or dropped)."""
        while True:
            stored = await self.stored()
            if expected_version is not None and stored.version != expected_version:
                raise VersionConflict(
                    f"routing table is at version {stored.version}, not {expected_version}"
                )
            changed = {n: doc for n, doc in entries.items() if stored.entries.get(n) != doc}
            deleted = [name for name in stored.entries if name not in entries]
            try:
                version = await self.apply(
                    changed, deleted, globals_json, expected_version=stored.version
                )
            except VersionConflict:
                if expected_version is not None:
                    raise
                continue  # another writer in between: diff against its table
            return version, len(changed) + len(deleted)

    async def replace(self, table: RoutingTable, *, expected_version: int | None = None) -> int:
        """Publish a whole table (the CLI's way): only the domains that differ from the
        stored ones are written. Returns the new version; with `expected_version`, raise
        VersionConflict instead of overwriting a newer table."""
        entries, globals_ = split_table(table)
        version, _ = await self.replace_entries(
            {name: entry.model_dump_json() for name, entry in entries.items()},
            globals_.model_dump_json(),
            expected_version=expected_version,
        )
        return version

    # -- reading --------------------------------------------------------------------------

    async def version(self) -> int:
        return int(await self.redis.get(self.version_key) or 0)

    async def stored(self) -> StoredTable:
        """Every entry as stored (JSON, not parsed), in one consistent read."""
        version, globals_json, flat = await self._load(
            keys=[self.version_key, self.domains_key, self.globals_key]
        )
        entries = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        return StoredTable(int(version), entries, _text(globals_json))

    async def state(self) -> TableState:
        version, globals_json, flat, old = await self._state(
            keys=[self.version_key, self.domain_versions_key, self.globals_key, self.table_key]
        )
        versions = {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return TableState(int(version), versions, _text(globals_json), bool(old))

    async def fetch(self, version: int, names: list[str]) -> tuple[str, list[str | None]] | None:
        """The globals JSON and the entries of `names` as they are at `version`; None if the
        version has moved since."""
        documents: list[str | None] = []
        globals_json = ""
        for start in range(0, max(len(names), 1), FETCH_BATCH):
            batch = names[start : start + FETCH_BATCH]
            answer = await self._fetch(
                keys=[self.version_key, self.domains_key, self.globals_key],
                args=[str(version), *batch],
            )
            if not int(answer[1]):
                return None
            globals_json = _text(answer[2])
            documents += [None if d is None else _text(d) for d in answer[3]]
        return globals_json, documents

    async def load_old_layout(self) -> RoutingSnapshot:
        version, data = await self._load_old(keys=[self.table_key, self.version_key])
        if not data:
            return RoutingSnapshot(RoutingTable(), int(version))
        return RoutingSnapshot(RoutingTable.model_validate_json(data), int(version))

    async def load(self) -> RoutingSnapshot:
        """The whole table (for the CLI and tests; readers apply deltas instead)."""
        stored = await self.stored()
        if not stored.globals:
            if await self.redis.exists(self.table_key):
                return await self.load_old_layout()
            return RoutingSnapshot(RoutingTable(), stored.version)
        entries = {n: DomainEntry.model_validate_json(d) for n, d in stored.entries.items()}
        globals_ = TableGlobals.model_validate_json(stored.globals)
        return RoutingSnapshot(join_table(entries, globals_), stored.version)


@dataclass
class _Held:
    """A domain's entry as the reader holds it: the version that wrote it, its JSON, parsed."""

    version: int
    document: str
    entry: DomainEntry


class RoutingReader:
    """Keeps `snapshot` current: on a change notification, and every `check_interval` in case
    a notification was missed (pub/sub is fire-and-forget), reads the domains' versions and
    fetches only the entries whose version moved."""

    def __init__(self, store: RoutingStore, check_interval: timedelta = timedelta(seconds=5)):
        self.store = store
        self.check_interval = check_interval
        self.snapshot = RoutingSnapshot.empty()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        #: the table vanished from Redis and the last one is kept (see _reload)
        self._table_lost = False
        #: the entries the snapshot is made of
        self._held: dict[str, _Held] = {}
        self._globals_json = ""
        self._globals = TableGlobals()
        #: how many entries the last reload fetched (and parsed), for tests and logs
        self.fetched = 0

    async def start(self) -> None:
        """Load the current table (raises if Redis is unreachable), then follow changes."""
        await self._reload()
        self._task = asyncio.create_task(self._follow(), name="routing-reader")

    async def start_when_available(self, stopping: asyncio.Event) -> bool:
        """start(), retried with backoff until Redis answers (it may start after us, e.g. on
        a fresh install); False if `stopping` was set first."""
        delay = 0.1
        while not stopping.is_set():
            try:
                await self.start()
                return True
            except Exception as error:
                log.warning("routing table not loaded yet; retrying", extra={"error": repr(error)})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stopping.wait()
            delay = min(delay * 2, 5.0)
        return False

    async def stop(self) -> None:
        task, self._task = self._task, None
        # Cancel until it is done: on Python 3.11, asyncio.wait_for (which redis-py puts
        # around socket operations) can swallow a cancellation that lands as it completes.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_for_version(self, version: int) -> RoutingSnapshot:
        """Wait until the snapshot is at `version` or newer (bound it with asyncio.timeout)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.snapshot.version >= version)
        return self.snapshot

    async def _reload(self, *, reconnected: bool = False) -> None:
        """Take the table in Redis if its version is another: fetch the entries whose
        domain's version differs from the one held, drop the domains gone. `reconnected`
        (the follow failed: Redis restarted, or failed over): fetch every entry and compare
        the content too. A write that a failover lost (made on the old primary, not yet on
        the replica promoted) leaves the version it took free, and the next write takes it
        again with other content."""
        for _ in range(RELOAD_ATTEMPTS):
            state = await self.store.state()
            if state.version == 0 and self.snapshot.version > 0:
                # The table is gone from Redis (data lost, FLUSHALL): an empty table would
                # refuse all local mail as unknown users (550), so keep the last one until
                # the operator (or `mailkube routing apply`) publishes again.
                if not self._table_lost:
                    log.warning("routing table missing in Redis; keeping the last one",
                                extra={"version": self.snapshot.version})  # fmt: skip
                self._table_lost = True
                return
            # once lost, the versions start again at 1: take whatever is published next
            fresh = self._table_lost or reconnected
            if state.version == self.snapshot.version and not fresh:
                return
            if not state.globals and state.old_layout:
                self._held, self._globals_json = {}, ""
                await self._set(await self.store.load_old_layout(), True)
                return
            wanted = [
                name for name, version in state.domain_versions.items()
                if fresh or (held := self._held.get(name)) is None or held.version != version
            ]  # fmt: skip
            found = await self.store.fetch(state.version, wanted)
            if found is None:
                continue  # written meanwhile: read the versions again
            globals_json, documents = found
            await self._apply(state, wanted, globals_json, documents)
            return
        log.info("routing table kept changing while being read; trying again later")

    async def _apply(
        self,
        state: TableState,
        wanted: list[str],
        globals_json: str,
        documents: list[str | None],
    ) -> None:
        held = {name: h for name, h in self._held.items() if name in state.domain_versions}
        changed = len(held) != len(self._held) or bool(self._table_lost)
        self.fetched = 0
        for name, document in zip(wanted, documents, strict=True):
            if document is None:
                continue  # listed in the versions, not in the entries: not ours to mend
            version = state.domain_versions[name]
            kept = held.get(name)
            if kept is not None and kept.document == document:
                kept.version = version
                continue
            self.fetched += 1
            held[name] = _Held(version, document, DomainEntry.model_validate_json(document))
            changed = True
        if globals_json != self._globals_json:
            self._globals = (
                TableGlobals.model_validate_json(globals_json) if globals_json else TableGlobals()
            )
            self._globals_json = globals_json
            changed = True
        self._held = held
        if changed or state.version != self.snapshot.version:
            table = join_table({n: h.entry for n, h in held.items()}, self._globals)
            await self._set(RoutingSnapshot(table, state.version), changed)

    async def _set(self, snapshot: RoutingSnapshot, changed: bool) -> None:
        self._table_lost = False
        self.snapshot = snapshot
        if changed:
            table = snapshot.table
            log.info(
                "routing table loaded",
                extra={"version": snapshot.version, "domains": len(table.domains),
                       "users": len(table.users), "fetched": self.fetched},
            )  # fmt: skip
        async with self._changed:
            self._changed.notify_all()

    async def _follow(self) -> None:
        reconnected = False
        while True:
            try:
                pubsub = self.store.redis.pubsub()
                async with pubsub:
                    await pubsub.subscribe(self.store.channel)
                    # anything published before the subscription
                    await self._reload(reconnected=reconnected)
                    reconnected = False
                    while True:
                        await pubsub.get_message(
                            ignore_subscribe_messages=True,
                            timeout=self.check_interval.total_seconds(),
                        )
                        # on a notification or after check_interval of silence alike
                        if (await self.store.version() != self.snapshot.version
                                or self._table_lost):  # fmt: skip
                            await self._reload()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("routing table follow failed; retrying", exc_info=True)
                reconnected = True
                await asyncio.sleep(self.check_interval.total_seconds())
