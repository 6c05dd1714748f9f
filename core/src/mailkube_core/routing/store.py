"""The routing table in Redis: one writer replaces it atomically with a new version and a
change notification; readers keep a snapshot in memory and reload when the version moves.

Keys (one hash tag, so the replace script is atomic on Redis Cluster too):
  {<prefix>:routing}:table     the table as JSON
  {<prefix>:routing}:version   an integer, +1 per replace
  <prefix>:routing:changed     pub/sub channel; the message is the new version
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from ..redis_client import RedisClient
from .models import RoutingTable
from .snapshot import RoutingSnapshot

log = logging.getLogger(__name__)

# KEYS[1] table, KEYS[2] version. ARGV[1] table JSON, ARGV[2] expected version or '',
# ARGV[3] channel. Returns {new version, 1} or {current version, 0} on a version conflict.
_REPLACE = """
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= current then return {current, 0} end
local version = current + 1
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], version)
redis.call('PUBLISH', ARGV[3], version)
return {version, 1}
"""

# KEYS[1] table, KEYS[2] version: both in one consistent read.
_LOAD = "return {redis.call('GET', KEYS[2]) or '0', redis.call('GET', KEYS[1]) or ''}"


class VersionConflict(Exception):
    """Someone else replaced the table since the version the writer started from."""


class RoutingStore:
    def __init__(self, redis: RedisClient, prefix: str = "mailkube") -> None:
        self.redis = redis
        tag = f"{{{prefix}:routing}}"
        self.table_key = f"{tag}:table"
        self.version_key = f"{tag}:version"
        self.channel = f"{prefix}:routing:changed"
        self._replace = redis.register_script(_REPLACE)
        self._load = redis.register_script(_LOAD)

    async def replace(self, table: RoutingTable, *, expected_version: int | None = None) -> int:
        """Publish a new table; returns its version. With `expected_version`, raise
        VersionConflict instead of overwriting a newer table."""
        expected = "" if expected_version is None else str(expected_version)
        version, done = await self._replace(
            keys=[self.table_key, self.version_key],
            args=[table.model_dump_json(), expected, self.channel],
        )
        if not done:
            raise VersionConflict(f"routing table is at version {version}, not {expected}")
        return int(version)

    async def version(self) -> int:
        return int(await self.redis.get(self.version_key) or 0)

    async def load(self) -> RoutingSnapshot:
        version, data = await self._load(keys=[self.table_key, self.version_key])
        if not data:
            return RoutingSnapshot(RoutingTable(), int(version))
        return RoutingSnapshot(RoutingTable.model_validate_json(data), int(version))


class RoutingReader:
    """Keeps `snapshot` current: reloads on a change notification, and checks the version
    every `check_interval` in case a notification was missed (pub/sub is fire-and-forget)."""

    def __init__(self, store: RoutingStore, check_interval: timedelta = timedelta(seconds=5)):
        self.store = store
        self.check_interval = check_interval
        self.snapshot = RoutingSnapshot.empty()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        #: the table vanished from Redis and the last one is kept (see _reload)
        self._table_lost = False

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

    async def _reload(self) -> None:
        snapshot = await self.store.load()
        if snapshot.version == 0 and self.snapshot.version > 0:
            # The table is gone from Redis (data lost, FLUSHALL): an empty table would refuse
            # all local mail as unknown users (550), so keep the last one until the operator
            # (or `mailkube routing apply`) publishes again.
            if not self._table_lost:
                log.warning("routing table missing in Redis; keeping the last one",
                            extra={"version": self.snapshot.version})  # fmt: skip
            self._table_lost = True
            return
        # once lost, the versions start again at 1: take whatever is published next
        if snapshot.version != self.snapshot.version or self._table_lost:
            self._table_lost = False
            self.snapshot = snapshot
            table = snapshot.table
            log.info(
                "routing table loaded",
                extra={"version": snapshot.version, "domains": len(table.domains),
                       "users": len(table.users)},
            )  # fmt: skip
            async with self._changed:
                self._changed.notify_all()

    async def _follow(self) -> None:
        while True:
            try:
                pubsub = self.store.redis.pubsub()
                async with pubsub:
                    await pubsub.subscribe(self.store.channel)
                    await self._reload()  # anything published before the subscription
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
                await asyncio.sleep(self.check_interval.total_seconds())
