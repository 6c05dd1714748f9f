"""Connection slots of a client address: held in Redis, reused by this process's next
connections from the same address.

Redis keeps the one account of connections per client address (ratelimit.py's lease set: a
member per slot, scored by when its lease ends), and max_connections_per_ip caps the slots
held there by all the gateway processes together. A connection holds a slot for its life.
When it ends, its slot stays with this process for HOLD seconds: a connection from the same
address in that time takes it again without asking Redis, so a sender that reconnects for
every message (as smtp-source, and many MTAs, do) costs no Redis round trip per connection.
Slots idle for HOLD go back to Redis, an address's together.

What this changes is who may use a slot meanwhile: another process is refused a slot that
idles here for up to HOLD seconds, as if the connection had lasted that much longer.

A slot is reused only while its lease has at least half its length left, so a session on a
reused slot is covered about as long as one on a new slot (the lease outlives any idle
session: policy.py).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

#: how long a slot given back by a connection waits for the next one from its address (s)
HOLD = 1.0

#: acquire(ip, slot, limit, lease seconds) -> whether Redis granted the slot
Acquire = Callable[[str, str, int, float], Coroutine[Any, Any, bool]]
#: release(ip, slots): the slots leave Redis's account of the address
Release = Callable[[str, list[str]], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class Slot:
    id: str
    #: when its lease ends in Redis (the clock's time)
    expires: float


@dataclass(frozen=True, slots=True)
class _Idle:
    slot: Slot
    #: when it was given back
    since: float


class ConnectionSlots:
    """The slots this process holds, by client address."""

    def __init__(
        self,
        acquire: Acquire,
        release: Release,
        *,
        hold: float = HOLD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._acquire = acquire
        self._release = release
        self.hold = hold
        self._clock = clock
        # unique among processes: a slot is a member of the address's lease set
        self._prefix = f"{random.getrandbits(64):016x}:"
        self._numbers = itertools.count()
        self._idle: dict[str, list[_Idle]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    def idle(self, ip: str) -> int:
        """Slots of `ip` held here for the next connection."""
        return len(self._idle.get(ip, ()))

    async def take(self, ip: str, limit: int, lease: float) -> Slot | None:
        """A slot for a new connection from `ip`: one this process holds idle, else one from
        Redis; None when `limit` are held (by all processes). Redis errors are raised."""
        now = self._clock()
        idle = self._idle.get(ip)
        stale: list[str] = []
        while idle:
            slot = idle.pop().slot
            if slot.expires - now >= lease / 2:
                if not idle:
                    del self._idle[ip]
                self._give_up(ip, stale)
                return slot
            stale.append(slot.id)
        self._idle.pop(ip, None)
        self._give_up(ip, stale)
        slot = Slot(f"{self._prefix}{next(self._numbers)}", now + lease)
        return slot if await self._acquire(ip, slot.id, limit, lease) else None

    def give_back(self, ip: str, slot: Slot) -> None:
        """A connection from `ip` ended: its slot waits HOLD seconds for the next one."""
        self._idle.setdefault(ip, []).append(_Idle(slot, self._clock()))
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.hold, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Slots idle for HOLD go back to Redis (within a quarter of HOLD more); the rest
        wait for the next sweep."""
        self._sweep = None
        now = self._clock()
        cutoff = now - self.hold
        for ip in list(self._idle):
            idle = self._idle[ip]
            old = [entry.slot.id for entry in idle if entry.since <= cutoff]
            if old:
                kept = [entry for entry in idle if entry.since > cutoff]
                if kept:
                    self._idle[ip] = kept
                else:
                    del self._idle[ip]
                self._give_up(ip, old)
        if self._idle:
            # at most four sweeps per HOLD, each over every address: with connections from
            # many addresses, a sweep per slot would go over all of them for each one
            oldest = min(entry.since for idle in self._idle.values() for entry in idle)
            delay = max(self.hold / 4, oldest + self.hold - now)
            self._sweep = asyncio.get_running_loop().call_later(delay, self._sweep_idle)

    def _give_up(self, ip: str, slots: list[str]) -> None:
        if slots:
            task = asyncio.get_running_loop().create_task(self._release(ip, slots))
            self._releasing.add(task)
            task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled():
            task.exception()  # a Redis error: the leases expire on their own

    async def close(self) -> None:
        """Every idle slot back to Redis (at SIGTERM, before Redis is closed)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, {}
        for ip, entries in idle.items():
            self._give_up(ip, [entry.slot.id for entry in entries])
        await asyncio.gather(*self._releasing, return_exceptions=True)
