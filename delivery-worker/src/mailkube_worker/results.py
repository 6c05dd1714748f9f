"""Recipient outcomes in the terms the queue records and an RFC 3464 DSN reports.

Every way a delivery can end (an SMTP reply, a maildir write, a DNS answer) becomes one of
`delivered`, `deferred` or `failed` here, with an RFC 3463 enhanced status code.
"""

from __future__ import annotations

import re

from mailkube_core.queue import RecipientResult, RecipientStatus

#: RFC 3463 §2: class.subject.detail at the start of the reply text (RFC 2034 puts it there)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_SPACES = re.compile(r"\s+")


def one_line(text: str, limit: int = 500) -> str:
    """Multi-line SMTP replies and exception texts as one line, bounded."""
    return _SPACES.sub(" ", text).strip()[:limit]


def delivered(diagnostic: str, *, smtp_code: int | None = None, remote_mta: str | None = None
              ) -> RecipientResult:  # fmt: skip
    return RecipientResult(
        status=RecipientStatus.DELIVERED,
        enhanced_code="2.0.0",
        smtp_code=smtp_code,
        diagnostic=one_line(diagnostic),
        remote_mta=remote_mta,
    )


def deferred(code: str, diagnostic: str, *, smtp_code: int | None = None,
             remote_mta: str | None = None) -> RecipientResult:  # fmt: skip
    return RecipientResult(
        status=RecipientStatus.DEFERRED,
        enhanced_code=code,
        smtp_code=smtp_code,
        diagnostic=one_line(diagnostic),
        remote_mta=remote_mta,
    )


def failed(code: str, diagnostic: str, *, smtp_code: int | None = None,
           remote_mta: str | None = None) -> RecipientResult:  # fmt: skip
    return RecipientResult(
        status=RecipientStatus.FAILED,
        enhanced_code=code,
        smtp_code=smtp_code,
        diagnostic=one_line(diagnostic),
        remote_mta=remote_mta,
    )


def enhanced_code(smtp_code: int, text: str) -> str:
    """The reply's own enhanced code when its class agrees with the reply code, else the
    class's generic X.0.0 (RFC 3463 §3.1: "Other undefined Status")."""
    match = _ENHANCED.match(text.strip())
    klass = str(smtp_code)[0]
    if match and match.group(1) == klass:
        return match.group(0)
    return f"{klass}.0.0" if klass in "245" else "4.0.0"


def from_reply(smtp_code: int, text: str, remote_mta: str | None) -> RecipientResult:
    """2xx delivered, 4xx deferred, 5xx failed (RFC 5321 §4.2.1); anything else is a
    protocol error, retried."""
    code = enhanced_code(smtp_code, text)
    diagnostic = f"{smtp_code} {text}"
    if 200 <= smtp_code < 300:
        return delivered(diagnostic, smtp_code=smtp_code, remote_mta=remote_mta)
    if 500 <= smtp_code < 600:
        return failed(code, diagnostic, smtp_code=smtp_code, remote_mta=remote_mta)
    return deferred(code, diagnostic, smtp_code=smtp_code, remote_mta=remote_mta)
