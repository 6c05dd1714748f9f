"""Where a mailbox lives and how full it is: one definition for every component.

- The maildir (docs/architecture.md "Maildir"): `<mail_root>/<domain>/<localpart>/`. The worker
  writes it and the operator reports it in MailUser status. A delivered file's name says which
  message it is (`delivery_name`), so a retry finds it and a recount knows it.
- The usage counters in Redis: the queue counts each copy in the same script that records its
  delivery, the tally relay adds it here once (mailkube_core.queue.tally), the gateway reads
  them for its quota check (452 4.2.2), and `mailkube mailbox recount` sets them from the
  maildir (mailkube_core.recount).

  <prefix>:mailbox:<address>   hash: `messages` and `bytes` in the mailbox; `applied:q<N>`, the
                               last tally entry of partition N counted in; `recount` and
                               `j:<message id>` while a recount runs
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from .addresses import split_address
from .redis_client import RedisClient


def mailbox_dir(address: str) -> str:
    """`<domain>/<localpart>` of a (normalised) address, relative to mail_root. A local part
    that could climb out of the domain's directory ('..', '/') is percent-encoded."""
    local, domain = split_address(address)
    if "/" in local or "\0" in local or local.startswith("."):
        local = quote(local, safe="")
        if local.startswith("."):  # quote() keeps dots: '..' would still climb
            local = "%2E" + local[1:]
    return f"{domain}/{local}"


def mailbox_key(prefix: str, address: str) -> str:
    """`address` in its normalised form (mailkube_core.addresses.normalize_address)."""
    return f"{prefix}:mailbox:{address}"


#: the hash field holding the mailbox's size in bytes
BYTES_FIELD = "bytes"
#: the hash field holding its message count
MESSAGES_FIELD = "messages"
#: while a recount runs: "<start ms>:<token>"
RECOUNT_FIELD = "recount"
#: while a recount runs, `j:<message id>` -> size for each copy counted in meanwhile
JOURNAL_PREFIX = "j:"
#: a recount that has not finished after this long is abandoned: its journal stops growing
RECOUNT_TTL_MS = 3600 * 1000


@dataclass(frozen=True)
class MailboxUsage:
    messages: int
    bytes: int


async def read_usage(redis: RedisClient, prefix: str, address: str) -> MailboxUsage:
    """The mailbox's counters as they stand (0 for a mailbox never counted)."""
    values: Any = await redis.hmget(mailbox_key(prefix, address), [MESSAGES_FIELD, BYTES_FIELD])
    return MailboxUsage(int(values[0] or 0), int(values[1] or 0))


# <arrival>.M<message id with _ for .>_<12 hex digits>.<host>,S=<size>[:2,<flags>]
_DELIVERY_NAME = re.compile(r"\d+\.M([0-9A-HJKMNP-TV-Z]{22})_(\d{1,4})_[0-9a-f]{12}\.")


def delivery_name(message_id: str, address: str, arrived: datetime, host: str, size: int) -> str:
    """The maildir file name for one message in one mailbox (maildir(5): time.unique.host).
    `/` and `:` in the host name are escaped as the maildir convention asks."""
    digest = hashlib.blake2s(f"{message_id}\0{address}".encode(), digest_size=6).hexdigest()
    unique = message_id.replace(".", "_") + "_" + digest
    host = host.replace("/", r"\057").replace(":", r"\072")
    return f"{int(arrived.timestamp())}.M{unique}.{host},S={size}"


def delivered_message(name: str) -> str | None:
    """The queue's message id in a file name `delivery_name` made (None for other files)."""
    match = _DELIVERY_NAME.match(name)
    return f"{match.group(1)}.{match.group(2)}" if match else None
