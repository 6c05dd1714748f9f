"""What every SMTP session of this process shares: settings, Redis, the routing table, the
queue, limits, TLS, the connection-level checks, the filter pipeline, the memory for messages
in DATA, and the set of live sessions."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailkube_core.queue import Queue
from mailkube_core.redis_client import RedisClient
from mailkube_core.routing import PasswordVerifier, RoutingReader
from mailkube_core.settings import GatewaySettings

from .auth import Authenticator
from .data import wire_allowance
from .data_memory import DataMemory, container_memory_limit, data_memory_limit
from .pipeline import Pipeline
from .ratelimit import Limits
from .spam.suspended import SuspendedUsers
from .tls import CertificateStore

if TYPE_CHECKING:
    from .screening.screen import Screening
    from .session import GatewaySMTP


@dataclass
class Gateway:
    settings: GatewaySettings
    redis: RedisClient
    routing: RoutingReader
    verifier: PasswordVerifier
    queue: Queue
    limits: Limits
    certs: CertificateStore | None
    #: users suspended for submission, read at AUTH (the scanning stage adds to it)
    suspended: SuspendedUsers
    pipeline: Pipeline = field(default_factory=Pipeline)
    #: connection-level checks of MX clients (DNS lists, reverse name, early talkers)
    screening: Screening | None = None
    sessions: set[GatewaySMTP] = field(default_factory=set)
    #: small tasks that must not be garbage-collected before they finish (connection leases)
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    stopping: bool = False
    authenticator: Authenticator = field(init=False)
    #: the bytes all sessions in DATA hold together, under data_memory_limit
    data_memory: DataMemory = field(init=False)
    _closed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.authenticator = Authenticator(self.settings, self.routing, self.verifier, self.limits)
        settings = self.settings
        self.data_memory = DataMemory(
            data_memory_limit(
                settings.data_memory_limit,
                floor=wire_allowance(settings.max_message_size),
                processes=settings.processes,
                container=settings.container_memory_limit or container_memory_limit(),
            )
        )

    def stop_sessions(self) -> None:
        """SIGTERM: every session says 421 and closes, as soon as the command it is in (a
        message being received, above all) is done."""
        self.stopping = True
        for session in list(self.sessions):
            session.request_stop()

    async def all_sessions_closed(self) -> None:
        while self.sessions:
            self._closed.clear()
            await self._closed.wait()

    def session_closed(self, session: GatewaySMTP) -> None:
        self.sessions.discard(session)
        self._closed.set()

    def abort_sessions(self) -> None:
        """The grace period is over: drop whatever is left."""
        for session in list(self.sessions):
            session.abort()
