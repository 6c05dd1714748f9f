"""The Received: trace header (RFC 5321 §4.4) with the protocol type of RFC 3848 / RFC 6531,
the TLS version and cipher, and the authenticated user."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")


def _safe(text: str, limit: int = 255) -> str:
    """Client-supplied text inside a comment or clause: printable ASCII, no parentheses or
    backslashes (which would end or escape the comment), bounded."""
    return _UNSAFE.sub("_", text)[:limit]


_last_date: tuple[int, str] = (-1, "")


def _date(now: float) -> str:
    """RFC 5322 date-time in local time (whole seconds: the same string all second long)."""
    global _last_date
    second = int(now)
    if _last_date[0] != second:
        _last_date = (second, formatdate(second, localtime=True))
    return _last_date[1]


@dataclass(frozen=True)
class TlsInfo:
    version: str
    cipher: str
    bits: int


def protocol_type(*, esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """RFC 3848: SMTP, ESMTP, ESMTPA, ESMTPS, ESMTPSA; RFC 6531 §3.7.4: UTF8SMTP[S][A]."""
    if not esmtp:
        return "SMTP"
    suffix = ("S" if tls else "") + ("A" if auth else "")
    return ("UTF8SMTP" if utf8 else "ESMTP") + suffix


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    tls: TlsInfo | None = None,
    auth_user: str | None = None,
    recipient: str | None = None,
    client_name: str | None = None,
    now: float | None = None,
) -> bytes:
    """One Received field, folded, ending in CRLF. `recipient` only for a single recipient
    (RFC 5321 §4.4: the for clause with many would disclose Bcc recipients). `client_name`:
    the client's verified reverse name, or "unknown" when it has none, as Postfix writes the
    TCP-info (`from helo (name [ip])`); None when it was not looked up (`from helo ([ip])`)."""
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    name = f"{_safe(client_name)} " if client_name else ""
    lines = [f"Received: from {_safe(helo) or 'unknown'} ({name}[{ip}])"]
    if tls is not None:
        lines.append(
            f"(using {_safe(tls.version)} with cipher {_safe(tls.cipher)} "
            f"({tls.bits}/{tls.bits} bits))"
        )
    if auth_user is not None:
        lines.append(f"(authenticated sender: {_safe(auth_user)})")
    lines.append(f"by {hostname} (Mailkube) with {protocol} id {queue_id}")
    stamp = _date(time.time() if now is None else now)
    if recipient is not None:
        lines.append(f"for <{_safe(recipient, 320)}>; {stamp}")
    else:
        lines.append(f"; {stamp}")
    header = "\r\n\t".join(lines)
    return header.encode("utf-8") + b"\r\n"
