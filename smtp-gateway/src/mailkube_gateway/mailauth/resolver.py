"""The gateway's one DNS resolver (dnspython, asynchronous), and its bridge for the blocking
libraries that must look things up from a worker thread (pyspf, dkimpy).

Every SPF, DKIM, ARC and DMARC lookup of a gateway process goes through one
`dns.asyncresolver.Resolver` with one cache that honours TTLs (positive and negative answers,
RFC 2308), configurable nameservers and a timeout. The libraries run in threads, where they
call `ThreadBridge` functions that hand the query to the event loop and wait for its answer,
so they share the cache and the settings too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import dkim  # type: ignore[import-untyped]
import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
from dns.rdata import Rdata

T = TypeVar("T")
#: answers kept in DnsResolver's front cache before it starts again
ANSWERS_KEPT = 10_000


class DnsTempError(Exception):
    """A lookup that may succeed later: timeout, SERVFAIL, no answer from any server."""


class DnsResolver:
    def __init__(self, nameservers: Sequence[str] = (), port: int = 53, timeout: float = 5.0):
        resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            resolver.nameservers = list(nameservers)
        resolver.port = port
        resolver.lifetime = timeout
        resolver.timeout = min(timeout, 2.0)  # per try; several tries fit in the lifetime
        resolver.cache = dns.resolver.LRUCache(50_000)
        self._resolver = resolver
        self.timeout = timeout
        #: (name, type) -> (expiry on time.monotonic(), records): answers as `query` returns
        #: them, readable from any thread without a trip through dnspython or the event loop
        self._answers: dict[tuple[str, str], tuple[float, list[Rdata]]] = {}

    def cached(self, name: str, rdtype: str) -> list[Rdata] | None:
        """A still-valid answer `query` gave before, or None. Safe from any thread."""
        hit = self._answers.get((name, rdtype))
        if hit is None or hit[0] <= time.monotonic():
            return None
        return list(hit[1])

    def cached_until(self, name: str, rdtype: str) -> float | None:
        """Until when (time.monotonic()) `cached` gives this answer; None if it does not."""
        hit = self._answers.get((name, rdtype))
        return None if hit is None or hit[0] <= time.monotonic() else hit[0]

    async def query(self, name: str, rdtype: str) -> list[Rdata]:
        """The records of `rdtype` at `name`; [] when the name or the type does not exist.
        Raises DnsTempError when the answer cannot be had now."""
        hit = self.cached(name, rdtype)
        if hit is not None:
            return hit
        try:
            answer = await self._resolver.resolve(
                name, rdtype, raise_on_no_answer=False, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as error:
            raise DnsTempError(f"{name} {rdtype}: {error.__class__.__name__}") from None
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel):
            return []  # not a name that can exist
        except dns.exception.DNSException as error:
            raise DnsTempError(f"{name} {rdtype}: {error.__class__.__name__}") from None
        records = list(answer.rrset or [])
        ttl = answer.expiration - time.time()  # the records' TTL, or the SOA's when none
        if ttl > 0:
            if len(self._answers) >= ANSWERS_KEPT:
                self._answers.clear()  # dnspython's own LRU cache still has them
            self._answers[(name, rdtype)] = (time.monotonic() + ttl, records)
        return records

    async def txt(self, name: str) -> list[bytes]:
        """Each TXT record at `name`, its strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return joined_txt(await self.query(name, "TXT"))


def joined_txt(records: list[Rdata]) -> list[bytes]:
    return [b"".join(rdata.strings) for rdata in records]  # type: ignore[attr-defined]


class ThreadBridge:
    """Lookups for code running in a worker thread: each call runs the query on `loop` and
    blocks the thread (never the loop) until it is answered."""

    def __init__(self, resolver: DnsResolver, loop: asyncio.AbstractEventLoop) -> None:
        self.resolver = resolver
        self.loop = loop

    def _wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(self.resolver.timeout + 1)
        except FutureTimeout:
            future.cancel()
            raise DnsTempError("lookup timed out") from None

    def query(self, name: str, rdtype: str) -> list[Rdata]:
        hit = self.resolver.cached(name, rdtype)  # no trip to the loop and back
        if hit is not None:
            return hit
        return self._wait(self.resolver.query(name, rdtype))

    def dkim_txt(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's `dnsfunc`: the first TXT record at `name`, None if there is none."""
        text = name.decode("ascii", "replace")
        hit = self.resolver.cached(text, "TXT")
        try:
            result = joined_txt(hit) if hit is not None else self._wait(self.resolver.txt(text))
        except DnsTempError as error:
            raise dkim.DnsTimeoutError(str(error)) from None
        return result[0] if result else None
