"""One SMTP client session (aiosmtplib) to one remote host: connect, EHLO, STARTTLS, AUTH, then
any number of transactions with per-recipient replies.

Timeouts are those of RFC 5321 §4.5.3.2: greeting 5 min (§4.5.3.2.1), MAIL and RCPT 5 min
(.2, .3), DATA initiation 2 min (.4), DATA termination 10 min (.6); aiosmtplib waits for the
354 and the final reply with one timeout, so the DATA command gets the longer one. The TCP
connect has its own, shorter limit (`smtp_connect_timeout`), as in Postfix.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import aiosmtplib
from aiosmtplib import SMTPResponse

from mailkube_core.queue import Envelope, Notify, Recipient, RecipientResult

from .results import enhanced_code, from_reply, one_line
from .smtp_chunking import bdat_last, crlf_lines, data
from .ssl_chain import unverified_chain

GREETING_TIMEOUT = 300.0
COMMAND_TIMEOUT = 300.0  # EHLO, STARTTLS, AUTH, MAIL, RCPT, RSET
DATA_TIMEOUT = 600.0

#: opportunistic: STARTTLS when offered, certificate not checked (RFC 7435);
#: required: STARTTLS, verified against the CAs; implicit: TLS from the first byte (465);
#: none: plain text
TlsMode = Literal["opportunistic", "required", "implicit", "none"]


class SessionError(Exception):
    """The session could not be set up (or broke): try another host, or defer."""

    def __init__(self, code: str, text: str, *, smtp_code: int | None = None,
                 permanent: bool = False) -> None:  # fmt: skip
        super().__init__(text)
        self.code = code
        self.smtp_code = smtp_code
        self.permanent = permanent


@dataclass(frozen=True)
class Peer:
    name: str  # host name: TLS server name, Remote-MTA
    address: str  # what to connect to (an IP address, or a name for a smart host)
    port: int


def limits(value: str) -> dict[str, int]:
    """The parameters of an EHLO `LIMITS` line (RFC 9422 §3: `name=number` separated by
    spaces), names upper-cased; what does not parse is ignored (§3: unknown limits are)."""
    out = {}
    for item in value.split():
        name, _, number = item.partition("=")
        if number.isascii() and number.isdigit() and 0 < int(number) < 2**31:
            out[name.upper()] = int(number)
    return out


def _xtext(value: str) -> str:
    """RFC 3461 §4: xtext, '+XX' for '+', '=', and anything outside '!'..'~'."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


