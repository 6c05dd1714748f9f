"""`mailkube queue list|show|retry|delete|stats`, over QueueAdmin (queue/admin.py)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from datetime import datetime

from ..queue import MessageInfo, QueueAdmin, RecipientStatus
from ..queue.envelope import utcnow
from ..queue.outcomes import bounce_rate, read_outcomes
from .tables import age, clip, size, table


def _when(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _pending(info: MessageInfo) -> int:
    return sum(
        1
        for i in range(len(info.envelope.recipients))
        if i not in info.results or not info.results[i].final
    )


async def list_messages(admin: QueueAdmin, limit: int) -> None:
    infos = await admin.list_messages(limit)
    if not infos:
        print("the queue is empty")
        return
    print(table(
        ["ID", "LANE", "STATE", "AGE", "FROM", "RCPTS", "SIZE", "TRIES", "NEXT", "LAST ERROR"],
        [
            [i.id, i.lane, i.state, age(i.envelope.received_at), i.envelope.mail_from or "<>",
             f"{_pending(i)}/{len(i.envelope.recipients)}", size(i.size), i.attempts,
             age(i.next_attempt) if i.next_attempt else "-", clip(i.last_error, 40)]
            for i in infos
        ],
    ))  # fmt: skip


async def show(admin: QueueAdmin, message_id: str) -> int:
    info = await admin.inspect(message_id)
    if info is None:
        print(f"no message {message_id} in the queue")
        return 1
    env = info.envelope
    fields = [
        ("id", info.id),
        ("lane", info.lane),
        ("state", info.state + (f" by {info.claimed_by}" if info.claimed_by else "")),
        ("from", env.mail_from or "<>"),
        ("received", f"{_when(env.received_at)} ({age(env.received_at)} ago)"),
        ("client", f"{env.client_address or '-'} helo={env.client_helo or '-'} "
                   f"listener={env.listener or '-'} auth={env.auth_user or '-'}"),
        ("size", f"{size(info.size)} ({info.size} bytes, {env.body_type}"
                 f"{', SMTPUTF8' if env.smtputf8 else ''})"),
        ("dsn", f"ret={env.ret or '-'} envid={env.envid or '-'}"),
        ("attempts", f"{info.attempts} (claimed {info.deliveries}x since the last one)"),
        ("next attempt", _when(info.next_attempt) if info.next_attempt else "-"),
        ("last error", info.last_error or "-"),
        ("trace", env.trace_context.get("traceparent", "-")),
    ]  # fmt: skip
    fields += [(f"annotation {k}", v) for k, v in sorted(env.annotations.items())]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.rjust(width)}: {value}")
    print()
    rows = []
    for index, rcpt in enumerate(env.recipients):
        result = info.results.get(index)
        status = result.status if result else RecipientStatus.PENDING
        notify = ",".join(sorted(rcpt.notify)) if rcpt.notify is not None else "-"
        detail = ""
        if result:
            detail = " ".join(str(x) for x in (result.smtp_code, result.enhanced_code) if x)
            detail = f"{detail} {clip(result.diagnostic, 60)}".strip()
        rows.append([rcpt.address, status.value, notify, rcpt.orcpt or "-", detail])
    print(table(["RECIPIENT", "STATUS", "NOTIFY", "ORCPT", "DETAIL"], rows))
    return 0


async def retry(admin: QueueAdmin, ids: list[str]) -> int:
    return await _each(
        ids, admin.retry_now, "back in the queue", "not deferred (unknown, or queued or active)"
    )


async def delete(admin: QueueAdmin, ids: list[str]) -> int:
    return await _each(ids, admin.delete, "deleted", "not in the queue")


async def _each(
    ids: list[str], action: Callable[[str], Awaitable[bool]], done: str, not_done: str
) -> int:
    """Run `action` on every id, one line each; exit status 1 if any was not done."""
    failures = 0
    for message_id in ids:
        ok = await action(message_id)
        failures += not ok
        print(f"{message_id}: {done if ok else not_done}")
    return 1 if failures else 0


async def stats(admin: QueueAdmin) -> None:
    result = await admin.stats()
    oldest = f", oldest {age(result.oldest)} old" if result.oldest else ""
    print(f"{result.messages} message(s) in {admin.partitions} partition(s){oldest}")
    print()
    print(table(
        ["PARTITION", "LANE", "READY", "ACTIVE", "DEFERRED"],
        [[s.partition, s.lane, s.ready, s.active, s.deferred] for s in result.lanes],
    ))  # fmt: skip
    today = utcnow().date()
    outcomes = await read_outcomes(admin.redis, admin.prefix, today)
    if outcomes:
        print()
        print(f"Recipients by sender domain, {today.isoformat()} (UTC):")
        rows = []
        for domain, counts in sorted(outcomes.items()):
            rate = bounce_rate(counts)
            rows.append([domain, counts["delivered"], counts["deferred"], counts["bounced"],
                         "-" if rate is None else f"{rate:.1%}"])  # fmt: skip
        print(table(["SENDER DOMAIN", "DELIVERED", "DEFERRED", "BOUNCED", "BOUNCE RATE"], rows))


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = subparsers.add_parser("queue", help="look at and manage the delivery queue")
    sub = queue.add_subparsers(dest="action", required=True)
    list_p = sub.add_parser("list", help="the oldest messages")
    list_p.add_argument("-n", "--limit", type=int, default=100)
    show_p = sub.add_parser("show", help="one message: envelope and each recipient's state")
    show_p.add_argument("id")
    retry_p = sub.add_parser("retry", help="try deferred messages again now")
    retry_p.add_argument("ids", nargs="+", metavar="ID")
    delete_p = sub.add_parser("delete", help="remove messages without delivering or bouncing")
    delete_p.add_argument("ids", nargs="+", metavar="ID")
    sub.add_parser("stats", help="counts per partition and lane; today's bounce rates")
