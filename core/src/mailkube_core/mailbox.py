"""Where a mailbox lives and how full it is: one definition for every component.

- The maildir (ARCHITECTURE.md "Maildir"): `<mail_root>/<domain>/<localpart>/`. The worker
  writes it and the operator reports it in MailUser status.
- The usage counters in Redis: the delivery worker writes them as it delivers, and the gateway
  reads them for its quota check (452 4.2.2).

  <prefix>:mailbox:<address>   hash: `messages` and `bytes` delivered into the mailbox
"""

from __future__ import annotations

from urllib.parse import quote

from .addresses import split_address


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
