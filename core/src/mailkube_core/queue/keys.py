"""Queue key layout. Every key of one partition shares the Redis Cluster hash tag
`{<prefix>:q<partition>}`, so each multi-key script runs on one slot."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

from .envelope import Lane

GROUP = "workers"
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_MESSAGE_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{22}\.[0-9]{1,4}", re.ASCII)


@dataclass(frozen=True)
class PartitionKeys:
    prefix: str
    partition: int

    @property
    def tag(self) -> str:
        return f"{{{self.prefix}:q{self.partition}}}"

    def stream(self, lane: Lane) -> str:
        """Entries ready for delivery; consumed by the group `workers`."""
        return f"{self.tag}:stream:{lane}"

    def delayed(self, lane: Lane) -> str:
        """Sorted set: message id -> due time (ms) of its next attempt."""
        return f"{self.tag}:delayed:{lane}"

    @property
    def messages(self) -> str:
        """Sorted set: every message id in this partition -> enqueue time (ms); for listing."""
        return f"{self.tag}:messages"

    def message(self, message_id: str) -> str:
        """Hash: envelope, body, lane, attempts, deliveries, claim info, r:<i> results, and
        the tally's markers: c:<mailbox> (that copy counted), t:<i> (that outcome counted)."""
        return f"{self.tag}:m:{message_id}"

    @property
    def tally(self) -> str:
        """Stream: what the partition's deliveries count, appended by the same scripts that
        record them, until the relay carries it to the counters (queue/tally.py)."""
        return f"{self.tag}:tally"


def new_message_id(partition: int) -> str:
    """Time-ordered and unique: 10 chars of milliseconds and 12 of randomness (Crockford
    base32, like a ULID), then '.<partition>' so any message can be found from its id alone.

    Ids must be unique, not unguessable (nothing is authorised by knowing one), so the
    randomness is `random`'s: seeded from os.urandom when a process starts and reseeded in a
    forked child by CPython itself, so no two processes share a sequence; an os.urandom
    system call per message cost the gateway more."""
    value = (int(time.time() * 1000) << 60) | random.getrandbits(60)
    chars = []
    for _ in range(22):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars)) + f".{partition}"


def enqueued_ms(message_id: str) -> int:
    """When the message was queued (ms since the epoch), from its id's first 10 characters;
    ValueError for a malformed id."""
    if not _MESSAGE_ID.fullmatch(message_id):
        raise ValueError(f"not a message id: {message_id!r}")
    value = 0
    for char in message_id[:10]:
        value = value * 32 + _CROCKFORD.index(char)
    return value


def partition_of(message_id: str) -> int:
    """The partition a message id names; ValueError for a malformed id."""
    if not _MESSAGE_ID.fullmatch(message_id):
        raise ValueError(f"not a message id: {message_id!r}")
    return int(message_id.rpartition(".")[2])
