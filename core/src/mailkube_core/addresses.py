"""Mail address and domain normalisation shared by every component: one canonical form for
routing-table keys and lookups, so `Alice@EXAMPLE.test.` and `alice@example.test` meet."""

from __future__ import annotations

import functools
import re

import idna

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@functools.lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """Lower-case A-label form (IDNA, RFC 5890), without a trailing dot. ValueError if it is
    not a valid domain name. Cached: IDNA processing costs ~0.1 ms, and the same few domains
    come up for every message."""
    name = domain.strip().rstrip(".")
    try:
        # UTS #46 mapping (case folding, full-width dots) then IDNA2008, non-transitional:
        # straße.de stays itself (xn--strae-oqa.de) instead of becoming strasse.de
        ascii_name = idna.encode(name, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError(f"not a valid domain name: {domain!r}") from exc
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 1 or not all(_LABEL.fullmatch(x) for x in labels):
        raise ValueError(f"not a valid domain name: {domain!r}")
    return ascii_name


def split_address(address: str) -> tuple[str, str]:
    """(local part, domain) at the last '@'. ValueError when either is missing."""
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise ValueError(f"not a mail address: {address!r}")
    return local, domain


def normalize_address(address: str) -> str:
    """Case-folded local part (Mailkube treats local parts case-insensitively, as nearly every
    mail system does), normalised domain."""
    local, domain = split_address(address.strip())
    local = local.lower()  # may grow: "İ".lower() is two code points, so check after
    # RFC 5321 §4.5.3.1.1: at most 64 octets
    if len(local.encode()) > 64 or any(
        c.isspace() or c in '<>"' or ord(c) < 32 or ord(c) == 127 for c in local
    ):
        raise ValueError(f"not a valid local part: {local!r}")
    return f"{local}@{normalize_domain(domain)}"
