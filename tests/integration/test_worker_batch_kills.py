"""Batched delivery (a claimed local batch's files written together, each new/ fsynced once,
the batch recorded and settled in one script with the forwards it queues; remote batches over
shared sessions, settled by one script per destination) loses nothing and stores nothing
twice when its worker is SIGKILLed again and again in the middle of it, and two workers then
finish, racing for what the dead one held: every (message, mailbox) has one file, and the
counters, the event stream and the outcome counts are exact."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from email import message_from_bytes
from pathlib import Path

from conditions import eventually
from dns_server import DnsServer
from fake_mx import MxFarm
from test_worker_counters import counted, maildir_usage
from worker_harness import (
    WorkerProcess,
    apply_routing,
    message,
    queue_empty,
    table,
    worker_settings,
)

from mailkube_core.queue import Envelope, Queue, Recipient
from mailkube_core.queue.envelope import utcnow
from mailkube_core.queue.outcomes import read_outcomes
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import User
from mailkube_core.routing.snapshot import RoutingSnapshot
from mailkube_core.settings import WorkerSettings
from mailkube_worker.app import REMOTE_BATCH_SIZE

ADDRESSES = ("alice@example.test", "carol@example.test")
MESSAGES = 400
KILLS = 3


async def enqueue_many(settings: WorkerSettings, routing: RoutingSnapshot, env: Envelope,
                       count: int) -> list[str]:  # fmt: skip
    """`count` messages for `env`'s recipients, queued directly; their ids."""
    redis = connect_redis(settings)
    queue = Queue.from_settings(settings, redis)
    try:
        return [(await queue.enqueue(env, message(f"m{i}"), is_local=routing.is_local))[0]
                for i in range(count)]  # fmt: skip
    finally:
        await redis.aclose()


async def kill_again_and_again_then_finish(
    settings: WorkerSettings, role: str, pod: dict[str, str],
    progressed: Callable[[], Callable[[], Awaitable[bool]]],
) -> None:  # fmt: skip
    """KILLS times: a worker starts and is SIGKILLed as soon as the probe `progressed()` made
    at its start holds (mid-batch). Then two workers race to finish the queue (pod-a takes
    back its own entries at start; pod-b takes over any after the visibility timeout) and
    stop cleanly."""
    killed: list[WorkerProcess] = []
    finishers: list[WorkerProcess] = []
    try:
        for _ in range(KILLS):
            victim = WorkerProcess(settings, "pod-a", "--role", role, **pod)
            killed.append(victim)
            await victim.ready()
            await eventually(progressed(), timeout=60)
            victim.kill()
        assert not await queue_empty(settings), "the kills came too late: nothing left to do"
        finishers = [WorkerProcess(settings, name, "--role", role, **pod)
                     for name in ("pod-a", "pod-b")]  # fmt: skip
        await finishers[0].ready()
        await eventually(lambda: queue_empty(settings), timeout=90)
        assert [process.stop() for process in finishers] == [0, 0]
    finally:
        for process in [*killed, *finishers]:
            process.kill()


async def test_repeated_sigkills_during_batched_delivery_lose_and_duplicate_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    mail = tmp_path / "mail"
    settings = worker_settings(redis_url, mail)
    routing = await apply_routing(settings, table(*(User(address=a) for a in ADDRESSES)))
    env = Envelope(mail_from="bob@remote.test",
                   recipients=[Recipient(address=a) for a in ADDRESSES])  # fmt: skip
    ids = await enqueue_many(settings, routing, env, MESSAGES)
    pod = {"MAILKUBE_VISIBILITY_TIMEOUT": "1s", "MAILKUBE_QUEUE_WORKERS": "2",
           "MAILKUBE_LOCAL_BATCH_SIZE": "16"}  # fmt: skip
    rounds = iter(range(1, KILLS + 1))

    def landing_faster_than_counted() -> Callable[[], Awaitable[bool]]:
        at_least = next(rounds) * MESSAGES // (KILLS + 2)

        async def probe() -> bool:
            files = maildir_usage(mail, ADDRESSES[0])[0]
            return files >= at_least and (await counted(settings, ADDRESSES[0]))[0] < files

        return probe

    await kill_again_and_again_then_finish(settings, "local", pod, landing_faster_than_counted)
    redis = connect_redis(settings)
    try:
        events = await redis.xrange(f"{settings.key_prefix}:events:message.received")
        outcomes = await read_outcomes(redis, settings.key_prefix, utcnow().date())
    finally:
        await redis.aclose()
    for address in ADDRESSES:
        files, size, per_message = maildir_usage(mail, address)
        assert sorted(per_message) == sorted(ids), "a message lost or stored twice"
        assert set(per_message.values()) == {1}
        assert await counted(settings, address) == (files, size)
        received = Counter(e[b"message_id"].decode() for _, e in events
                           if e[b"mailbox"] == address.encode())  # fmt: skip
        assert received == per_message, "one message.received event per message and mailbox"
    assert outcomes["remote.test"]["delivered"] == len(ADDRESSES) * MESSAGES


