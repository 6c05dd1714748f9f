"""The Authentication-Results header field (RFC 8601): built from the checks' results, and
incoming copies that claim our authserv-id removed (§5: a forgery, or a stale copy of our own).

    Authentication-Results: mx.example.test;
        spf=pass smtp.mailfrom=example.org;
        dkim=pass header.d=example.org header.s=sel header.a=rsa-sha256 header.b=AbCdEfGh1234;
        arc=none;
        dmarc=pass (p=reject dis=none) header.from=example.org
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .header_fields import field_spans

FIELD_NAME = b"authentication-results"
# RFC 5322 §3.2.3 token characters, the form of a `value` that needs no quoting (RFC 2045)
_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")
_AUTHSERV_ID = re.compile(rb"^\s*(?:\([^)]*\)\s*)*\"?([^\s;\"()]+)")


@dataclass(frozen=True)
class Clause:
    """One resinfo: method=result [(comment)] [reason=...] [ptype.property=value ...]."""

    method: str
    result: str
    comment: str = ""
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()

    def render(self) -> str:
        text = f"{self.method}={self.result}"
        if self.comment:
            text += f" ({_comment(self.comment)})"
        if self.reason:
            text += f" reason={_quote(self.reason)}"
        for name, value in self.properties:
            if value:
                text += f" {name}={_pvalue(value)}"
        return text


def _ascii(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)


def _comment(text: str) -> str:
    return re.sub(r"([()\\])", r"\\\1", _ascii(text))


def _quote(text: str) -> str:
    text = _ascii(text)
    if _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pvalue(value: str) -> str:
    """RFC 8601 §2.2 pvalue: a value, or [local-part] "@" domain-name; domains and simple
    addresses go as they are, anything else quoted."""
    if re.match(r"^[A-Za-z0-9._+\-]*@?[A-Za-z0-9.\-]+$", value):
        return value
    return _quote(value)


def render_header(authserv_id: str, clauses: Sequence[Clause]) -> str:
    """The whole field, folded one clause per line, without the final CRLF."""
    if not clauses:
        return f"Authentication-Results: {authserv_id}; none"
    return f"Authentication-Results: {authserv_id};\r\n\t" + ";\r\n\t".join(
        clause.render() for clause in clauses
    )


def authserv_id_of(value: bytes) -> str | None:
    """The authserv-id of a field value (unfolded or not), lower-case; None if unparseable."""
    match = _AUTHSERV_ID.match(value.replace(b"\r\n", b""))
    return match.group(1).decode("ascii", "replace").lower() if match else None


def remove_ours(content: bytes, header_size: int, authserv_id: str) -> tuple[bytes, int]:
    """`content` without the Authentication-Results fields of its header section (the first
    `header_size` bytes) that claim `authserv_id`, and how many were removed. RFC 8601 §5:
    an MTA that adds the field must remove such fields arriving from outside, since only it
    may speak for its authserv-id."""
    ours = authserv_id.lower()
    kept: list[bytes] = []
    removed = 0
    pos = 0
    for start, end in field_spans(content, header_size):
        name, _, value = content[start:end].partition(b":")
        if name.strip().lower() == FIELD_NAME and authserv_id_of(value) == ours:
            kept.append(content[pos:start])
            pos = end
            removed += 1
    if not removed:
        return content, 0
    kept.append(content[pos:])
    return b"".join(kept), removed
