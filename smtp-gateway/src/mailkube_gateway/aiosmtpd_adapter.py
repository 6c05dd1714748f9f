"""Everything the gateway takes from aiosmtpd's private side (and asyncio's, under it), in one
place. The session (session.py) builds on `ProtocolBase` and uses only public names.

Relied on, for aiosmtpd in the range pinned in smtp-gateway/pyproject.toml; the drift test
(tests/unit/gateway/test_aiosmtpd_adapter.py) fails on a release that changes any of it:
- the state `SMTP.__init__` leaves (`_adopt` sets it instead: the constructor scans the
  session and handler with `inspect.getmembers` on every connection, evaluating every
  property, to build tables this class does not use);
- the hooks aiosmtpd calls: `_handle_client` (started by `connection_made`), the state resets
  `_set_rset_state`/`_set_post_data_state`, the idle timer `_reset_timeout`/`_timeout_cb`
  with its handle `_timeout_handle` (cancelled by `connection_lost`);
- the stream `_reader`/`_writer` (set by `_cb_client_connected`), the STARTTLS state
  `_tls_protocol`/`_original_transport`/`_tls_handshake_okay` that `connection_made` and
  `connection_lost` read;
- asyncio's `StreamReader._buffer` (bytes read but not consumed) and
  `SSLProtocol._app_transport`, as aiosmtpd's own STARTTLS uses them.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP, login_always_fail

#: no aiosmtpd handler hooks: the session does everything itself
_NO_HOOKS: dict[str, Any] = {}


class ProtocolBase(SMTP):
    """aiosmtpd's protocol engine, with its private hooks turned into public ones:
    `serve` (the connection's coroutine), `transaction_reset`, `reset_timeout` and
    `timed_out`."""

    def _adopt(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        line_limit: int,
        ident: str,
        hostname: str,
        data_size_limit: int,
        tls_context: ssl.SSLContext | None,
        require_starttls: bool,
        timeout: float,
        auth_required: bool,
    ) -> None:
        """Set aiosmtpd's state as its constructor leaves it for these arguments and
        handler=None (no hooks), enable_SMTPUTF8=True, decode_data=False,
        auth_require_tls=True; AUTH and PROXY are the subclass's own."""
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(limit=line_limit, loop=loop),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.__ident__ = ident
        self.loop = loop
        self.event_handler = None
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = require_starttls
        self._timeout_duration = timeout
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
        self._auth_required = auth_required
        self._auth_methods = {}
        self._handle_hooks = _NO_HOOKS
        self._ehlo_hook_ver = None
        self._smtp_methods = {}
        self._enforce_call_limit = False
        #: loop time at which an idle client times out (the timer moves to it lazily)
        self._deadline = 0.0

    # --- the stream -------------------------------------------------------------------------

    @property
    def reader(self) -> asyncio.StreamReader:
        return self._reader

    @property
    def writer(self) -> asyncio.StreamWriter:
        return self._writer

    def buffered(self) -> bytearray:
        """The bytes read from the client and not consumed yet (changes go to the reader)."""
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        return buffer

    # --- TLS --------------------------------------------------------------------------------

    @property
    def tls_active(self) -> bool:
        """STARTTLS or implicit TLS was started on this connection."""
        return self._tls_protocol is not None

    @property
    def tls_handshake_ok(self) -> bool:
        return bool(self._tls_handshake_okay)

    def raw_transport(self) -> asyncio.BaseTransport | None:
        """The socket's own transport (under TLS, the one beneath it)."""
        return self._original_transport or self.transport

    def begin_tls(self) -> asyncio.Future[None]:
        """RFC 8314 §3.3: TLS before the greeting, set up as aiosmtpd sets up STARTTLS but
        without the 220; the future is done when the handshake is. Bytes the stream reader
        already holds (a ClientHello sent right behind a PROXY header) go to the TLS layer,
        not to the command loop."""
        assert self.tls_context is not None
        assert self.transport is not None
        waiter: asyncio.Future[None] = self.loop.create_future()
        tls = asyncio.sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True
        )
        self._tls_protocol = tls
        self._original_transport = self.transport
        self._original_transport.set_protocol(tls)
        self.transport = tls._app_transport
        tls.connection_made(self._original_transport)
        buffered = self.buffered()
        if buffered:
            data = bytes(buffered)
            buffered.clear()
            target = tls.get_buffer(len(data))
            target[: len(data)] = data
            tls.buffer_updated(len(data))
        return waiter

    def drop_failed_tls(self) -> None:
        """The implicit TLS handshake failed: the TLS layer never connected this protocol,
        so `connection_lost` will not come; drop the socket and the timer here."""
        if self._original_transport is not None:
            self._original_transport.abort()  # type: ignore[attr-defined]
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    # --- the idle timer ---------------------------------------------------------------------

    @property
    def idle_timeout(self) -> float:
        return float(self._timeout_duration)

    def reset_timeout(self, duration: float | None = None) -> None:
        """The client is active: it may now stay idle for `duration` (default: the read
        timeout). Moves a deadline; the timer, when it fires early, waits for the rest,
        instead of a new timer per command."""
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
            self.timed_out()

    # --- what the subclass provides ---------------------------------------------------------

    async def serve(self) -> None:
        """The connection, from the greeting to the end."""
        raise NotImplementedError

    def transaction_reset(self) -> None:
        """RSET, HELO/EHLO, STARTTLS or the end of DATA: no mail transaction any more."""

    def timed_out(self) -> None:
        """The client was idle for longer than the timeout."""
        raise NotImplementedError

    # --- aiosmtpd's hooks -------------------------------------------------------------------

    async def _handle_client(self) -> None:
        await self.serve()

    def _set_post_data_state(self) -> None:
        self.transaction_reset()

    def _set_rset_state(self) -> None:
        self.transaction_reset()

    def _reset_timeout(self, duration: float | None = None) -> None:
        self.reset_timeout(duration)

    def _timeout_cb(self) -> None:
        self.timed_out()
