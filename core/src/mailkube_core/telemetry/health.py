"""A tiny HTTP/1.1 server for Prometheus and Kubernetes probes: /metrics, /healthz, /readyz.

One request per connection, read and answered by `mailkube_core.tinyhttp` (limits, deadline,
``Connection: close``). Nothing a client sends can raise out of a connection handler or stop the
server.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from ..tinyhttp import Request, Response, TinyHTTPServer
from .checks import Check, CheckResult, CheckSet

log = logging.getLogger(__name__)

__all__ = ["HealthServer", "Response"]


class HealthServer(TinyHTTPServer):
    """``GET /metrics`` (Prometheus text format), ``GET /healthz`` (liveness), ``GET /readyz``
    (readiness); HEAD works too.

    /healthz answers 200 unless a liveness check fails; /readyz answers 200 only when every
    readiness check passes, 503 with one ``name: reason`` line per failing check otherwise.
    """

    name = "health server"

    def __init__(
        self,
        *,
        registry: CollectorRegistry = REGISTRY,
        check_timeout: float = 2.0,
        request_timeout: float = 5.0,
    ) -> None:
        super().__init__(request_timeout=request_timeout)
        self._registry = registry
        self._readiness = CheckSet("readiness", check_timeout)
        self._liveness = CheckSet("liveness", check_timeout)

    # -- checks ---------------------------------------------------------------------------

    def add_readiness_check(self, name: str, fn: Check) -> None:
        """/readyz fails while ``fn()`` returns False (or raises, or times out)."""
        self._readiness.add(name, fn)

    def remove_readiness_check(self, name: str) -> None:
        self._readiness.remove(name)

    def add_liveness_check(self, name: str, fn: Check) -> None:
        """/healthz fails while ``fn()`` returns False (or raises, or times out): the kubelet
        restarts the container, so only for states the process cannot recover from."""
        self._liveness.add(name, fn)

    def remove_liveness_check(self, name: str) -> None:
        self._liveness.remove(name)

    async def __aenter__(self) -> HealthServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- requests -------------------------------------------------------------------------

    async def route(self, request: Request) -> Response:
        path = request.path
        if path == "/metrics":
            return await self._metrics()
        if path == "/healthz":
            return _checks_response(await self._liveness.run(), "ok\n", "unhealthy\n")
        if path == "/readyz":
            return _checks_response(await self._readiness.run(), "ok\n", "not ready\n")
        return Response(HTTPStatus.NOT_FOUND, b"not found\n")

    async def _metrics(self) -> Response:
        try:
            # collection takes SDK locks and may run callbacks: keep it off the event loop
            body = await asyncio.to_thread(generate_latest, self._registry)
        except Exception:
            log.exception("health server: metrics collection failed")
            return Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"metrics collection failed\n")
        return Response(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)


def _checks_response(results: list[CheckResult], ok_body: str, failed_body: str) -> Response:
    failing = [result for result in results if not result.ok]
    if not failing:
        return Response(HTTPStatus.OK, ok_body.encode())
    body = failed_body + "".join(f"{result.name}: {result.detail}\n" for result in failing)
    return Response(HTTPStatus.SERVICE_UNAVAILABLE, body.encode("utf-8", "replace"))
