"""One SMTP connection: aiosmtpd's protocol engine (command loop, STARTTLS, PROXY protocol,
AUTH challenges) with the commands the gateway needs done its own way.

aiosmtpd is kept for what it does well. What is replaced, and why:
  EHLO        the gateway's own extension list (RFC 5321 §4.1.1.1), per listener
  MAIL, RCPT  strict RFC 5321 §4.1.2 paths, DSN parameters (RFC 3461), which aiosmtpd refuses,
              and the relay and recipient policy (policy.py)
  DATA        a chunked, smuggling-safe reader (data.py) instead of line-by-line reading
  AUTH        PLAIN and LOGIN verified off the event loop, throttled in Redis
  replies     an enhanced status code on every one (RFC 2034), errors counted (421 past
              max_errors), unknown and HTTP commands handled, a write timeout
  the loop    the command loop itself (`_handle_client`): aiosmtpd's, without its per-line
              logging, with busy tracking for a graceful stop, and one dispatch table per class
Connection state (client address, leases, trace span) lives on this object, so it survives
STARTTLS, after which aiosmtpd starts a fresh Session as RFC 3207 §4.2 requires.

A connection costs little before its first command: aiosmtpd's constructor scans the session
and the handler with `inspect.getmembers` (which also evaluates every property) to build its
method tables; this class builds its table once and sets aiosmtpd's state itself. The idle
timer is re-armed by moving a deadline, not by a new timer per command.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import random
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.proxy_protocol import ProxyData, get_proxy
from aiosmtpd.smtp import ALLOWED_BEFORE_STARTTLS, SMTP, TLSSetupException, login_always_fail
from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from . import replies
from .auth import AuthOutcome, Credentials, MalformedCredentials, decode_plain
from .data import read_data
from .gateway import Gateway
from .listeners import ListenerSpec
from .params import ParamError, parse_mail_params, parse_rcpt_params
from .policy import Policy, Transaction
from .received import TlsInfo
from .relay import PathSyntaxError, is_postmaster, parse_path

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("mailkube.gateway")
_ids = RandomIdGenerator()
_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)

# RFC 5321 §4.5.3.1.4: 512 octets, plus what each extension adds: SIZE (RFC 1870) 26, BODY
# 14, SMTPUTF8 10, RET 9, ENVID 107 (RFC 3461 §4), AUTH= 500 (RFC 4954 §5); NOTIFY 28 and
# ORCPT 500 on RCPT. RFC 4954 §4: AUTH lines up to 12288 octets.
COMMAND_LIMITS = {"MAIL": 512 + 26 + 14 + 10 + 9 + 107 + 500, "RCPT": 512 + 28 + 500,
                  "AUTH": 12288}  # fmt: skip
#: a session's command: the unbound method, called with the session and the argument
Command = Callable[["GatewaySMTP", str | None], Awaitable[None]]
HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "PATCH"})
_ENHANCED = re.compile(r"\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |$)")
# what to add to aiosmtpd's own replies that carry no enhanced code (RFC 3463 classes)
_DEFAULT_ENHANCED = {
    "221": "2.0.0", "250": "2.0.0", "252": "2.0.0", "220": "2.0.0", "235": "2.7.0",
    "421": "4.7.0", "451": "4.3.0", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "535": "5.7.8", "538": "5.7.11", "552": "5.3.4", "553": "5.1.3",
    "554": "5.7.0", "555": "5.5.4",
}  # fmt: skip
#: the greeting's text after the host name
IDENT = "ESMTP Mailkube"
#: no aiosmtpd handler hooks: the session does everything itself (PROXY in `_handle_client`)
_NO_HOOKS: dict[str, Any] = {}


def with_enhanced_code(reply: str) -> str:
    """'250 OK' -> '250 2.0.0 OK' when a single-line reply lacks an RFC 3463 code."""
    if len(reply) < 4 or reply[3] != " " or _ENHANCED.match(reply):
        return reply
    code = reply[:3]
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    if code[0] not in "245":
        return reply
    return f"{code} {enhanced} {reply[4:]}"


def split_path(arg: str) -> tuple[str, str]:
    """'<path> params' -> ('<path>', 'params'); a '>' inside a quoted local part does not end
    the path."""
    if not arg.startswith("<"):
        path, _, rest = arg.partition(" ")
        return path, rest
    quoted = escaped = False
    for index, char in enumerate(arg):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return arg[: index + 1], arg[index + 1 :].strip()
    return arg, ""


class GatewaySMTP(SMTP):
    line_length_limit = 64 * 1024  # stream buffer; command lengths are checked per command

    #: command name -> method, for every smtp_* method of the class (see _command_table)
    _commands: dict[str, Command]

    def __init__(self, gateway: Gateway, listener: ListenerSpec) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.listener = listener
        self.policy = Policy(gateway, self)
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(limit=self.line_length_limit, loop=loop),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        # aiosmtpd's state, as its constructor leaves it for these arguments:
        # handler=None (no hooks), data_size_limit=max_message_size, enable_SMTPUTF8=True,
        # decode_data=False, ident=IDENT, require_starttls=listener.require_tls,
        # timeout=read_timeout, auth_required=listener.auth_required, auth_require_tls=True;
        # AUTH, PROXY and every command's dispatch are this class's own
        # (tests/integration/test_gateway_perf_session.py compares the two)
        certs = gateway.certs
        self.__ident__ = IDENT
        self.loop = loop
        self.event_handler = None
        self.data_size_limit = settings.max_message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.command_size_limits = COMMAND_LIMITS
        self.hostname = settings.hostname
        self.tls_context = certs.context if certs is not None else None
        self.require_starttls = bool(self.tls_context and listener.require_tls)
        self._timeout_duration = settings.read_timeout.total_seconds()
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = listener.auth_required
        self._auth_methods = {}
        self._handle_hooks = _NO_HOOKS
        self._ehlo_hook_ver = None
        self._smtp_methods = {}
        self._enforce_call_limit = False
        # connection state (kept across STARTTLS)
        self.connection_id = f"{random.getrandbits(64):016x}"  # unique, not secret
        self.client_ip = "unknown"
        self.client_port = 0
        self.txn: Transaction | None = None
        self.errors = 0
        self.busy = False
        self.stop_requested = False
        self.span: trace.Span | None = None
        self._expect_proxy = False
        self._tls_waiter: asyncio.Future[None] | None = None
        #: loop time at which an idle client times out (the timer moves to it lazily)
        self._deadline = 0.0

    # --- connection lifecycle --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername") or ("unknown", 0)
            self.client_ip, self.client_port = str(peer[0]), int(peer[1])
            self._expect_proxy = self.listener.proxy and self._trusted_proxy(self.client_ip)
            if self._expect_proxy:
                self._proxy_timeout = self.gateway.settings.proxy_protocol_timeout.total_seconds()
            self.gateway.sessions.add(self)
            self.span = self._session_span()
        super().connection_made(transport)
        if first and self.listener.implicit_tls and not self._expect_proxy:
            # now, before the event loop can hand the ClientHello to the stream reader
            self._tls_waiter = self._begin_tls()

    def _session_span(self) -> trace.Span:
        """The session's span, parent of each message's. Where no span processor would see it
        (no OTLP endpoint: spans only carry ids for logs and the queue), it is only its ids,
        which cost a fraction of a recorded span; messages still record theirs under it."""
        if _spans_exported():
            return _tracer.start_span(
                "smtp.session",
                kind=trace.SpanKind.SERVER,
                attributes={"smtp.listener": self.listener.name, "client.address": self.client_ip},
            )
        return trace.NonRecordingSpan(
            trace.SpanContext(
                trace_id=_ids.generate_trace_id(),
                span_id=_ids.generate_span_id(),
                is_remote=False,
                trace_flags=_SAMPLED,
            )
        )

    def connection_lost(self, error: Exception | None) -> None:
        self._forget()
        with contextlib.suppress(AssertionError):
            super().connection_lost(error)

    def _forget(self) -> None:
        """The connection is gone: out of the session set, span ended, lease released."""
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

    async def _handle_client(self) -> None:
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
        await self.push(f"220 {self.hostname} {IDENT}")
        # the connection lease was asked for before the greeting went out; no command is
        # read before it is known (a client over its limit has been told 421 and dropped)
        if await self.policy.admitted():
            await self._command_loop()

    async def _read_proxy(self) -> bool:
        """The PROXY header of a trusted proxy, within proxy_protocol_timeout."""
        assert self.session is not None
        self._reset_timeout(self._proxy_timeout)
        proxy = await get_proxy(self._reader)
        self.session.proxy_data = proxy
        if not proxy or not await self.on_proxy(proxy):
            if self.transport is not None:
                self.transport.close()
            return False
        self._reset_timeout()
        return True

    async def _command_loop(self) -> None:
        """aiosmtpd's loop (SMTP._handle_client) for this class: the same checks and replies
        in the same order, no per-line logging, unknown and HTTP commands answered by the
        session, and `busy` set while a command runs (a graceful stop waits for it)."""
        reader = self._reader
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
                    await self.push("500 Command line too long")
                    continue
                line = line.rstrip(b"\r\n")
                if not line:
                    await self.push("500 Error: bad syntax")
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    await self.push("500 Error: bad syntax")
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
                    await self.push("500 Command line too long")
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                if (
                    self.require_starttls
                    and not self._tls_protocol
                    and command not in ALLOWED_BEFORE_STARTTLS
                ):
                    await self.push("530 Must issue a STARTTLS command first")  # RFC 3207 §4
                    continue
                method = commands.get(command)
                if method is None:
                    method = (
                        GatewaySMTP.http_command
                        if command in HTTP_VERBS
                        else GatewaySMTP.unknown_command
                    )
                self._reset_timeout()
                self.busy = True
                try:
                    await method(self, arg)
                finally:
                    self.busy = False
                if self.stop_requested:
                    self.close_with(replies.SHUTTING_DOWN)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except Exception as error:
                try:
                    status = await self.handle_exception(error)
                except Exception as inner:
                    status = f"500 Error: ({inner.__class__.__name__}) {inner}"
                if isinstance(error, TLSSetupException):
                    if self.transport is not None:
                        self.transport.close()
                    self.connection_lost(error)
                else:
                    await self.push(status)

    async def _admit(self) -> bool:
        reply = self.policy.admit()
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

    def _begin_tls(self) -> asyncio.Future[None]:
        """RFC 8314 §3.3: TLS before the greeting, set up as aiosmtpd sets up STARTTLS but
        without the 220. Bytes the stream reader already holds (a ClientHello sent right
        behind a PROXY header) go to the TLS layer, not to the command loop."""
        assert self.tls_context is not None
        assert self.transport is not None
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._tls_protocol = asyncio.sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True
        )
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        buffered: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        if buffered:
            data = bytes(buffered)
            buffered.clear()
            target = self._tls_protocol.get_buffer(len(data))
            target[: len(data)] = data
            self._tls_protocol.buffer_updated(len(data))
        return waiter

    async def _start_implicit_tls(self) -> bool:
        waiter = self._tls_waiter or self._begin_tls()
        self._tls_waiter = None
        try:
            await waiter
        except Exception as error:
            log.debug("implicit TLS handshake failed", extra={"client_ip": self.client_ip,
                                                              "error": repr(error)})  # fmt: skip
            # the TLS layer never connected us, so connection_lost will not come: clean up here
            if self._original_transport is not None:
                self._original_transport.abort()  # type: ignore[attr-defined]
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
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

    def _set_post_data_state(self) -> None:
        # aiosmtpd's envelope is unused: the transaction is self.txn
        self.txn = None

    def _set_rset_state(self) -> None:
        self.txn = None

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        transport = self._original_transport or self.transport
        if transport is not None:
            transport.abort()  # type: ignore[attr-defined]

    def request_stop(self) -> None:
        self.stop_requested = True
        if not self.busy and self.transport is not None:
            self.close_with(replies.SHUTTING_DOWN)

    def close_with(self, reply: str) -> None:
        """Say a last thing and hang up, without waiting for the client to read it."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
            self.transport.close()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The client is active: it may now stay idle for `duration` (read_timeout). Moves
        a deadline; the timer, when it fires early, waits for the rest."""
        loop = self.loop
        deadline = loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: say why before closing
        log.info("session timed out", extra={"client_ip": self.client_ip})
        self.close_with(replies.TIMEOUT)

    def unread(self, data: bytes) -> None:
        """Give bytes read past the end of DATA back to the command loop (pipelining)."""
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        buffer[0:0] = data

    # --- replies ----------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        reply = status.decode() if isinstance(status, bytes) else status
        if self.esmtp:
            reply = with_enhanced_code(reply)
        if reply[:1] in ("4", "5") and not reply.startswith("421"):
            self.errors += 1
            if self.errors >= self.gateway.settings.max_errors:
                log.info("too many errors", extra={"client_ip": self.client_ip})
                self.close_with(f"{reply}\r\n{replies.TOO_MANY_ERRORS}")
                return
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(reply.encode("utf-8") + b"\r\n")
        if not self.transport.get_write_buffer_size():  # type: ignore[attr-defined]
            return  # all sent: nothing to wait for
        try:
            async with asyncio.timeout(self.gateway.settings.write_timeout.total_seconds()):
                await self._writer.drain()
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
        self._set_rset_state()
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
        ]
        tls = self._tls_protocol is not None
        if self.listener.starttls and not tls:
            lines.append("STARTTLS")
        if self.listener.auth and tls:
            lines.append("AUTH PLAIN LOGIN")
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}"
        await self.push(text)

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = False
        self.session.host_name = hostname
        await self.push(f"250 {self.hostname}")

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self._tls_protocol is not None:
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
        if not arg or arg[:5].upper() != "FROM:":
            await self.push(replies.MAIL_SYNTAX)
            return
        path_text, params_text = split_path(arg[5:].lstrip())
        if params_text and not self.esmtp:
            await self.push(replies.MAIL_SYNTAX)
            return
        try:
            params = parse_mail_params(params_text, max_size=self.gateway.settings.max_message_size)
        except ParamError as error:
            await self.push(error.reply)
            return
        if not path_text.isascii() and not params.smtputf8:
            await self.push(replies.NON_ASCII_NEEDS_SMTPUTF8)
            return
        try:
            path = parse_path(path_text, utf8=params.smtputf8, null_ok=True)
        except PathSyntaxError:
            await self.push(replies.BAD_SENDER_SYNTAX)
            return
        reply = await self.policy.mail(path, params)
        await self.push(reply)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._needs_session():
            return
        txn = self.txn
        if txn is None:
            await self.push(replies.NEED_MAIL)
            return
        if not arg or arg[:3].upper() != "TO:":
            await self.push(replies.RCPT_SYNTAX)
            return
        path_text, params_text = split_path(arg[3:].lstrip())
        if params_text and not self.esmtp:
            await self.push(replies.RCPT_SYNTAX)
            return
        try:
            params = parse_rcpt_params(params_text)
        except ParamError as error:
            await self.push(error.reply)
            return
        if not path_text.isascii() and not txn.params.smtputf8:
            await self.push(replies.NON_ASCII_NEEDS_SMTPUTF8)
            return
        if is_postmaster(path_text):
            reply = await self.policy.rcpt(None, params)
        else:
            try:
                path = parse_path(path_text, utf8=txn.params.smtputf8)
            except PathSyntaxError:
                await self.push(replies.BAD_RECIPIENT_SYNTAX)
                return
            reply = await self.policy.rcpt(path, params)
        await self.push(reply)

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
        await self.push(replies.START_DATA)
        result = await read_data(
            self._reader,
            self.unread,
            limit=self.gateway.settings.max_message_size,
            on_progress=self._reset_timeout,
        )
        self._reset_timeout()
        try:
            reply = await self.policy.data(txn, result)
        finally:
            self._set_post_data_state()
        await self.push(reply)

    # --- AUTH -------------------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        assert self.session is not None
        if not self.listener.auth or not self.esmtp:
            await self.push(replies.AUTH_NOT_OFFERED)
            return
        if self._tls_protocol is None:
            await self.push(replies.AUTH_NEEDS_TLS)
            return
        if self.session.authenticated:
            await self.push(replies.AUTH_ALREADY)
            return
        if self.txn is not None:  # RFC 4954 §4: not during a mail transaction
            await self.push("503 5.5.1 AUTH not allowed during a mail transaction")
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = args[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            await self.push(replies.AUTH_MECHANISM)
            return
        authenticator = self.gateway.authenticator
        try:
            if await authenticator.locked_out(self.client_ip):
                self.close_with(replies.AUTH_LOCKED)
                return
            credentials = await self._credentials(mechanism, args[1] if len(args) > 1 else None)
            if credentials is None:
                return
            outcome, user = await authenticator.authenticate(self.client_ip, credentials)
        except Exception as error:  # Redis down: say so, never let it pass
            if not _is_redis_error(error):
                raise
            await self.push(replies.AUTH_TEMP)
            return
        if outcome is AuthOutcome.OK:
            self.session.authenticated = True
            self.session.auth_data = user  # type: ignore[assignment]
            await self.push(replies.AUTH_OK)
        elif outcome is AuthOutcome.LOCKED:
            self.close_with(replies.AUTH_LOCKED)
        else:
            await self.push(replies.AUTH_FAILED)

    async def _response(self, initial: str | None, challenge: bytes) -> bytes | None:
        """The client's base64 answer (or the initial response); None if it aborted or sent
        garbage (the reply is sent)."""
        if initial is not None:
            if initial == "=":  # RFC 4954 §4: an empty initial response
                return b""
            try:
                return base64.b64decode(initial, validate=True)
            except (binascii.Error, ValueError):
                await self.push(replies.AUTH_SYNTAX)
                return None
        await self.push(b"334 " + base64.b64encode(challenge))
        line = await self._reader.readline()
        blob = line.strip()
        if blob == b"*":
            await self.push(replies.AUTH_ABORTED)
            return None
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.push(replies.AUTH_SYNTAX)
            return None

    async def _credentials(self, mechanism: str, initial: str | None) -> Credentials | None:
        try:
            if mechanism == "PLAIN":
                message = await self._response(initial, b"")
                return None if message is None else decode_plain(message)
            user = await self._response(initial, b"Username:")
            if user is None:
                return None
            password = await self._response(None, b"Password:")
            if password is None:
                return None
            return Credentials(user.decode("utf-8"), password.decode("utf-8"))
        except (MalformedCredentials, UnicodeDecodeError):
            await self.push(replies.AUTH_SYNTAX)
            return None


def _spans_exported() -> bool:
    """Whether the process's tracer provider has a span processor (an OTLP exporter, or a
    test's); True when it cannot tell."""
    processor = getattr(trace.get_tracer_provider(), "_active_span_processor", None)
    processors = getattr(processor, "_span_processors", None)
    return processors is None or bool(processors)


def _is_redis_error(error: BaseException) -> bool:
    from redis.exceptions import RedisError

    return isinstance(error, RedisError | TimeoutError | OSError)


def _command_table(cls: type[GatewaySMTP]) -> dict[str, Command]:
    return {name[5:]: getattr(cls, name) for name in dir(cls) if name.startswith("smtp_")}


GatewaySMTP._commands = _command_table(GatewaySMTP)
