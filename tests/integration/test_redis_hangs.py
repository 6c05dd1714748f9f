"""A Redis that hangs instead of failing: frozen (SIGSTOP: connects still complete, nothing is
answered) or behind a path that stops forwarding (tcp_proxy.TcpProxy paused). Every Redis call
of the gateway, the worker and the operator has a deadline (redis_timeout); past it the gateway
answers 451 4.3.0 (454 4.7.0 to AUTH), the worker stops claiming and is not ready, the operator
retries after retry_delay; and all of them carry on by themselves once Redis answers again."""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conditions import eventually
from gateway_harness import ALICE, ALICE_PASSWORD, RawClient, Running, message, running_gateway
from kube_emulator import KubeEmulator
from operator_harness import Api, OperatorRun, condition, operator_settings
from operator_harness import eventually as operator_eventually
from redis.exceptions import RedisError
from redis_servers import RedisCluster, RedisServer
from tcp_proxy import TcpProxy
from worker_harness import (
    apply_routing,
    enqueue,
    http_status,
    maildir_files,
    queue_empty,
    running_worker,
    table,
    worker_settings,
)

from mailkube_core.queue import Claimed, Envelope, Queue, QueueConsumer, Recipient
from mailkube_core.queue.keys import GROUP, PartitionKeys
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import User
from mailkube_core.settings import CommonSettings, WorkerSettings
from mailkube_core.telemetry import Telemetry
from mailkube_worker.app import consumer_name

T = TypeVar("T")
#: a hang of Redis or of the path to it, for as long as the block lasts
Hang = Callable[[], AbstractContextManager[None]]

#: redis_timeout in these tests
DEADLINE = 1.0
#: how much later than DEADLINE an answer may come (a shared 2-core machine)
MARGIN = 1.5


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    server.freeze()
    try:
        yield
    finally:
        server.thaw()


@contextmanager
def paused(proxy: TcpProxy) -> Iterator[None]:
    proxy.pause()
    try:
        yield
    finally:
        proxy.resume()


