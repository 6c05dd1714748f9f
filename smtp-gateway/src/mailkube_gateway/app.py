"""The gateway process: Redis, the routing table, the listeners, readiness and a graceful stop.

    serve(settings, service)   what `run_service("gateway", GatewaySettings, serve)` runs

Start: the routing table is loaded before any listener opens (an empty table would refuse all
mail for our domains as relaying). Stop (SIGTERM): readiness fails, listeners close, idle
sessions get 421 at once, sessions receiving a message finish it within `shutdown_grace`
and then get 421; whatever is left after that is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

from mailkube_core.queue import Queue
from mailkube_core.redis_client import RedisClient, connect_redis
from mailkube_core.routing import PasswordVerifier, RoutingReader, RoutingStore
from mailkube_core.service import Service
from mailkube_core.settings import GatewaySettings, SettingsError

from .gateway import Gateway
from .listeners import ListenerSpec, listener_specs, serve_listener
from .mailauth.stages import build_stages
from .pipeline import Pipeline
from .ratelimit import Limits, multiplexed
from .session import GatewaySMTP
from .tls import CertificateStore

log = logging.getLogger(__name__)
#: set in the extra processes `processes` starts, which share the listeners of the first:
#: the first one's pid
CHILD_ENV = "MAILKUBE_GATEWAY_CHILD"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _redis_check(redis: RedisClient) -> Callable[[], Awaitable[bool]]:
    async def ping() -> bool:
        return bool(await redis.ping())

    return ping


def _start_children(settings: GatewaySettings) -> list[subprocess.Popen[bytes]]:
    """processes > 1: more copies of this process on the same ports (SO_REUSEPORT); the
    kernel spreads connections over them. They have no telemetry server of their own."""
    if settings.processes <= 1 or os.environ.get(CHILD_ENV):
        return []
    env = {**os.environ, CHILD_ENV: str(os.getpid()), "MAILKUBE_TELEMETRY_LISTEN": ""}
    return [
        subprocess.Popen([sys.executable, "-m", "mailkube_gateway"], env=env)
        for _ in range(settings.processes - 1)
    ]


def _stop_with_parent() -> None:
    """In an extra process: SIGTERM (a graceful stop) when the first process dies, however it
    dies, SIGKILL included, so that no orphan keeps serving on its ports. Linux's
    PR_SET_PDEATHSIG, set by the child itself (a preexec_fn in the parent is unsafe with
    threads), then a check that the parent did not die before it was set."""
    parent = os.environ.get(CHILD_ENV)
    if not parent or not parent.isdigit():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot follow the first process", extra={"errno": ctypes.get_errno()})
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


def _stop_children(children: list[subprocess.Popen[bytes]], grace: float) -> None:
    """Wait for the children (told to stop when this process was) for the grace period."""
    deadline = time.monotonic() + grace + 5
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


class GatewayApp:
    """The gateway's parts, started and stopped in order; `serve` runs one per process, tests
    run one in their own event loop."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.specs = listener_specs(settings)
        self.redis = multiplexed(connect_redis(settings))
        store = RoutingStore(self.redis, settings.key_prefix)
        self.routing = RoutingReader(store, settings.routing_check_interval)
        self.certs: CertificateStore | None = None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            self.certs = CertificateStore(settings.tls_cert_file, settings.tls_key_file)
        self.verifier = PasswordVerifier()
        stages, self.auth_checks = build_stages(settings, self.routing)
        self.gateway = Gateway(
            settings=settings,
            redis=self.redis,
            routing=self.routing,
            verifier=self.verifier,
            queue=Queue.from_settings(settings, self.redis),
            limits=Limits(self.redis, settings.key_prefix),
            certs=self.certs,
            pipeline=Pipeline(stages),
        )
        self.servers: list[asyncio.Server] = []
        self.bound: list[tuple[ListenerSpec, asyncio.Server]] = []
        self.children: list[subprocess.Popen[bytes]] = []

    def ready(self) -> bool:
        return bool(self.servers) and not self.gateway.stopping

    async def start(self, stopping: asyncio.Event | None = None) -> bool:
        """Load the routing table (waiting for Redis), then open the listeners. False if
        `stopping` was set first."""
        if not await self.routing.start_when_available(stopping or asyncio.Event()):
            return False
        if self.certs is not None:
            self.certs.start(self.settings.tls_check_interval)
        reuse_port = self.settings.processes > 1 or bool(os.environ.get(CHILD_ENV))

        def factory(spec: ListenerSpec) -> GatewaySMTP:
            return GatewaySMTP(self.gateway, spec)

        for spec in self.specs:
            try:
                servers = await serve_listener(spec, factory, reuse_port=reuse_port)
            except OSError as exc:  # port taken, address not on this host, privileged port
                for server in self.servers:
                    server.close()
                setting = {"mx": "mx_listen", "submission": "submission_listen"}.get(
                    spec.name, "submissions_listen"
                )
                raise SettingsError(
                    f"invalid setting {setting}: cannot listen on {spec.address}: {exc.strerror}"
                ) from None
            for server in servers:
                self.servers.append(server)
                self.bound.append((spec, server))
            log.info("listening", extra={"listener": spec.name, "address": spec.address})
        self.children = _start_children(self.settings)
        return True

    def ports(self, name: str) -> list[int]:
        """Bound ports of a listener kind (the real ones when configured with port 0)."""
        return [
            int(sock.getsockname()[1])
            for spec, server in self.bound
            if spec.name == name
            for sock in server.sockets
        ]

    async def stop(self) -> None:
        gateway = self.gateway
        gateway.stopping = True
        for child in self.children:  # they stop alongside, not after this one's sessions
            child.terminate()
        for server in self.servers:
            server.close()
        gateway.stop_sessions()
        grace = self.settings.shutdown_grace.total_seconds()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await gateway.all_sessions_closed()
        gateway.abort_sessions()
        if self.children:
            await asyncio.to_thread(_stop_children, self.children, grace)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        await asyncio.gather(*gateway.background, return_exceptions=True)
        if self.certs is not None:
            await self.certs.stop()
        await self.routing.stop()
        self.verifier.close()
        self.auth_checks.close()
        await self.redis.aclose()


async def serve(settings: GatewaySettings, service: Service) -> None:
    # aiosmtpd logs every command at INFO: far too much for production, and slow
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    _stop_with_parent()
    app = GatewayApp(settings)
    service.health.add_readiness_check("redis", _redis_check(app.redis))
    service.health.add_readiness_check("listeners", app.ready)
    try:
        if await app.start(service.stopping):
            await service.stopping.wait()
    finally:
        await app.stop()
