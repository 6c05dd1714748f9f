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
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

from mailkube_core.parent_death import follow_parent
from mailkube_core.queue import Queue
from mailkube_core.redis_client import RedisClient, connect_redis
from mailkube_core.redis_multiplexed import multiplexed
from mailkube_core.routing import PasswordVerifier, RoutingReader, RoutingStore
from mailkube_core.service import Service
from mailkube_core.settings import GatewaySettings, SettingsError, split_host_port

from .gateway import Gateway
from .listeners import ListenerSpec, listener_specs, serve_listener
from .mailauth.stages import SubmissionSigning, build_resolver, build_stages
from .mtasts import MtaStsServer
from .pipeline import Pipeline
from .ratelimit import Limits
from .screening.screen import Screening
from .session import GatewaySMTP
from .spam.build import build_spam_stages
from .spam.suspended import SuspendedUsers
from .tls import CertificateStore

log = logging.getLogger(__name__)
#: set in the extra processes `processes` starts, which share the listeners of the first:
#: the first one's pid
CHILD_ENV = "MAILKUBE_GATEWAY_CHILD"
#: and the listening sockets they inherit from it: "<listener index>:<fd>,…"
LISTEN_FDS_ENV = "MAILKUBE_GATEWAY_LISTEN_FDS"


def _redis_check(redis: RedisClient) -> Callable[[], Awaitable[bool]]:
    async def ping() -> bool:
        return bool(await redis.ping())

    return ping


def _start_children(
    settings: GatewaySettings, listening: list[tuple[int, socket.socket]]
) -> list[subprocess.Popen[bytes]]:
    """processes > 1: more copies of this process, serving this one's listening sockets
    (`listening`: the index of each one's listener, and the socket), handed down as open
    descriptors. Whichever process is idle takes the next connection from the one accept
    queue, so a busy process is not handed more, as SO_REUSEPORT's hash would; and one that
    dies leaves no queued connection behind. They have no telemetry or MTA-STS server of
    their own."""
    if settings.processes <= 1 or os.environ.get(CHILD_ENV):
        return []
    fds = ",".join(f"{index}:{sock.fileno()}" for index, sock in listening)
    env = {**os.environ, CHILD_ENV: str(os.getpid()), LISTEN_FDS_ENV: fds,
           "MAILKUBE_TELEMETRY_LISTEN": "", "MAILKUBE_MTA_STS_LISTEN": ""}  # fmt: skip
    return [
        subprocess.Popen(
            [sys.executable, "-m", "mailkube_gateway"],
            env=env,
            pass_fds=[sock.fileno() for _, sock in listening],
        )
        for _ in range(settings.processes - 1)
    ]


def _inherited_sockets() -> dict[int, list[socket.socket]] | None:
    """In an extra process: the first one's listening sockets, by listener index."""
    fds = os.environ.get(LISTEN_FDS_ENV)
    if fds is None:
        return None
    inherited: dict[int, list[socket.socket]] = {}
    for item in filter(None, fds.split(",")):
        index, fd = item.split(":")
        sock = socket.socket(fileno=int(fd))
        sock.setblocking(False)
        inherited.setdefault(int(index), []).append(sock)
    return inherited


def _stop_with_parent() -> None:
    """In an extra process: SIGTERM (a graceful stop) when the first process dies, however it
    dies, SIGKILL included, so that no orphan keeps serving on its ports. Asked by the child
    itself: a preexec_fn in the parent is unsafe with the parent's threads."""
    parent = os.environ.get(CHILD_ENV)
    if parent and parent.isdigit() and not follow_parent(int(parent)):
        log.warning("cannot follow the first process", extra={"errno": ctypes.get_errno()})


def _stop_children(children: list[subprocess.Popen[bytes]], grace: float) -> None:
    """Wait for the children (told to stop when this process was) for the grace period."""
    deadline = time.monotonic() + grace + 5
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


