"""SMTP paths (RFC 5321 §4.1.2) and the relay policy: who may send mail where.

The parser is strict on purpose: every address trick that fools a relay check (percent hack,
bang paths, quoted local parts hiding '@', source routes, trailing dots) is either a syntax
error here or is judged on the mailbox it finally names, never on a part of it.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from mailkube_core.addresses import normalize_domain

# RFC 5322 §3.2.3 atext, plus UTF-8 (RFC 6531 §3.3) when the client said SMTPUTF8
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*")
# RFC 5321 §4.1.2 Quoted-string: qtextSMTP = %d32-33 / %d35-91 / %d93-126, quoted-pairSMTP
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
# sub-domain = Let-dig [Ldh-str]; U-labels allowed with SMTPUTF8 (checked by IDNA afterwards)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_LET_DIG_UTF8 = r"A-Za-z0-9\u0080-\U0010ffff"
_LABEL_UTF8 = rf"[{_LET_DIG_UTF8}](?:[{_LET_DIG_UTF8}-]*[{_LET_DIG_UTF8}])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN_UTF8 = re.compile(rf"{_LABEL_UTF8}(?:\.{_LABEL_UTF8})*")
# A-d-l = At-domain *( "," At-domain ), ended by ":"
_ROUTE = re.compile(rf"@{_LABEL}(?:\.{_LABEL})*(?:,@{_LABEL}(?:\.{_LABEL})*)*:")

# control characters, DEL, and lone surrogates (bytes that were not UTF-8: surrogateescape)
_FORBIDDEN = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")

#: local-part characters that route mail onwards on some systems (RFC 5321 §3.6.1 deprecates
#: source routing of every kind): refused in unauthenticated mail even to local domains
ROUTING_CHARACTERS = frozenset("%!@")


class PathSyntaxError(ValueError):
    """Not an RFC 5321 path."""


@dataclass(frozen=True)
class Path:
    """A parsed forward- or reverse-path."""

    #: local part without quotes or quoted-pair backslashes
    local: str
    #: the domain as given (for an address literal: "[...]" as given)
    domain: str
    #: local part as it goes on the wire again (quoted when it has to be)
    wire_local: str
    #: the domain is an address literal such as [192.0.2.1]
    literal: bool = False
    #: the source route the client gave (ignored, RFC 5321 §4.1.2 and appendix C)
    route: str = ""

    @property
    def address(self) -> str:
        """local@domain as it goes into the envelope."""
        return f"{self.wire_local}@{self.domain}"

    @property
    def ascii_domain(self) -> str | None:
        """The domain in lower-case A-label form; None for literals and invalid names."""
        if self.literal:
            return None
        try:
            return normalize_domain(self.domain)
        except ValueError:
            return None


def parse_path(text: str, *, utf8: bool = False, null_ok: bool = False) -> Path | None:
    """Parse '<...>' (the text after 'FROM:' or 'TO:' up to the parameters). Returns None for
    the null path '<>' when `null_ok`. Raises PathSyntaxError for anything else that is not a
    path."""
    if not (text.startswith("<") and text.endswith(">")):
        raise PathSyntaxError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        if null_ok:
            return None
        raise PathSyntaxError("null path not allowed here")
    if _FORBIDDEN.search(inner):
        raise PathSyntaxError("control characters or invalid UTF-8 in path")
    if not utf8 and not inner.isascii():
        raise PathSyntaxError("non-ASCII address without SMTPUTF8")
    route = ""
    if inner.startswith("@"):
        match = _ROUTE.match(inner)
        if match is None:
            raise PathSyntaxError("malformed source route")
        route, inner = match.group(0), inner[match.end() :]
    return parse_mailbox(inner, utf8=utf8, route=route)


def parse_mailbox(text: str, *, utf8: bool = False, route: str = "") -> Path:
    """local-part@(domain / address-literal), RFC 5321 §4.1.2."""
    quoted = _QUOTED_UTF8 if utf8 else _QUOTED
    dot_string = _DOT_STRING_UTF8 if utf8 else _DOT_STRING
    if text.startswith('"'):
        match = quoted.match(text)
        if match is None:
            raise PathSyntaxError("malformed quoted local part")
        wire_local = match.group(0)
        local = re.sub(r"\\(.)", r"\1", wire_local[1:-1])
    else:
        match = dot_string.match(text)
        if match is None:
            raise PathSyntaxError("malformed local part")
        wire_local = local = match.group(0)
    rest = text[match.end() :]
    if not rest.startswith("@"):
        raise PathSyntaxError("missing @domain")
    domain = rest[1:]
    # RFC 5321 §4.5.3.1.1: local part at most 64 octets; §4.5.3.1.2: domain at most 255
    if len(local.encode()) > 64 or len(domain.encode()) > 255:
        raise PathSyntaxError("address too long")
    if not local:
        raise PathSyntaxError("empty local part")
    if domain.startswith("["):
        if not _address_literal(domain):
            raise PathSyntaxError("malformed address literal")
        return Path(local, domain, _requote(local, wire_local), literal=True, route=route)
    if not (_DOMAIN_UTF8 if utf8 else _DOMAIN).fullmatch(domain):
        raise PathSyntaxError("malformed domain")
    try:
        normalize_domain(domain)
    except ValueError:
        raise PathSyntaxError("invalid domain name") from None
    return Path(local, domain, _requote(local, wire_local), route=route)


def _requote(local: str, wire_local: str) -> str:
    """A quoted local part that needs no quotes ("alice") goes on as alice (RFC 5321 §4.1.2:
    a server SHOULD NOT send a quoted form where an unquoted one works)."""
    if wire_local.startswith('"') and _DOT_STRING_UTF8.fullmatch(local):
        return local
    return wire_local


def _address_literal(text: str) -> bool:
    """RFC 5321 §4.1.3: [IPv4] or [IPv6:...]; general literals are refused."""
    if not text.endswith("]"):
        return False
    body = text[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(body[5:])
        else:
            ipaddress.IPv4Address(body)
    except ValueError:
        return False
    return True


def split_path_command(arg: str | None, keyword: str, *, esmtp: bool) -> tuple[str, str] | None:
    """MAIL's and RCPT's argument: 'FROM:<a@b> SIZE=1' with keyword 'FROM:' ->
    ('<a@b>', 'SIZE=1'); None when it is not that command's syntax (parameters need EHLO,
    RFC 5321 §4.1.1.11)."""
    if not arg or arg[: len(keyword)].upper() != keyword:
        return None
    path_text, params_text = split_path(arg[len(keyword) :].lstrip())
    if params_text and not esmtp:
        return None
    return path_text, params_text


def split_path(arg: str) -> tuple[str, str]:
    """'<path> params' -> ('<path>', 'params'); a '>' inside a quoted local part does not end
    the path."""
    if not arg.startswith("<"):
        path, _, rest = arg.partition(" ")
        return path, rest
    quoted = escaped = False
    for index, char in enumerate(arg):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return arg[: index + 1], arg[index + 1 :].strip()
    return arg, ""


def is_postmaster(text: str) -> bool:
    """'<postmaster>' without a domain, any case: RFC 5321 §4.5.1 says it MUST be accepted."""
    return text.lower() == "<postmaster>"


class RelayVerdict(enum.Enum):
    #: to one of our domains: check the mailbox
    LOCAL = "local"
    #: to somewhere else, from an authenticated user
    REMOTE = "remote"
    #: refused: 554 5.7.1
    DENIED = "denied"


def relay_verdict(
    path: Path, *, authenticated: bool, is_local_domain: Callable[[str], bool]
) -> RelayVerdict:
    """Where a recipient may go. Unauthenticated mail may only go to local domains, and only
    to a plain mailbox there: a local part that routes onwards on other systems (user%host,
    host!user, "user@host") is refused, so no chain of hosts can turn us into a relay."""
    domain = path.ascii_domain
    local = domain is not None and is_local_domain(domain)
    if local and not ROUTING_CHARACTERS.intersection(path.local):
        return RelayVerdict.LOCAL
    if authenticated:
        return RelayVerdict.REMOTE if not local else RelayVerdict.LOCAL
    return RelayVerdict.DENIED
