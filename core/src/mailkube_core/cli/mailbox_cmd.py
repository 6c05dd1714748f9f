"""`mailkube mailbox recount ADDRESS...|--all`: the counters the gateway's quota check reads
(`messages`, `bytes` of P:mailbox:<address>) set from the maildirs under mail_root, exactly,
while deliveries go on (mailkube_core.recount). Run it where the mail volume is mounted, e.g.
in a local-role worker's pod."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..addresses import normalize_address
from ..mailbox import mailbox_dir
from ..recount import Recount, RecountFailed, maildirs
from ..redis_client import RedisClient
from ..routing import RoutingStore
from .tables import size


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mailbox = subparsers.add_parser("mailbox", help="mailbox counters")
    sub = mailbox.add_subparsers(dest="action", required=True)
    recount = sub.add_parser(
        "recount",
        help="set mailboxes' message and byte counters from their maildirs (new/, cur/ and "
        "Maildir++ folders), exactly, while deliveries go on",
    )
    recount.add_argument("addresses", nargs="*", metavar="ADDRESS")
    recount.add_argument(
        "--all", action="store_true",
        help="every user in the routing table and every maildir on disk",
    )  # fmt: skip
    recount.add_argument("--mail-root", type=Path, default=None,
                         help="the maildirs' root (default: the mail_root setting)")  # fmt: skip


async def recount(
    redis: RedisClient,
    prefix: str,
    partitions: int,
    mail_root: Path,
    addresses: list[str],
    every: bool,
) -> int:
    if every == bool(addresses):
        print("mailkube: name addresses, or --all", file=sys.stderr)
        return 2
    snapshot = await RoutingStore(redis, prefix).load()
    users = {user.address for user in snapshot.table.users}
    if every:
        targets = sorted(users | set(maildirs(mail_root)))
    else:
        targets = []
        for address in addresses:
            try:
                targets.append(normalize_address(address))
            except ValueError as exc:
                print(f"mailkube: {exc}", file=sys.stderr)
                return 2
    failures = 0
    width = max((len(t) for t in targets), default=0)
    for address in targets:
        box = mail_root / mailbox_dir(address)
        if address not in users and not box.is_dir():
            print(f"{address.ljust(width)}  not a user, and no maildir at {box}")
            failures += 1
            continue
        try:
            done = await Recount(redis, prefix, partitions, mail_root, address).run()
        except RecountFailed as exc:
            print(f"{address.ljust(width)}  not recounted: {exc}")
            failures += 1
            continue
        before, after = done.before, done.after
        change = (
            "unchanged" if before == after
            else f"was {before.messages} messages, {size(before.bytes)}"
        )  # fmt: skip
        print(f"{address.ljust(width)}  {after.messages} messages, "
              f"{size(after.bytes)} ({after.bytes} bytes); {change}")  # fmt: skip
    return 1 if failures else 0