async def within(seconds: float, step: Awaitable[T]) -> T:
    """`step`'s result, which must come within `seconds` (a hang fails the test)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(seconds):
            return await step
    except TimeoutError:
        raise AssertionError(
            f"no answer within {seconds:g}s (waited {time.monotonic() - started:.1f}s)"
        ) from None


# --- gateway ------------------------------------------------------------------------------


async def at_rcpt(gateway: Running) -> RawClient:
    client = await RawClient.connect(gateway.mx)
    assert (await client.command("EHLO client.test")).startswith("250")
    assert (await client.command("MAIL FROM:<someone@remote.test>")).startswith("250")
    return client


async def at_data(gateway: Running) -> RawClient:
    client = await at_rcpt(gateway)
    assert (await client.command(f"RCPT TO:<{ALICE}>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    return client


def data(subject: str) -> bytes:
    return message(subject=subject).encode() + b"."


async def accepted_again(gateway: Running) -> None:
    """A new message is queued once Redis answers (no restart)."""
    client = gateway.client(gateway.mx)
    async with client:
        _, reply = await client.sendmail("someone@remote.test", [ALICE], message(subject="after"))
    queue_id = reply.rsplit(" ", 1)[-1]
    assert reply.startswith("2.0.0 Ok: queued as"), reply
    assert queue_id in [m.id for m in await gateway.messages()]


async def test_gateway_frozen_redis_gets_451_at_rcpt_and_data_within_the_deadline(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async with running_gateway(private_redis.url, tmp_path, redis_timeout=f"{DEADLINE}s") as gw:
        rcpt = await at_rcpt(gw)
        sending = await at_data(gw)
        with frozen(private_redis):
            # the shared connection's request times out; the connection is dropped
            reply = await within(DEADLINE + MARGIN, rcpt.command(f"RCPT TO:<{ALICE}>"))
            assert reply.startswith("451 4.3.0"), reply
            # the enqueue finds no connection: opening one hangs in the handshake
            reply = await within(DEADLINE + MARGIN, sending.command(data("frozen")))
            assert reply.startswith("451 4.3.0"), reply
            # a client that comes now: its connection lease gets no answer and lets it in
            # (fail open), and its recipient gets the same 451
            late = await within(DEADLINE + MARGIN, RawClient.connect(gw.mx))
            reply = await within(DEADLINE + MARGIN, late.command("EHLO late.test"))
            assert reply.startswith("250"), reply
            assert (await late.command("MAIL FROM:<someone@remote.test>")).startswith("250")
            reply = await within(DEADLINE + MARGIN, late.command(f"RCPT TO:<{ALICE}>"))
            assert reply.startswith("451 4.3.0"), reply
        for client in (rcpt, sending, late):
            await client.close()
        await within(DEADLINE + MARGIN + 5, accepted_again(gw))


async def test_gateway_auth_against_a_frozen_redis_is_a_temporary_failure(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async with running_gateway(private_redis.url, tmp_path, redis_timeout=f"{DEADLINE}s") as gw:
        client = gw.client(gw.submissions, use_tls=True)
        async with client:
            await client.ehlo()
            plain = base64.b64encode(f"\0{ALICE}\0{ALICE_PASSWORD}".encode())
            with frozen(private_redis):
                reply = await within(
                    DEADLINE + MARGIN, client.execute_command(b"AUTH", b"PLAIN", plain)
                )
                assert (reply.code, reply.message[:5]) == (454, "4.7.0"), reply
            reply = await within(DEADLINE + MARGIN + 5, client.execute_command(
                b"AUTH", b"PLAIN", plain))  # fmt: skip
            assert reply.code == 235, reply


async def test_gateway_behind_a_path_that_stops_forwarding_gets_451_then_recovers(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async with (
        TcpProxy(private_redis.port) as proxy,
        running_gateway(proxy.url, tmp_path, redis_timeout=f"{DEADLINE}s") as gw,
    ):
        rcpt = await at_rcpt(gw)
        sending = await at_data(gw)
        with paused(proxy):
            reply = await within(DEADLINE + MARGIN, rcpt.command(f"RCPT TO:<{ALICE}>"))
            assert reply.startswith("451 4.3.0"), reply
            reply = await within(DEADLINE + MARGIN, sending.command(data("partitioned")))
            assert reply.startswith("451 4.3.0"), reply
        # the same sessions go on once the path heals
        reply = await within(DEADLINE + MARGIN, rcpt.command(f"RCPT TO:<{ALICE}>"))
        assert reply.startswith("250"), reply
        for client in (rcpt, sending):
            await client.close()
        await within(DEADLINE + MARGIN + 5, accepted_again(gw))


# --- delivery worker ----------------------------------------------------------------------


async def readyz(port: int, wanted: int) -> bool:
    return await http_status(port, "/readyz") == wanted


async def delivered_to(settings: WorkerSettings, address: str, count: int) -> bool:
    return await queue_empty(settings) and len(maildir_files(settings.mail_root, address)) == count


async def test_worker_frozen_redis_is_not_ready_then_recovers_and_delivers(
    private_redis: RedisServer, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(private_redis.url, tmp_path / "mail", role="local",
                               redis_timeout=f"{DEADLINE}s")  # fmt: skip
    async with running_worker(settings, telemetry) as service:
        port = service.health.port
        routing = await apply_routing(settings, table(User(address=ALICE)))
        await enqueue(settings, [ALICE], routing=routing)
        await eventually(lambda: delivered_to(settings, ALICE, 1))
        with frozen(private_redis):
            # a claim waits queue_poll_interval at most, then its reply is late
            await eventually(lambda: readyz(port, 503), timeout=DEADLINE + MARGIN)
        await eventually(lambda: readyz(port, 200))
        await enqueue(settings, [ALICE], routing=routing)
        await eventually(lambda: delivered_to(settings, ALICE, 2))


async def test_worker_behind_a_path_that_stops_forwarding_takes_back_what_a_late_claim_took(
    private_redis: RedisServer, tmp_path: Path, telemetry: Telemetry
) -> None:
    """A claim sent as the path stopped forwarding reaches Redis when it heals and takes a
    message for a request nobody waits for any more: the worker takes it back when Redis
    answers again, instead of leaving it to another worker after visibility_timeout."""
    async with TcpProxy(private_redis.port) as proxy:
        settings = worker_settings(
            proxy.url, tmp_path / "mail", role="local", redis_timeout=f"{DEADLINE}s",
            visibility_timeout="5m",
        )  # fmt: skip
        direct = settings.model_copy(update={"redis_url": private_redis.url})
        async with running_worker(settings, telemetry) as service:
            port = service.health.port
            routing = await apply_routing(direct, table(User(address=ALICE)))
            await enqueue(direct, [ALICE], routing=routing)  # the worker has the table then
            await eventually(lambda: delivered_to(direct, ALICE, 1))
            with paused(proxy):
                await eventually(lambda: readyz(port, 503), timeout=DEADLINE + MARGIN)
                await enqueue(direct, [ALICE], routing=routing)
                await late_claim(direct, consumer_name(settings))
            await eventually(lambda: readyz(port, 200))
            await eventually(lambda: delivered_to(direct, ALICE, 2))


async def late_claim(settings: WorkerSettings, consumer: str) -> None:
    """The worker's claim, as Redis runs it once the path heals: XREADGROUP for `consumer`."""
    client = connect_redis(settings)
    try:
        stream = PartitionKeys(settings.key_prefix, 0).stream("local")
        reply = await client.xreadgroup(GROUP, consumer, {stream: ">"}, count=10)
        assert reply, "nothing to claim"
    finally:
        await client.aclose()


