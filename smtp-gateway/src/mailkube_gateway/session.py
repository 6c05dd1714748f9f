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
Connection state (client address, leases, trace span) lives on this object, so it survives
STARTTLS, after which aiosmtpd starts a fresh Session as RFC 3207 §4.2 requires.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import SMTP, Envelope, Session
from opentelemetry import trace

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

# RFC 5321 §4.5.3.1.4: 512 octets, plus what each extension adds: SIZE (RFC 1870) 26, BODY
# 14, SMTPUTF8 10, RET 9, ENVID 107 (RFC 3461 §4), AUTH= 500 (RFC 4954 §5); NOTIFY 28 and
# ORCPT 500 on RCPT. RFC 4954 §4: AUTH lines up to 12288 octets.
COMMAND_LIMITS = {"MAIL": 512 + 26 + 14 + 10 + 9 + 107 + 500, "RCPT": 512 + 28 + 500,
                  "AUTH": 12288}  # fmt: skip
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
ALWAYS_ALLOWED = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT", "HELO"})


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


class _Commands(dict[str, Any]):
    """aiosmtpd's command table, with every command wrapped (busy tracking for a graceful
    stop) and unknown ones answered by the session instead of aiosmtpd's bogus counter."""

    def __init__(self, session: GatewaySMTP, methods: dict[str, Any]) -> None:
        super().__init__({name: session.tracked(method) for name, method in methods.items()})
        self.session = session

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        if key in HTTP_VERBS:
            return self.session.tracked(self.session.http_command)
        return self.session.tracked(self.session.unknown_command)


class GatewaySMTP(SMTP):
    line_length_limit = 64 * 1024  # stream buffer; command lengths are checked per command

    def __init__(self, gateway: Gateway, listener: ListenerSpec) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.listener = listener
        self.policy = Policy(gateway, self)
        certs = gateway.certs
        super().__init__(
            _ProxyHandler(self),
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.hostname,
            ident="ESMTP Mailkube",
            tls_context=certs.context if certs is not None else None,
            require_starttls=listener.require_tls,
            timeout=settings.read_timeout.total_seconds(),
            auth_required=listener.auth_required,
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )
        self.command_size_limits = _command_limits()
        self._smtp_methods = _Commands(self, self._smtp_methods)
        # connection state (kept across STARTTLS)
        self.connection_id = secrets.token_hex(8)
        self.client_ip = "unknown"
        self.client_port = 0
        self.txn: Transaction | None = None
        self.errors = 0
        self.busy = False
        self.stop_requested = False
        self.span: trace.Span | None = None
        self._expect_proxy = False
        self._tls_waiter: asyncio.Future[None] | None = None

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
            self.span = _tracer.start_span(
                "smtp.session",
                kind=trace.SpanKind.SERVER,
                attributes={"smtp.listener": self.listener.name, "client.address": self.client_ip},
            )
        super().connection_made(transport)
        if first and self.listener.implicit_tls and not self._expect_proxy:
            # now, before the event loop can hand the ClientHello to the stream reader
            self._tls_waiter = self._begin_tls()

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
        if not self._expect_proxy:
            if self.listener.implicit_tls and not await self._start_implicit_tls():
                return
            if not await self._admit():
                return
        await super()._handle_client()

    async def _admit(self) -> bool:
        reply = await self.policy.admit()
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
            self._write_final(replies.SHUTTING_DOWN)

    def _write_final(self, reply: str) -> None:
        """Say a last thing and hang up, without waiting for the client to read it."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
            self.transport.close()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: say why before closing
        log.info("session timed out", extra={"client_ip": self.client_ip})
        self._write_final(replies.TIMEOUT)

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
                self._write_final(f"{reply}\r\n{replies.TOO_MANY_ERRORS}")
                return
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(reply.encode("utf-8") + b"\r\n")
        try:
            async with asyncio.timeout(self.gateway.settings.write_timeout.total_seconds()):
                await self._writer.drain()
        except TimeoutError:
            log.info("write timed out", extra={"client_ip": self.client_ip})
            self.abort()

    def tracked(
        self, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def run(arg: str | None) -> None:
            self.busy = True
            try:
                await method(arg)
            finally:
                self.busy = False
            if self.stop_requested:
                self._write_final(replies.SHUTTING_DOWN)

        return run

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
                self._write_final(replies.AUTH_LOCKED)
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
            self._write_final(replies.AUTH_LOCKED)
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


def _command_limits() -> dict[str, int]:
    from collections import defaultdict

    limits: defaultdict[str, int] = defaultdict(lambda: SMTP.command_size_limit)
    limits.update(COMMAND_LIMITS)
    return limits


def _is_redis_error(error: BaseException) -> bool:
    from redis.exceptions import RedisError

    return isinstance(error, RedisError | TimeoutError | OSError)


class _ProxyHandler:
    """The aiosmtpd handler: only the PROXY hook; commands are the session's methods."""

    def __init__(self, session: GatewaySMTP) -> None:
        self.session = session

    async def handle_PROXY(
        self, server: SMTP, session: Session, envelope: Envelope, proxy_data: ProxyData
    ) -> bool:
        return await self.session.on_proxy(proxy_data)
