"""Resolve a MailDomain's DNS records and say which ones are missing or wrong (DNSVerified)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailkube_core.settings import OperatorSettings


def resolver(settings: OperatorSettings) -> dns.asyncresolver.Resolver:
    if settings.dns_nameservers:
        res = dns.asyncresolver.Resolver(configure=False)
        res.nameservers = list(settings.dns_nameservers)
    else:
        res = dns.asyncresolver.Resolver()
    res.port = settings.dns_port
    res.lifetime = settings.dns_timeout.total_seconds()
    return res


async def _found(res: dns.asyncresolver.Resolver, rtype: str, name: str) -> list[str] | str:
    """The values published at name (MX: 'pref host.'; TXT: the strings joined), or why not."""
    try:
        answer = await res.resolve(name, rtype)
    except dns.resolver.NXDOMAIN:
        return "does not exist"
    except dns.resolver.NoAnswer:
        return f"has no {rtype} record"
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        return f"could not be resolved ({type(exc).__name__})"
    values: list[str] = []
    for rdata in answer:
        if rtype == "MX":
            values.append(f"{rdata.preference} {str(rdata.exchange).lower()}")
        else:
            values.append(b"".join(rdata.strings).decode(errors="replace"))
    return values


async def check(res: dns.asyncresolver.Resolver, records: Iterable[dict[str, Any]]) -> list[str]:
    """One line per record not published as listed; empty when all are."""
    problems: list[str] = []
    for record in records:
        rtype, name, value = record["type"], record["name"], record["value"]
        found = await _found(res, rtype, name)
        if isinstance(found, str):
            problems.append(f"{rtype} {name} {found}")
        elif (value.lower() if rtype == "MX" else value) not in found:
            shown = ", ".join(repr(v) for v in found) or "nothing"
            problems.append(f"{rtype} {name}: expected {value!r}, found {shown}")
    return problems
