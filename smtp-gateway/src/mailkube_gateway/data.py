"""Reading the message after DATA: in large chunks, not line by line, and safe from SMTP
smuggling.

The end of the data is CRLF "." CRLF and nothing else (RFC 5321 §4.1.1.4). Variants that
other servers took for it (LF "." LF, LF "." CRLF, CR "." CR ...) are not; and since CR and LF
may only appear together as CRLF (RFC 5321 §2.3.8), a message holding a bare CR or LF is
refused as a whole after its end. So no byte sequence turns one message into two, or ends one
where a downstream server would not.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass

END = b"\r\n.\r\n"
CHUNK = 256 * 1024


class DataStatus(enum.Enum):
    OK = "ok"
    TOO_BIG = "too big"
    BARE_LINE_ENDING = "bare CR or LF"


@dataclass(frozen=True)
class DataResult:
    status: DataStatus
    #: the message, dot-unstuffed, every line ending in CRLF; empty unless status is OK
    content: bytes
    #: bytes received on the wire, up to and including the final CRLF "." CRLF
    wire_size: int


def unstuff(wire: bytes) -> bytes:
    """RFC 5321 §4.5.2: a line starting with "." loses that first ".". `wire` starts with the
    CRLF that ended the DATA command, so the first line is treated like every other."""
    return wire.replace(b"\r\n.", b"\r\n")[2:]


def has_bare_line_ending(content: bytes) -> bool:
    """Any CR not followed by LF, or LF not preceded by CR: as many CR as LF as CRLF. (Three
    C-speed passes, the slow one, for CRLF, only when the quick ones agree.)"""
    lines = content.count(b"\n")
    return content.count(b"\r") != lines or content.count(b"\r\n") != lines


async def read_data(
    reader: asyncio.StreamReader,
    unread: Callable[[bytes], None],
    *,
    limit: int,
    on_progress: Callable[[], None] | None = None,
) -> DataResult:
    """Read up to and including the end of data. What the client sent after it (pipelined
    commands) goes back through `unread`. Past `limit` bytes the content is dropped as it
    arrives (only the last 4 bytes are kept to find the end), so a huge message costs no
    memory. Raises asyncio.IncompleteReadError if the client hangs up first."""
    # The CRLF that ended "DATA" starts the buffer, so that END also finds an empty message
    # (".\r\n" first) and a first line starting with "." is unstuffed like the others.
    buffer = bytearray(b"\r\n")
    scanned = 0  # END cannot start before this offset in buffer
    dropped = 0  # bytes dropped from the front of buffer after the limit was passed
    # wire bytes allowed before dropping: dot-stuffing can add at most one byte per line, and
    # the exact size is checked on the unstuffed content
    keep = limit + limit // 32 + 1024
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(buffer), None)
        if on_progress is not None:
            on_progress()
        buffer += chunk
        end = buffer.find(END, scanned)
        if end >= 0:
            break
        scanned = max(0, len(buffer) - len(END) + 1)
        if dropped or len(buffer) > keep:
            tail = len(buffer) - (len(END) - 1)
            dropped += tail
            del buffer[:tail]
            scanned = 0
    after = end + len(END)
    if after < len(buffer):
        unread(bytes(buffer[after:]))
    wire_size = dropped + after - 2
    if dropped:
        return DataResult(DataStatus.TOO_BIG, b"", wire_size)
    wire = bytes(buffer[: end + 2])
    del buffer
    if has_bare_line_ending(wire):
        return DataResult(DataStatus.BARE_LINE_ENDING, b"", wire_size)
    content = unstuff(wire)
    if len(content) > limit:
        return DataResult(DataStatus.TOO_BIG, b"", wire_size)
    return DataResult(DataStatus.OK, content, wire_size)