class SmtpSession:
    def __init__(self, peer: Peer, smtp: aiosmtplib.SMTP, tls: bool) -> None:
        self.peer = peer
        self.smtp = smtp
        self.tls = tls
        self.transactions = 0

    @property
    def remote_mta(self) -> str:
        return self.peer.name

    @property
    def usable(self) -> bool:
        return self.smtp.is_connected

    @classmethod
    async def open(
        cls,
        peer: Peer,
        *,
        helo: str,
        tls: TlsMode,
        tls_context: ssl.SSLContext,
        connect_timeout: float,
        auth: tuple[str, str] | None = None,
    ) -> SmtpSession:
        """Connected, greeted, EHLO'd, TLS'd and authenticated as asked; SessionError
        otherwise (always temporary: another host, or a later try, may do better)."""
        smtp = aiosmtplib.SMTP(
            hostname=peer.address if tls == "implicit" else None,
            port=peer.port if tls == "implicit" else None,
            local_hostname=helo,
            timeout=GREETING_TIMEOUT,
            use_tls=tls == "implicit",
            start_tls=False,
            tls_context=tls_context if tls == "implicit" else None,
            sock=None if tls == "implicit" else await _connect(peer, limit=connect_timeout),
        )
        try:
            if tls == "implicit":
                await smtp.connect(timeout=connect_timeout)
            else:
                await smtp.connect()
            await cls._ehlo(smtp)
            secured = tls == "implicit"
            if tls in ("opportunistic", "required") and smtp.supports_extension("starttls"):
                await smtp.starttls(
                    server_hostname=peer.name, tls_context=tls_context, timeout=COMMAND_TIMEOUT
                )
                await cls._ehlo(smtp)  # RFC 3207 §4.2: forget what was said before TLS
                secured = True
            elif tls == "required":
                raise SessionError("4.7.4", f"{peer.name} does not offer STARTTLS; TLS required")
            if auth is not None:
                await smtp.login(*auth, timeout=COMMAND_TIMEOUT)
        except SessionError:
            smtp.close()
            raise
        except aiosmtplib.SMTPAuthenticationError as exc:
            smtp.close()
            # deferred even on 535: a rejected login is a configuration error to fix, not a
            # reason to bounce the mail (Postfix's smtp_sasl_auth_soft_bounce)
            code = "4" + enhanced_code(exc.code, exc.message)[1:]
            text = f"{peer.name}: AUTH: {exc.code} {one_line(exc.message)}"
            raise SessionError(code, text, smtp_code=exc.code) from exc
        except aiosmtplib.SMTPResponseException as exc:  # greeting or EHLO refused
            smtp.close()
            raise SessionError(
                "4.4.2" if exc.code < 500 else "4.4.0",
                f"{peer.name}: {exc.code} {one_line(exc.message)}",
                smtp_code=exc.code,
            ) from exc
        except ssl.SSLError as exc:
            smtp.close()
            raise SessionError("4.7.5", f"{peer.name}: TLS failed: {exc}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            if isinstance(exc.__cause__, ssl.SSLError) or isinstance(exc.__context__, ssl.SSLError):
                raise SessionError("4.7.5", f"{peer.name}: TLS failed: {exc}") from exc
            raise SessionError("4.4.1", f"{peer.name}: {one_line(str(exc)) or type(exc).__name__}"
                               ) from exc  # fmt: skip
        return cls(peer, smtp, secured)

    @staticmethod
    async def _ehlo(smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo(timeout=COMMAND_TIMEOUT)
        except aiosmtplib.SMTPHeloError as exc:
            if exc.code >= 500 and exc.code != 554 and smtp.is_connected:
                # RFC 5321 §4.1.4: an old server; fall back to HELO
                await smtp.helo()
            else:
                raise

    def peer_chain(self) -> list[bytes]:
        """The certificate chain the peer presented (DER, leaf first; [] without TLS), as
        sent, whatever the handshake verified: the TLS policies judge it (tlspolicy/)."""
        transport = self.smtp.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        if ssl_object is None:
            return []
        return unverified_chain(ssl_object)

    def max_size(self) -> int | None:
        """The peer's SIZE limit (RFC 1870), None when it gives none."""
        value = self.smtp.esmtp_extensions.get("size", "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else None

    def rcpt_max(self) -> int | None:
        """The peer's RCPTMAX (RFC 9422 §4.2): recipients one transaction may carry."""
        return limits(self.smtp.esmtp_extensions.get("limits", "")).get("RCPTMAX")

    @property
    def chunking(self) -> bool:
        """The peer takes BDAT (RFC 3030 §2)."""
        return self.smtp.supports_extension("chunking")

    async def send(
        self, envelope: Envelope, recipients: Sequence[tuple[int, Recipient]], body: bytes
    ) -> dict[int, RecipientResult]:
        """One transaction, its content by BDAT where the peer offers CHUNKING, else by DATA.
        Per-recipient results; SessionError if the connection broke before the outcome was
        known."""
        if envelope.body_type != "BINARYMIME":
            # BDAT's octets are taken as they are; DATA's content is lines (RFC 5321 §2.3.8),
            # checked here unless the producer did (Envelope.crlf_checked)
            if not envelope.crlf_checked:
                body = crlf_lines(body)
            if not body.endswith(b"\r\n"):
                body += b"\r\n"
        mta = self.remote_mta
        try:
            reply = await self._command(b"MAIL", b"FROM:<" + envelope.mail_from.encode() + b">",
                                        *self._mail_options(envelope, len(body)))  # fmt: skip
            if reply.code != 250:
                self.transactions += 1
                await self._reset()
                code, text = reply.code, reply.message
                if code == 530:
                    # RFC 4954 §6 "authentication required": a relay whose credentials we
                    # lack (e.g. its Secret is missing). Our configuration, not the mail:
                    # retry once it is fixed, never bounce (cf. Postfix's soft bounce).
                    code, text = 451, f"4.7.0 relay wants AUTH we could not give: 530 {text}"
                return {i: from_reply(code, text, mta) for i, _ in recipients}
            results: dict[int, RecipientResult] = {}
            accepted: list[int] = []
            for index, recipient in recipients:
                reply = await self._command(
                    b"RCPT", b"TO:<" + recipient.address.encode() + b">",
                    *self._rcpt_options(recipient),
                )  # fmt: skip
                if reply.code in (250, 251):
                    accepted.append(index)
                else:
                    results[index] = from_reply(reply.code, reply.message, mta)
            self.transactions += 1
            if not accepted:
                await self._reset()
                return results
            if self.chunking:
                reply = await bdat_last(self.smtp, body, DATA_TIMEOUT)
            else:
                reply = await data(self.smtp, body, DATA_TIMEOUT, envelope.dot_lines)
            for index in accepted:
                results[index] = from_reply(reply.code, reply.message, mta)
            return results
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.smtp.close()
            raise SessionError("4.4.2", f"{mta}: connection lost: {one_line(str(exc))}") from exc

    async def _command(self, *args: bytes) -> SMTPResponse:
        return await self.smtp.execute_command(*args, timeout=COMMAND_TIMEOUT)

    async def _reset(self) -> None:
        reply = await self._command(b"RSET")
        if reply.code != 250:
            self.smtp.close()

    def _mail_options(self, envelope: Envelope, size: int) -> list[bytes]:
        options = []
        if self.smtp.supports_extension("size"):
            options.append(f"SIZE={size}")
        if envelope.body_type == "BINARYMIME":
            options.append("BODY=BINARYMIME")  # only to a peer offering it (remote.py)
        elif envelope.body_type != "7BIT" and self.smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if envelope.smtputf8 and self.smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
        if envelope.requiretls and self.smtp.supports_extension("requiretls"):
            options.append("REQUIRETLS")  # RFC 8689 §4.2.1: passed on to the next hop
        if self.smtp.supports_extension("dsn"):  # RFC 3461 §4.3, §4.4: pass them on
            if envelope.ret:
                options.append(f"RET={envelope.ret}")
            if envelope.envid:
                options.append(f"ENVID={_xtext(envelope.envid)}")
        return [option.encode() for option in options]

    def _rcpt_options(self, recipient: Recipient) -> list[bytes]:
        if not self.smtp.supports_extension("dsn"):
            return []
        options = []
        if recipient.notify is not None:
            order = [Notify.NEVER, Notify.SUCCESS, Notify.FAILURE, Notify.DELAY]
            options.append("NOTIFY=" + ",".join(n.value for n in order if n in recipient.notify))
        if recipient.orcpt:
            kind, _, address = recipient.orcpt.partition(";")
            options.append(f"ORCPT={kind};{_xtext(address)}")
        return [option.encode() for option in options]

    async def close(self) -> None:
        """QUIT politely (RFC 5321 §4.1.1.10), then drop the connection."""
        if self.smtp.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await asyncio.wait_for(self.smtp.quit(), 5)
        self.smtp.close()


async def _connect(peer: Peer, limit: float) -> socket.socket:
    """A connected TCP socket (so the connect gets its own timeout, the greeting another)."""
    family = socket.AF_INET6 if ":" in peer.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (peer.address, peer.port)), limit
        )
    except (OSError, TimeoutError) as exc:
        sock.close()
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise SessionError("4.4.1", f"{peer.name}[{peer.address}]: connect: {reason}") from exc
    return sock
