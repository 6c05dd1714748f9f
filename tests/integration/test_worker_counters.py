"""Mailbox counters, the message.received stream and the outcome counts stay exact when a
worker process dies (SIGKILL) in the middle of delivering: counted in the queue's own record
of each delivery, then carried to the counters once (issue 15, finding 2). And recounts from
the maildir while a worker delivers leave them exact too."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from conditions import eventually
from worker_harness import (
    WorkerProcess,
    apply_routing,
    message,
    queue_empty,
    table,
    worker_settings,
)

from mailkube_core.mailbox import BYTES_FIELD, MESSAGES_FIELD, mailbox_key
from mailkube_core.queue import Envelope, Queue, Recipient
from mailkube_core.queue.envelope import utcnow
from mailkube_core.queue.outcomes import read_outcomes
from mailkube_core.recount import Recount
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import User
from mailkube_core.settings import WorkerSettings

ALICE = User(address="alice@example.test")
CAROL = User(address="carol@example.test")
MESSAGES = 300


def maildir_usage(root: Path, address: str) -> tuple[int, int, Counter[str]]:
    """Files and bytes in new/ and cur/ of a maildir, and how many files each message id has."""
    local, domain = address.split("@")
    files = [f for sub in ("new", "cur") for f in (root / domain / local / sub).glob("*")]
    ids = Counter(f.name.split(".M", 1)[1].rsplit("_", 1)[0].replace("_", ".") for f in files)
    return len(files), sum(f.stat().st_size for f in files), ids


async def counted(settings: WorkerSettings, address: str) -> tuple[int, int]:
    redis = connect_redis(settings)
    try:
        values: Any = await redis.hmget(
            mailbox_key(settings.key_prefix, address), [MESSAGES_FIELD, BYTES_FIELD]
        )
    finally:
        await redis.aclose()
    return int(values[0] or 0), int(values[1] or 0)


async def test_sigkill_in_the_middle_of_batched_delivery_leaves_the_counters_exact(
    redis_url: str, tmp_path: Path
) -> None:
    """pod-a delivers 300 messages to alice and carol and is killed while files are landing
    faster than they are counted; pod-a again takes its entries back and finishes. Then the
    counters equal the maildirs' files and bytes, the event stream holds one event per
    (message, mailbox) and today's outcomes one delivery per recipient."""
    mail = tmp_path / "mail"
    settings = worker_settings(redis_url, mail)
    routing = await apply_routing(settings, table(ALICE, CAROL))
    redis = connect_redis(settings)
    queue = Queue.from_settings(settings, redis)
    env = Envelope(mail_from="bob@remote.test",
                   recipients=[Recipient(address=a) for a in ("alice@example.test",
                                                              "carol@example.test")])  # fmt: skip
    try:
        ids = [(await queue.enqueue(env, message(f"m{i}"), is_local=routing.is_local))[0]
               for i in range(MESSAGES)]  # fmt: skip
    finally:
        await redis.aclose()
    pod = {"MAILKUBE_VISIBILITY_TIMEOUT": "1s", "MAILKUBE_QUEUE_WORKERS": "8"}
    first = WorkerProcess(settings, "pod-a", "--role", "local", **pod)
    second: WorkerProcess | None = None
    try:
        await first.ready()

        async def landing_faster_than_counted() -> bool:
            files = maildir_usage(mail, "alice@example.test")[0]
            return files >= 30 and (await counted(settings, "alice@example.test"))[0] < files

        await eventually(landing_faster_than_counted, timeout=30)
        first.kill()
        assert not await queue_empty(settings), "the kill came too late: nothing left to do"
        second = WorkerProcess(settings, "pod-a", "--role", "local", **pod)
        await second.ready()
        await eventually(lambda: queue_empty(settings), timeout=60)
        assert second.stop() == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
    redis = connect_redis(settings)
    try:
        events = await redis.xrange(f"{settings.key_prefix}:events:message.received")
        outcomes = await read_outcomes(redis, settings.key_prefix, utcnow().date())
    finally:
        await redis.aclose()
    for address in ("alice@example.test", "carol@example.test"):
        files, size, per_message = maildir_usage(mail, address)
        assert sorted(per_message) == sorted(ids), "a message lost or stored twice"
        assert set(per_message.values()) == {1}
        assert await counted(settings, address) == (files, size)
        received = Counter(e[b"message_id"].decode() for _, e in events
                           if e[b"mailbox"] == address.encode())  # fmt: skip
        assert received == per_message, "one message.received event per message and mailbox"
    assert outcomes["remote.test"]["delivered"] == 2 * MESSAGES


async def test_recounts_while_a_worker_delivers_leave_the_counters_exact(
    redis_url: str, tmp_path: Path
) -> None:
    """`mailkube mailbox recount` runs again and again while pod-a delivers 300 messages to
    alice; after the queue drains, no recount afterwards, the counters equal the maildir."""
    mail = tmp_path / "mail"
    settings = worker_settings(redis_url, mail)
    routing = await apply_routing(settings, table(ALICE))
    redis = connect_redis(settings)
    queue = Queue.from_settings(settings, redis)
    env = Envelope(mail_from="bob@remote.test", recipients=[Recipient(address=ALICE.address)])
    # small batches, one at a time: the deliveries last long enough for recounts to overlap
    worker = WorkerProcess(settings, "pod-a", "--role", "local", MAILKUBE_QUEUE_WORKERS="1",
                           MAILKUBE_LOCAL_BATCH_SIZE="4")  # fmt: skip
    try:
        for i in range(MESSAGES):
            await queue.enqueue(env, message(f"m{i}"), is_local=routing.is_local)
        await worker.ready()
        during = 0  # recounts while files were landing
        while not await queue_empty(settings):
            landed = maildir_usage(mail, ALICE.address)[0]
            await Recount(redis, settings.key_prefix, 1, mail, ALICE.address).run()
            during += 0 < landed < maildir_usage(mail, ALICE.address)[0]
        assert worker.stop() == 0
    finally:
        worker.kill()
        await redis.aclose()
    assert during >= 3, "the deliveries were over before the recounts could overlap them"
    files, size, _ = maildir_usage(mail, ALICE.address)
    assert files == MESSAGES
    assert await counted(settings, ALICE.address) == (files, size)
