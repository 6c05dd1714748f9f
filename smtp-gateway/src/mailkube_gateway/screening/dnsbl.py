"""DNS block and allow lists, asked about each MX client the way Postfix's postscreen asks
them (postscreen_dnsbl_sites): every list at once under one deadline, each listing weighted,
the weights added up.

A list is asked for the A records of the client's address, reversed, under the list's zone
(RFC 5782 §2.1; IPv6 as nibbles, §2.4): 192.0.2.99 under zen.spamhaus.org is
99.2.0.192.zen.spamhaus.org. Any answer means "listed"; a filter keeps only the answers that
count (zen.spamhaus.org=127.0.0.[2..9] leaves out the PBL's 127.0.0.10 and 127.0.0.11).

    zone[=filter][*weight]     e.g. zen.spamhaus.org=127.0.0.[2..11]*3, list.dnswl.org*-2

The filter is a dotted address whose octets may be N, a range [a..b], or a list
[a;b;c..d]. A list counts its weight once, however many of its answers match; a negative
weight allows (list.dnswl.org). A sum at or above the threshold (and above 0) blocks the
client; a negative sum allow-lists it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..mailauth.header_fields import field_spans
from ..mailauth.resolver import DnsResolver, DnsTempError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: the trace field the gateway adds (and removes from incoming mail: only it may say this)
TRACE_FIELD = "X-Mailkube-DNSBL"

_ITEM = re.compile(r"(?P<zone>[^=*]+)(=(?P<filter>[^*]+))?(\*(?P<weight>-?\d+))?")
_RANGE = re.compile(r"(\d{1,3})(\.\.(\d{1,3}))?")
# an octet of a filter: N or [...] (whose ranges hold dots of their own)
_FILTER_OCTET = re.compile(r"\[[^\]]*\]|[^.\[\]]+")
_FILTER = re.compile(rf"({_FILTER_OCTET.pattern})(\.({_FILTER_OCTET.pattern})){{3}}")


@dataclass(frozen=True)
class DnsList:
    """One configured list: its zone, the answers that count (None: any), its weight."""

    zone: str
    #: per octet of the answer, the (low, high) ranges it may be in
    filter: tuple[tuple[tuple[int, int], ...], ...] | None
    weight: int

    def matches(self, answer: str) -> bool:
        if self.filter is None:
            return True
        octets = answer.split(".")
        if len(octets) != 4 or not all(octet.isdigit() for octet in octets):
            return False
        return all(
            any(low <= int(octet) <= high for low, high in ranges)
            for octet, ranges in zip(octets, self.filter, strict=True)
        )


def parse_list(item: str) -> DnsList:
    """'zone[=filter][*weight]' -> DnsList; ValueError naming what is wrong."""
    match = _ITEM.fullmatch(item.strip())
    if match is None:
        raise ValueError(f"not a DNS list: {item!r} (use zone[=filter][*weight])")
    zone = match["zone"].strip().rstrip(".").lower()
    labels = zone.split(".")
    if len(labels) < 2 or not all(re.fullmatch(r"[a-z0-9_]([a-z0-9_-]{0,62})", x) for x in labels):
        raise ValueError(f"not a DNS list: {item!r}: {zone!r} is not a zone name")
    weight = int(match["weight"]) if match["weight"] is not None else 1
    text = match["filter"]
    if text is None:
        return DnsList(zone, None, weight)
    if not _FILTER.fullmatch(text):
        raise ValueError(f"not a DNS list: {item!r}: the filter needs 4 octets (a.b.c.d)")
    octets = _FILTER_OCTET.findall(text)
    return DnsList(zone, tuple(_octet(octet, item) for octet in octets), weight)


def _octet(text: str, item: str) -> tuple[tuple[int, int], ...]:
    """'N', '[a..b]' or '[a;b;c..d]' -> ((low, high), ...)."""
    bracketed = text.startswith("[") and text.endswith("]")
    parts = text[1:-1].split(";") if bracketed else [text]
    ranges = []
    for part in parts:
        match = _RANGE.fullmatch(part)
        if match is None or (not bracketed and match[3] is not None):
            raise ValueError(f"not a DNS list: {item!r}: bad filter octet {text!r}")
        low = int(match[1])
        high = int(match[3]) if match[3] is not None else low
        if high > 255 or low > high:
            raise ValueError(f"not a DNS list: {item!r}: bad filter octet {text!r}")
        ranges.append((low, high))
    return tuple(ranges)


def parse_lists(items: Iterable[str]) -> tuple[DnsList, ...]:
    return tuple(parse_list(item) for item in items)


def query_name(address: IPAddress, zone: str) -> str:
    """The name a list is asked about: the address reversed (octets, or nibbles for IPv6)
    under the zone."""
    pointer = address.reverse_pointer  # 1.0.0.127.in-addr.arpa, or nibbles.ip6.arpa
    reversed_address = pointer.removesuffix(".in-addr.arpa").removesuffix(".ip6.arpa")
    return f"{reversed_address}.{zone}"


@dataclass(frozen=True)
class DnsblResult:
    #: the weights of the lists that listed the client, added up
    score: int = 0
    #: each listing, "zone=answer*weight"
    hits: tuple[str, ...] = ()
    #: blocked: the listing zone of the highest weight (named in the reply); else None
    blocked_by: str | None = None
    #: lists that gave no answer in time (they count as not listing)
    unanswered: tuple[str, ...] = ()

    @property
    def allow_listed(self) -> bool:
        return self.score < 0

    def trace_field(self) -> str:
        """X-Mailkube-DNSBL: score=3; zen.spamhaus.org=127.0.0.2*3"""
        parts = [f"score={self.score}", *self.hits]
        if self.unanswered:
            parts.append(f"unanswered={','.join(self.unanswered)}")
        return f"{TRACE_FIELD}: {'; '.join(parts)}"


def score(
    lists: Sequence[DnsList], answers: Mapping[str, Sequence[str] | None], threshold: int
) -> DnsblResult:
    """What the answers (zone -> its A records, None when it did not answer) say about the
    client. A list counts its weight once when any answer passes its filter."""
    total = 0
    hits: list[str] = []
    top: DnsList | None = None
    for spec in lists:
        found = next((a for a in answers.get(spec.zone) or () if spec.matches(a)), None)
        if found is None:
            continue
        total += spec.weight
        hits.append(f"{spec.zone}={found}*{spec.weight}")
        if top is None or spec.weight > top.weight:
            top = spec
    blocked = top is not None and total > 0 and total >= threshold
    unanswered = tuple(zone for zone, found in answers.items() if found is None)
    return DnsblResult(total, tuple(hits), top.zone if blocked and top else None, unanswered)


async def ask_lists(
    resolver: DnsResolver, lists: Sequence[DnsList], address: IPAddress, within: float
) -> dict[str, list[str] | None]:
    """Every list's answers about `address` (zone -> A records, [] when not listed, None when
    it gave no answer within `within` seconds or failed): all asked at once, each zone once."""
    zones = list(dict.fromkeys(spec.zone for spec in lists))
    loop = asyncio.get_running_loop()
    tasks = {zone: loop.create_task(_ask(resolver, query_name(address, zone))) for zone in zones}
    try:
        await asyncio.wait(tasks.values(), timeout=within)
    finally:
        for task in tasks.values():
            task.cancel()  # the deadline passed (or the connection went): they count as silent
    return {zone: task.result() if task.done() and not task.cancelled() else None
            for zone, task in tasks.items()}  # fmt: skip


async def _ask(resolver: DnsResolver, name: str) -> list[str] | None:
    try:
        records = await resolver.query(name, "A")
    except DnsTempError:
        return None
    return [str(getattr(record, "address", "")) for record in records]


def remove_trace_fields(content: bytes, header_size: int) -> bytes:
    """`content` without incoming X-Mailkube-DNSBL fields: only this gateway may say what the
    lists said about its client."""
    wanted = TRACE_FIELD.lower().encode()
    kept: list[bytes] = []
    pos = 0
    for start, end in field_spans(content, header_size):
        name = content[start:end].partition(b":")[0].strip().lower()
        if name == wanted:
            kept.append(content[pos:start])
            pos = end
    kept.append(content[pos:])
    return b"".join(kept)
