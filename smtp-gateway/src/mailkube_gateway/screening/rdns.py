"""The client's reverse name, forward-confirmed (FCrDNS): the PTR records of its address, then
the A (or AAAA) records of each name; the name is verified when one of them is the client's
address. This is RFC 8601's `iprev` (§3), whose results (§2.7.3) it reports:

    pass       a PTR name resolves back to the client
    fail       PTR names were found, their forward lookups completed, none gave the client
    permerror  no PTR record (NXDOMAIN or no data): a later try is unlikely to do better
    temperror  a lookup failed or timed out

At most MAX_NAMES PTR names are followed (a client controls its PTR records; RFC 8601 §3
asks verifiers to bound the work). The caller sets the deadline (dns_timeout).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from dns.rdata import Rdata

from ..mailauth.resolver import DnsResolver, DnsTempError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IprevResult = Literal["pass", "fail", "temperror", "permerror"]
MAX_NAMES = 5


@dataclass(frozen=True)
class ReverseDns:
    result: IprevResult
    #: the name that resolves back to the client (pass), else the first PTR name, if any
    name: str | None = None

    @property
    def verified(self) -> bool:
        return self.result == "pass"


TIMED_OUT = ReverseDns("temperror")


def ptr_names(records: Sequence[Rdata]) -> list[str]:
    """The PTR targets, lower-case without the final dot, each once, at most MAX_NAMES."""
    names: list[str] = []
    for record in records:
        target = getattr(record, "target", None)
        if target is None:
            continue
        name = str(target.to_text(omit_final_dot=True)).lower()
        if name and name != "." and name not in names:
            names.append(name)
    return names[:MAX_NAMES]


def judge(
    address: IPAddress, names: Sequence[str], forwards: Sequence[Sequence[str] | None]
) -> ReverseDns:
    """The iprev result from the PTR names and, for each, the addresses it resolves to (None
    where that lookup failed)."""
    if not names:
        return ReverseDns("permerror")
    for name, found in zip(names, forwards, strict=True):
        if found is not None and any(_same(address, text) for text in found):
            return ReverseDns("pass", name)
    if any(found is None for found in forwards):
        return ReverseDns("temperror", names[0])
    return ReverseDns("fail", names[0])


def _same(address: IPAddress, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False


def _forward_type(address: IPAddress) -> str:
    return "A" if address.version == 4 else "AAAA"


def _addresses(records: Sequence[Rdata]) -> list[str]:
    return [str(getattr(record, "address", "")) for record in records]


async def check_reverse_dns(resolver: DnsResolver, address: IPAddress) -> ReverseDns:
    """Look the client up (the caller bounds the time it may take)."""
    try:
        names = ptr_names(await resolver.query(address.reverse_pointer, "PTR"))
    except DnsTempError:
        return ReverseDns("temperror")
    rdtype = _forward_type(address)

    async def forward(name: str) -> list[str] | None:
        try:
            return _addresses(await resolver.query(name, rdtype))
        except DnsTempError:
            return None

    forwards = await asyncio.gather(*(forward(name) for name in names))
    return judge(address, names, forwards)


def cached_reverse_dns(
    resolver: DnsResolver, address: IPAddress
) -> tuple[ReverseDns, float] | None:
    """The result from answers the resolver holds, without a lookup, and until when
    (time.monotonic()) those answers hold; None when one is missing (a client that comes back
    within the TTLs costs no task)."""
    ptr = address.reverse_pointer
    records = resolver.cached(ptr, "PTR")
    until = resolver.cached_until(ptr, "PTR")
    if records is None or until is None:
        return None
    names = ptr_names(records)
    rdtype = _forward_type(address)
    forwards: list[Sequence[str] | None] = []
    for name in names:
        found = resolver.cached(name, rdtype)
        found_until = resolver.cached_until(name, rdtype)
        if found is None or found_until is None:
            return None
        forwards.append(_addresses(found))
        until = min(until, found_until)
    return judge(address, names, forwards), until
