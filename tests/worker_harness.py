"""Helpers for the delivery-worker tests: settings for a test, a worker running in the test's
event loop (health server on a free port, as run_service would start it), a worker process
(`mailkube-worker`, to SIGTERM or SIGKILL), routing tables, enqueueing, and polling a condition
with a deadline (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

from conditions import eventually
from redis_servers import free_port

from mailkube_core.queue import Envelope, Queue, QueueAdmin, Recipient
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import Domain, RoutingSnapshot, RoutingStore, RoutingTable, User
from mailkube_core.service import Service
from mailkube_core.settings import WorkerSettings
from mailkube_core.telemetry import HealthServer, Telemetry
from mailkube_worker.app import serve

T = TypeVar("T")
HOSTNAME = "mail.mailkube.test"


def worker_settings(redis_url: str, mail_root: Path, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "key_prefix": f"t{uuid.uuid4().hex[:8]}",
        "hostname": HOSTNAME,
        "mail_root": mail_root,
        "telemetry_listen": "",
        "queue_poll_interval": timedelta(milliseconds=50),
        "retry_intervals": [timedelta(milliseconds=200)],
        "retry_jitter": 0,
        "log_format": "text",
    }
    values.update(overrides)
    return WorkerSettings(**values)


async def http_status(port: int, path: str) -> int | None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    line = await reader.readline()
    writer.close()
    return int(line.split()[1]) if line else None


@asynccontextmanager
async def running_worker(settings: WorkerSettings, telemetry: Telemetry) -> AsyncIterator[Service]:
    """The worker's `serve`, as `run_service` runs it, until the block ends (a SIGTERM)."""
    health = HealthServer()
    await health.start("127.0.0.1", 0)
    service = Service("worker", telemetry, health, asyncio.Event())
    task = asyncio.create_task(serve(settings, service))

    async def ready() -> bool:
        if task.done():
            task.result()  # raise what stopped it
        return await http_status(health.port, "/readyz") == 200

    try:
        await eventually(ready)
        yield service
    finally:
        service.stopping.set()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await health.stop()


def table(
    *users: User, domains: tuple[str, ...] = ("example.test",), **domain: Any
) -> RoutingTable:
    return RoutingTable(domains=[Domain(name=d, **domain) for d in domains], users=list(users))


async def apply_routing(settings: WorkerSettings, routing: RoutingTable) -> RoutingSnapshot:
    redis = connect_redis(settings)
    try:
        version = await RoutingStore(redis, settings.key_prefix).replace(routing)
    finally:
        await redis.aclose()
    return RoutingSnapshot(routing, version)


def message(
    subject: str = "hello", sender: str = "bob@remote.test", to: str = "alice@example.test",
    body: str = "Hello Alice.\n",
) -> bytes:  # fmt: skip
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@remote.test>"
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


async def enqueue(
    settings: WorkerSettings,
    recipients: list[str] | list[Recipient],
    body: bytes | None = None,
    *,
    mail_from: str = "bob@remote.test",
    routing: RoutingSnapshot,
    **envelope: Any,
) -> list[str]:
    redis = connect_redis(settings)
    try:
        queue = Queue.from_settings(settings, redis)
        rcpts = [r if isinstance(r, Recipient) else Recipient(address=r) for r in recipients]
        env = Envelope(mail_from=mail_from, recipients=rcpts, **envelope)
        return await queue.enqueue(env, body or message(), is_local=routing.is_local)
    finally:
        await redis.aclose()


async def queue_empty(settings: WorkerSettings) -> bool:
    redis = connect_redis(settings)
    try:
        return (await QueueAdmin.from_settings(settings, redis).stats()).messages == 0
    finally:
        await redis.aclose()


def maildir_files(root: Path, address: str, folder: str | None = None) -> list[Path]:
    local, domain = address.split("@")
    box = root / domain / local
    if folder:
        box = box / f".{folder}"
    return sorted((box / "new").glob("*")) if (box / "new").is_dir() else []


def parse(path: Path) -> email.message.EmailMessage:
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


class WorkerProcess:
    """A `mailkube-worker` process on the test's Redis and mail root, as a pod would run it
    (consumer name = `pod`); its output goes to <mail_root>/../<pod>.log, appended to when the
    same pod is started again."""

    def __init__(self, settings: WorkerSettings, pod: str, *args: str, **env: str) -> None:
        self.port = free_port()
        self.log = Path(settings.mail_root).parent / f"{pod}.log"
        environment = {
            **os.environ,
            "HOSTNAME": pod,
            "MAILKUBE_REDIS_URL": settings.redis_url,
            "MAILKUBE_KEY_PREFIX": settings.key_prefix,
            "MAILKUBE_HOSTNAME": settings.hostname,
            "MAILKUBE_MAIL_ROOT": str(settings.mail_root),
            "MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{self.port}",
            "MAILKUBE_QUEUE_POLL_INTERVAL": "50ms",
            "MAILKUBE_RETRY_INTERVALS": "200ms",
            **env,
        }
        environment.pop("MAILKUBE_CONFIG", None)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailkube_worker", *args],
                env=environment, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def ready(self) -> None:
        async def probe() -> bool:
            assert self.process.poll() is None, self.log.read_text()
            return await http_status(self.port, "/readyz") == 200

        await eventually(probe, timeout=30)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
