"""Fake remote mail servers for the worker tests: real aiosmtpd servers on 127.0.0.x (all of
127.0.0.0/8 is loopback on Linux) or ::1, on one unprivileged port that the worker's
`smtp_port` setting points at, with scripted replies per recipient, per attempt, at EHLO, and
optional STARTTLS / implicit TLS / AUTH. Plus a server that refuses at the greeting."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    helo: str | None
    tls: bool
    mail_options: list[str]
    login: str | None


@dataclass
class Script:
    """What the server answers. Replies are full lines, e.g. "550 5.1.1 no such user"."""

    #: address -> RCPT reply; a list is consumed one reply per transaction (then 250)
    rcpt: dict[str, str | list[str]] = field(default_factory=dict)
    #: replies to DATA's end, one per transaction, then 250
    data: list[str] = field(default_factory=list)
    #: reply to EHLO instead of the extensions
    ehlo: str | None = None
    #: offer REQUIRETLS (RFC 8689) after STARTTLS and take it on MAIL
    requiretls: bool = False
    mail: str | None = None
    #: the first DATA waits for this event, so a test can act while a delivery is in
    #: flight; `held` is set once it waits. Then it answers 451 and stores nothing, unless
    #: `keep_held` (the client is still there): then it goes on as usual
    hold: threading.Event | None = None
    keep_held: bool = False
    held: threading.Event = field(default_factory=threading.Event)


class Handler:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[Received] = []
        self.connections = 0
        self.active = 0
        self.most_active = 0
        self.transactions = 0
        self.lock = threading.Lock()

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        if self.script.ehlo:
            return [self.script.ehlo]
        if self.script.requiretls and session.ssl is not None:
            return [*responses[:-1], "250-REQUIRETLS", responses[-1]]
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        if self.script.mail:
            return self.script.mail
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        reply = self.script.rcpt.get(address.lower())
        if isinstance(reply, list):
            reply = reply.pop(0) if reply else None
        if reply and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        return reply or "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        hold = self.script.hold
        if hold is not None and not self.script.held.is_set():
            self.script.held.set()
            await asyncio.to_thread(hold.wait, 60)
            if not self.script.keep_held:
                return "451 4.3.0 the client went away"
        with self.lock:
            self.transactions += 1
            reply = self.script.data.pop(0) if self.script.data else "250 2.0.0 queued"
            if reply.startswith("2"):
                self.received.append(
                    Received(
                        mail_from=str(envelope.mail_from),
                        rcpt_tos=list(envelope.rcpt_tos),
                        data=bytes(envelope.original_content or b""),
                        helo=session.host_name,
                        tls=session.ssl is not None,
                        mail_options=list(envelope.mail_options),
                        login=str(session.auth_data) if session.auth_data else None,
                    )
                )
        return reply


class CountingSMTP(SMTP):
    """Counts connections, and the most open at once."""

    def connection_made(self, transport: Any) -> None:
        handler = self.event_handler
        if isinstance(handler, Handler):
            with handler.lock:
                handler.connections += 1
                handler.active += 1
                handler.most_active = max(handler.most_active, handler.active)
        super().connection_made(transport)

    def _getparams(self, params: Any) -> Any:
        """REQUIRETLS is taken (and kept in mail_options) when the script offers it."""
        handler = self.event_handler
        if isinstance(handler, Handler) and handler.script.requiretls:
            params = [p for p in params if p != "REQUIRETLS"]
        return super()._getparams(params)

    def connection_lost(self, error: Exception | None) -> None:
        handler = self.event_handler
        if isinstance(handler, Handler):
            with handler.lock:
                handler.active -= 1
        super().connection_lost(error)


class CountingController(Controller):
    def factory(self) -> SMTP:
        return CountingSMTP(self.handler, **self.SMTP_kwargs)


class Authenticator:
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:  # fmt: skip
        if isinstance(auth_data, LoginPassword):
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if self.users.get(user) == password:
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)


@dataclass
class FakeMx:
    host: str
    port: int
    handler: Handler
    controller: Controller

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def stop(self) -> None:
        self.controller.stop()


class Certificates:
    """A test CA (trustme) and server certificates it issues, as files for the worker."""

    def __init__(self, directory: Any) -> None:
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self, *names: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*names).configure_cert(context)
        return context


class Sink:
    """Postfix's smtp-sink: takes every message and throws it away, counting (-c)."""

    def __init__(self, host: str, port: int, log: Path) -> None:
        self.log = log
        sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        privileges = ["-u", "nobody"] if os.geteuid() == 0 else []  # required as root
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sink, *privileges, "-c", f"{host}:{port}", "64"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            assert self.process.poll() is None, log.read_text()
            with socket.socket() as probe:
                if probe.connect_ex((host, port)) == 0:
                    break
            assert time.monotonic() < deadline, "smtp-sink did not start"
            time.sleep(0.02)

    def messages(self) -> int:
        """Messages received so far (smtp-sink -c writes 'sess=N quit=N mesg=N')."""
        counts = re.findall(r"mesg=(\d+)", self.log.read_text(errors="replace"))
        return max((int(n) for n in counts), default=0)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class MxFarm:
    """Starts fake MX hosts on one port; stops them all at the end of the test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.servers: list[FakeMx] = []
        self.refusers: list[socketserver.TCPServer] = []
        self.sinks: list[Sink] = []

    def start(
        self,
        host: str,
        script: Script | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        users: dict[str, str] | None = None,
        size_limit: int | None = 33554432,
        port: int | None = None,
        smtputf8: bool = True,
    ) -> FakeMx:
        handler = Handler(script or Script())
        kwargs: dict[str, Any] = {"data_size_limit": size_limit, "enable_SMTPUTF8": smtputf8}
        if tls is not None:
            kwargs["tls_context"] = tls
        if users is not None:
            kwargs["authenticator"] = Authenticator(users)
            kwargs["auth_required"] = True  # MAIL refused until AUTH succeeded
            kwargs["auth_require_tls"] = tls is not None or implicit_tls is not None
        controller = CountingController(
            handler, hostname=host, port=port or self.port, ssl_context=implicit_tls,
            server_hostname="localhost" if implicit_tls else None, **kwargs,
        )  # fmt: skip
        if implicit_tls is not None:
            # the controller's own start-up probe must trust our test CA
            controller.ssl_context = implicit_tls
        controller.start()
        with handler.lock:  # the controller's own start-up probe is not a client
            handler.connections = handler.most_active = 0
        server = FakeMx(host, port or self.port, handler, controller)
        self.servers.append(server)
        return server

    def refuse_at_greeting(self, host: str, reply: str = "421 4.3.2 busy, try later") -> list[int]:
        """A host whose greeting is a refusal; returns a list counting connections."""
        seen: list[int] = []

        class Refuse(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                seen.append(1)
                self.request.sendall(reply.encode() + b"\r\n")

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        server = Server((host, self.port), Refuse)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.refusers.append(server)
        return seen

    def start_sink(self, host: str, log: Path) -> Sink:
        sink = Sink(host, self.port, log)
        self.sinks.append(sink)
        return sink

    def stop(self) -> None:
        for sink in self.sinks:
            sink.stop()
        for server in self.servers:
            server.stop()
        for refuser in self.refusers:
            refuser.shutdown()
            refuser.server_close()


def free_port_on(hosts: list[str]) -> int:
    """One port free on every address given (an MX port shared by all fake hosts)."""
    for _ in range(200):
        port = random.randrange(21000, 30000)
        if all(_bindable(host, port) for host in hosts):
            return port
    raise RuntimeError("no port free on every test address")


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def loopback_hosts() -> Iterator[str]:
    yield "::1"
    for last in range(20, 45):
        yield f"127.0.0.{last}"
