"""The queue's tally (mailkube_core.queue.tally): a delivery counts once in the mailbox
counters, the message.received stream and the day's outcomes, however often it is recorded
or carried. Against a real Redis: standalone with 1 partition, and Cluster with 4."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
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
    QueueAdmin,
    Recipient,
    RecipientResult,
    RecipientStatus,
    TallyRelay,
)
from mailkube_core.queue.envelope import utcnow
from mailkube_core.queue.outcomes import read_outcomes
from mailkube_core.queue.tally import events_key, parse_entries

ALICE = "alice@example.test"
DELIVERED = RecipientResult(status=RecipientStatus.DELIVERED, smtp_code=250)
FAILED = RecipientResult(status=RecipientStatus.FAILED, enhanced_code="5.1.1", smtp_code=550)


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


def relay(queue: Queue) -> TallyRelay:
    return TallyRelay(queue.redis, queue.prefix, queue.partitions)


async def claim(queue: Queue, *recipients: str, mail_from: str = "bob@remote.test") -> Claimed:
    env = Envelope(mail_from=mail_from, recipients=[Recipient(address=r) for r in recipients])
    (message_id,) = await queue.enqueue(env, b"Subject: x\r\n\r\nx\r\n", is_local=lambda a: True)
    for partition in range(queue.partitions):
        got = await queue.claim("pod-a", "local", partition, count=1, block=None)
        if got:
            assert got[0].id == message_id
            return got[0]
    raise AssertionError("nothing to claim")


def copy(claimed: Claimed, mailbox: str = ALICE, size: int = 100) -> MailboxCopy:
    return MailboxCopy(mailbox, claimed.id, size, None, claimed.envelope.received_at)


async def events(queue: Queue) -> list[tuple[str, str]]:
    return [(e[b"mailbox"].decode(), e[b"message_id"].decode())
            for _, e in await queue.redis.xrange(events_key(queue.prefix))]  # fmt: skip


async def delivered_today(queue: Queue, domain: str = "remote.test") -> dict[str, int]:
    return (await read_outcomes(queue.redis, queue.prefix, utcnow().date()))[domain]


async def test_the_same_delivery_recorded_twice_counts_once(queue: Queue) -> None:
    claimed = await claim(queue, ALICE)
    assert await queue.record(claimed, {0: DELIVERED}, [copy(claimed)])
    assert await queue.record(claimed, {0: DELIVERED}, [copy(claimed)])  # a retry's record
    assert await relay(queue).relay() == 1  # the second record appended nothing
    assert await read_usage(queue.redis, queue.prefix, ALICE) == MailboxUsage(1, 100)
    assert await events(queue) == [(ALICE, claimed.id)]
    assert (await delivered_today(queue))["delivered"] == 1


async def test_a_reclaimed_message_recorded_by_both_consumers_counts_once(queue: Queue) -> None:
    first = await claim(queue, ALICE, "carol@example.test")
    await queue.record(first, {0: DELIVERED}, [copy(first)])  # then pod-a stalls
    (second,) = [c for p in range(queue.partitions)
                 for c in await queue.reclaim("pod-b", "local", p, min_idle=timedelta(0))
                 ]  # fmt: skip
    # pod-b finds alice's copy already stored and records it with carol's
    await queue.record(second, {0: DELIVERED, 1: DELIVERED},
                       [copy(second), copy(second, "carol@example.test", 120)])  # fmt: skip
    await queue.record(first, {1: DELIVERED}, [copy(first, "carol@example.test", 120)])
    assert (await queue.settle(second)).outcome == "done"
    await relay(queue).relay()
    assert await read_usage(queue.redis, queue.prefix, ALICE) == MailboxUsage(1, 100)
    assert await read_usage(queue.redis, queue.prefix, "carol@example.test") == MailboxUsage(1, 120)
    assert sorted(await events(queue)) == [(ALICE, first.id), ("carol@example.test", first.id)]
    assert (await delivered_today(queue))["delivered"] == 2


async def test_an_alias_and_its_user_in_one_message_count_one_copy(queue: Queue) -> None:
    claimed = await claim(queue, ALICE, "info@example.test")
    await queue.record(claimed, {0: DELIVERED}, [copy(claimed)])
    await queue.record(claimed, {1: DELIVERED}, [copy(claimed)])  # info@ is alice's alias
    await relay(queue).relay()
    assert await read_usage(queue.redis, queue.prefix, ALICE) == MailboxUsage(1, 100)
    assert (await delivered_today(queue))["delivered"] == 2  # two recipients delivered


async def test_a_copy_stored_for_a_recipient_that_then_deferred_counts(queue: Queue) -> None:
    """info@ expands to alice and carol; alice's copy is stored, carol's write fails: the
    recipient is deferred, alice's copy is there and counts, and the retry adds only carol."""
    claimed = await claim(queue, "info@example.test")
    deferred = RecipientResult(status=RecipientStatus.DEFERRED, enhanced_code="4.3.0")
    await queue.record(claimed, {0: deferred}, [copy(claimed)])
    await queue.record(claimed, {0: DELIVERED},
                       [copy(claimed), copy(claimed, "carol@example.test")])  # fmt: skip
    await relay(queue).relay()
    assert await read_usage(queue.redis, queue.prefix, ALICE) == MailboxUsage(1, 100)
    assert await read_usage(queue.redis, queue.prefix, "carol@example.test") == MailboxUsage(1, 100)


