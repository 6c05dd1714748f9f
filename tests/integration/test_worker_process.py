"""The `mailkube-worker` process: --role, readiness, delivery, SIGTERM; SIGKILL in the middle
of a delivery; several worker processes sharing one queue (what `kubectl scale` does)."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conditions import eventually
from dns_server import DnsServer
from fake_mx import MxFarm, Script
from worker_harness import (
    WorkerProcess,
    apply_routing,
    enqueue,
    http_status,
    maildir_files,
    queue_empty,
    table,
    worker_settings,
)

from mailkube_core.queue import QueueAdmin
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import User

ALICE = User(address="alice@example.test")


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


async def test_worker_process_delivers_and_stops_cleanly_on_sigterm(
    redis_url: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail")
    routing = await apply_routing(settings, table(ALICE))
    worker = WorkerProcess(settings, "pod-a", "--role", "local", MAILKUBE_ROLE="remote")
    workers.append(worker)
    await worker.ready()
    await enqueue(settings, ["alice@example.test"], routing=routing)
    await eventually(lambda: _delivered(tmp_path, 1))
    # the maildir file appears just before the delivery is counted: wait for the count too
    metrics = ""

    async def counted() -> bool:
        nonlocal metrics
        metrics = await asyncio.to_thread(_get, worker.port, "/metrics")
        return 'outcome="delivered"' in metrics

    await eventually(counted)
    assert worker.stop() == 0
    log = worker.log.read_text()
    assert "'role': 'local'" in log or '"role": "local"' in log
    assert '"consumer": "pod-a"' in log
    assert log.rstrip().endswith('"msg": "stopped"}') or '"msg": "stopped"' in log
    (line,) = [x for x in metrics.splitlines() if x.startswith("mailkube_worker_recipients_total{")]
    assert 'lane="local"' in line
    assert 'outcome="delivered"' in line
    assert line.endswith(" 1.0")
    # the bounce rate of our own sender domain, by outcome (issue: exported as metrics)
    (line,) = [x for x in metrics.splitlines()
               if x.startswith("mailkube_worker_sender_outcomes_total{")]  # fmt: skip
    assert 'outcome="delivered"' in line
    assert 'sender_domain="other"' in line  # bob@remote.test is not one of ours
    assert line.endswith(" 1.0")


async def _delivered(tmp_path: Path, count: int) -> bool:
    return len(maildir_files(tmp_path / "mail", "alice@example.test")) >= count


def _get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


async def test_two_worker_processes_share_the_queue(
    redis_url: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail")
    routing = await apply_routing(settings, table(ALICE))
    workers += [WorkerProcess(settings, "pod-a"), WorkerProcess(settings, "pod-b")]
    for worker in workers:
        await worker.ready()
    for _ in range(60):
        await enqueue(settings, ["alice@example.test"], routing=routing)
    await eventually(lambda: queue_empty(settings), timeout=60)
    files = maildir_files(tmp_path / "mail", "alice@example.test")
    assert len(files) == 60
    logs = [w.log.read_text() for w in workers]
    for worker in workers:
        assert worker.stop() == 0
    assert all(log.count('"msg": "delivery attempt"') > 0 for log in logs), "one worker idle"


async def test_sigkill_in_the_middle_of_a_delivery_loses_nothing(
    redis_url: str, tmp_path: Path, workers: list[WorkerProcess], dns_server: DnsServer,
    mx_farm: MxFarm,
) -> None:  # fmt: skip
    """pod-a dies (SIGKILL) while the remote host is receiving the message; pod-b takes the
    entry over after the visibility timeout and delivers it, once."""
    settings = worker_settings(redis_url, tmp_path / "mail")
    release = threading.Event()
    script = Script(hold=release)
    mx = mx_farm.start("127.0.0.26", script)
    remote = {
        "MAILKUBE_DNS_NAMESERVERS": dns_server.host, "MAILKUBE_DNS_PORT": str(dns_server.port),
        "MAILKUBE_SMTP_PORT": str(mx_farm.port), "MAILKUBE_VISIBILITY_TIMEOUT": "1s",
    }  # fmt: skip
    routing = await apply_routing(settings, table(ALICE))
    first = WorkerProcess(settings, "pod-a", "--role", "remote", **remote)
    workers.append(first)
    await first.ready()
    await enqueue(settings, ["hank@retry.test"], mail_from="alice@example.test", routing=routing)
    await eventually(lambda: _is_set(script.held))
    first.kill()
    release.set()
    second = WorkerProcess(settings, "pod-b", "--role", "remote", **remote)
    workers.append(second)
    await second.ready()
    await eventually(lambda: queue_empty(settings), timeout=30)
    assert second.stop() == 0
    assert [r.rcpt_tos for r in mx.received] == [["hank@retry.test"]]
    assert "reclaimed a message from a dead consumer" in second.log.read_text()
    assert maildir_files(tmp_path / "mail", "alice@example.test") == []  # no bounce


async def _is_set(event: threading.Event) -> bool:
    return event.is_set()


async def test_sigterm_lets_a_delivery_in_flight_finish(
    redis_url: str, tmp_path: Path, workers: list[WorkerProcess], dns_server: DnsServer,
    mx_farm: MxFarm,
) -> None:  # fmt: skip
    """SIGTERM while the remote host is still receiving: the worker claims nothing new, the
    delivery in flight completes within shutdown_grace, and the process exits 0."""
    settings = worker_settings(redis_url, tmp_path / "mail")
    release = threading.Event()
    script = Script(hold=release, keep_held=True)
    mx = mx_farm.start("127.0.0.26", script)
    routing = await apply_routing(settings, table(ALICE))
    worker = WorkerProcess(
        settings, "pod-a", "--role", "remote",
        MAILKUBE_DNS_NAMESERVERS=dns_server.host, MAILKUBE_DNS_PORT=str(dns_server.port),
        MAILKUBE_SMTP_PORT=str(mx_farm.port), MAILKUBE_SHUTDOWN_GRACE="20s",
    )  # fmt: skip
    workers.append(worker)
    await worker.ready()
    await enqueue(settings, ["hank@retry.test"], mail_from="alice@example.test", routing=routing)
    await eventually(lambda: _is_set(script.held))
    worker.process.send_signal(signal.SIGTERM)
    await eventually(lambda: _not_ready(worker.port))  # stopped claiming, still running
    assert worker.process.poll() is None
    (later,) = await enqueue(settings, ["ivy@retry.test"], mail_from="alice@example.test",
                             routing=routing)  # fmt: skip
    release.set()
    assert await asyncio.to_thread(worker.process.wait, 30) == 0
    assert [r.rcpt_tos for r in mx.received] == [["hank@retry.test"]]
    redis = connect_redis(settings)
    try:
        info = await QueueAdmin.from_settings(settings, redis).inspect(later)
    finally:
        await redis.aclose()
    assert info is not None
    assert info.attempts == 0  # left in the queue for the other workers
    assert info.state == "queued"  # not even claimed


async def _not_ready(port: int) -> bool:
    return await http_status(port, "/readyz") != 200
