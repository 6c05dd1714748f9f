"""Connection reuse, per-destination concurrency, and hosts that just failed.

- Idle sessions are kept per destination (a domain, or a smart host) for `idle_time`, so a
  burst of messages to one place costs one TCP+TLS handshake (Postfix's connection cache).
- `slot(destination)` caps concurrent sessions per destination in this process (Postfix's
  default_destination_concurrency_limit), so a worker never floods one receiver.
- A host that refused or timed out is skipped for `failed_ttl` while another can be tried.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from .smtp_client import SmtpSession


class ConnectionPool:
    def __init__(self, per_destination: int, idle_time: float, failed_ttl: float) -> None:
        self.per_destination = per_destination
        self.idle_time = idle_time
        self.failed_ttl = failed_ttl
        self._slots: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(per_destination)
        )
        self._idle: dict[str, list[tuple[float, SmtpSession]]] = defaultdict(list)
        self._failed: dict[str, float] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def slot(self, destination: str) -> asyncio.Semaphore:
        return self._slots[destination]

    def take(self, destination: str) -> SmtpSession | None:
        """The most recently used idle session to `destination` that is still open."""
        idle = self._idle.get(destination)
        now = time.monotonic()
        while idle:
            since, session = idle.pop()
            if session.usable and now - since < self.idle_time:
                return session
            self._close(session)
        return None

    def give(self, destination: str, session: SmtpSession) -> None:
        """Keep a session for the next message to `destination`."""
        if not session.usable or self.idle_time <= 0:
            self._close(session)
            return
        self._idle[destination].append((time.monotonic(), session))
        asyncio.get_running_loop().call_later(self.idle_time, self._expire, destination)

    def _expire(self, destination: str) -> None:
        now = time.monotonic()
        keep = []
        for since, session in self._idle.get(destination, []):
            if now - since >= self.idle_time:
                self._close(session)
            else:
                keep.append((since, session))
        self._idle[destination] = keep

    def _close(self, session: SmtpSession) -> None:
        task = asyncio.create_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def failed(self, address: str) -> None:
        self._failed[address] = time.monotonic() + self.failed_ttl

    def recently_failed(self, address: str) -> bool:
        until = self._failed.get(address)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._failed[address]
            return False
        return True

    def recovered(self, address: str) -> None:
        self._failed.pop(address, None)

    async def close(self) -> None:
        for sessions in self._idle.values():
            for _, session in sessions:
                self._close(session)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
