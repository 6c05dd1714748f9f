"""ARC chain validation (RFC 8617 §5.2), with dkimpy.

`verify_arc` returns the chain validation status, as Authentication-Results reports it
(RFC 8617 §7.2: arc=none|pass|fail). It never raises, blocks on DNS (call it in a thread) and
may run in several threads at once (each call has its own dkimpy objects).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import dkim  # type: ignore[import-untyped]

from .dkim_verify import DKIMPY_LOG, MIN_RSA_BITS, CachingDns, DnsFunc, raw_fields, safe_reason

#: RFC 8617 §4.2.1: i= runs from 1 to 50
MAX_INSTANCE = 50
ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
#: dkimpy's reasons that say what failed without quoting the message; any other is reported
#: as a malformed field (the others quote tag values, the sender's bytes)
_KNOWN_REASON = re.compile(
    r"Most recent ARC-Message-Signature did not validate"
    r"|ARC-Seal\[\d+\] (did not validate|reported failure, the chain is terminated"
    r"|reported invalid status)"
    r"|(Incomplete ARC set|Duplicate [A-Za-z-]+) for instance \d+"
)


@dataclass(frozen=True)
class ArcResult:
    #: "none" (no ARC fields), "pass" or "fail"
    result: str
    #: the highest i= seen, 0 if none
    instance: int
    #: short, ASCII, no CR/LF or parentheses: fit for a header comment
    reason: str


#: a message without ARC fields
NO_ARC = ArcResult("none", 0, "")


def verify_arc(content: bytes, dnsfunc: DnsFunc, *, timeout: float = 5) -> ArcResult:
    try:
        arc = dkim.ARC(content, logger=DKIMPY_LOG, minkey=MIN_RSA_BITS, timeout=timeout)
        present = any(name.lower() in ARC_FIELDS for name, _ in arc.headers)
        instance, _ = arc.sorted_arc_headers()
    except Exception:
        if any(raw_fields(content, name) for name in ARC_FIELDS):
            return ArcResult("fail", 0, "message header not parseable")
        return NO_ARC
    if not present:
        return NO_ARC
    if instance == 0:
        return ArcResult("fail", 0, "ARC field without i=")
    if instance > MAX_INSTANCE:
        return ArcResult("fail", instance, f"i= above {MAX_INSTANCE}")
    lookups = CachingDns(dnsfunc)
    try:
        status, _, reason = arc.verify(dnsfunc=lookups)
    except Exception:
        return ArcResult("fail", instance, "chain not verifiable")
    if status == dkim.CV_Pass:
        return ArcResult("pass", instance, "")
    if lookups.failed:
        return ArcResult("fail", instance, "key lookup failed: DNS error")
    # dkimpy returns None (not fail) for a chain whose last seal says cv=fail: RFC 8617 §5.2
    # step 2 makes that a failed chain too
    known = _KNOWN_REASON.match(str(reason))
    return ArcResult("fail", instance, safe_reason(known[0]) if known else "malformed ARC field")
