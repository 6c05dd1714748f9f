"""BDAT (RFC 3030 CHUNKING), and DATA without aiosmtplib's per-message regex passes, on an
aiosmtplib session: the one place that reaches below aiosmtplib's documented API, which has
no BDAT command, and whose `data()` runs two regular expressions over every message
(line-ending normalisation, dot-stuffing): for a 100 KiB message, most of the client's CPU
per transaction.

It uses the session's protocol object (`SMTP.protocol`, an `SMTPProtocol`) and two of its
methods that have no leading underscore but are not in aiosmtplib's documentation: `write`
(bytes onto the transport) and `read_response` (the next reply, parsed). The drift test
(tests/unit/worker/test_smtp_chunking_drift.py) fails on a release that changes them, and
pyproject pins the range it was tested on.

Why BDAT: the message goes as one counted chunk, `BDAT <size> LAST` then its octets, answered
by one reply (RFC 3030 §2): no 354 round trip, and no dot-stuffing pass over the body (DATA
needs one, RFC 5321 §4.5.2), which for a 100 KiB message is the largest part of the client's
CPU per transaction.
"""

from __future__ import annotations

import re

import aiosmtplib
from aiosmtplib import SMTPResponse

from mailkube_core.line_endings import has_bare_line_ending

#: a CR or LF that is not part of a CRLF pair (RFC 5321 §2.3.8: lines end in CRLF only)
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def crlf_lines(body: bytes) -> bytes:
    """The body with every line ending CRLF. Queued bodies already are (the gateway refuses
    bare CR or LF); they are checked first (core/line_endings.py), so the common case copies
    nothing."""
    if not has_bare_line_ending(body):
        return body
    return _BARE.sub(b"\r\n", body)


async def bdat_last(smtp: aiosmtplib.SMTP, body: bytes, reply_timeout: float) -> SMTPResponse:
    """Send `body` (CRLF lines) as one BDAT LAST chunk and return the server's reply. The
    caller holds the session alone (the connection pool hands it to one delivery at a time).
    On a timeout or a lost connection the session is closed, as aiosmtplib closes it after a
    command, since a late reply would be taken for the next command's."""
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    try:
        # no await between the write and read_response: the reply cannot arrive before
        # read_response waits for it (it marks a reply as expected before it yields)
        protocol.write(b"BDAT %d LAST\r\n" % len(body))
        protocol.write(body)
        return await protocol.read_response(timeout=reply_timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise


def dot_stuffed(body: bytes, dot_lines: bool = True) -> bytes:
    """DATA's transparency (RFC 5321 §4.5.2) for a body of CRLF lines ending in CRLF: a dot
    added before every line that starts with one, and the end-of-data line appended. Two C
    passes (bytes.replace) instead of aiosmtplib's regular expressions; none when no line
    starts with a dot (rfind: a backward search, on CPython 3.11 twice as fast as replace's),
    and no pass at all when the producer knows none does (`dot_lines` False)."""
    if not dot_lines or body.rfind(b"\r\n.") < 0:
        stuffed = body
    else:
        stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


async def data(
    smtp: aiosmtplib.SMTP, body: bytes, reply_timeout: float, dot_lines: bool = True
) -> SMTPResponse:
    """DATA, then `body` (CRLF lines ending in CRLF) dot-stuffed (`dot_lines` False: the
    producer knows no line starts with a dot): the reply to DATA when it is not 354, else the
    reply to the content. Closed on a timeout or a lost connection."""
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    try:
        protocol.write(b"DATA\r\n")
        reply = await protocol.read_response(timeout=reply_timeout)
        if reply.code != 354:
            return reply
        protocol.write(dot_stuffed(body, dot_lines))
        return await protocol.read_response(timeout=reply_timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
