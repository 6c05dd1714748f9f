"""The three kinds of listener and the sockets they serve.

mx           port 25: mail from the world to our domains. STARTTLS offered, plain allowed
             unless require_tls; AUTH not offered unless auth_on_mx (and then after TLS).
submission   port 587 (RFC 6409): STARTTLS before AUTH, AUTH before MAIL.
submissions  port 465 (RFC 8314): TLS from the first byte, AUTH before MAIL.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from mailkube_core.settings import GatewaySettings, SettingsError, split_host_port

ListenerName = Literal["mx", "submission", "submissions"]
#: connections the kernel may hold for a listener before the gateway accepts them
BACKLOG = 1024


@dataclass(frozen=True)
class ListenerSpec:
    name: ListenerName
    host: str | None
    port: int
    #: TLS from the first byte (after a PROXY header, if any)
    implicit_tls: bool
    #: STARTTLS offered (a certificate is configured and TLS is not implicit)
    starttls: bool
    #: nothing but EHLO, STARTTLS, NOOP, QUIT before TLS
    require_tls: bool
    #: AUTH offered (only ever once TLS is on)
    auth: bool
    #: MAIL needs AUTH first
    auth_required: bool
    #: a PROXY protocol header is expected from trusted proxies
    proxy: bool

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if self.host and ":" in self.host else (self.host or "*")
        return f"{host}:{self.port}"


def listener_specs(settings: GatewaySettings) -> list[ListenerSpec]:
    have_tls = settings.tls_cert_file is not None
    if not have_tls and settings.submissions_listen:
        raise SettingsError(
            "invalid setting submissions_listen: implicit TLS needs tls_cert_file and tls_key_file"
        )
    proxied = set(settings.proxy_protocol_listeners)
    specs = []
    for address in settings.mx_listen:
        host, port = split_host_port(address)
        specs.append(
            ListenerSpec("mx", host, port, implicit_tls=False, starttls=have_tls,
                         require_tls=settings.require_tls and have_tls,
                         auth=settings.auth_on_mx and have_tls, auth_required=False,
                         proxy="mx" in proxied)
        )  # fmt: skip
    for address in settings.submission_listen:
        host, port = split_host_port(address)
        specs.append(
            ListenerSpec("submission", host, port, implicit_tls=False, starttls=have_tls,
                         require_tls=True, auth=True, auth_required=True,
                         proxy="submission" in proxied)
        )  # fmt: skip
    for address in settings.submissions_listen:
        host, port = split_host_port(address)
        specs.append(
            ListenerSpec("submissions", host, port, implicit_tls=True, starttls=False,
                         require_tls=False, auth=True, auth_required=True,
                         proxy="submissions" in proxied)
        )  # fmt: skip
    return specs


def _sockets(spec: ListenerSpec) -> list[socket.socket]:
    """Bound, listening sockets: every address of `host` (both IPv4 and IPv6 for '')."""
    infos = socket.getaddrinfo(
        spec.host, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    for family, kind, proto, _, address in infos:
        if (family, address) in seen:
            continue
        seen.add((family, address))
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # one socket per family, so "every address" means both
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            for other in sockets:
                other.close()
            raise
        sockets.append(sock)
    return sockets


async def serve_listener(
    spec: ListenerSpec,
    factory: Callable[[ListenerSpec], asyncio.Protocol],
    *,
    inherited: list[socket.socket] | None = None,
) -> list[asyncio.Server]:
    """Serve `spec` on new sockets, or on the `inherited` ones: an extra process of
    `processes` serves the very sockets of the first (app.py)."""
    loop = asyncio.get_running_loop()
    servers = []
    for sock in inherited if inherited is not None else _sockets(spec):
        # create_server listens again: without the backlog it would cut it to 100
        servers.append(await loop.create_server(lambda: factory(spec), sock=sock, backlog=BACKLOG))
    return servers
