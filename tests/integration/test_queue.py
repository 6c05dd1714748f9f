"""The queue's semantics (docs/architecture.md "Queue") against a real Redis: a private standalone
server with 1 partition, and a local 3-master Redis Cluster with 4 partitions."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from conditions import eventually
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from mailkube_core.queue import (
    Claimed,
    Envelope,
    FailedRecipients,
    Forward,
    MailboxCopy,
    Notify,
    Queue,
    QueueAdmin,
    QueueConsumer,
    Recipient,
    RecipientResult,
    RecipientStatus,
    RetryPolicy,
)
from mailkube_core.redis_client import connect_redis
from mailkube_core.redis_multiplexed import multiplexed
from mailkube_core.settings import CommonSettings

T = TypeVar("T")
LOCAL = "example.test"


def is_local(address: str) -> bool:
    return address.endswith("@" + LOCAL)


def envelope(*recipients: str, **extra: Any) -> Envelope:
    return Envelope(
        mail_from=extra.pop("mail_from", "sender@remote.test"),
        recipients=[Recipient(address=r) for r in recipients],
        **extra,
    )


def delivered() -> RecipientResult:
    return RecipientResult(status=RecipientStatus.DELIVERED, smtp_code=250)


def deferred(text: str = "451 4.4.1 try later") -> RecipientResult:
    return RecipientResult(
        status=RecipientStatus.DEFERRED, enhanced_code="4.4.1", smtp_code=451, diagnostic=text
    )


def failed() -> RecipientResult:
    return RecipientResult(
        status=RecipientStatus.FAILED,
        enhanced_code="5.1.1",
        smtp_code=550,
        diagnostic="no such user",
    )


class Failures:
    """A failure hook that remembers what it was given."""

    def __init__(self) -> None:
        self.calls: list[FailedRecipients] = []
        self.raise_next = False

    async def __call__(self, failed: FailedRecipients) -> None:
        if self.raise_next:
            self.raise_next = False
            raise RuntimeError("bounce could not be queued")
        self.calls.append(failed)


@pytest.fixture(params=["standalone", "cluster"])
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, int]]:
    """(client, partitions) — each test gets its own key prefix through `queue_factory`."""
    if request.param == "standalone":
        client: Any = Redis.from_url(request.getfixturevalue("redis_url"))
        partitions = 1
    else:
        cluster = request.getfixturevalue("redis_cluster")
        client = RedisCluster.from_url(cluster.url)
        partitions = 4
    yield client, partitions
    await client.aclose()


@pytest.fixture
def failures() -> Failures:
    return Failures()


@pytest.fixture
def make_queue(redis_client: tuple[Any, int], failures: Failures) -> Callable[..., Queue]:
    client, partitions = redis_client
    prefix = f"t{uuid.uuid4().hex[:8]}"

    def factory(**options: Any) -> Queue:
        options.setdefault("partitions", partitions)
        options.setdefault("on_failure", failures)
        return Queue(client, prefix=prefix, **options)

    return factory


@pytest.fixture
async def queue(make_queue: Callable[..., Queue]) -> Queue:
    q = make_queue()
    await q.ensure_groups()
    return q


async def claim_one(q: Queue, consumer: str = "c1", lane: str = "local") -> Claimed:
    """Claim the next entry of a lane from whichever partition has one."""

    async def probe() -> Claimed | None:
        for partition in range(q.partitions):
            got = await q.claim(consumer, lane, partition, count=1, block=None)  # type: ignore[arg-type]
            if got:
                return got[0]
        return None

    return await eventually(probe)


async def nothing_to_claim(q: Queue, lane: str = "local") -> bool:
    for partition in range(q.partitions):
        if await q.claim("probe", lane, partition, count=1, block=None):  # type: ignore[arg-type]
            return False
    return True


@pytest.mark.parametrize("size", [1, 100 * 1024, 25 * 1024 * 1024], ids=["1B", "100KiB", "25MiB"])
async def test_enqueue_claim_ack_keeps_body_and_envelope(queue: Queue, size: int) -> None:
    body = os.urandom(size)
    env = envelope(
        "alice@example.test",
        ret="HDRS",
        envid="QQ314159",
        trace_context={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    (message_id,) = await queue.enqueue(env, body, is_local=is_local)

    claimed = await claim_one(queue)
    assert claimed.id == message_id
    assert claimed.body == body
    assert claimed.envelope == env
    assert claimed.deliveries == 1

    await queue.record(claimed, {0: delivered()})
    settlement = await queue.settle(claimed)
    assert settlement.outcome == "done"
    assert await QueueAdmin.of(queue).inspect(message_id) is None
    stats = await QueueAdmin.of(queue).stats()
    assert stats.messages == 0
    assert all(s.ready == s.active == s.deferred == 0 for s in stats.lanes)
    assert await nothing_to_claim(queue)


async def test_recipients_split_into_local_and_remote_lanes(queue: Queue) -> None:
    env = envelope("alice@example.test", "bob@elsewhere.test", "carol@example.test")
    ids = await queue.enqueue(env, b"mixed", is_local=is_local)
    assert len(ids) == 2

    local = await claim_one(queue, lane="local")
    remote = await claim_one(queue, lane="remote")
    assert [r.address for r in local.envelope.recipients] == [
        "alice@example.test",
        "carol@example.test",
    ]
    assert [r.address for r in remote.envelope.recipients] == ["bob@elsewhere.test"]
    assert local.body == remote.body == b"mixed"
    assert local.partition == remote.partition  # one atomic script, one hash tag


async def test_dead_consumer_entry_goes_to_another_without_redelivering_done_recipients(
    queue: Queue,
) -> None:
    env = envelope("alice@example.test", "bob@example.test")
    (message_id,) = await queue.enqueue(env, b"hello", is_local=is_local)

    dying = await claim_one(queue, consumer="pod-a")
    await queue.record(dying, {0: delivered()})  # then pod-a dies: no settle, no ack

    async def reclaim() -> Claimed | None:
        for partition in range(queue.partitions):
            got = await queue.reclaim(
                "pod-b", "local", partition, min_idle=timedelta(milliseconds=50)
            )
            if got:
                return got[0]
        return None

    taken = await eventually(reclaim)
    assert taken.id == message_id
    assert taken.consumer == "pod-b"
    assert taken.deliveries == 2
    assert taken.pending() == [1]  # alice is done; only bob is left
    assert not await queue.extend(dying)  # pod-a, if it comes back, has lost the claim
    assert await queue.extend(taken)

    await queue.record(taken, {1: delivered()})
    assert (await queue.settle(taken)).outcome == "done"
    # the zombie's late settle finds nothing and delivers nothing twice
    assert (await queue.settle(dying)).outcome == "gone"
    assert await nothing_to_claim(queue)


async def test_concurrent_consumers_never_share_an_entry(queue: Queue) -> None:
    ids = set()
    for n in range(60):
        ids.update(await queue.enqueue(envelope(f"u{n}@example.test"), b"x", is_local=is_local))

    async def drain(consumer: str) -> list[str]:
        got = []
        while True:
            batch = []
            for partition in range(queue.partitions):
                batch += await queue.claim(consumer, "local", partition, count=5, block=None)
            if not batch:
                return got
            got += [c.id for c in batch]

    results = await asyncio.gather(*(drain(f"c{i}") for i in range(4)))
    claimed = [message_id for result in results for message_id in result]
    assert len(claimed) == len(set(claimed))
    assert set(claimed) == ids


async def test_defer_then_due_mover_returns_it_on_schedule(queue: Queue) -> None:
    (message_id,) = await queue.enqueue(envelope("x@remote.test"), b"b", is_local=is_local)
    claimed = await claim_one(queue, lane="remote")
    await queue.record(claimed, {0: deferred()})
    now = datetime.now(UTC)
    settlement = await queue.settle(claimed, now=now)

    assert settlement.outcome == "deferred"
    assert settlement.next_attempt is not None
    delay = settlement.next_attempt - now
    assert timedelta(minutes=4, seconds=30) <= delay <= timedelta(minutes=5, seconds=30)
    info = await QueueAdmin.of(queue).inspect(message_id)
    assert info is not None
    assert info.state == "deferred"
    assert info.attempts == 1
    assert info.last_error == "451 4.4.1 try later"

    partition = claimed.partition
    before = settlement.next_attempt - timedelta(seconds=1)
    assert await queue.move_due("remote", partition, now=before) == 0
    assert await nothing_to_claim(queue, "remote")
    after = settlement.next_attempt + timedelta(milliseconds=1)
    assert await queue.move_due("remote", partition, now=after) == 1
    assert await queue.move_due("remote", partition, now=after) == 0  # exactly once

    again = await claim_one(queue, lane="remote")
    assert again.id == message_id
    assert again.attempts == 1
    assert again.results[0].status is RecipientStatus.DEFERRED


async def test_retries_exhausted_fail_the_rest_through_the_hook(
    make_queue: Callable[..., Queue], failures: Failures
) -> None:
    q = make_queue(retry=RetryPolicy(intervals=[timedelta(seconds=1)], max_retries=2))
    await q.ensure_groups()
    env = envelope("x@remote.test", "y@remote.test")
    (message_id,) = await q.enqueue(env, b"body", is_local=is_local)

    now = datetime.now(UTC)
    for attempt in range(3):
        claimed = await claim_one(q, lane="remote")
        await q.record(claimed, {0: deferred(f"attempt {attempt}"), 1: deferred()})
        now += timedelta(seconds=2)
        settlement = await q.settle(claimed, now=now)
        if attempt < 2:
            assert settlement.outcome == "deferred"
            assert failures.calls == []
            await q.move_due("remote", claimed.partition, now=now + timedelta(seconds=2))

    assert settlement.outcome == "done"
    assert settlement.failed == 2
    (call,) = failures.calls
    assert call.message_id == message_id
    assert call.body == b"body"
    assert [i for i, _ in call.failed] == [0, 1]
    first = call.failed[0][1]
    assert first.status is RecipientStatus.FAILED
    assert first.enhanced_code == "4.4.7"
    assert "attempt 2" in (first.diagnostic or "")
    assert await QueueAdmin.of(q).inspect(message_id) is None


async def test_bounce_after_expires_an_old_message_on_first_deferral(
    queue: Queue, failures: Failures
) -> None:
    old = datetime.now(UTC) - timedelta(hours=49)
    await queue.enqueue(envelope("x@remote.test", received_at=old), b"b", is_local=is_local)
    claimed = await claim_one(queue, lane="remote")
    await queue.record(claimed, {0: deferred()})
    assert (await queue.settle(claimed)).outcome == "done"
    assert failures.calls[0].failed[0][1].enhanced_code == "4.4.7"


async def test_mixed_outcomes_report_each_failure_once(queue: Queue, failures: Failures) -> None:
    env = envelope("a@remote.test", "b@remote.test", "c@remote.test")
    (message_id,) = await queue.enqueue(env, b"b", is_local=is_local)
    claimed = await claim_one(queue, lane="remote")
    await queue.record(claimed, {0: delivered(), 1: failed(), 2: deferred()})
    now = datetime.now(UTC)
    settlement = await queue.settle(claimed, now=now)
    assert settlement.outcome == "deferred"
    assert [[i for i, _ in call.failed] for call in failures.calls] == [[1]]

    await queue.move_due("remote", claimed.partition, now=now + timedelta(hours=1))
    again = await claim_one(queue, lane="remote")
    assert again.pending() == [2]
    await queue.record(again, {2: delivered()})
    assert (await queue.settle(again)).outcome == "done"
    assert len(failures.calls) == 1  # b was not reported a second time
    assert await QueueAdmin.of(queue).inspect(message_id) is None


async def test_a_failing_hook_keeps_the_message_and_the_failure(
    queue: Queue, failures: Failures
) -> None:
    (message_id,) = await queue.enqueue(envelope("a@remote.test"), b"b", is_local=is_local)
    claimed = await claim_one(queue, lane="remote")
    await queue.record(claimed, {0: failed()})
    failures.raise_next = True
    with pytest.raises(RuntimeError):
        await queue.settle(claimed)
    info = await QueueAdmin.of(queue).inspect(message_id)
    assert info is not None
    assert info.state == "active"
    assert not info.results[0].reported

    assert (await queue.settle(claimed)).outcome == "done"
    assert len(failures.calls) == 1


def test_null_sender_and_notify_decide_dsns() -> None:
    env = Envelope(
        mail_from="s@remote.test",
        recipients=[
            Recipient(address="a@x.test"),
            Recipient(address="b@x.test", notify=frozenset({Notify.NEVER})),
            Recipient(address="c@x.test", notify=frozenset({Notify.SUCCESS, Notify.DELAY})),
        ],
    )
    assert env.wants_dsn(0, "failure")
    assert env.wants_dsn(0, "delay")
    assert not env.wants_dsn(0, "success")
    assert not env.wants_dsn(1, "failure")
    assert env.wants_dsn(2, "success")
    assert not env.wants_dsn(2, "failure")
    bounce = env.model_copy(update={"mail_from": ""})
    assert not any(bounce.wants_dsn(i, "failure") for i in range(3))
    with pytest.raises(ValueError, match="NEVER"):
        Recipient(address="a@x.test", notify=frozenset({Notify.NEVER, Notify.FAILURE}))


async def test_list_inspect_retry_now_and_delete(queue: Queue) -> None:
    admin = QueueAdmin.of(queue)
    ids = []
    for n in range(3):
        ids += await queue.enqueue(envelope(f"r{n}@remote.test"), b"x" * 10, is_local=is_local)
    listed = await admin.list_messages()
    assert sorted(m.id for m in listed) == sorted(ids)
    assert all(m.state == "queued" and m.size == 10 for m in listed)

    claimed = await claim_one(queue, lane="remote")
    active = await admin.inspect(claimed.id)
    assert active is not None
    assert active.state == "active"
    assert active.claimed_by == "c1"
    await queue.record(claimed, {0: deferred()})
    await queue.settle(claimed)
    assert await admin.retry_now(claimed.id)
    assert not await admin.retry_now(claimed.id)  # no longer deferred
    info = await admin.inspect(claimed.id)
    assert info is not None
    assert info.state == "queued"

    gone = next(i for i in ids if i != claimed.id)
    assert await admin.delete(gone)
    assert not await admin.delete(gone)
    remaining = set()
    while not await nothing_to_claim_ids(queue, remaining):
        pass
    assert gone not in remaining
    assert len(remaining) == 2
    stats = await admin.stats()
    assert stats.messages == 2


async def nothing_to_claim_ids(q: Queue, seen: set[str]) -> bool:
    for partition in range(q.partitions):
        got = await q.claim("drain", "remote", partition, count=10, block=None)
        if got:
            seen.update(c.id for c in got)
            return False
    return True


async def test_consumer_delivers_everything_once_and_stops(queue: Queue) -> None:
    seen: list[tuple[str, str]] = []
    ids = set()
    for n in range(40):
        ids.update(
            await queue.enqueue(
                envelope(f"a{n}@example.test", f"b{n}@remote.test"), b"m", is_local=is_local
            )
        )

    async def handler(claimed: Claimed) -> None:
        for index in claimed.pending():
            seen.append((claimed.id, claimed.envelope.recipients[index].address))
            await queue.record(claimed, {index: delivered()})
        await queue.settle(claimed)

    consumer = QueueConsumer(queue, "pod-1", ["local", "remote"], handler, concurrency=4,
                             poll=timedelta(milliseconds=50))  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))

    async def all_done() -> bool:
        return (await QueueAdmin.of(queue).stats()).messages == 0

    await eventually(all_done, timeout=30)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert len(seen) == 80
    assert len(set(seen)) == 80
    assert {message_id for message_id, _ in seen} == ids


async def test_consumer_defers_when_the_handler_crashes(queue: Queue) -> None:
    (message_id,) = await queue.enqueue(envelope("a@remote.test"), b"m", is_local=is_local)

    async def handler(claimed: Claimed) -> None:
        raise RuntimeError("bug in delivery")

    consumer = QueueConsumer(queue, "pod-1", ["remote"], handler,
                             poll=timedelta(milliseconds=50))  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))

    async def is_deferred() -> bool:
        info = await QueueAdmin.of(queue).inspect(message_id)
        return info is not None and info.state == "deferred"

    await eventually(is_deferred)
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_every_enqueued_message_survives_a_redis_sigkill(private_redis: Any) -> None:
    """AOF with appendfsync always: what enqueue returned for is on disk before the reply."""
    settings = CommonSettings(redis_url=private_redis.url, redis_max_connections=8)
    client = connect_redis(settings)
    q = Queue(client, prefix="crash")
    await q.ensure_groups()
    ids = set()
    envelopes = [envelope(f"u{n}@example.test") for n in range(200)]
    results = await asyncio.gather(
        *(q.enqueue(env, os.urandom(2048), is_local=is_local) for env in envelopes)
    )
    for result in results:
        ids.update(result)
    await client.aclose()

    private_redis.kill()  # SIGKILL: no shutdown save, only the AOF
    private_redis.restart()

    client = connect_redis(settings)
    q = Queue(client, prefix="crash")
    claimed = []
    while batch := await q.claim("after-crash", "local", 0, count=50, block=None):
        claimed += batch
    await client.aclose()
    assert {c.id for c in claimed} == ids
    assert all(len(c.body) == 2048 for c in claimed)


async def test_queue_counts_show_on_the_metrics_endpoint(queue: Queue, telemetry: Any) -> None:
    from prometheus_client import REGISTRY, generate_latest

    def enqueued_local() -> float:
        for line in generate_latest(REGISTRY).decode().splitlines():
            if line.startswith("mailkube_queue_enqueued_total{") and 'lane="local"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = enqueued_local()
    await queue.enqueue(envelope("a@example.test"), b"x", is_local=is_local)
    await queue.enqueue(envelope("b@example.test"), b"x", is_local=is_local)
    assert enqueued_local() == before + 2


async def test_claim_recreates_a_vanished_group(queue: Queue) -> None:
    """A Redis without persistence that restarted has no streams: consumers carry on."""
    for partition in range(queue.partitions):
        await queue.redis.delete(queue.keys(partition).stream("local"))
    assert await nothing_to_claim(queue)  # NOGROUP is absorbed, the group is back
    await queue.enqueue(envelope("a@example.test"), b"x", is_local=is_local)
    assert (await claim_one(queue)).body == b"x"


async def test_replicas_wait_for_a_replica_and_fail_without_one(
    private_redis: Any, tmp_path: Any
) -> None:
    """enqueue_replicas: enqueue returns once a replica holds the message, and fails like a
    Redis outage (the gateway's 451) when none acknowledges in time. A Redis without WAITAOF
    (7.0) is found out once per connection: one "unknown command", then WAIT only."""
    from redis.exceptions import RedisError
    from redis_servers import RedisServer

    replica = RedisServer(
        tmp_path / "replica", config={"replicaof": f"127.0.0.1 {private_redis.port}"}
    )
    replica.start()
    primary = Redis.from_url(private_redis.url, max_connections=1)
    q = Queue(primary, prefix="repl", replicas=1, replica_timeout=timedelta(seconds=1))
    stats = Redis.from_url(private_redis.url)
    try:

        async def linked() -> bool:
            info = await primary.info("replication")
            return int(info.get("connected_slaves", 0)) == 1 and "online" in str(
                info.get("slave0", {})
            )

        async def calls(command: str) -> int:
            info = await stats.info("commandstats")
            return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))

        async def unknown_waitaof() -> int:
            info = await stats.info("errorstats")
            return int(info.get("errorstat_ERR", {}).get("count", 0))

        await eventually(linked, timeout=20)
        server = await primary.info("server")
        has_waitaof = tuple(map(int, str(server["redis_version"]).split(".")[:2])) >= (7, 2)
        waits_before, errors_before = await calls("wait"), await unknown_waitaof()
        ids = [
            (await q.enqueue(envelope(f"{n}@example.test"), b"x", is_local=is_local))[0]
            for n in range(3)
        ]
        replica_client = Redis.from_url(replica.url)
        for message_id in ids:
            assert await replica_client.exists(q.keys(0).message(message_id)) == 1
        await replica_client.aclose()
        if has_waitaof:
            assert await calls("waitaof") >= 3
        else:  # one try of WAITAOF on the one connection, then WAIT for each message
            assert await calls("wait") - waits_before == 3
            assert await unknown_waitaof() - errors_before == 1

        replica.stop()
        with pytest.raises(RedisError, match="0 of 1 replicas"):
            await q.enqueue(envelope("b@example.test"), b"x", is_local=is_local)
        # the connection is fit for more: the next enqueue on it gets its own answer
        with pytest.raises(RedisError, match="0 of 1 replicas"):
            await q.enqueue(envelope("c@example.test"), b"x", is_local=is_local)
    finally:
        replica.stop()
        await primary.aclose()
        await stats.aclose()


async def test_replicas_survive_a_flushed_script_cache(private_redis: Any, tmp_path: Any) -> None:
    """After SCRIPT FLUSH (as after a failover to a server that never ran it) the script is
    loaded again on the same connection and the message is queued once."""
    from redis_servers import RedisServer

    replica = RedisServer(
        tmp_path / "replica", config={"replicaof": f"127.0.0.1 {private_redis.port}"}
    )
    replica.start()
    primary = Redis.from_url(private_redis.url)
    q = Queue(primary, prefix="flushed", replicas=1, replica_timeout=timedelta(seconds=2))
    try:

        async def linked() -> bool:
            info = await primary.info("replication")
            return "online" in str(info.get("slave0", {}))

        await eventually(linked, timeout=20)
        await q.enqueue(envelope("a@example.test"), b"x", is_local=is_local)
        await primary.script_flush()
        await q.enqueue(envelope("b@example.test"), b"y", is_local=is_local)
        assert await primary.zcard(q.keys(0).messages) == 2
    finally:
        replica.stop()
        await primary.aclose()


async def tally_items(q: Queue, partition: int) -> list[dict[str, Any]]:
    entries: Any = await q.redis.xrange(q.keys(partition).tally)
    return [item for _, fields in entries for item in json.loads(fields[b"items"])]


async def test_finish_delivered_counts_each_delivery_once_and_removes_the_batch(
    make_queue: Callable[..., Queue],
) -> None:
    """The local lane's batch settle: one script records what each delivery counts and
    removes every message; what an earlier attempt already counted is not counted again, and
    a message deleted meanwhile leaves no entry behind."""
    q = make_queue(partitions=1)
    await q.ensure_groups()
    ids = [(await q.enqueue(envelope(*rcpts), b"m", is_local=is_local))[0]
           for rcpts in (["a@example.test"], ["a@example.test", "b@example.test"],
                         ["c@example.test"])]  # fmt: skip
    batch = await q.claim("pod-a", "local", 0, count=10, block=None)
    assert [c.id for c in batch] == ids

    def copies(claimed: Claimed) -> list[MailboxCopy]:
        return [MailboxCopy(r.address, claimed.id, 10, None, claimed.envelope.received_at)
                for r in claimed.envelope.recipients]  # fmt: skip

    # an earlier attempt stored and recorded a's copy of the second message, then died
    await q.record(batch[1], {0: delivered()}, copies(batch[1])[:1])
    await QueueAdmin.of(q).delete(ids[2])  # deleted from the CLI while it was being delivered
    found = await q.finish_delivered([(c, c.pending(), copies(c)) for c in batch])
    assert found == 2
    items = await tally_items(q, 0)
    counted = Counter((i["message_id"], i["mailbox"]) for i in items if "mailbox" in i)
    assert counted == {(ids[0], "a@example.test"): 1, (ids[1], "a@example.test"): 1,
                       (ids[1], "b@example.test"): 1}  # fmt: skip
    assert sum(i["n"] for i in items if i.get("outcome") == "delivered") == 3
    stats = await QueueAdmin.of(q).stats()
    assert stats.messages == 0
    assert all(s.ready == s.active == s.deferred == 0 for s in stats.lanes)
    assert await nothing_to_claim(q)


async def test_finish_delivered_queues_forwards_once_and_only_for_a_message_still_there(
    make_queue: Callable[..., Queue],
) -> None:
    """A batch's forwards are queued by the settling script: in the remote lane of the
    claim's partition, with their envelope and body; none for a message deleted meanwhile;
    and settling the same claims again (a worker that died before it knew the reply) queues
    nothing twice."""
    q = make_queue(partitions=1)
    await q.ensure_groups()
    for name in ("a", "b"):
        await q.enqueue(envelope(f"{name}@example.test"), b"m", is_local=is_local)
    batch = await q.claim("pod-a", "local", 0, count=10, block=None)
    await QueueAdmin.of(q).delete(batch[1].id)
    forwards = {c.id: [Forward(0, envelope("far@remote.test"), b"Delivered-To: x\r\n" + c.body)]
                for c in batch}  # fmt: skip
    assert await q.finish_delivered([(c, c.pending(), []) for c in batch], forwards) == 1
    assert await q.finish_delivered([(c, c.pending(), []) for c in batch], forwards) == 0
    remote = await q.claim("pod-a", "remote", 0, count=10, block=None)
    assert [c.envelope.recipients[0].address for c in remote] == ["far@remote.test"]
    assert remote[0].body == b"Delivered-To: x\r\nm"
    assert remote[0].envelope.mail_from == batch[0].envelope.mail_from
    stats = await QueueAdmin.of(q).stats()
    assert stats.messages == 1


async def test_record_queues_a_recipients_forward_once_with_its_result(
    make_queue: Callable[..., Queue],
) -> None:
    """A forward recorded with its recipient's result is queued by that script: recording it
    again (a worker killed before it knew the reply, or two consumers racing on one claim)
    queues nothing more, and a message deleted meanwhile forwards nothing."""
    q = make_queue(partitions=1)
    await q.ensure_groups()
    for name in ("a", "b"):
        await q.enqueue(envelope(f"{name}@example.test"), b"m", is_local=is_local)
    kept, deleted = await q.claim("pod-a", "local", 0, count=10, block=None)
    await QueueAdmin.of(q).delete(deleted.id)
    for claimed in (kept, deleted, kept):
        forward = Forward(0, envelope("far@remote.test"), b"Delivered-To: x\r\n" + claimed.body)
        await q.record(claimed, {0: delivered()}, [], [forward])
    remote = await q.claim("pod-a", "remote", 0, count=10, block=None)
    assert [c.envelope.recipients[0].address for c in remote] == ["far@remote.test"]
    assert remote[0].body == b"Delivered-To: x\r\nm"
    assert (await QueueAdmin.of(q).stats()).messages == 2


async def test_a_batched_lane_waits_batch_wait_after_a_partial_batch_so_arrivals_gather(
    make_queue: Callable[..., Queue],
) -> None:
    """After a claim that did not fill a batch, the claim loop waits `batch_wait` before it
    claims again: messages queued meanwhile arrive as one batch, not a claim (and a Redis
    write, an AOF fsync) each. (One partition: each has a claim loop of its own.)"""
    queue = make_queue(partitions=1)
    sizes: list[int] = []
    first = asyncio.Event()

    async def batch_handler(batch: list[Claimed]) -> None:
        sizes.append(len(batch))
        await queue.finish_delivered([(c, c.pending(), []) for c in batch])
        first.set()

    async def handler(claimed: Claimed) -> None:
        raise AssertionError("the local lane is batched")

    consumer = QueueConsumer(queue, "pod-1", ["local"], handler, concurrency=4,
                             poll=timedelta(milliseconds=50), batch_handler=batch_handler,
                             batch_lanes=["local"], batch_size=32,
                             batch_wait=timedelta(seconds=2))  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await queue.enqueue(envelope("a0@example.test"), b"m", is_local=is_local)
    await asyncio.wait_for(first.wait(), 30)
    for n in range(1, 6):
        await queue.enqueue(envelope(f"a{n}@example.test"), b"m", is_local=is_local)

    async def all_done() -> bool:
        return (await QueueAdmin.of(queue).stats()).messages == 0

    await eventually(all_done, timeout=30)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert sizes == [1, 5]


async def test_consumer_hands_batches_of_a_batched_lane_to_the_batch_handler(
    queue: Queue,
) -> None:
    """Claims of a batched lane go to the batch handler together, up to batch_size, each
    batch one slot; other lanes still go one by one to the handler."""
    ids = set()
    for n in range(40):
        ids.update(await queue.enqueue(envelope(f"a{n}@example.test", f"b{n}@remote.test"),
                                       b"m", is_local=is_local))  # fmt: skip
    batches: list[list[str]] = []
    single: list[str] = []

    async def batch_handler(batch: list[Claimed]) -> None:
        batches.append([c.id for c in batch])
        await queue.finish_delivered([(c, c.pending(), []) for c in batch])

    async def handler(claimed: Claimed) -> None:
        single.append(claimed.id)
        await queue.record(claimed, {i: delivered() for i in claimed.pending()})
        await queue.settle(claimed)

    consumer = QueueConsumer(queue, "pod-1", ["local", "remote"], handler, concurrency=1,
                             poll=timedelta(milliseconds=50), batch_handler=batch_handler,
                             batch_lanes=["local"], batch_size=8)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))

    async def all_done() -> bool:
        return (await QueueAdmin.of(queue).stats()).messages == 0

    await eventually(all_done, timeout=30)
    stop.set()
    await asyncio.wait_for(task, 10)
    local = [message_id for batch in batches for message_id in batch]
    assert len(local) == len(set(local)) == 40
    assert len(single) == len(set(single)) == 40
    assert set(local) | set(single) == ids
    assert max(len(b) for b in batches) == 8


async def test_no_body_goes_through_lua(private_redis: Any) -> None:
    """Redis hashes every Lua string byte by byte: enqueue is a transaction of plain commands,
    and a claim reads messages with HGETALL beside its marking script, on the gateway's shared
    connection as on a pooled one."""
    settings = CommonSettings(redis_url=private_redis.url)
    for client in (connect_redis(settings), multiplexed(connect_redis(settings))):
        q = Queue(client, prefix=f"lua{uuid.uuid4().hex[:6]}")
        await q.ensure_groups()
        await client.config_resetstat()
        body = os.urandom(100 * 1024)
        (message_id,) = await q.enqueue(envelope("alice@example.test"), body, is_local=is_local)
        stats = await client.info("commandstats")
        assert stats["cmdstat_exec"]["calls"] == 1
        assert not {"cmdstat_eval", "cmdstat_evalsha"} & set(stats), stats
        (claimed,) = await q.claim("c", "local", 0, count=5, block=None)
        assert (claimed.id, claimed.body, claimed.deliveries) == (message_id, body, 1)
        stats = await client.info("commandstats")
        assert stats["cmdstat_hgetall"]["calls"] == 1
        assert stats["cmdstat_eval"]["calls"] == 1  # the marks: consumer, time, deliveries
        await client.aclose()
