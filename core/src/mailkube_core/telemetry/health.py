"""A tiny HTTP/1.1 server for Prometheus and Kubernetes probes: /metrics, /healthz, /readyz.

One request per connection: the request line is read with a size limit and a timeout, headers are
read and ignored, the answer carries ``Connection: close`` and the connection is closed. Nothing a
client sends can raise out of a connection handler or stop the server.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from .checks import Check, CheckResult, CheckSet

log = logging.getLogger(__name__)

#: longest request line (and header line) accepted
MAX_LINE = 8 * 1024
#: most header bytes read (and ignored) after the request line
MAX_HEADERS = 32 * 1024
_TEXT = "text/plain; charset=utf-8"
_REQUEST_LINE = re.compile(r"([A-Za-z]+) (\S+) HTTP/\d\.\d")


class Response(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


class HealthServer:
    """``GET /metrics`` (Prometheus text format), ``GET /healthz`` (liveness), ``GET /readyz``
    (readiness); HEAD works too.

    /healthz answers 200 unless a liveness check fails; /readyz answers 200 only when every
    readiness check passes, 503 with one ``name: reason`` line per failing check otherwise.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry = REGISTRY,
        check_timeout: float = 2.0,
        request_timeout: float = 5.0,
    ) -> None:
        self._registry = registry
        self._request_timeout = request_timeout
        self._readiness = CheckSet("readiness", check_timeout)
        self._liveness = CheckSet("liveness", check_timeout)
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: set[asyncio.Task[None]] = set()

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

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        if self._port is None:
            raise RuntimeError("HealthServer is not started")
        return self._port

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self, host: str | None, port: int) -> None:
        """Listen on ``host`` (None or "" = every address, IPv6 and IPv4) and ``port``."""
        if self._server is not None:
            raise RuntimeError("HealthServer is already started")
        if host:
            server = await asyncio.start_server(self._handle, host, port, limit=MAX_LINE)
        else:
            server = await asyncio.start_server(
                self._handle, sock=_listen_any(port), limit=MAX_LINE
            )
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop connections still being answered. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> HealthServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- requests -------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            response = await self._answer(reader)
            if response is not None:
                await self._send(writer, response)
        except Exception as error:  # a peer that went away, mostly
            log.debug("health server: connection failed: %r", error)
        finally:
            if task is not None:
                self._connections.discard(task)
            await _close(writer)

    async def _answer(self, reader: asyncio.StreamReader) -> _Answer | None:
        try:
            method, target = await self._read_request(reader)
        except _BadRequest as bad:
            return _Answer(Response(bad.status, f"{bad.status.phrase}\n".encode()), False)
        except asyncio.IncompleteReadError:
            return None  # the client hung up before a whole request line: nobody to answer
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            response = Response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                b"method not allowed\n",
                headers=(("Allow", "GET, HEAD"),),
            )
        else:
            response = await self._route(_path(target))
        return _Answer(response, head_only)

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        """(method, target) of the request; its headers are read and dropped."""
        try:
            async with asyncio.timeout(self._request_timeout):
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    raise _BadRequest(HTTPStatus.REQUEST_URI_TOO_LONG) from None
                match = _REQUEST_LINE.fullmatch(line.decode("latin-1").rstrip("\r\n"))
                if match is None:
                    raise _BadRequest(HTTPStatus.BAD_REQUEST)
                await _skip_headers(reader)
        except TimeoutError:
            raise _BadRequest(HTTPStatus.REQUEST_TIMEOUT) from None
        return match.group(1).upper(), match.group(2)

    async def _route(self, path: str) -> Response:
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

    async def _send(self, writer: asyncio.StreamWriter, answer: _Answer) -> None:
        response = answer.response
        status = HTTPStatus(response.status)
        lines = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in response.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head if answer.head_only else head + response.body)
        async with asyncio.timeout(self._request_timeout):
            await writer.drain()


class _Answer(NamedTuple):
    response: Response
    head_only: bool


def _path(target: str) -> str:
    """The path of an origin-form ("/x?y") or absolute-form ("http://h/x") request target."""
    try:
        return urlsplit(target).path or "/"
    except ValueError:
        return target


def _checks_response(results: list[CheckResult], ok_body: str, failed_body: str) -> Response:
    failing = [result for result in results if not result.ok]
    if not failing:
        return Response(HTTPStatus.OK, ok_body.encode())
    body = failed_body + "".join(f"{result.name}: {result.detail}\n" for result in failing)
    return Response(HTTPStatus.SERVICE_UNAVAILABLE, body.encode("utf-8", "replace"))


async def _skip_headers(reader: asyncio.StreamReader) -> None:
    """Read header lines up to the blank line, so that closing does not reset the connection
    under the client's feet; a client that half-closes early is answered anyway."""
    total = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return
        except asyncio.LimitOverrunError:
            raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from None
        total += len(line)
        if line in (b"\r\n", b"\n"):
            return
        if total > MAX_HEADERS:
            raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:  # timeout, or the peer reset the connection
        writer.transport.abort()


def _listen_any(port: int) -> socket.socket:
    """One socket for every address: dual-stack IPv6 where available, else IPv4 (so that port
    0 yields a single port, unlike asyncio's one socket per address family)."""
    if socket.has_ipv6:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError:
            pass
        else:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
                return sock
            except OSError:
                sock.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock
