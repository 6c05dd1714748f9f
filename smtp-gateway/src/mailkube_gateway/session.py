"""One SMTP connection: aiosmtpd's protocol engine (command loop, STARTTLS, PROXY protocol,
AUTH challenges) with the commands the gateway needs done its own way.

aiosmtpd is kept for what it does well. What is replaced, and why:
  EHLO        the gateway's own extension list (RFC 5321 §4.1.1.1), per listener
  MAIL, RCPT  strict RFC 5321 §4.1.2 paths, DSN parameters (RFC 3461), which aiosmtpd refuses,
              and the relay and recipient policy (policy.py)
  DATA        a chunked, smuggling-safe reader (data.py) instead of line-by-line reading, the
              bytes held counted against the process's data_memory_limit (data_memory.py)
  AUTH        PLAIN and LOGIN verified off the event loop; who may try, and after how long,
              decided by auth_throttle on what Redis remembers
  replies     an enhanced status code on every one (RFC 2034 §3: all but the greeting and the
              answer to HELO or EHLO, before EHLO too), errors counted (421 past max_errors),
              unknown and HTTP commands handled, a write timeout; a failing command answers
              451 4.3.0 and is logged, its exception's text never sent
  the loop    the command loop itself (`serve`): aiosmtpd's, without its per-line
              logging, with busy tracking for a graceful stop, and one dispatch table per class
  greeting    on MX, held back by greet_pause, and commands gated by the connection-level
              checks (screening/): a refused client still greets and says goodbye
Connection state (client address, leases, trace span) lives on this object, so it survives
STARTTLS, after which aiosmtpd starts a fresh Session as RFC 3207 §4.2 requires.

A connection costs little before its first command: aiosmtpd's constructor scans the session
and the handler with `inspect.getmembers` (which also evaluates every property) to build its
method tables; this class builds its table once and sets aiosmtpd's state itself. The idle
timer is re-armed by moving a deadline, not by a new timer per command. What that takes of
aiosmtpd's private side is in aiosmtpd_adapter.py, and only there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable

from aiosmtpd.proxy_protocol import ProxyData, get_proxy
from aiosmtpd.smtp import ALLOWED_BEFORE_STARTTLS, SMTP, TLSSetupException
from opentelemetry import trace

from mailkube_core.telemetry import span_ids_only, spans_exported

from . import replies, sasl
from .aiosmtpd_adapter import ProtocolBase
from .auth import AuthOutcome
from .bdat import SYNTAX as BDAT_SYNTAX
from .bdat import Chunks, parse_bdat, read_chunk
from .data import read_data
from .gateway import Gateway
from .listeners import ListenerSpec
from .params import ParamError, parse_mail_params, parse_rcpt_params
from .policy import REDIS_ERRORS, Policy, Transaction
from .received import TlsInfo
from .relay import PathSyntaxError, is_postmaster, parse_path, split_path_command
from .replies import with_enhanced_code
from .rules import Client
from .screening.screen import UNGATED, ClientScreen

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("mailkube.gateway")

# RFC 5321 §4.5.3.1.4: 512 octets, plus what each extension adds: SIZE (RFC 1870) 26, BODY
# 14, SMTPUTF8 10, RET 9, ENVID 107 (RFC 3461 §4), AUTH= 500 (RFC 4954 §5); NOTIFY 28 and
# ORCPT 500 on RCPT. RFC 4954 §4: AUTH lines up to 12288 octets.
COMMAND_LIMITS = {"MAIL": 512 + 26 + 14 + 10 + 9 + 107 + 500, "RCPT": 512 + 28 + 500,
                  "AUTH": 12288}  # fmt: skip
#: a session's command: the unbound method, called with the session and the argument
Command = Callable[["GatewaySMTP", str | None], Awaitable[None]]
HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "PATCH"})
#: the greeting's text after the host name
IDENT = "ESMTP Mailkube"


class GatewaySMTP(ProtocolBase):
    line_length_limit = 64 * 1024  # stream buffer; command lengths are checked per command

    #: command name -> method, for every smtp_* method of the class (see _command_table)
    _commands: dict[str, Command]

    def __init__(self, gateway: Gateway, listener: ListenerSpec) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.listener = listener
        self.policy = Policy(gateway, self.close_with)
        certs = gateway.certs
        tls_context = certs.context if certs is not None else None
        self._adopt(
            loop=asyncio.get_running_loop(),
            line_limit=self.line_length_limit,
            ident=IDENT,
            hostname=settings.hostname,
            data_size_limit=settings.max_message_size,
            tls_context=tls_context,
            require_starttls=bool(tls_context and listener.require_tls),
            timeout=settings.read_timeout.total_seconds(),
            auth_required=listener.auth_required,
        )
        self.command_size_limits = COMMAND_LIMITS
        # connection state (kept across STARTTLS)
        self.client_ip = "unknown"
        self.client_port = 0
        self.txn: Transaction | None = None
        self.errors = 0
        self.busy = False
        self.stop_requested = False
        self.span: trace.Span | None = None
        self._expect_proxy = False
        self._proxy_timeout_seconds = settings.proxy_protocol_timeout.total_seconds()
        self._tls_waiter: asyncio.Future[None] | None = None
        #: the connection-level checks, while commands must wait for their verdict
        self._gate: ClientScreen | None = None
        #: during the greet pause: set when the client sends anything
        self._talked_early: asyncio.Future[None] | None = None
        #: the BDAT chunks of the transaction so far (RFC 3030)
        self._chunks: Chunks | None = None
        #: replies held back while the client's next pipelined command is here (push)
        self._corked = bytearray()

    # --- connection lifecycle --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername") or ("unknown", 0)
            self.client_ip, self.client_port = str(peer[0]), int(peer[1])
            self._expect_proxy = self.listener.proxy and self._trusted_proxy(self.client_ip)
            self.gateway.sessions.add(self)
            self.span = self._session_span()
        super().connection_made(transport)
        if first and self.listener.implicit_tls and not self._expect_proxy:
            # now, before the event loop can hand the ClientHello to the stream reader
            self._tls_waiter = self.begin_tls()

    def _session_span(self) -> trace.Span:
        """The session's span, parent of each message's. Where no span processor would see it
        (no OTLP endpoint: spans only carry ids for logs and the queue), it is only its ids,
        which cost a fraction of a recorded span; messages still record theirs under it."""
        if spans_exported():
            return _tracer.start_span(
                "smtp.session",
                kind=trace.SpanKind.SERVER,
                attributes={"smtp.listener": self.listener.name, "client.address": self.client_ip},
            )
        return span_ids_only()

    def connection_lost(self, error: Exception | None) -> None:
        self._forget()
        with contextlib.suppress(AssertionError):
            super().connection_lost(error)

    def _forget(self) -> None:
        """The connection is gone: out of the session set, span ended, lease released."""
        self.transaction_reset()
        self.gateway.session_closed(self)
        if self.span is not None:
            self.span.end()
            self.span = None
        self.policy.release()

    def _trusted_proxy(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.gateway.settings.trusted_proxies)

    async def serve(self) -> None:
        """Admission (after the PROXY header and implicit TLS, where they apply), the
        greeting, then one command after another until the connection ends."""
        if self._expect_proxy:
            if not await self._read_proxy():
                return
        else:
            if self.listener.implicit_tls and not await self._start_implicit_tls():
                return
            if not await self._admit():
                return
        screen = self.policy.screen
        if screen is not None and screen.greet_pause and not await self._greet_pause(screen):
            return
        await self.push(f"220 {self.hostname} {IDENT}", plain=True)
        # the connection lease was asked for before the greeting went out; no command is
        # read before it is known (a client over its limit has been told 421 and dropped)
        if await self.policy.admitted():
            if screen is not None and screen.gating:
                self._gate = screen
            await self._command_loop()

    async def _greet_pause(self, screen: ClientScreen) -> bool:
        """RFC 5321 §4.3.1: the client waits for the greeting. Wait up to greet_pause before
        sending it; a client that sends anything meanwhile is refused, dropped and remembered
        (False). Bytes are noticed as they arrive (data_received)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        # bytes that came right behind a PROXY header are already in
        if not self.buffered():
            self._talked_early = talked = self.loop.create_future()
            try:
                async with asyncio.timeout(screen.greet_pause):
                    await talked
            except TimeoutError:
                screen.waited()
                return True
            finally:
                self._talked_early = None
        self.close_with(replies.TALKED_EARLY)
        remembering = screen.talked_early()
        self.gateway.background.add(remembering)
        remembering.add_done_callback(self.gateway.background.discard)
        return False

    def data_received(self, data: bytes) -> None:
        talked = self._talked_early
        if talked is not None and not talked.done():  # during the greet pause
            talked.set_result(None)
        super().data_received(data)

    async def _read_proxy(self) -> bool:
        """The PROXY header of a trusted proxy, within proxy_protocol_timeout."""
        assert self.session is not None
        self.reset_timeout(self._proxy_timeout_seconds)
        proxy = await get_proxy(self.reader)
        self.session.proxy_data = proxy
        if not proxy or not await self.on_proxy(proxy):
            if self.transport is not None:
                self.transport.close()
            return False
        self.reset_timeout()
        return True

    async def _command_loop(self) -> None:
        """aiosmtpd's loop (SMTP._handle_client) for this class: the same checks and replies
        in the same order, no per-line logging, unknown and HTTP commands answered by the
        session, and `busy` set while a command runs (a graceful stop waits for it)."""
        reader = self.reader
        commands = self._commands
        while self.transport is not None:
            try:
                try:
                    line: bytes = await reader.readuntil()
                except asyncio.LimitOverrunError as error:
                    # too long: read to the end of the line, then say so
                    await reader.read(error.consumed)
                    while True:
                        try:
                            await reader.readuntil()
                            break
                        except asyncio.LimitOverrunError as more:
                            await reader.read(more.consumed)
                    await self.push(replies.LINE_TOO_LONG)
                    continue
                line = line.rstrip(b"\r\n")
                if not line:
                    await self.push(replies.BAD_SYNTAX)
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    await self.push(replies.BAD_SYNTAX)
                    continue
                # arguments may be UTF-8 (SMTPUTF8) or anything: surrogateescape keeps bytes
                arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
                session = self.session
                assert session is not None
                if session.extended_smtp:
                    limit = COMMAND_LIMITS.get(command, SMTP.command_size_limit)
                else:
                    limit = SMTP.command_size_limit
                if len(line) > limit:
                    await self.push(replies.LINE_TOO_LONG)
                    continue
                if not self.tls_handshake_ok and command != "QUIT":
                    await self.push(replies.TLS_FAILED)
                    continue
                if (
                    self.require_starttls
                    and not self.tls_active
                    and command not in ALLOWED_BEFORE_STARTTLS
                ):
                    await self.push(replies.STARTTLS_FIRST)  # RFC 3207 §4
                    continue
                method = commands.get(command)
                self.reset_timeout()
                if method is None:
                    method = (
                        GatewaySMTP.http_command
                        if command in HTTP_VERBS
                        else GatewaySMTP.unknown_command
                    )
                elif self._gate is not None and command not in UNGATED and await self._refused():
                    continue
                self.busy = True
                try:
                    await method(self, arg)
                finally:
                    self.busy = False
                if self.stop_requested:
                    self.close_with(replies.SHUTTING_DOWN)
            except (asyncio.CancelledError, ConnectionResetError):
                self.writer.close()
                raise
            except Exception as error:
                if isinstance(error, TLSSetupException):
                    if self.transport is not None:
                        self.transport.close()
                    self.connection_lost(error)
                elif not isinstance(error, asyncio.IncompleteReadError):  # not a hang-up
                    await self.push(await self.handle_exception(error))

    async def handle_exception(self, error: Exception) -> str:
        """A command failed for a reason of our own: logged with its traceback; the client
        is told to try again, and nothing of the error (aiosmtpd would send its text)."""
        log.exception(
            "command failed", extra={"client_ip": self.client_ip, "error": type(error).__name__}
        )
        return replies.INTERNAL_ERROR

    async def _refused(self) -> bool:
        """Whether the connection-level checks refuse this command (the reply is sent). Waits
        for their verdict, each check within its deadline; a client they pass is not asked
        about again."""
        gate = self._gate
        assert gate is not None
        refusal = await gate.refusal()
        if refusal is None:
            self._gate = None
            return False
        await self.push(refusal)
        return True

    async def _admit(self) -> bool:
        reply = self.policy.admit(self.listener.name, self.client_ip)
        if reply is None:
            return True
        await self.push(reply)
        self._close()
        return False

    async def on_proxy(self, proxy: ProxyData) -> bool:
        """A trusted proxy's header: the client is who it names (RFC-less, but see
        haproxy's proxy-protocol.txt §2). Then admission and implicit TLS, in that order."""
        if not proxy.valid:
            return False
        if proxy.src_addr is not None:  # not a LOCAL/UNKNOWN header (a proxy's health check)
            self.client_ip = str(ipaddress.ip_address(proxy.src_addr))
            self.client_port = int(proxy.src_port or 0)
            if self.span is not None:
                self.span.set_attribute("client.address", self.client_ip)
        if not await self._admit():
            return False
        return not (self.listener.implicit_tls and not await self._start_implicit_tls())

    async def _start_implicit_tls(self) -> bool:
        waiter = self._tls_waiter or self.begin_tls()
        self._tls_waiter = None
        try:
            await waiter
        except Exception as error:
            log.debug("implicit TLS handshake failed", extra={"client_ip": self.client_ip,
                                                              "error": repr(error)})  # fmt: skip
            self.drop_failed_tls()
            self._forget()
            return False
        return True

    # --- state ------------------------------------------------------------------------------

    @property
    def tls(self) -> TlsInfo | None:
        if self.transport is None:
            return None
        ssl_object: ssl.SSLObject | None = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        if cipher is None:
            return None
        return TlsInfo(ssl_object.version() or "TLS", cipher[0], cipher[2])

    @property
    def auth_user(self) -> str | None:
        session = self.session
        if session is not None and session.authenticated and isinstance(session.auth_data, str):
            return session.auth_data
        return None

    @property
    def helo(self) -> str:
        return (self.session.host_name if self.session else None) or ""

    @property
    def esmtp(self) -> bool:
        return bool(self.session and self.session.extended_smtp)

    def _client(self) -> Client:
        """The client as it is now (a transaction keeps the one that started it)."""
        return Client(
            self.listener.name, self.client_ip, self.auth_user, self.helo, self.esmtp, self.tls
        )

    def transaction_reset(self) -> None:
        # aiosmtpd's envelope is unused: the transaction is self.txn
        self.txn = None
        chunks = self._chunks
        if chunks is not None:
            self._chunks = None
            chunks.close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        transport = self.raw_transport()
        if transport is not None:
            transport.abort()  # type: ignore[attr-defined]

    def request_stop(self) -> None:
        self.stop_requested = True
        if not self.busy and self.transport is not None:
            self.close_with(replies.SHUTTING_DOWN)

    def close_with(self, reply: str) -> None:
        """Say a last thing and hang up, without waiting for the client to read it."""
        if self.transport is not None and not self.transport.is_closing():
            data = bytes(self._corked) + reply.encode() + b"\r\n"
            self._corked.clear()
            self.transport.write(data)  # type: ignore[attr-defined]
            self.transport.close()

    def timed_out(self) -> None:
        # RFC 5321 §4.5.3.2: say why before closing
        log.info("session timed out", extra={"client_ip": self.client_ip})
        self.close_with(replies.TIMEOUT)

    def unread(self, data: bytes) -> None:
        """Give bytes read past the end of DATA back to the command loop (pipelining)."""
        self.buffered()[0:0] = data

    # --- replies ----------------------------------------------------------------------------

    async def push(
        self, status: str | bytes, *, plain: bool = False, pipelined: bool = False
    ) -> None:
        """Send a reply, with an enhanced status code added where it has none, unless
        `plain`: the greeting and the answer to HELO or EHLO (RFC 2034 §3).

        `pipelined`: the reply to a command that may stand anywhere in a pipelined group
        (MAIL, RCPT: RFC 2920 §3.1; BDAT: RFC 3030 §2). While the client's next command is
        already here, the reply waits for the next one and they go out in one write (one
        send, one segment), as a group's replies do from Postfix."""
        reply = status.decode() if isinstance(status, bytes) else status
        if not plain:
            reply = with_enhanced_code(reply)
        if reply[:1] in ("4", "5") and not reply.startswith("421"):
            self.errors += 1
            if self.errors >= self.gateway.settings.max_errors:
                log.info("too many errors", extra={"client_ip": self.client_ip})
                self.close_with(f"{reply}\r\n{replies.TOO_MANY_ERRORS}")
                return
        if self.transport is None or self.transport.is_closing():
            return
        data = reply.encode("utf-8") + b"\r\n"
        if pipelined and b"\n" in self.buffered():  # the next command is here already
            self._corked += data
            return
        if self._corked:
            data = bytes(self._corked) + data
            self._corked.clear()
        self.writer.write(data)
        if not self.transport.get_write_buffer_size():  # type: ignore[attr-defined]
            return  # all sent: nothing to wait for
        try:
            async with asyncio.timeout(self.gateway.settings.write_timeout.total_seconds()):
                await self.writer.drain()
        except TimeoutError:
            log.info("write timed out", extra={"client_ip": self.client_ip})
            self.abort()

    async def unknown_command(self, arg: str | None) -> None:
        await self.push(replies.UNKNOWN_COMMAND)

    async def http_command(self, arg: str | None) -> None:
        # an HTTP client (or a cross-protocol attack through one): nothing to say to it
        log.info("HTTP request on an SMTP port", extra={"client_ip": self.client_ip})
        self._close()

    # --- commands ---------------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self.transaction_reset()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [
            f"{self.hostname} Hello {hostname[:64]}",
            "PIPELINING",
            f"SIZE {self.gateway.settings.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "CHUNKING",
            "BINARYMIME",  # RFC 3030 §3 (with CHUNKING: binary content comes by BDAT)
            # RFC 9422 §4.2: the recipients one transaction takes (452 4.5.3 past it)
            f"LIMITS RCPTMAX={self.gateway.settings.max_recipients}",
        ]
        tls = self.tls_active
        if self.listener.starttls and not tls:
            lines.append("STARTTLS")
        if self.listener.auth and tls:
            lines.append("AUTH PLAIN LOGIN")
        if tls:  # RFC 8689 §3: offered only over TLS
            lines.append("REQUIRETLS")
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}"
        await self.push(text, plain=True)

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        self.transaction_reset()
        assert self.session is not None
        self.session.extended_smtp = False
        self.session.host_name = hostname
        await self.push(f"250 {self.hostname}", plain=True)

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_active:
            await self.push("554 5.5.1 TLS already active")
            return
        if not self.listener.starttls:
            await self.push("502 5.5.1 STARTTLS not available")
            return
        await super().smtp_STARTTLS(arg or "")

    async def smtp_HELP(self, arg: str | None) -> None:
        if await self.check_auth_needed("HELP"):
            return
        names = sorted(
            name
            for name in self._commands
            if (name != "STARTTLS" or self.listener.starttls)
            and (name != "AUTH" or self.listener.auth)
        )
        await self.push(f"250 2.0.0 Supported commands: {' '.join(names)}")

    async def smtp_VRFY(self, arg: str | None) -> None:
        # RFC 5321 §3.5.3: 252 says nothing about which mailboxes exist
        await self.push("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.5.1 EXPN not available")

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            await self.push(replies.NEED_HELO.format(helo=helo))
            return True
        return False

    async def _needs_session(self) -> bool:
        """HELO/EHLO and (on submission) AUTH first; True if a reply was sent."""
        if await self.check_helo_needed():
            return True
        return await self.check_auth_needed("MAIL")

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._needs_session():
            return
        if self.txn is not None:
            await self.push(replies.NESTED_MAIL)
            return
        split = split_path_command(arg, "FROM:", esmtp=self.esmtp)
        if split is None:
            await self.push(replies.MAIL_SYNTAX)
            return
        path_text, params_text = split
        try:
            params = parse_mail_params(params_text, max_size=self.gateway.settings.max_message_size)
        except ParamError as error:
            await self.push(error.reply)
            return
        if not path_text.isascii() and not params.smtputf8:
            await self.push(replies.NON_ASCII_NEEDS_SMTPUTF8)
            return
        if params.requiretls and not self.tls_active:
            await self.push(replies.REQUIRETLS_NEEDS_TLS)
            return
        try:
            path = parse_path(path_text, utf8=params.smtputf8, null_ok=True)
        except PathSyntaxError:
            await self.push(replies.BAD_SENDER_SYNTAX)
            return
        reply, self.txn = await self.policy.mail(self._client(), path, params)
        await self.push(reply, pipelined=True)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._needs_session():
            return
        txn = self.txn
        if txn is None:
            await self.push(replies.NEED_MAIL)
            return
        split = split_path_command(arg, "TO:", esmtp=self.esmtp)
        if split is None:
            await self.push(replies.RCPT_SYNTAX)
            return
        path_text, params_text = split
        try:
            params = parse_rcpt_params(params_text)
        except ParamError as error:
            await self.push(error.reply)
            return
        if not path_text.isascii() and not txn.params.smtputf8:
            await self.push(replies.NON_ASCII_NEEDS_SMTPUTF8)
            return
        if is_postmaster(path_text):
            reply = await self.policy.rcpt(txn, None, params)
        else:
            try:
                path = parse_path(path_text, utf8=txn.params.smtputf8)
            except PathSyntaxError:
                await self.push(replies.BAD_RECIPIENT_SYNTAX)
                return
            reply = await self.policy.rcpt(txn, path, params)
        await self.push(reply, pipelined=True)

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self._needs_session():
            return
        txn = self.txn
        if txn is None:
            await self.push(replies.NEED_MAIL)
            return
        if not txn.recipients:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push(replies.DATA_SYNTAX)
            return
        if self._chunks is not None:  # RFC 3030 §2: not both in one transaction
            await self.push(replies.DATA_AFTER_BDAT)
            return
        if txn.params.body == "BINARYMIME":  # RFC 3030 §3: binary content by BDAT only
            await self.push(replies.DATA_FOR_BINARYMIME)
            return
        await self.push(replies.START_DATA)
        # the message's bytes count against data_memory_limit until it is queued or refused,
        # and are given back however this ends (a hang-up, a cancelled session included)
        with self.gateway.data_memory.hold() as hold:
            result = await read_data(
                self.reader,
                self.unread,
                limit=self.gateway.settings.max_message_size,
                on_progress=self.reset_timeout,
                hold=hold,
            )
            self.reset_timeout()
            try:
                reply = await self.policy.data(txn, result, self.span)
            finally:
                self.transaction_reset()
        await self.push(reply)

    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 §2 (the rules as applied: bdat.py). The chunk is read before any reply,
        refused or not."""
        parsed = parse_bdat(arg)
        if parsed is None:
            # how many octets follow is unknown: none of them may be read as commands
            self.close_with(BDAT_SYNTAX)
            return
        size, last = parsed
        txn = self.txn
        refusal = self._bdat_refusal()
        chunks = None
        into = None
        if refusal is None:
            chunks = self._chunks
            if chunks is None:
                settings = self.gateway.settings
                hold = self.gateway.data_memory.hold()
                chunks = self._chunks = Chunks(hold, settings.max_message_size)
            if chunks.admit(size):
                into = chunks.content
        await read_chunk(self.reader, size, into, self.reset_timeout)
        self.reset_timeout()
        if refusal is not None or chunks is None or txn is None:
            await self.push(refusal or replies.NEED_MAIL)
            return
        chunks.wire_size += size
        if chunks.refused is None and not last:
            await self.push(replies.CHUNK_OK.format(size=size), pipelined=True)
            return
        # the last chunk, or one refused: either ends the transaction (the chunks still in
        # the pipeline after a refused one get 503, no MAIL)
        try:
            binary = txn.params.body == "BINARYMIME"
            reply = await self.policy.data(txn, chunks.result(binary=binary), self.span)
        finally:
            self.transaction_reset()
        await self.push(reply)

    def _bdat_refusal(self) -> str | None:
        """Why a BDAT cannot be taken now (None: it can); said after its chunk is read."""
        session = self.session
        assert session is not None
        if not session.host_name:
            return replies.NEED_HELO.format(helo="HELO")
        if self.listener.auth_required and not session.authenticated:
            return replies.AUTH_REQUIRED
        if self.txn is None:
            return replies.NEED_MAIL
        if not self.txn.recipients:
            return replies.NEED_RCPT
        return None

    # --- AUTH -------------------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        assert self.session is not None
        if not self.listener.auth or not self.esmtp:
            await self.push(replies.AUTH_NOT_OFFERED)
            return
        if not self.tls_active:
            await self.push(replies.AUTH_NEEDS_TLS)
            return
        if self.session.authenticated:
            await self.push(replies.AUTH_ALREADY)
            return
        if self.txn is not None:  # RFC 4954 §4: not during a mail transaction
            await self.push(replies.AUTH_IN_TRANSACTION)
            return
        parsed = sasl.parse_auth(arg)
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        mechanism, initial = parsed
        authenticator = self.gateway.authenticator
        try:
            credentials = await sasl.read_credentials(
                mechanism, initial, self.push, self.reader.readline
            )
            if credentials is None:
                return
            # a throttled try may wait up to auth_max_delay before its password is checked
            self.reset_timeout(self.idle_timeout + authenticator.rules.max_delay)
            # the user's submission suspension is read alongside (spam/suspended.py)
            outcome, user = await self.gateway.suspended.authenticate(
                authenticator, self.client_ip, credentials
            )
        except REDIS_ERRORS:  # Redis down: say so, never let it pass
            await self.push(replies.AUTH_TEMP)
            return
        if outcome is AuthOutcome.OK:
            self.session.authenticated = True
            self.session.auth_data = user  # type: ignore[assignment]
            await self.push(replies.AUTH_OK)
        elif outcome is AuthOutcome.THROTTLED:
            self.close_with(replies.AUTH_THROTTLED)
        else:
            await self.push(replies.AUTH_FAILED)


def _command_table(cls: type[GatewaySMTP]) -> dict[str, Command]:
    return {name[5:]: getattr(cls, name) for name in dir(cls) if name.startswith("smtp_")}


GatewaySMTP._commands = _command_table(GatewaySMTP)
