"""The header section of a message (RFC 5322 §2.2, §3.6): found, counted and checked without
parsing the body, and completed on submission (RFC 6409 §8)."""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from email.utils import formatdate

# field-name = 1*ftext, ftext = %d33-57 / %d59-126 (RFC 5322 §3.6.8)
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
#: RFC 5322 §3.6: fields that may occur at most once
SINGLE = frozenset(
    {"date", "from", "sender", "reply-to", "to", "cc", "bcc", "message-id", "in-reply-to",
     "references", "subject"}
)  # fmt: skip


class HeaderError(ValueError):
    pass


@dataclass(frozen=True)
class HeaderSection:
    #: lower-case field names in order
    names: list[str]
    #: bytes of the header section (up to, not including, the empty line)
    size: int

    def count(self, name: str) -> int:
        return self.names.count(name)


def parse_header_section(content: bytes, *, max_size: int) -> HeaderSection:
    """The fields before the first empty line (or the first line that is neither a field nor
    a folded continuation, where the body starts as for most MTAs). Raises HeaderError past
    `max_size` bytes, before looking further."""
    names: list[str] = []
    pos = 0
    length = len(content)
    while pos < length:
        if pos > max_size:
            raise HeaderError("header section too large")
        eol = content.find(b"\r\n", pos)
        if eol < 0:
            eol = length
        if eol == pos:  # the empty line: end of the header section
            break
        first = content[pos]
        if first in (0x20, 0x09):  # folded continuation of the previous field
            if not names:
                break
        else:
            match = _FIELD.match(content, pos, eol)
            if match is None:
                break
            names.append(match.group(1).decode("ascii").lower())
        pos = eol + 2
    if pos > max_size:
        raise HeaderError("header section too large")
    return HeaderSection(names, min(pos, length))


def check_fields(section: HeaderSection) -> str | None:
    """What is wrong with the fields, or None. From is required; fields RFC 5322 §3.6 allows
    once must not repeat."""
    if "from" not in section.names:
        return "no From header (RFC 5322 §3.6.2)"
    counts = Counter(name for name in section.names if name in SINGLE)
    repeated = sorted(name for name, n in counts.items() if n > 1)
    if repeated:
        return f"more than one {', '.join(repeated)} header (RFC 5322 §3.6)"
    return None


def submission_additions(section: HeaderSection, hostname: str) -> bytes:
    """Date and Message-ID for a submitted message that lacks them (RFC 6409 §8.2, §8.3)."""
    added = b""
    if "date" not in section.names:
        added += f"Date: {formatdate(time.time(), localtime=True)}\r\n".encode()
    if "message-id" not in section.names:
        token = f"{time.time_ns():x}.{secrets.token_hex(8)}"
        added += f"Message-ID: <{token}@{hostname}>\r\n".encode()
    return added


def add_after_headers(content: bytes, section: HeaderSection, fields: bytes) -> bytes:
    """Append fields at the end of the header section."""
    if not fields:
        return content
    return content[: section.size] + fields + content[section.size :]
