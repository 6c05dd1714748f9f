"""A tiny HTTP/1.1 server: one GET or HEAD request per connection, read strictly with limits and
a deadline, answered with ``Connection: close``. Shared by the health endpoints
(`telemetry.health`) and the gateway's MTA-STS policy listener.

Nothing a client sends can raise out of a connection handler or stop the server: a request line
that is too long is 414, headers over `MAX_HEADERS` are 431, anything malformed is 400, a
client slower than the deadline gets 408.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from http import HTTPStatus
from typing import Any, NamedTuple
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: longest request line (and header line) accepted
MAX_LINE = 8 * 1024
#: most header bytes read after the request line
MAX_HEADERS = 32 * 1024
#: most header fields read after the request line
MAX_HEADER_FIELDS = 100
TEXT = "text/plain; charset=utf-8"
_REQUEST_LINE = re.compile(r"([A-Za-z]+) (\S+) HTTP/(\d)\.(\d)")
# RFC 9110 §5.1 token, then ":" and the value (no obsolete line folding, RFC 9112 §5.2)
_HEADER_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*")


class Response(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


class Request(NamedTuple):
    method: str
    target: str
    #: header fields, names lower-cased, in the order received
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        """The path of an origin-form ("/x?y") or absolute-form ("http://h/x") target."""
        try:
            return urlsplit(self.target).path or "/"
        except ValueError:
            return self.target

    def header(self, name: str) -> list[str]:
        """Every value of the header field `name` (lower case)."""
        return [value for field, value in self.headers if field == name]


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


def error(status: HTTPStatus, text: str | None = None) -> Response:
    return Response(status, f"{text or status.phrase.lower()}\n".encode())


async def read_request(reader: asyncio.StreamReader, deadline: float) -> Request:
    """The request line and header fields, within `deadline` seconds overall.

    Raises `BadRequest` (with the status to answer) or `asyncio.IncompleteReadError` (the
    client hung up before a whole request line: nobody to answer)."""
    try:
        async with asyncio.timeout(deadline):
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                raise BadRequest(HTTPStatus.REQUEST_URI_TOO_LONG) from None
            match = _REQUEST_LINE.fullmatch(line.decode("latin-1").rstrip("\r\n"))
            if match is None:
                raise BadRequest(HTTPStatus.BAD_REQUEST)
            if match.group(3) != "1":
                raise BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
            headers = await _read_headers(reader)
    except TimeoutError:
        raise BadRequest(HTTPStatus.REQUEST_TIMEOUT) from None
    return Request(match.group(1).upper(), match.group(2), headers)


async def _read_headers(reader: asyncio.StreamReader) -> tuple[tuple[str, str], ...]:
    """Header lines up to the blank line. A client that half-closes before the blank line is
    answered with what it sent (closing before reading everything would reset the connection
    under its feet)."""
    fields: list[tuple[str, str]] = []
    total = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return tuple(fields)
        except asyncio.LimitOverrunError:
            raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from None
        total += len(line)
        if line in (b"\r\n", b"\n"):
            return tuple(fields)
        if total > MAX_HEADERS or len(fields) >= MAX_HEADER_FIELDS:
            raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        match = _HEADER_LINE.fullmatch(line.decode("latin-1").rstrip("\r\n"))
        if match is None:
            raise BadRequest(HTTPStatus.BAD_REQUEST)
        fields.append((match.group(1).lower(), match.group(2)))


async def write_response(
    writer: asyncio.StreamWriter, response: Response, *, head_only: bool, deadline: float
) -> None:
    status = HTTPStatus(response.status)
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    if not any(name.lower() == "cache-control" for name, _ in response.headers):
        lines.append("Cache-Control: no-store")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    writer.write(head if head_only else head + response.body)
    async with asyncio.timeout(deadline):
        await writer.drain()


class TinyHTTPServer:
    """Answers GET and HEAD with `route(request)`; everything else is 405. Subclasses
    implement `route`."""

    #: for log lines
    name = "http server"

    def __init__(self, *, request_timeout: float = 5.0) -> None:
        self._request_timeout = request_timeout
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def route(self, request: Request) -> Response:
        raise NotImplementedError

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        if self._port is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._port

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(
        self, host: str | None, port: int, *, tls: ssl.SSLContext | None = None
    ) -> None:
        """Listen on ``host`` (None or "" = every address, IPv6 and IPv4) and ``port``; HTTPS
        with `tls` (its handshake within the request deadline)."""
        if self._server is not None:
            raise RuntimeError(f"{self.name} is already started")
        options: dict[str, Any] = {"limit": MAX_LINE}
        if tls is not None:
            options.update(ssl=tls, ssl_handshake_timeout=self._request_timeout)
        if host:
            server = await asyncio.start_server(self._handle, host, port, **options)
        else:
            server = await asyncio.start_server(self._handle, sock=listen_any(port), **options)
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

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            try:
                request = await read_request(reader, self._request_timeout)
            except BadRequest as bad:
                await self._send(writer, error(bad.status), head_only=False)
                return
            except asyncio.IncompleteReadError:
                return
            if request.method not in ("GET", "HEAD"):
                response = Response(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    b"method not allowed\n",
                    headers=(("Allow", "GET, HEAD"),),
                )
            else:
                response = await self.route(request)
            await self._send(writer, response, head_only=request.method == "HEAD")
        except Exception as failure:  # a peer that went away, mostly
            log.debug("%s: connection failed: %r", self.name, failure)
        finally:
            if task is not None:
                self._connections.discard(task)
            await close(writer)

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, *, head_only: bool
    ) -> None:
        await write_response(writer, response, head_only=head_only, deadline=self._request_timeout)


async def close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:  # timeout, or the peer reset the connection
        writer.transport.abort()


def listen_any(port: int) -> socket.socket:
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
