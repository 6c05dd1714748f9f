"""Removes the consumers of pods that are gone from the consumer group (`kubectl scale` down,
rolling updates), so `XINFO CONSUMERS` lists the live workers only.

XGROUP DELCONSUMER drops a consumer's pending entries with it, so a consumer is removed only
once it holds none: its claims were taken over (XAUTOCLAIM after the visibility timeout), or it
finished them. Check and removal run in one script, so an entry claimed in between is never
lost. A live worker removed by mistake loses nothing either: its next XREADGROUP creates it
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import timedelta

from redis.exceptions import ResponseError

from mailkube_core.queue import Lane, Queue

log = logging.getLogger(__name__)

# KEYS[1] stream. ARGV[1] our own consumer name, ARGV[2] idle threshold (ms).
# Returns the names removed.
_REMOVE_GONE = """
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], 'workers')) do
  local f = {}
  for i = 1, #consumer, 2 do f[consumer[i]] = consumer[i + 1] end
  if f['name'] ~= ARGV[1] and tonumber(f['pending']) == 0
     and tonumber(f['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], 'workers', f['name'])
    table.insert(removed, f['name'])
  end
end
return removed
"""


class Janitor:
    def __init__(
        self, queue: Queue, lanes: Sequence[Lane], consumer: str, idle_after: timedelta
    ) -> None:
        self.queue = queue
        self.lanes = list(lanes)
        self.consumer = consumer
        self.idle_after = idle_after
        self._script = queue.redis.register_script(_REMOVE_GONE)

    async def sweep(self) -> list[str]:
        removed: list[str] = []
        for partition in range(self.queue.partitions):
            for lane in self.lanes:
                stream = self.queue.keys(partition).stream(lane)
                try:
                    names = await self._script(
                        keys=[stream],
                        args=[self.consumer, int(self.idle_after.total_seconds() * 1000)],
                    )
                except ResponseError:  # no stream or group yet
                    continue
                removed += [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        if removed:
            log.info("removed consumers of gone workers", extra={"consumers": removed})
        return removed

    async def run(self, stop: asyncio.Event, every: timedelta) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception:
                log.warning("consumer sweep failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every.total_seconds())