#: a whole MTA-STS policy request, read and answered
MTA_STS_REQUEST_TIMEOUT = 10.0


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
        resolver = build_resolver(settings)  # one per process: SPF, DKIM, DMARC, screening
        stages, self.auth_checks = build_stages(settings, self.routing, resolver)
        suspended = SuspendedUsers(self.redis, settings.key_prefix)
        # after email authentication (whose results they read), before DKIM signing
        signing = next(i for i, stage in enumerate(stages) if isinstance(stage, SubmissionSigning))
        stages[signing:signing] = build_spam_stages(settings, self.routing, self.redis, suspended)
        self.gateway = Gateway(
            settings=settings,
            redis=self.redis,
            routing=self.routing,
            verifier=self.verifier,
            queue=Queue.from_settings(settings, self.redis),
            limits=Limits(self.redis, settings.key_prefix),
            certs=self.certs,
            pipeline=Pipeline(stages),
            screening=Screening(settings, resolver, self.redis),
            suspended=suspended,
        )
        self.mta_sts: MtaStsServer | None = None
        self.mta_sts_certs: CertificateStore | None = None
        if settings.mta_sts_listen:
            self.mta_sts = MtaStsServer(self.routing, request_timeout=MTA_STS_REQUEST_TIMEOUT)
            if settings.mta_sts_tls_cert_file and settings.mta_sts_tls_key_file:
                self.mta_sts_certs = CertificateStore(
                    settings.mta_sts_tls_cert_file,
                    settings.mta_sts_tls_key_file,
                    settings="mta_sts_tls_cert_file/mta_sts_tls_key_file",
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
        inherited = _inherited_sockets()
        listening: list[tuple[int, socket.socket]] = []

        def factory(spec: ListenerSpec) -> GatewaySMTP:
            return GatewaySMTP(self.gateway, spec)

        for index, spec in enumerate(self.specs):
            try:
                servers = await serve_listener(
                    spec, factory, inherited=None if inherited is None else inherited.get(index, [])
                )
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
                listening += [(index, sock) for sock in server.sockets]
            ports = sorted({sock.getsockname()[1] for server in servers for sock in server.sockets})
            where = {"listener": spec.name, "address": spec.address, "ports": ports}
            log.info("listening", extra=where)
        if self.mta_sts is not None:
            host, port = split_host_port(self.settings.mta_sts_listen)
            tls = None
            if self.mta_sts_certs is not None:
                tls = self.mta_sts_certs.context
                self.mta_sts_certs.start(self.settings.tls_check_interval)
            try:
                await self.mta_sts.start(host, port, tls=tls)
            except OSError as exc:
                for server in self.servers:
                    server.close()
                raise SettingsError(
                    f"invalid setting mta_sts_listen: cannot listen on "
                    f"{self.settings.mta_sts_listen}: {exc.strerror}"
                ) from None
            log.info("listening", extra={"listener": "mta-sts",
                                         "address": self.settings.mta_sts_listen})  # fmt: skip
        self.children = _start_children(self.settings, listening)
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
        if self.mta_sts is not None:
            await self.mta_sts.stop()
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
        with contextlib.suppress(Exception):  # unreturned loans wait out their minute
            async with asyncio.timeout(1):
                await gateway.limits.close()
        if self.certs is not None:
            await self.certs.stop()
        if self.mta_sts_certs is not None:
            await self.mta_sts_certs.stop()
        await self.routing.stop()
        self.verifier.close()
        self.auth_checks.close()
        await self.redis.aclose()


#: descriptors a process needs besides its SMTP connections (Redis pool, DNS, files, rspamd)
FD_MARGIN = 256


def _check_fd_limit(settings: GatewaySettings) -> None:
    """Warn when max_connections cannot be reached: each connection is a descriptor, and
    past the open-file limit accept() fails (run_service raised it as far as it could)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = settings.max_connections + FD_MARGIN
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the open-file limit is below what max_connections needs; raise the container's "
            "nofile limit or lower max_connections",
            extra={"limit": soft, "needed": needed, "max_connections": settings.max_connections},
        )


async def serve(settings: GatewaySettings, service: Service) -> None:
    # aiosmtpd logs every command at INFO: far too much for production, and slow
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    _stop_with_parent()
    _check_fd_limit(settings)
    app = GatewayApp(settings)
    service.health.add_readiness_check("redis", _redis_check(app.redis))
    service.health.add_readiness_check("listeners", app.ready)
    try:
        if await app.start(service.stopping):
            await service.stopping.wait()
    finally:
        await app.stop()
