"""Header fields of a message's header section, found without a MIME parser (which would
rewrite or misread what the checks must see byte for byte)."""

from __future__ import annotations

from email.utils import getaddresses

from mailkube_core.addresses import normalize_domain


def field_spans(content: bytes, header_size: int) -> list[tuple[int, int]]:
    """(start, end) of each field in the first `header_size` bytes (the header section, its
    last CRLF included), continuation lines and the final CRLF of each field included."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < header_size:
        eol = content.find(b"\r\n", pos, header_size)
        end = header_size if eol < 0 else eol + 2
        if content[pos : pos + 1] in (b" ", b"\t") and spans:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((pos, end))
        pos = end
    return spans


def field_values(content: bytes, header_size: int, name: bytes) -> list[str]:
    """The unfolded values of every `name` field (case-insensitive), decoded leniently."""
    wanted = name.lower()
    values = []
    for start, end in field_spans(content, header_size):
        field_name, colon, value = content[start:end].partition(b":")
        if colon and field_name.strip().lower() == wanted:
            unfolded = value.replace(b"\r\n", b"").strip()
            values.append(unfolded.decode("utf-8", "replace"))
    return values


def from_address(content: bytes, header_size: int) -> str | None:
    """The single RFC 5322.From address, or None."""
    values = field_values(content, header_size, b"from")
    if len(values) != 1:
        return None
    addresses = [address for _, address in getaddresses(values) if address]
    return addresses[0] if len(addresses) == 1 and "@" in addresses[0] else None


def from_domain(content: bytes, header_size: int) -> str | None:
    """The domain of the RFC 5322.From address in its A-label form (RFC 7489 §6.6.1), None
    unless there is exactly one From field holding exactly one address with a domain."""
    address = from_address(content, header_size)
    if address is None:
        return None
    try:
        return normalize_domain(address.rpartition("@")[2])
    except ValueError:
        return None
