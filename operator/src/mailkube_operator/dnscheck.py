"""The DNS check: resolve each MailDomain's status.dnsRecords and say which ones are missing or
wrong (DNSVerified).

One task (`check_loop`) checks a domain when its records were never checked, changed since
(a new domain, a DKIM rotation: the reconciler wakes the task), or were last checked
`dns_check_interval` ago; a few domains at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailkube_core.settings import OperatorSettings

from .conditions import ConditionValue
from .plan import Key

if TYPE_CHECKING:  # the reconciler imports DnsResult from here
    from .reconciler import Reconciler

log = logging.getLogger(__name__)

#: domains checked at the same time
CONCURRENCY = 8

#: TXT records of which a name must hold only one (RFC 7208 §4.5, RFC 7489 §6.6.3)
_SINGLE = {"spf": ("v=spf1", "SPF"), "dmarc": ("v=DMARC1", "DMARC"),
           "mta-sts": ("v=STSv1", "MTA-STS"), "tls-rpt": ("v=TLSRPTv1", "TLS-RPT")}  # fmt: skip


@dataclass(frozen=True)
class DnsResult:
    """What the DNS check found for the records it checked, and when (time.monotonic)."""

    records: tuple[tuple[str, str, str], ...]
    value: ConditionValue
    checked_at: float = field(default=0.0, compare=False)
    #: the records found published as listed
    seen: frozenset[tuple[str, str, str]] = frozenset()


def record_keys(records: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, str, str], ...]:
    return tuple((str(r.get("type")), str(r.get("name")), str(r.get("value"))) for r in records)


@dataclass(frozen=True)
class Finding:
    """A record not published as listed. `definite` is False when the lookup failed (a
    timeout, SERVFAIL): then nobody knows yet."""

    message: str
    definite: bool = True
    #: the record (type, name, value) it is about; None for a check that failed as a whole
    record: tuple[str, str, str] | None = None
    #: the record's purpose (status.dnsRecords), when it is about one
    purpose: str | None = None


def resolver(settings: OperatorSettings) -> dns.asyncresolver.Resolver:
    if settings.dns_nameservers:
        res = dns.asyncresolver.Resolver(configure=False)
        res.nameservers = list(settings.dns_nameservers)
    else:
        res = dns.asyncresolver.Resolver()
    res.port = settings.dns_port
    res.lifetime = settings.dns_timeout.total_seconds()
    return res


async def _found(res: dns.asyncresolver.Resolver, rtype: str, name: str) -> list[str] | Finding:
    """The values published at name (MX: 'pref host.'; TXT: the strings joined), or why not."""
    try:
        answer = await res.resolve(name, rtype)
    except dns.resolver.NXDOMAIN:
        return Finding(f"{rtype} {name} does not exist")
    except dns.resolver.NoAnswer:
        return Finding(f"{rtype} {name} has no {rtype} record")
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        return Finding(f"{rtype} {name} could not be resolved ({type(exc).__name__})", False)
    values: list[str] = []
    for rdata in answer:
        if rtype == "MX":
            values.append(f"{rdata.preference} {str(rdata.exchange).lower()}")
        elif rtype == "CNAME":
            values.append(str(rdata.target).lower())
        elif rtype == "TLSA":
            values.append(f"{rdata.usage} {rdata.selector} {rdata.mtype} {rdata.cert.hex()}")
        else:
            values.append(b"".join(rdata.strings).decode(errors="replace"))
    return values


async def check(
    res: dns.asyncresolver.Resolver, records: Iterable[dict[str, Any]]
) -> list[Finding]:
    """One finding per record not published as listed; empty when all are."""
    findings: list[Finding] = []
    for record in records:
        rtype, name, value = record["type"], record["name"], record["value"]
        about = (str(rtype), str(name), str(value))
        purpose = record.get("purpose")
        found = await _found(res, rtype, name)
        if isinstance(found, Finding):
            findings.append(Finding(found.message, found.definite, about, purpose))
        elif (value.lower() if rtype in ("MX", "CNAME", "TLSA") else value) not in found:
            shown = ", ".join(repr(v) for v in found) or "nothing"
            findings.append(Finding(f"{rtype} {name}: expected {value!r}, found {shown}",
                                    record=about, purpose=purpose))  # fmt: skip
        elif record.get("purpose") in _SINGLE:
            prefix, what = _SINGLE[record["purpose"]]
            same = [v for v in found if v.lower().startswith(prefix.lower())]
            if len(same) > 1:
                findings.append(Finding(
                    f"{rtype} {name}: {len(same)} {what} records, there must be only one",
                    record=about, purpose=purpose,
                ))  # fmt: skip
    return findings


def verdict(findings: list[Finding], count: int) -> ConditionValue:
    """DNSVerified from the findings: False when a record is surely missing or wrong, Unknown
    when only lookups failed, True when all `count` records are published. The TLSA record
    of the key cert-manager is about to use, missing while the rest is fine, is the classic
    DANE outage in the making: its own reason."""
    definite = [f for f in findings if f.definite]
    if definite and all(f.purpose == "tlsa-next" for f in definite):
        return ConditionValue("False", "NextKeyNotInTLSA", (
            "the gateway's next TLS key is not in the published TLSA records: publish "
            "the tlsa-next record now, or mail from DANE senders will be deferred once the "
            "new certificate is in use; " + "; ".join(f.message for f in findings)
        ))  # fmt: skip
    if definite:
        return ConditionValue("False", "RecordsMismatch", "; ".join(f.message for f in findings))
    if findings:
        return ConditionValue("Unknown", "LookupFailed", "; ".join(f.message for f in findings))
    return ConditionValue("True", "Verified", f"all {count} records are published")


async def check_loop(reconciler: Reconciler, settings: OperatorSettings) -> None:
    """Keep reconciler.dns_results current for reconciler.dns_wanted (runs until cancelled)."""
    interval = settings.dns_check_interval.total_seconds()
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(key: Key, records: list[dict[str, Any]]) -> bool:
        async with limit:
            try:
                findings = await check(resolver(settings), records)
            except Exception as exc:  # e.g. no resolver configuration at all
                log.warning("DNS check of %s/%s failed: %r", *key, exc)
                findings = [Finding(f"the DNS check failed ({type(exc).__name__})", False)]
        wanted = record_keys(records)
        unseen = {f.record for f in findings if f.record is not None}
        if any(f.record is None for f in findings):
            unseen = set(wanted)
        result = DnsResult(wanted, verdict(findings, len(records)), time.monotonic(),
                           seen=frozenset(wanted) - unseen)  # fmt: skip
        previous = reconciler.dns_results.get(key)
        reconciler.dns_results[key] = result
        return previous != result

    while True:
        reconciler.dns_wake.clear()
        now = time.monotonic()
        due: list[tuple[Key, list[dict[str, Any]]]] = []
        next_at: float | None = None
        for key, records in list(reconciler.dns_wanted.items()):
            previous = reconciler.dns_results.get(key)
            if (
                previous is None
                or previous.records != record_keys(records)
                or now - previous.checked_at >= interval
            ):
                due.append((key, records))
            else:
                at = previous.checked_at + interval
                next_at = at if next_at is None else min(next_at, at)
        if due:
            if any(await asyncio.gather(*(one(key, records) for key, records in due))):
                await reconciler.request()
            continue
        timeout = None if next_at is None else max(0.0, next_at - now)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await reconciler.dns_wake.wait()
