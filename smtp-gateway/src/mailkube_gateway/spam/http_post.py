"""One HTTP/1.0 POST and its answer over a connection of its own: all that asking rspamd needs.

rspamd's workers answer a request and close the connection (rspamd 3.4 answers
`Connection: close` whatever the client asks), so there is nothing to pool or keep alive:
each scan is connect, write, read to the end. aiohttp did the same with its request
machinery around it (cookies, redirects, tracing, its connection pool): 406 µs of CPU per
request against this module's 203 µs (parsing the answer included), when the scanning stage's
whole budget is 0.3 ms per message (docs/benchmarks.md). What it does not do, it refuses: an answer
without a status line, one cut short of its Content-Length, a chunked one (an HTTP/1.0
request must not get one), one larger than `limit`.

    endpoint = Endpoint.from_url("http://rspamd:11333/checkv2")
    status, body = await post(endpoint, [("IP", "192.0.2.1")], message, limit=2**21)

The caller sets the deadline (asyncio.timeout around the call); a cancelled exchange aborts
its connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: how long a host name's addresses are used before they are looked up again (aiohttp's
#: default too); a failed connection forgets them at once
ADDRESS_TTL = 10.0
MAX_HEADER_SECTION = 64 * 1024


class HttpError(Exception):
    """The exchange failed: no connection, a broken or refused answer. str() says why."""


@dataclass
class Endpoint:
    host: str
    port: int
    path: str
    tls: ssl.SSLContext | None = None
    #: resolved addresses and when they expire (loop time); IP literals never expire
    _addresses: list[tuple[str, int]] = field(default_factory=list)
    _expires: float = 0.0

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = ssl.create_default_context() if parts.scheme == "https" else None
        port = parts.port or (443 if tls else 80)
        return cls(parts.hostname, port, parts.path or "/", tls)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    async def addresses(self) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        if self._addresses and (self._expires == 0 or loop.time() < self._expires):
            return self._addresses
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            found = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            self._addresses = [(str(info[4][0]), self.port) for info in found]
            self._expires = loop.time() + ADDRESS_TTL
        else:
            self._addresses, self._expires = [(self.host, self.port)], 0.0
        return self._addresses

    def forget(self) -> None:
        """The addresses did not answer: look the name up again next time."""
        if self._expires:
            self._addresses = []


class _Exchange(asyncio.Protocol):
    """Writes the request, collects the answer until the server closes."""

    def __init__(self, request: bytes, limit: int, done: asyncio.Future[bytes]) -> None:
        self.request = request
        self.limit = limit
        self.done = done
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.received += data
        if len(self.received) > self.limit and self.transport is not None:
            if not self.done.done():
                self.done.set_exception(HttpError(f"answer larger than {self.limit} bytes"))
            self.transport.abort()

    def eof_received(self) -> bool:
        return False  # close: the answer is complete

    def connection_lost(self, error: Exception | None) -> None:
        if self.done.done():
            return
        if error is not None:
            self.done.set_exception(HttpError(f"connection lost: {error!r}"[:200]))
        else:
            self.done.set_result(bytes(self.received))


def build_request(endpoint: Endpoint, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"POST {endpoint.path} HTTP/1.0", f"Host: {endpoint.host_header}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n"
    return head + body


def parse_response(data: bytes) -> tuple[int, bytes]:
    """(status, body) of a complete HTTP/1.x answer read to the connection's end."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        raise HttpError("no complete header section" if data else "empty answer")
    if len(head) > MAX_HEADER_SECTION:
        raise HttpError("header section too large")
    status_line, *fields = head.split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HttpError("no HTTP status line")
    length: int | None = None
    for line in fields:
        name, colon, value = line.partition(b":")
        if not colon:
            raise HttpError("malformed header field")
        name = name.strip().lower()
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit() or (length is not None and length != int(value)):
                raise HttpError("bad Content-Length")
            length = int(value)
        elif name == b"transfer-encoding" and value.strip().lower() != b"identity":
            raise HttpError("unexpected Transfer-Encoding")
    if length is not None:
        if len(body) < length:
            raise HttpError(f"answer cut short: {len(body)} of {length} bytes")
        body = body[:length]
    return int(code), body


async def post(
    endpoint: Endpoint, headers: Sequence[tuple[str, str]], body: bytes, *, limit: int
) -> tuple[int, bytes]:
    loop = asyncio.get_running_loop()
    request = build_request(endpoint, headers, body)
    try:
        addresses = await endpoint.addresses()
    except OSError as error:
        raise HttpError(f"cannot resolve {endpoint.host}: {error}"[:200]) from None
    last: OSError | None = None
    for host, port in addresses:
        done: asyncio.Future[bytes] = loop.create_future()
        try:
            transport, _ = await loop.create_connection(
                lambda: _Exchange(request, limit, done),  # noqa: B023 - used at once
                host,
                port,
                ssl=endpoint.tls,
                server_hostname=endpoint.host if endpoint.tls else None,
            )
        except OSError as error:
            last = error
            continue
        try:
            return parse_response(await done)
        finally:
            if not transport.is_closing():  # cancelled (the caller's deadline), or failed
                transport.abort()
    endpoint.forget()
    raise HttpError(f"cannot connect to {endpoint.host}:{endpoint.port}: {last}"[:200])