class CountingQueue(Queue):
    """Counts the claims a consumer makes."""

    claims = 0

    async def claim(self, *args: Any, **kwargs: Any) -> list[Claimed]:
        self.claims += 1
        return await super().claim(*args, **kwargs)


async def test_a_consumer_stops_claiming_while_redis_does_not_answer(
    private_redis: RedisServer,
) -> None:
    """Each claim sent into a frozen Redis may run when it wakes up and take messages for
    nobody: while Redis does not answer, the consumer PINGs (less and less often) instead."""
    async with TcpProxy(private_redis.port) as proxy:
        settings = CommonSettings(redis_url=proxy.url, redis_timeout=f"{DEADLINE}s")
        client = connect_redis(settings)
        queue = CountingQueue(client, prefix="hang")
        pings: list[float] = []
        ping = client.ping

        async def counted_ping() -> Any:
            pings.append(time.monotonic())
            return await ping()

        client.ping = counted_ping  # type: ignore[method-assign]
        handled: list[str] = []

        async def handler(claimed: Claimed) -> None:
            handled.append(claimed.id)
            await queue.ack(claimed)

        consumer = QueueConsumer(queue, "pod-1", ["remote"], handler,
                                 poll=timedelta(milliseconds=50))  # fmt: skip
        try:
            async with consuming(consumer):
                with paused(proxy):
                    await eventually(lambda: _true(not consumer.ready),
                                     timeout=DEADLINE + MARGIN)  # fmt: skip
                    claims = queue.claims
                    await eventually(lambda: _true(len(pings) >= 3), timeout=5 * (DEADLINE + 1))
                    assert queue.claims == claims
                    gaps = [b - a for a, b in itertools.pairwise(pings)]
                    assert all(gap >= DEADLINE for gap in gaps), gaps  # each waits for its reply
                await eventually(lambda: _true(consumer.ready), timeout=10)
                remote = Envelope(mail_from="a@remote.test",
                                  recipients=[Recipient(address="b@x.test")])  # fmt: skip
                (message_id,) = await queue.enqueue(remote, b"m", is_local=lambda _: False)
                await eventually(lambda: _true(handled == [message_id]))
                assert queue.claims > claims
        finally:
            await client.aclose()


async def test_orphans_beyond_the_free_slots_are_taken_back_as_slots_free_up(
    private_redis: RedisServer,
) -> None:
    """Claims that ran in Redis while their replies were lost leave entries this consumer
    holds and no handler does. When Redis answers again, those beyond the free slots are
    taken back as slots free up (once idle for orphan_min_idle), not left for another
    consumer after visibility_timeout (5 minutes here)."""
    async with TcpProxy(private_redis.port) as proxy:
        client = connect_redis(CommonSettings(redis_url=proxy.url, redis_timeout=f"{DEADLINE}s"))
        direct = connect_redis(CommonSettings(redis_url=private_redis.url))
        queue = Queue(client, prefix="orphans")
        handled: list[str] = []
        gate = asyncio.Event()

        async def handler(claimed: Claimed) -> None:
            await gate.wait()  # the first orphan holds the only slot until the gate opens
            handled.append(claimed.id)
            await queue.ack(claimed)

        consumer = QueueConsumer(queue, "pod-1", ["remote"], handler, concurrency=1,
                                 poll=timedelta(milliseconds=50),
                                 orphan_min_idle=timedelta(seconds=1))  # fmt: skip
        try:
            async with consuming(consumer):
                with paused(proxy):
                    await eventually(lambda: _true(not consumer.ready),
                                     timeout=DEADLINE + MARGIN)  # fmt: skip
                    remote = Envelope(mail_from="a@remote.test",
                                      recipients=[Recipient(address="b@x.test")])  # fmt: skip
                    producer = Queue(direct, prefix="orphans")
                    ids = [(await producer.enqueue(remote, b"m", is_local=lambda _: False))[0]
                           for _ in range(2)]  # fmt: skip
                    # the claim a lost reply leaves behind: both entries now held by pod-1
                    stream = PartitionKeys("orphans", 0).stream("remote")
                    assert await direct.xreadgroup(GROUP, "pod-1", {stream: ">"}, count=10)
                await eventually(lambda: _true(consumer.ready), timeout=10)
                gate.set()
                await eventually(lambda: _true(sorted(handled) == sorted(ids)), timeout=30)
        finally:
            await client.aclose()
            await direct.aclose()


