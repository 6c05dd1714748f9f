"""BDAT (RFC 3030 CHUNKING): the message in counted chunks instead of DATA's dot-terminated
stream. No dot-unstuffing and no end marker to search for, so no smuggling of one message's
end into another; the byte counts are exact.

RFC 3030 §2, as the session applies it:
- `bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF`, `chunk-size = 1*DIGIT`,
  `end-marker = "LAST"`; the chunk's octets follow the command line at once.
- Every chunk is read, even one refused (no transaction, past the size limit, no memory):
  its octets are discarded, then the reply says why. A command line that is not a BDAT
  command cannot be framed (how many octets follow is unknown): 501, and the connection is
  closed, so no chunk's octets are ever read as commands.
- A chunk refused for its size or for memory ends the transaction: chunks still in the
  pipeline are discarded with 503 (no MAIL), and the client starts again.
- DATA after a BDAT in the same transaction is refused with 503; BDAT 0 LAST is valid.
- Content that is not BINARYMIME is still lines of text: a bare CR or LF refuses it as it
  would after DATA (RFC 5321 §2.3.8), so what is queued passes through DATA downstream.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mailkube_core.line_endings import has_bare_line_ending

from .data import CHUNK, DataResult, DataStatus
from .data_memory import DataHold

SYNTAX = "501 5.5.4 Syntax: BDAT chunk-size [LAST]"
#: more digits than any size limit can need; longer counts are not parsed into huge ints
_BDAT = re.compile(r"([0-9]{1,18})(?: +(LAST))?", re.IGNORECASE)  # ASCII digits only


def parse_bdat(arg: str | None) -> tuple[int, bool] | None:
    """'1000 LAST' -> (1000, True); None when `arg` is not a BDAT argument."""
    match = _BDAT.fullmatch(arg or "")
    if match is None:
        return None
    return int(match[1]), match[2] is not None


@dataclass
class Chunks:
    """The chunks of one transaction so far, and their share of the process's memory."""

    hold: DataHold
    limit: int
    content: bytearray = field(default_factory=bytearray)
    #: octets received in all chunks, kept or not
    wire_size: int = 0
    #: why the content is being dropped (TOO_BIG, NO_MEMORY), once it is
    refused: DataStatus | None = None

    def admit(self, size: int) -> bool:
        """Whether the next chunk's `size` octets are kept (False: read and dropped)."""
        if self.refused is not None:
            return False
        if len(self.content) + size > self.limit:
            self.refused = DataStatus.TOO_BIG
        elif not self.hold.grow(size):
            self.refused = DataStatus.NO_MEMORY  # (grow gave the share back)
        if self.refused is not None:
            self.content = bytearray()
            self.hold.release()
            return False
        return True

    def result(self, *, binary: bool = False) -> DataResult:
        """The message the chunks make, after the LAST one (or why it is refused)."""
        if self.refused is not None:
            return DataResult(self.refused, b"", self.wire_size)
        content = bytes(self.content)
        self.content = bytearray()
        if not binary and has_bare_line_ending(content):
            return DataResult(DataStatus.BARE_LINE_ENDING, b"", self.wire_size)
        return DataResult(DataStatus.OK, content, self.wire_size)

    def close(self) -> None:
        """The transaction ended: give the memory back (idempotent)."""
        self.content = bytearray()
        self.hold.release()


async def read_chunk(
    reader: asyncio.StreamReader,
    size: int,
    into: bytearray | None,
    on_progress: Callable[[], None] | None = None,
) -> None:
    """Read exactly `size` octets, appended to `into` or dropped (None). Raises
    asyncio.IncompleteReadError if the client hangs up first."""
    remaining = size
    while remaining:
        piece = await reader.read(min(CHUNK, remaining))
        if not piece:
            raise asyncio.IncompleteReadError(b"", remaining)
        if on_progress is not None:
            on_progress()
        if into is not None:
            into += piece
        remaining -= len(piece)