FORWARDED = 300
#: a remote batch's transactions in flight when its worker dies: queue_workers times the batch size
IN_FLIGHT = 2 * REMOTE_BATCH_SIZE


async def test_repeated_sigkills_during_batched_forwards_and_remote_delivery(
    redis_url: str, tmp_path: Path, dns_server: DnsServer, mx_port: int, mx_farm: MxFarm
) -> None:
    """The remote path batched end to end: a local user keeping a copy and forwarding to a
    remote address (the local batch stores the copy and queues the forward in its settling
    script), then the remote lane's batches over shared sessions to a fake MX, the worker
    SIGKILLed again and again in the middle. Nothing is lost: every message is in the mailbox
    once and reached the MX. Nothing is queued twice: one forward per message (the outcome
    counts are exact). The MX may see a message twice only where a kill fell between its 250
    and the settling script (SMTP's own duplicate window, RFC 5321 §6.1): at most the
    transactions in flight at each kill."""
    mx = mx_farm.start("127.0.0.23")  # implicit.test's A record: its implicit MX
    mail = tmp_path / "mail"
    settings = worker_settings(redis_url, mail, dns_nameservers=[dns_server.host],
                               dns_port=dns_server.port, smtp_port=mx_port)  # fmt: skip
    alice = User(address=ADDRESSES[0], forward_to=["far@implicit.test"], keep_copy=True)
    routing = await apply_routing(settings, table(alice))
    env = Envelope(mail_from="bob@remote.test", recipients=[Recipient(address=ADDRESSES[0])])
    ids = await enqueue_many(settings, routing, env, FORWARDED)
    pod = {"MAILKUBE_VISIBILITY_TIMEOUT": "1s", "MAILKUBE_QUEUE_WORKERS": "2",
           "MAILKUBE_LOCAL_BATCH_SIZE": "16",
           "MAILKUBE_DNS_NAMESERVERS": dns_server.host, "MAILKUBE_DNS_PORT": str(dns_server.port),
           "MAILKUBE_SMTP_PORT": str(mx_port)}  # fmt: skip

    def reached_the_mx() -> Callable[[], Awaitable[bool]]:
        at_least = len(mx.received) + FORWARDED // (KILLS + 2)

        async def probe() -> bool:
            return len(mx.received) >= at_least

        return probe

    await kill_again_and_again_then_finish(settings, "all", pod, reached_the_mx)
    redis = connect_redis(settings)
    try:
        outcomes = await read_outcomes(redis, settings.key_prefix, utcnow().date())
    finally:
        await redis.aclose()
    files, size, per_message = maildir_usage(mail, ADDRESSES[0])
    assert sorted(per_message) == sorted(ids), "a copy lost or stored twice"
    assert set(per_message.values()) == {1}
    assert await counted(settings, ADDRESSES[0]) == (files, size)
    at_mx = Counter(message_from_bytes(r.data)["Subject"] for r in mx.received)
    assert set(at_mx) == {f"m{i}" for i in range(FORWARDED)}, "a forward lost"
    assert all(r.rcpt_tos == ["far@implicit.test"] for r in mx.received)
    assert sum(at_mx.values()) - FORWARDED <= KILLS * IN_FLIGHT
    # one local delivery and one remote delivery per message: no forward queued twice
    assert outcomes["remote.test"]["delivered"] == 2 * FORWARDED