@asynccontextmanager
async def consuming(consumer: QueueConsumer) -> AsyncIterator[None]:
    """The consumer running (and ready) for the block; stopped after it."""
    stop = asyncio.Event()
    running = asyncio.create_task(consumer.run(stop))
    try:
        await eventually(lambda: _true(consumer.ready))
        yield
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)


async def _true(value: bool) -> bool:
    return value


# --- operator -----------------------------------------------------------------------------

RETRY_DELAY = 0.5


def publish_failures(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [r.created for r in caplog.records
            if r.getMessage().startswith("publishing the routing table failed")]  # fmt: skip


@asynccontextmanager
async def hanging(how: str, server: RedisServer) -> AsyncIterator[tuple[str, Hang]]:
    """(the URL to give a component, the hang of that path): `frozen` Redis itself, or a
    `partitioned` path to it."""
    if how == "frozen":
        yield server.url, lambda: frozen(server)
        return
    async with TcpProxy(server.port) as proxy:
        yield proxy.url, lambda: paused(proxy)


@pytest.mark.kmock(cls=KubeEmulator)
@pytest.mark.parametrize("how", ["frozen", "partitioned"])
async def test_operator_reconcile_against_a_hung_redis_fails_in_time_and_is_retried_slowly(
    kmock: KubeEmulator, api: Api, private_redis: RedisServer, caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:  # fmt: skip
    async with hanging(how, private_redis) as (url, hang):
        settings = operator_settings(url, str(kmock.url), retry_delay=f"{RETRY_DELAY}s",
                                     redis_timeout=f"{DEADLINE}s")  # fmt: skip
        run = OperatorRun(settings)
        await run.start()
        try:
            await reconcile_during_a_hang(api, run, hang, caplog)
        finally:
            await run.stop()


async def reconcile_during_a_hang(
    api: Api, run: OperatorRun, hang: Hang, caplog: pytest.LogCaptureFixture
) -> None:
    await api.apply("maildomains", "example", {"domain": "example.test"})

    async def ready(name: str) -> None:
        assert condition(await api.get("mailusers", name), "Ready")["status"] == "True"
        assert (await run.table()).user(f"{name}@example.test") is not None

    await api.apply("mailusers", "alice", {"address": "alice@example.test"})
    await operator_eventually(lambda: ready("alice"))
    with hang():
        await api.apply("mailusers", "bob", {"address": "bob@example.test"})

        async def unavailable() -> None:
            bob = condition(await api.get("mailusers", "bob"), "Ready")
            assert (bob["status"], bob["reason"]) == ("False", "RedisUnavailable"), bob
            assert bob["message"].startswith("Redis: TimeoutError"), bob

        # the reconcile's publish fails after redis_timeout (the status is Kubernetes')
        await operator_eventually(unavailable, timeout=DEADLINE + MARGIN + 2)
        # and is tried again, each time retry_delay after the last failure
        await eventually(lambda: _true(len(publish_failures(caplog)) >= 3), timeout=15)
        failures = publish_failures(caplog)
        gaps = [b - a for a, b in itertools.pairwise(failures)]
        assert min(gaps) >= RETRY_DELAY * 0.9, gaps
    await operator_eventually(lambda: ready("bob"))
    reconciler = run.state.reconciler
    assert reconciler is not None
    await eventually(lambda: _true(reconciler.healthy))


# --- Redis Cluster ------------------------------------------------------------------------


@pytest.mark.cluster
async def test_a_call_to_a_frozen_cluster_node_fails_within_twice_the_deadline(
    tmp_path: Path,
) -> None:
    """redis-py's cluster client retries ten times by default, each try waiting redis_timeout
    for a frozen node; connect_redis allows one retry (for a failover)."""
    with RedisCluster(tmp_path / "cluster") as cluster:
        client = connect_redis(
            CommonSettings(redis_url=cluster.url, redis_cluster=True, redis_timeout=f"{DEADLINE}s")
        )
        try:
            await client.set("key", "value")
            node = client.get_node_from_key("key")  # type: ignore[union-attr]
            (server,) = [s for s in cluster.nodes if s.port == node.port]
            with frozen(server), pytest.raises(RedisError):
                await within(2 * DEADLINE + MARGIN, client.get("key"))
            assert await client.get("key") == b"value"
        finally:
            await client.aclose()
