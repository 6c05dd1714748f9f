"""Mailbox usage counters in Redis: the delivery worker writes them as it delivers, the gateway
reads them for its quota check (452 4.2.2). One definition of the key, so the two cannot drift.

  <prefix>:mailbox:<address>   hash: `messages` and `bytes` delivered into the mailbox
"""

from __future__ import annotations


def mailbox_key(prefix: str, address: str) -> str:
    """`address` in its normalised form (mailkube_core.addresses.normalize_address)."""
    return f"{prefix}:mailbox:{address}"


#: the hash field holding the mailbox's size in bytes
BYTES_FIELD = "bytes"
#: the hash field holding its message count
MESSAGES_FIELD = "messages"