async def test_deferrals_count_once_per_attempt_and_bounces_once(queue: Queue) -> None:
    claimed = await claim(queue, ALICE, "carol@example.test")
    other = Claimed(**{**claimed.__dict__, "consumer": "pod-b"})  # racing on the same entry
    await queue.record(claimed, {0: FAILED.model_copy(update={"reported": True})})
    await queue.record(other, {0: FAILED.model_copy(update={"reported": True})})
    assert await queue.defer(claimed, utcnow())
    assert not await queue.defer(other, utcnow())  # its ack did not land: no second count
    await relay(queue).relay()
    assert await delivered_today(queue) == {"delivered": 0, "deferred": 1, "bounced": 1}


async def test_recording_a_deleted_message_counts_nothing(queue: Queue) -> None:
    claimed = await claim(queue, ALICE)
    assert await QueueAdmin.of(queue).delete(claimed.id)
    assert not await queue.record(claimed, {0: DELIVERED}, [copy(claimed)])
    assert await relay(queue).relay() == 0
    assert await read_usage(queue.redis, queue.prefix, ALICE) == MailboxUsage(0, 0)


async def test_entries_carried_twice_count_once(queue: Queue) -> None:
    """Two relays at once, and a relay that died after adding but before trimming."""
    claims = [await claim(queue, ALICE) for _ in range(6)]
    for claimed in claims[:3]:
        await queue.record(claimed, {0: DELIVERED}, [copy(claimed)])
    dying = relay(queue)
    for partition in range(queue.partitions):
        raw: Any = await queue.redis.xrange(dying.tally_key(partition))
        if raw:
            await dying._evaluate(dying._applications(partition, parse_entries(raw)))
    for claimed in claims[3:]:
        await queue.record(claimed, {0: DELIVERED}, [copy(claimed)])
    await asyncio.gather(relay(queue).relay(), relay(queue).relay())
    assert await read_usage(queue.redis, queue.prefix, ALICE) == MailboxUsage(6, 600)
    assert sorted(await events(queue)) == sorted((ALICE, c.id) for c in claims)
    assert (await delivered_today(queue))["delivered"] == 6
    for partition in range(queue.partitions):
        assert await queue.redis.xlen(dying.tally_key(partition)) == 0


async def test_an_unreadable_entry_is_dropped_without_blocking_the_rest(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    claimed = await claim(queue, ALICE)
    tally = queue.keys(claimed.partition).tally
    await queue.redis.xadd(tally, {"items": "not json"})
    await queue.redis.xadd(tally, {"items": '[{"mailbox": "x@example.test"}, 3]'})
    await queue.record(claimed, {0: DELIVERED}, [copy(claimed)])
    assert await relay(queue).relay() == 3
    assert await read_usage(queue.redis, queue.prefix, ALICE) == MailboxUsage(1, 100)
    assert await queue.redis.exists(mailbox_key(queue.prefix, "x@example.test")) == 0
    assert {r.getMessage() for r in caplog.records} >= {"unreadable tally entry",
                                                        "unreadable tally item"}  # fmt: skip


async def test_the_relay_reloads_scripts_redis_forgot(queue: Queue) -> None:
    carrier = relay(queue)
    first = await claim(queue, ALICE)
    await queue.record(first, {0: DELIVERED}, [copy(first)])
    await carrier.relay()
    await queue.redis.script_flush()
    second = await claim(queue, ALICE)
    await queue.record(second, {0: DELIVERED}, [copy(second)])
    await carrier.relay()
    assert await read_usage(queue.redis, queue.prefix, ALICE) == MailboxUsage(2, 200)


async def test_a_long_tally_is_carried_in_batches(queue: Queue) -> None:
    claims = [await claim(queue, ALICE) for _ in range(7)]
    for claimed in claims:
        await queue.record(claimed, {0: DELIVERED}, [copy(claimed, size=10)])
    carrier = TallyRelay(queue.redis, queue.prefix, queue.partitions, batch=2)
    assert await carrier.relay() == 7
    assert await read_usage(queue.redis, queue.prefix, ALICE) == MailboxUsage(7, 70)
