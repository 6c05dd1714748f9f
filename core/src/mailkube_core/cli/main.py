"""`mailkube`: the operator's command line. Settings (Redis URL, key prefix, partitions) come
from MAILKUBE_* and the file named by -c or MAILKUBE_CONFIG, like every Mailkube process."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from redis.exceptions import RedisError

from ..queue import QueueAdmin
from ..redis_client import connect_redis, describe_redis
from ..routing import RoutingStore
from ..settings import CommonSettings, WorkerSettings, load_settings_or_exit
from . import delivery_cmd, dev, mailbox_cmd, passwd, queue_cmd, routing_cmd, spam_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailkube",
        description="Mailkube: routing table, delivery queue, mailboxes, spam, delivery "
        "diagnostics, local stack.",
    )
    parser.add_argument("-c", "--config", help="settings file (default: $MAILKUBE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    routing_cmd.add_parser(sub)
    queue_cmd.add_parser(sub)
    mailbox_cmd.add_parser(sub)
    spam_cmd.add_parser(sub)
    delivery_cmd.add_parser(sub)
    passwd.add_parser(sub)
    dev.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except BrokenPipeError:
        # `mailkube queue list | head`: the reader left; say nothing more, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "passwd":
        raise SystemExit(passwd.run(args.stdin))
    if args.command == "dev":
        raise SystemExit(dev.run(args))
    if args.command == "delivery":  # the worker's settings and the network, no Redis
        raise SystemExit(delivery_cmd.run(args))
    if args.command == "spam" and args.action == "learn":  # rspamd only, no Redis
        raise SystemExit(spam_cmd.run_learn(args))
    # the mailbox commands read the maildirs, where a worker does (its mail_root)
    model = WorkerSettings if args.command == "mailbox" else CommonSettings
    settings = load_settings_or_exit(model, "mailkube", args.config)
    try:
        raise SystemExit(asyncio.run(_with_redis(args, settings)))
    except routing_cmd.RoutingFileError as exc:
        print(f"mailkube: {exc}", file=sys.stderr)
    except RedisError as exc:
        print(f"mailkube: Redis at {describe_redis(settings)}: {exc}", file=sys.stderr)
    except ValueError as exc:  # e.g. a malformed message id
        print(f"mailkube: {exc}", file=sys.stderr)
    raise SystemExit(1)


async def _with_redis(args: argparse.Namespace, settings: CommonSettings) -> int:
    redis = connect_redis(settings)
    try:
        if args.command == "routing":
            if args.action == "apply":
                await routing_cmd.apply(redis, settings.key_prefix, args.file)
            else:
                snapshot = await RoutingStore(redis, settings.key_prefix).load()
                routing_cmd.show(snapshot, as_yaml=args.output == "yaml")
            return 0
        if args.command == "mailbox":
            assert isinstance(settings, WorkerSettings)
            return await mailbox_cmd.recount(
                redis, settings.key_prefix, settings.queue_partitions,
                args.mail_root or settings.mail_root, args.addresses, args.all,
            )  # fmt: skip
        if args.command == "spam":
            if args.action == "suspended":
                return await spam_cmd.suspended(redis, settings.key_prefix)
            return await spam_cmd.unsuspend(redis, settings.key_prefix, args.addresses)
        admin = QueueAdmin.from_settings(settings, redis)
        if args.action == "list":
            await queue_cmd.list_messages(admin, args.limit)
        elif args.action == "show":
            return await queue_cmd.show(admin, args.id)
        elif args.action == "retry":
            return await queue_cmd.retry(admin, args.ids)
        elif args.action == "delete":
            return await queue_cmd.delete(admin, args.ids)
        else:
            await queue_cmd.stats(admin)
        return 0
    finally:
        await redis.aclose()


if __name__ == "__main__":
    main()
