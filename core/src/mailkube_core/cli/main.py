"""`mailkube`: the operator's command line. Settings (Redis URL, key prefix, partitions) come
from MAILKUBE_* and the file named by -c or MAILKUBE_CONFIG, like every Mailkube process."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from redis.exceptions import RedisError

from ..queue import Queue
from ..redis_client import connect_redis
from ..routing import RoutingStore
from ..settings import CommonSettings, load_settings_or_exit
from . import dev, passwd, queue_cmd, routing_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailkube", description="Mailkube: routing table, delivery queue, local stack."
    )
    parser.add_argument("-c", "--config", help="settings file (default: $MAILKUBE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    routing_cmd.add_parser(sub)
    queue_cmd.add_parser(sub)
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
    settings = load_settings_or_exit(CommonSettings, "mailkube", args.config)
    try:
        raise SystemExit(asyncio.run(_with_redis(args, settings)))
    except routing_cmd.RoutingFileError as exc:
        print(f"mailkube: {exc}", file=sys.stderr)
    except RedisError as exc:
        print(f"mailkube: Redis at {settings.redis_url}: {exc}", file=sys.stderr)
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
        queue = Queue.from_settings(settings, redis)
        if args.action == "list":
            await queue_cmd.list_messages(queue, args.limit)
        elif args.action == "show":
            return await queue_cmd.show(queue, args.id)
        elif args.action == "retry":
            return await queue_cmd.retry(queue, args.ids)
        elif args.action == "delete":
            return await queue_cmd.delete(queue, args.ids)
        else:
            await queue_cmd.stats(queue)
        return 0
    finally:
        await redis.aclose()


if __name__ == "__main__":
    main()
