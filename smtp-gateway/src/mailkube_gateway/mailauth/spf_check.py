"""SPF (RFC 7208) with pyspf, whose DNS lookups go through the gateway's resolver.

The identity checked is MAIL FROM; for the null sender `<>` it is the HELO name, as
postmaster@<helo> (RFC 7208 §2.4). pyspf enforces the lookup limits of §4.6.4 (10 terms that
query DNS, 2 void lookups) and answers permerror past them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import spf  # type: ignore[import-untyped]

from .resolver import DnsTempError, ThreadBridge

#: the longest a whole SPF evaluation may take (RFC 7208 §4.6.4 suggests at least 20 s)
MAX_SPF_SECONDS = 20
RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})

_current = threading.local()


@dataclass(frozen=True)
class SpfResult:
    result: str
    #: "mailfrom" or "helo" (RFC 8601 smtp.mailfrom / smtp.helo)
    scope: str
    #: the domain whose policy was evaluated
    domain: str
    explanation: str = ""


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 30) -> list[Any]:
    """pyspf's DNSLookup, answered by the bridge of the calling thread (same answer shapes as
    pyspf's own dnspython lookup)."""
    bridge: ThreadBridge = _current.bridge
    try:
        records = bridge.query(name, qtype)
    except DnsTempError as error:
        raise spf.TempError(f"DNS {error}") from None
    answers: list[Any] = []
    for rdata in records:
        if qtype in ("A", "AAAA"):
            answers.append(((name, qtype), rdata.address))  # type: ignore[attr-defined]
        elif qtype == "MX":
            answers.append(((name, qtype), (rdata.preference, rdata.exchange)))  # type: ignore[attr-defined]
        elif qtype == "PTR":
            answers.append(((name, qtype), rdata.target.to_text(True)))  # type: ignore[attr-defined]
        elif qtype in ("TXT", "SPF"):
            answers.append(((name, qtype), rdata.strings))  # type: ignore[attr-defined]
    return answers


# pyspf looks DNS up through this module-level hook; every SPF check of the gateway runs in a
# thread that set its bridge first (check_spf below), so this is the only lookup pyspf makes.
spf.DNSLookup = _lookup


def check_spf(bridge: ThreadBridge, client_ip: str, mail_from: str, helo: str) -> SpfResult:
    """Blocking (run it in a thread). `mail_from` "" is the null sender."""
    if mail_from:
        scope, domain = "mailfrom", mail_from.rpartition("@")[2]
    else:
        scope, domain = "helo", helo
    if "." not in domain.strip(".") or domain.startswith("["):
        # RFC 7208 §4.3: not a multi-label domain name (e.g. HELO localhost, an address
        # literal): "none", without a lookup
        return SpfResult("none", scope, domain.lower(), "not a multi-label domain name")
    _current.bridge = bridge
    try:
        query = spf.query(
            i=client_ip,
            s=mail_from or f"postmaster@{helo}",
            h=helo or "unknown",
            timeout=MAX_SPF_SECONDS,
            querytime=MAX_SPF_SECONDS,
        )
        result, _code, explanation = query.check()
    except Exception as error:  # pyspf's own bugs must not lose the message
        return SpfResult(
            "temperror", scope, domain, f"SPF check failed: {error.__class__.__name__}"
        )
    finally:
        _current.bridge = None
    result = str(result).lower()
    if result not in RESULTS:  # e.g. "ambiguous" from older pyspf
        result = "permerror"
    return SpfResult(result, scope, domain.lower().rstrip("."), str(explanation)[:200])
