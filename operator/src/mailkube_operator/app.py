"""The operator process: kopf in its own thread, tied to the service's lifecycle.

`run_operator` is what `serve` starts and what the tests start: kopf with the handler
registry, our state in its memo, and a stop flag.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import kopf

from mailkube_core.service import Service
from mailkube_core.settings import OperatorSettings

from .registry import build_registry
from .state import OperatorState

log = logging.getLogger(__name__)


class _SignalsAreOurs(logging.Filter):
    """kopf warns that it ignores OS signals in a thread of its own: that is the design here
    (run_service turns SIGTERM into the stop flag), not something to warn about."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("OS signals are ignored: running not in the")


def quiet_kopf() -> None:
    """kopf logs every handler call at INFO, each line carrying its whole settings object (2 kB
    in JSON logs, on every watch event): keep its per-object lines to warnings and errors. The
    reconciler logs what it did."""
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    running = logging.getLogger("kopf._core.reactor.running")
    if not any(isinstance(f, _SignalsAreOurs) for f in running.filters):
        running.addFilter(_SignalsAreOurs())


def run_operator(
    settings: OperatorSettings,
    *,
    stop_flag: threading.Event,
    ready_flag: threading.Event | None = None,
    state: OperatorState | None = None,
) -> None:
    """Run kopf until stop_flag is set (blocks; meant for a thread of its own)."""
    quiet_kopf()
    state = state or OperatorState(settings)
    kopf.run(
        registry=build_registry(settings),
        standalone=True,
        clusterwide=settings.cluster_wide,
        namespaces=[] if settings.cluster_wide else [settings.namespace],
        memo=kopf.Memo(state=state),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


async def serve(settings: OperatorSettings, service: Service) -> None:
    stop = threading.Event()
    ready = threading.Event()
    state = OperatorState(settings)
    thread = threading.Thread(
        target=run_operator,
        kwargs={"settings": settings, "stop_flag": stop, "ready_flag": ready, "state": state},
        name="kopf",
        daemon=True,
    )
    thread.start()
    service.health.add_liveness_check("kopf", thread.is_alive)
    service.health.add_readiness_check("kopf", ready.is_set)
    service.health.add_readiness_check(
        "routing", lambda: state.reconciler is not None and state.reconciler.healthy
    )
    stopping = asyncio.create_task(service.stopping.wait())
    died = asyncio.create_task(asyncio.to_thread(thread.join))
    await asyncio.wait({stopping, died}, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await died
    stopping.cancel()
    if not service.stopping.is_set():
        log.error("kopf stopped on its own")
        raise SystemExit(1)
