"""The header fields content scanning writes, the removal of incoming ones of the same names,
and the Subject of spam.

    X-Spam: Yes                                          spam only
    X-Spam-Status: Yes, score=11.54 required=15.00       (or No, ...; or unchecked)
    X-Spam-Score: 11.54
    X-Spamd-Result: default: False [11.54 / 15.00];      rspamd's own form (milter_headers),
        MAILKUBE_TEST_ADD_HEADER(8.00)[]; ...            largest scores first

Mail clients and sieve scripts file mail by these names, so a sender must not be able to
bring its own: incoming fields of these names (any case, with X-Spam-Flag and X-Spam-Level,
SpamAssassin's, which clients read too) are removed whenever the scanning stage runs.
"""

from __future__ import annotations

import re
from email.header import Header

from ..mailauth.header_fields import field_spans
from .rspamd import RspamdResult, Symbol

#: lower-case names of the fields removed from incoming mail
SPAM_FIELDS = frozenset(
    {b"x-spam", b"x-spam-status", b"x-spam-score", b"x-spamd-result", b"x-spam-flag",
     b"x-spam-level"}
)  # fmt: skip
UNCHECKED = "X-Spam-Status: unchecked"
SUBJECT_PREFIX = "***SPAM*** "
#: X-Spamd-Result: lines folded at this many columns, the field at most this many bytes
FOLD_AT = 78
MAX_RESULT_FIELD = 4096
#: per symbol: its name and its options cut to these lengths, at most this many options
MAX_NAME = 64
MAX_OPTION = 64
MAX_OPTIONS = 5
#: a Subject rspamd rewrote, cut to this many characters
MAX_SUBJECT = 900

_NOT_NAME = re.compile(r"[^\x21-\x7e]")
_NOT_TEXT = re.compile(r"[^\x20-\x7e]")


def _name(text: str) -> str:
    """A symbol name as printable ASCII without spaces, cut to MAX_NAME."""
    text = text[:MAX_NAME]
    if text.isascii() and text.isprintable() and " " not in text:  # the usual case, fast
        return text
    return _NOT_NAME.sub("?", text)


def _option(text: str) -> str:
    """A symbol option (URLs, addresses, words) as printable ASCII, cut to MAX_OPTION."""
    text = text[:MAX_OPTION]
    if text.isascii() and text.isprintable():
        return text
    return _NOT_TEXT.sub("?", text)


def strip_spam_fields(content: bytes, header_size: int) -> tuple[bytes, int]:
    """`content` without the fields of SPAM_FIELDS in its header section (the first
    `header_size` bytes), and how many were removed."""
    kept: list[bytes] = []
    removed = 0
    pos = 0
    for start, end in field_spans(content, header_size):
        name, colon, _ = content[start:end].partition(b":")
        if colon and name.rstrip(b" \t").lower() in SPAM_FIELDS:
            kept.append(content[pos:start])
            pos = end
            removed += 1
    if not removed:
        return content, 0
    kept.append(content[pos:])
    return b"".join(kept), removed


def _weight(symbol: Symbol) -> tuple[float, str]:
    return -abs(symbol.score), symbol.name


def spamd_result(result: RspamdResult, action: str, required: float) -> str:
    """X-Spamd-Result as rspamd's milter_headers writes it (True only for a reject), symbols
    by descending absolute score, folded at FOLD_AT columns, at most MAX_RESULT_FIELD bytes
    (symbols that do not fit are left out, and "..." says so)."""
    verdict = "True" if action == "reject" else "False"
    parts = []
    for name, score, options in sorted(result.symbols, key=_weight):
        shown = ",".join([_option(option) for option in options[:MAX_OPTIONS]])
        if len(options) > MAX_OPTIONS:
            shown += ",..."
        parts.append(f"{_name(name)}({score:.2f})[{shown}]")
    lines = [f"X-Spamd-Result: default: {verdict} [{result.score:.2f} / {required:.2f}]"]
    size = len(lines[0])
    for part in parts:
        if size + len(part) + 12 > MAX_RESULT_FIELD:  # room for this, and for "; ..." after
            part = "..."
        # "; " before it, ";" after it, and the tab that starts a continuation line
        if len(lines[-1]) + len(part) + 3 + (len(lines) > 1) <= FOLD_AT:
            lines[-1] += "; " + part
            size += 2 + len(part)
        else:
            lines[-1] += ";"
            lines.append(part)
            size += 4 + len(part)  # ";" CRLF TAB
        if part == "...":
            break
    return "\r\n\t".join(lines)


def tag_headers(
    result: RspamdResult, *, action: str, spam: bool, required: float
) -> tuple[str, ...]:
    """The fields for a scanned message. `action`: what was decided (after the thresholds),
    `required`: the reject score in effect."""
    status = "Yes" if spam else "No"
    fields = (
        f"X-Spam-Status: {status}, score={result.score:.2f} required={required:.2f}",
        f"X-Spam-Score: {result.score:.2f}",
        spamd_result(result, action, required),
    )
    return ("X-Spam: Yes", *fields) if spam else fields


def _subject_field(text: str) -> bytes:
    """A Subject field for decoded text: as it is when printable ASCII, else RFC 2047
    encoded words, folded."""
    text = "".join(c if c.isprintable() else " " for c in text[:MAX_SUBJECT]).strip()
    charset = "us-ascii" if text.isascii() else "utf-8"
    value = Header(text, charset, header_name="Subject").encode(linesep="\r\n")
    return f"Subject: {value}\r\n".encode("ascii")


def rewrite_subject(content: bytes, header_size: int, rspamd_subject: str | None) -> bytes:
    """The message with the Subject of spam: rspamd's rewritten one when it sent one, else
    SUBJECT_PREFIX before the original value (its bytes kept: encoded words stay valid). A
    message without a Subject gets one at the end of its header section."""
    spans = field_spans(content, header_size)
    for start, end in spans:
        name, colon, value = content[start:end].partition(b":")
        if not colon or name.rstrip(b" \t").lower() != b"subject":
            continue
        if rspamd_subject is not None:
            field = _subject_field(rspamd_subject)
        else:
            original = value.lstrip(b" \t")
            if original.startswith(SUBJECT_PREFIX.encode()):
                return content  # already marked (a message coming round again)
            field = b"Subject: " + SUBJECT_PREFIX.encode() + original
        return content[:start] + field + content[end:]
    field = _subject_field(rspamd_subject if rspamd_subject is not None else SUBJECT_PREFIX)
    return content[:header_size] + field + content[header_size:]
