"""The recount (mailkube_core.recount): a maildir walked as the worker counts it, and the
counters set exactly while copies are stored, recorded and carried around it, step by step.
Real maildirs in a temp dir; real Redis, standalone with 1 partition and Cluster with 4."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from mailkube_core.mailbox import MailboxUsage, mailbox_key, read_usage
from mailkube_core.queue import (
    Claimed,
    Envelope,
    MailboxCopy,
    Queue,
    Recipient,
    RecipientResult,
    RecipientStatus,
    TallyRelay,
)
from mailkube_core.recount import Recount, RecountFailed, maildirs, walk_maildir
from mailkube_worker import maildir

ALICE = "alice@example.test"
DELIVERED = RecipientResult(status=RecipientStatus.DELIVERED, smtp_code=250)


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
async def queue(request: pytest.FixtureRequest) -> AsyncIterator[Queue]:
    client: Any
    if request.param == "standalone":
        client, partitions = Redis.from_url(request.getfixturevalue("redis_url")), 1
    else:
        client = RedisCluster.from_url(request.getfixturevalue("redis_cluster").url)
        partitions = 4
    q = Queue(client, prefix=f"t{uuid.uuid4().hex[:8]}", partitions=partitions)
    await q.ensure_groups()
    yield q
    await client.aclose()


def recount(queue: Queue, root: Path, address: str = ALICE) -> Recount:
    return Recount(queue.redis, queue.prefix, queue.partitions, root, address)


async def carry(queue: Queue) -> None:
    await TallyRelay(queue.redis, queue.prefix, queue.partitions).relay()


async def claim(queue: Queue) -> Claimed:
    env = Envelope(mail_from="bob@remote.test", recipients=[Recipient(address=ALICE)])
    (message_id,) = await queue.enqueue(env, b"Subject: x\r\n\r\nx\r\n", is_local=lambda a: True)
    for partition in range(queue.partitions):
        if got := await queue.claim("pod-a", "local", partition, count=1, block=None):
            return got[0]
    raise AssertionError(f"{message_id} not claimed")


def store(root: Path, claimed: Claimed, folder: str | None = None) -> MailboxCopy:
    """What local delivery writes for alice: the file, named after the message."""
    content = maildir.render(claimed.body, claimed.envelope.mail_from, ALICE)
    name = maildir.unique_name(claimed.id, ALICE, claimed.envelope.received_at, "mx",
                               len(content))  # fmt: skip
    box = maildir.mailbox_path(root, ALICE, folder)
    stored = maildir.store(box, name, content, check_existing=False)
    return MailboxCopy(ALICE, claimed.id, stored.size, folder, claimed.envelope.received_at)


async def deliver(queue: Queue, root: Path) -> MailboxCopy:
    """A delivery recorded (and counted in the tally), not carried yet."""
    claimed = await claim(queue)
    copy = store(root, claimed)
    await queue.record(claimed, {0: DELIVERED}, [copy])
    assert (await queue.settle(claimed)).outcome == "done"
    return copy


def files(root: Path) -> MailboxUsage:
    walked = walk_maildir(maildir.mailbox_path(root, ALICE))
    return MailboxUsage(walked.messages, walked.bytes)


def test_the_walk_counts_new_cur_and_folders_once_each(tmp_path: Path) -> None:
    box = tmp_path / "example.test" / "alice"
    written = {
        "new/1.M01M97M9QCE6WBFA8R2BAG2_0_0123456789ab.mx,S=5": b"12345",
        "cur/2.Mother.host:2,S": b"123",  # another MDA's name, seen by IMAP
        ".Junk/new/3.M01M97M9QCE6WBFA8R2BAG3_1_0123456789ab.mx,S=4": b"1234",
        ".Sent/cur/4.Mx.host:2,RS": b"12",
    }
    for name, content in written.items():
        (box / name).parent.mkdir(parents=True, exist_ok=True)
        (box / name).write_bytes(content)
    # not mail: tmp/, hidden files, Dovecot's and Maildir++'s own files
    (box / "tmp").mkdir()
    (box / "tmp" / "5.Mx.host").write_bytes(b"partial")
    (box / "new" / ".hidden").write_bytes(b"x")
    (box / "dovecot-uidlist").write_bytes(b"3 V1 N5\n")
    (box / ".Junk" / "maildirfolder").touch()
    walked = walk_maildir(box)
    assert (walked.messages, walked.bytes) == (4, 14)
    assert walked.sizes == {"01M97M9QCE6WBFA8R2BAG2.0": 5, "01M97M9QCE6WBFA8R2BAG3.1": 4}
    # an IMAP client moves a message from new/ to cur/ during a walk: it may be listed in both
    (box / "cur" / "1.M01M97M9QCE6WBFA8R2BAG2_0_0123456789ab.mx,S=5:2,S").write_bytes(b"12345")
    assert walk_maildir(box).messages == 4
    assert walk_maildir(tmp_path / "nowhere").messages == 0
    assert maildirs(tmp_path) == [ALICE]


async def test_recount_of_a_quiet_mailbox_sets_the_maildirs_files_and_bytes(
    queue: Queue, tmp_path: Path
) -> None:
    for _ in range(3):
        await deliver(queue, tmp_path)
    await carry(queue)
    (tmp_path / "example.test/alice/.Junk/cur").mkdir(parents=True)
    (tmp_path / "example.test/alice/.Junk/cur/9.Mimap.host:2,S").write_bytes(b"moved by IMAP")
    await queue.redis.hset(mailbox_key(queue.prefix, ALICE), mapping={"messages": 99})
    done = await recount(queue, tmp_path).run()
    assert done.before.messages == 99
    assert done.after == files(tmp_path) == await read_usage(queue.redis, queue.prefix, ALICE)
    assert done.after.messages == 4
    fields: Any = await queue.redis.hgetall(mailbox_key(queue.prefix, ALICE))
    assert not [f for f in fields if f.startswith((b"j:", b"recount"))]
    assert any(f.startswith(b"applied:q") for f in fields)  # the relay's memory stays


async def test_a_copy_stored_but_not_recorded_yet_is_left_for_its_record(
    queue: Queue, tmp_path: Path
) -> None:
    """A worker stored the file and has not recorded it (or died, and its retry will)."""
    claimed = await claim(queue)
    copy = store(tmp_path, claimed)
    assert (await recount(queue, tmp_path).run()).after == MailboxUsage(0, 0)
    await queue.record(claimed, {0: DELIVERED}, [copy])
    await carry(queue)
    assert await read_usage(queue.redis, queue.prefix, ALICE) == files(tmp_path)


async def test_a_copy_recorded_but_not_carried_yet_is_left_for_the_relay(
    queue: Queue, tmp_path: Path
) -> None:
    await deliver(queue, tmp_path)
    await carry(queue)
    await deliver(queue, tmp_path)
    assert (await recount(queue, tmp_path).run()).after.messages == 1
    await carry(queue)
    assert await read_usage(queue.redis, queue.prefix, ALICE) == files(tmp_path)
    assert files(tmp_path).messages == 2


async def test_a_copy_counted_during_the_walk_whose_file_it_missed_counts(
    queue: Queue, tmp_path: Path
) -> None:
    job = recount(queue, tmp_path)
    await job.begin()
    walked = await job.walk()  # nothing yet
    await deliver(queue, tmp_path)  # lands in a directory already walked
    await carry(queue)
    in_flight = await job.in_flight(walked)
    assert await job.finish(walked, in_flight) == files(tmp_path)
    assert files(tmp_path).messages == 1


async def test_a_copy_seen_by_the_walk_and_carried_before_the_finish_counts_once(
    queue: Queue, tmp_path: Path
) -> None:
    job = recount(queue, tmp_path)
    await job.begin()
    await deliver(queue, tmp_path)
    walked = await job.walk()
    in_flight = await job.in_flight(walked)
    assert len(in_flight) == 1  # recorded, not carried
    await carry(queue)  # carried now: the journal has it
    assert await job.finish(walked, in_flight) == files(tmp_path)
    await carry(queue)
    assert await read_usage(queue.redis, queue.prefix, ALICE) == files(tmp_path)


async def test_a_journal_grown_since_it_was_read_is_read_again(
    queue: Queue, tmp_path: Path
) -> None:
    job = recount(queue, tmp_path)
    await job.begin()
    walked = await job.walk()
    stale = await job.journal()
    await deliver(queue, tmp_path)
    await carry(queue)
    assert await job.finish(walked, {}, stale) is None
    assert await job.finish(walked, {}) == files(tmp_path)


async def test_a_second_recount_of_the_mailbox_makes_the_first_fail(
    queue: Queue, tmp_path: Path
) -> None:
    first, second = recount(queue, tmp_path), recount(queue, tmp_path)
    await first.begin()
    walked = await first.walk()
    await second.begin()
    with pytest.raises(RecountFailed, match="another recount"):
        await first.finish(walked, {})
    assert await second.finish(walked, {}) == MailboxUsage(0, 0)


async def test_an_abandoned_recount_stops_its_journal_and_the_next_one_clears_it(
    queue: Queue, tmp_path: Path
) -> None:
    key = mailbox_key(queue.prefix, ALICE)
    await queue.redis.hset(key, mapping={"recount": "1000:gone", "j:old": 5})  # begun in 1970
    await deliver(queue, tmp_path)
    await carry(queue)
    assert [f for f in await queue.redis.hkeys(key) if f.startswith(b"j:")] == [b"j:old"]
    job = recount(queue, tmp_path)
    await job.begin()
    assert await job.journal() == {}
    walked = await job.walk()
    job.token = "1000:" + job.token.partition(":")[2]  # as if this one had begun in 1970
    await queue.redis.hset(key, "recount", job.token)
    with pytest.raises(RecountFailed, match="longer than an hour"):
        await job.finish(walked, {})
