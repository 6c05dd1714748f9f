"""Where mail for a domain goes: MX records (RFC 5321 §5.1), with dnspython.

- MX hosts in preference order, shuffled among equal preferences (§5.1: "randomize").
- No MX records: the domain itself is the implicit MX (its A/AAAA records).
- A null MX (RFC 7505: a single `MX 0 .`): the domain accepts no mail, 5.1.10.
- A name that does not exist: 5.1.2 (RFC 3463 bad destination system address); names under
  `.invalid` without asking (RFC 6761 §6.4).
- Any DNS trouble (SERVFAIL, timeout): temporary, 4.4.3, retried later.
- An address literal (user@[192.0.2.1], RFC 5321 §4.1.3) is its own single host.
- At most `address_limit` addresses (IPv6 and IPv4) are returned, like Postfix's
  smtp_mx_address_limit, so a domain with many MX hosts cannot hold a worker for long.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass
from datetime import timedelta

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX


@dataclass(frozen=True)
class Host:
    """One address to try: `name` is the MX host name (for TLS and Remote-MTA)."""

    name: str
    address: str
    preference: int


class MxLookupError(Exception):
    """The domain cannot be reached now (`permanent` False) or ever."""

    def __init__(self, code: str, text: str, *, permanent: bool) -> None:
        super().__init__(text)
        self.code = code
        self.permanent = permanent


class MxResolver:
    def __init__(
        self,
        nameservers: list[str] | None = None,
        *,
        port: int = 53,
        timeout: timedelta = timedelta(seconds=10),
        address_limit: int = 5,
    ) -> None:
        if nameservers:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = list(nameservers)
            self.resolver.port = port
        else:
            self.resolver = dns.asyncresolver.Resolver()
        self.resolver.lifetime = timeout.total_seconds()
        # answers are kept for their TTL: a burst to one domain asks the DNS once
        self.resolver.cache = dns.resolver.LRUCache()
        self.address_limit = address_limit

    async def hosts(self, domain: str) -> list[Host]:
        """The addresses to try, in order; raises MxLookupError."""
        if domain.startswith("[") and domain.endswith("]"):
            return [self._literal(domain)]
        if domain.rstrip(".").lower().endswith(".invalid"):
            # RFC 6761 §6.4: resolvers should answer names under .invalid negatively at once
            raise MxLookupError("5.1.2", f"domain {domain} does not exist", permanent=True)
        try:
            answer = await self.resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            text = f"domain {domain} does not exist"
            raise MxLookupError("5.1.2", text, permanent=True) from None
        except dns.resolver.NoAnswer:
            # RFC 5321 §5.1: no MX, so the domain is its own (implicit) MX
            return (await self._addresses(domain, 0))[: self.address_limit]
        except dns.exception.DNSException as exc:  # timeouts, SERVFAIL from every server
            raise MxLookupError("4.4.3", f"MX lookup for {domain}: {exc}", permanent=False) from exc
        records = [r for r in answer if isinstance(r, MX)]
        if len(records) == 1 and records[0].exchange == dns.name.root:
            # RFC 7505 §3: "MX 0 ." alone means the domain accepts no mail; §4.2: 5.1.10
            raise MxLookupError("5.1.10", f"{domain} accepts no mail (null MX)", permanent=True)
        ordered = _order([r for r in records if r.exchange != dns.name.root])
        found: list[Host] = []
        temporary: MxLookupError | None = None
        for record in ordered:
            name = record.exchange.to_text(omit_final_dot=True)
            try:
                found += await self._addresses(name, record.preference)
            except MxLookupError as exc:
                if not exc.permanent:
                    temporary = exc
            if len(found) >= self.address_limit:
                break
        if not found:
            if temporary is not None:
                raise temporary
            raise MxLookupError("5.4.4", f"no address for any MX host of {domain}", permanent=True)
        return found[: self.address_limit]

    @staticmethod
    def _literal(domain: str) -> Host:
        """An address literal, user@[192.0.2.1] or user@[IPv6:2001:db8::1] (RFC 5321 §4.1.3):
        no DNS, that host and no other."""
        text = domain[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise MxLookupError("5.1.2", f"bad address literal {domain}", permanent=True) from None
        if domain[1:6].lower() != "ipv6:" and address.version == 6:
            raise MxLookupError("5.1.2", f"bad address literal {domain}", permanent=True)
        return Host(domain, str(address), 0)

    async def _addresses(self, name: str, preference: int) -> list[Host]:
        """IPv6 and IPv4 addresses of one host (asked at once)."""
        answers = await asyncio.gather(self._query(name, "AAAA"), self._query(name, "A"))
        addresses = [a for answer in answers if isinstance(answer, list) for a in answer]
        if addresses:
            return [Host(name, address, preference) for address in addresses]
        for answer in answers:
            if isinstance(answer, MxLookupError) and not answer.permanent:
                raise answer
        raise MxLookupError("5.4.4", f"{name} has no address", permanent=True)

    async def _query(self, name: str, rdtype: str) -> list[str] | MxLookupError:
        try:
            answer = await self.resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return []
        except dns.exception.DNSException as exc:
            return MxLookupError("4.4.3", f"{rdtype} lookup for {name}: {exc}", permanent=False)
        return [r.to_text() for r in answer]


def _order(records: list[MX]) -> list[MX]:
    """By preference, random order among equals (RFC 5321 §5.1)."""
    shuffled = list(records)
    random.shuffle(shuffled)
    return sorted(shuffled, key=lambda r: r.preference)
