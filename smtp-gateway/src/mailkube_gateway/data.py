"""Reading the message after DATA: in large chunks, not line by line, and safe from SMTP
smuggling.

The end of the data is CRLF "." CRLF and nothing else (RFC 5321 §4.1.1.4). Variants that
other servers took for it (LF "." LF, LF "." CRLF, CR "." CR ...) are not; and since CR and LF
may only appear together as CRLF (RFC 5321 §2.3.8), a message holding a bare CR or LF is
refused as a whole after its end. So no byte sequence turns one message into two, or ends one
where a downstream server would not.

The bytes a message holds while it is read are counted against the process's limit for all
sessions in DATA (data_memory.py): past it, the message is dropped as it arrives, as one past
the size limit is.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass

from mailkube_core.line_endings import has_bare_line_ending

from .data_memory import DataHold

END = b"\r\n.\r\n"
CHUNK = 256 * 1024


class DataStatus(enum.Enum):
    OK = "ok"
    TOO_BIG = "too big"
    BARE_LINE_ENDING = "bare CR or LF"
    #: the sessions in DATA hold the process's data_memory_limit: 452 4.3.1
    NO_MEMORY = "no memory"


@dataclass(frozen=True)
class DataResult:
    status: DataStatus
    #: the message, dot-unstuffed, every line ending in CRLF; empty unless status is OK
    content: bytes
    #: bytes received on the wire, up to and including the final CRLF "." CRLF
    wire_size: int
    #: a line of `content` may start with "." (sending it on by DATA stuffs it again); False
    #: only when none does (known for free while unstuffing; BDAT content is not looked at)
    dot_lines: bool = True


def unstuff(wire: bytes) -> bytes:
    """RFC 5321 §4.5.2: a line starting with "." loses that first ".", the first line too.
    (No copy when nothing is stuffed. rfind first: on CPython 3.11 it searches twice as fast
    as replace's forward search, and most messages have no such line.)"""
    content = wire if wire.rfind(b"\r\n.") < 0 else wire.replace(b"\r\n.", b"\r\n")
    return content[1:] if content.startswith(b".") else content


def wire_allowance(limit: int) -> int:
    """Wire bytes read before a message of at most `limit` bytes is known to be too big:
    dot-stuffing adds at most one byte per line (and lines are long), and the exact size is
    checked on the unstuffed content."""
    return limit + limit // 32 + 1024


async def read_data(
    reader: asyncio.StreamReader,
    unread: Callable[[bytes], None],
    *,
    limit: int,
    on_progress: Callable[[], None] | None = None,
    hold: DataHold | None = None,
) -> DataResult:
    """Read up to and including the end of data. What the client sent after it (pipelined
    commands) goes back through `unread`. Past `limit` bytes, or when `hold` (the session's
    share of the process's memory for DATA) cannot grow by the next bytes, the content is
    dropped as it arrives (only the last 4 bytes are kept to find the end), so a huge message
    costs no memory. The bytes held stay in `hold` until the caller gives them back. Raises
    asyncio.IncompleteReadError if the client hangs up first."""
    # The CRLF that ended "DATA" starts the buffer, so that END also finds an empty message
    # (".\r\n" first); the content starts after it.
    buffer = bytearray(b"\r\n")
    scanned = 0  # END cannot start before this offset in buffer
    dropped = 0  # bytes dropped from the front of buffer after the data was refused
    refused: DataStatus | None = None  # TOO_BIG or NO_MEMORY, once the data is dropped
    keep = wire_allowance(limit)
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(buffer), None)
        if on_progress is not None:
            on_progress()
        if refused is None and hold is not None and not hold.grow(len(chunk)):
            refused = DataStatus.NO_MEMORY  # (grow gave the share back)
        buffer += chunk
        # backward searches: on CPython 3.11 twice as fast as forward ones, and most chunks
        # hold no end at all
        end = buffer.rfind(END, scanned)
        if end >= 0:
            # the first end, not the last: what follows it (pipelined commands, whatever
            # they hold) is not this message's; each step scans only the gap before
            while (earlier := buffer.rfind(END, scanned, end + len(END) - 1)) >= 0:
                end = earlier
            break
        scanned = max(0, len(buffer) - len(END) + 1)
        if refused is None and len(buffer) > keep:
            refused = DataStatus.TOO_BIG
            if hold is not None:
                hold.release()
        if refused is not None:
            tail = len(buffer) - (len(END) - 1)
            dropped += tail
            del buffer[:tail]
            scanned = 0
    after = end + len(END)
    if after < len(buffer):
        unread(bytes(buffer[after:]))
    wire_size = dropped + after - 2
    if refused is not None:
        return DataResult(refused, b"", wire_size)
    with memoryview(buffer) as view:  # one copy: without the leading CRLF, up to END's CRLF
        wire = bytes(view[2 : end + 2])
    del buffer
    if has_bare_line_ending(wire):
        return DataResult(DataStatus.BARE_LINE_ENDING, b"", wire_size)
    # without a CRLF "." on the wire, only the first line can start with a dot after unstuffing
    stuffed = wire.rfind(b"\r\n.") >= 0
    content = unstuff(wire) if stuffed or wire.startswith(b".") else wire
    if len(content) > limit:
        return DataResult(DataStatus.TOO_BIG, b"", wire_size)
    return DataResult(DataStatus.OK, content, wire_size, stuffed or content.startswith(b"."))
