"""How every long-running Mailkube process starts and stops, so each entry point is only its
own work:

    def main() -> None:
        run_service("smtp-gateway", GatewaySettings, serve)

    async def serve(settings: GatewaySettings, service: Service) -> None:
        ...start listeners; service.health.add_readiness_check("redis", ping)...
        await service.stopping.wait()
        ...close listeners, finish sessions...

`run_service` loads the settings (a bad value: one line per field on stderr, exit status 2),
sets up JSON logs, OpenTelemetry and the /metrics, /healthz, /readyz server, and turns SIGTERM
and SIGINT into `service.stopping`. A second signal while stopping exits at once. A
SettingsError that `main` raises while starting (a certificate that cannot be read, a listener
that needs TLS) ends the process the same way as a bad setting: one line, exit status 2.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .settings import CommonSettings, SettingsError, load_settings_or_exit, split_host_port
from .telemetry import HealthServer, Telemetry, setup_logging, setup_telemetry

S = TypeVar("S", bound=CommonSettings)
log = logging.getLogger(__name__)


@dataclass
class Service:
    name: str
    telemetry: Telemetry
    health: HealthServer
    stopping: asyncio.Event


def run_service(
    name: str, settings_model: type[S], main: Callable[[S, Service], Awaitable[None]]
) -> None:
    prog = f"mailkube-{name}"
    settings = load_settings_or_exit(settings_model, prog)
    setup_logging(name, settings.log_level, settings.log_format)
    raise_fd_limit()
    tune_gc()
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(_run(name, settings, main))
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        sys.exit(130)
    except SettingsError as exc:  # found while starting (e.g. an unreadable certificate)
        for line in str(exc).splitlines():
            print(f"{prog}: {line}", file=sys.stderr)
        sys.exit(2)


#: container allocations between young-generation collections (CPython's default: 700)
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Fewer cyclic-GC passes on the hot path. A message allocates thousands of short-lived
    containers that reference counting frees; at CPython's default a young collection ran
    every 700 of them (2.6% of the gateway's samples at 2 KiB, py-spy). The objects of the
    start (modules, settings, tables) move to the permanent generation (`gc.freeze`), so the
    full collections left do not walk them again."""
    import gc

    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def raise_fd_limit() -> int:
    """Raise this process's open-file limit (RLIMIT_NOFILE) to its hard limit, as far as
    the container allows; the soft limit is often 1024, a thousand connections. Returns the
    limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit", extra={"error": repr(exc)})
    return soft


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `event_loop` names (None: asyncio's default)."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


async def _run(name: str, settings: S, main: Callable[[S, Service], Awaitable[None]]) -> None:
    telemetry = setup_telemetry(name)
    health = HealthServer()
    service = Service(name, telemetry, health, asyncio.Event())
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if service.stopping.is_set():
            log.warning("second signal while stopping; exiting now")
            raise SystemExit(1)
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        service.stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if settings.telemetry_listen:
        host, port = split_host_port(settings.telemetry_listen)
        await health.start(host, port)
    log.info("starting", extra={"service": name, "hostname": settings.hostname})
    try:
        await main(settings, service)
    finally:
        await health.stop()
        await telemetry.shutdown()
        log.info("stopped")
