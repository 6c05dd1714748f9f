"""Installs the process-wide OpenTelemetry providers, once per process."""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version

from opentelemetry import metrics, trace
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer

from .providers import build_meter_provider, build_resource, build_tracer_provider

log = logging.getLogger(__name__)


def _default_version() -> str:
    try:
        return _package_version("mailkube-core")
    except PackageNotFoundError:
        return "0+unknown"


#: service.version when the caller does not give one: the installed mailkube-core version
DEFAULT_VERSION = _default_version()


class Telemetry:
    """The process's tracer and meter, and the way to flush them on the way out."""

    def __init__(
        self,
        service: str,
        version: str,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
    ) -> None:
        self.service = service
        self.version = version
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        scope = f"mailkube.{service}"
        self.tracer: Tracer = tracer_provider.get_tracer(scope, version)
        self.meter: Meter = meter_provider.get_meter(scope, version)
        self._lock = threading.Lock()
        self._closed = False
        # flush on interpreter exit if nobody called shutdown() (removed again by shutdown())
        atexit.register(self.shutdown_sync)

    @property
    def closed(self) -> bool:
        return self._closed

    async def shutdown(self, flush_timeout: float = 10.0) -> None:
        """Flush pending spans and metrics, then shut both providers down. Safe to call twice
        (and concurrently: a second caller returns once the first one has finished)."""
        await asyncio.to_thread(self.shutdown_sync, flush_timeout)

    def shutdown_sync(self, flush_timeout: float = 10.0) -> None:
        """Blocking shutdown(), for atexit and synchronous callers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.shutdown_sync)
            millis = int(flush_timeout * 1000)
            for name, step in (
                ("flush spans", lambda: self.tracer_provider.force_flush(millis)),
                ("shut down tracer provider", self.tracer_provider.shutdown),
                ("flush metrics", lambda: self.meter_provider.force_flush(millis)),
                ("shut down meter provider", lambda: self.meter_provider.shutdown(millis)),
            ):
                try:
                    step()
                except Exception:
                    log.warning("telemetry: could not %s", name, exc_info=True)


_instance: Telemetry | None = None
_instance_lock = threading.Lock()


def setup_telemetry(service: str, *, version: str = DEFAULT_VERSION) -> Telemetry:
    """Install the global TracerProvider and MeterProvider for ``service``, once per process.

    Later calls return the first call's Telemetry (even after its shutdown(): OpenTelemetry's
    global providers can only be set once per process, and the Prometheus collector must not be
    registered twice).
    """
    global _instance
    with _instance_lock:
        if _instance is not None:
            if _instance.service != service:
                log.warning(
                    "telemetry already set up for service %r; ignoring setup for %r",
                    _instance.service,
                    service,
                )
            return _instance
        resource = build_resource(service, version)
        tracer_provider = build_tracer_provider(resource)
        meter_provider = build_meter_provider(resource)
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        _instance = Telemetry(service, version, tracer_provider, meter_provider)
        return _instance
