"""Kill the Redis primary under load and count what was promised against what arrived: the e2e
test (tests/e2e/test_redis_failover.py) and bench/failover_bench.py share it.

A gateway and a delivery worker (in this event loop) reach Redis through three sentinels
(redis_sentinels.SentinelGroup). Senders keep sending numbered messages to one local mailbox,
each its own SMTP session, and note every number the gateway answered 250 to, with when. After
`before_kill` acceptances the primary gets SIGKILL; the sentinels promote the replica; the
killed server is started again and comes back as the new primary's replica (so that
enqueue_replicas: 1 can be met again); the load goes on until `after_rejoin` more were
accepted. Then every accepted number must reach the maildir: `lost` are those that never do.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from gateway_harness import ALICE, running_gateway
from redis.exceptions import RedisError
from redis_sentinels import SentinelGroup
from worker_harness import maildir_files, queue_empty, running_worker, worker_settings

from mailkube_core.settings import WorkerSettings
from mailkube_core.telemetry import Telemetry

NUMBER = re.compile(rb"^Subject: failover (\d+)\r?$", re.M)


@dataclass
class Outcome:
    """What one run saw. Times are time.monotonic()."""

    enqueue_replicas: int
    #: number -> when it was accepted (250 at the end of DATA)
    accepted: dict[int, float] = field(default_factory=dict)
    #: temporary refusals (4xx) and broken sessions, by kind
    refused: dict[str, int] = field(default_factory=dict)
    delivered: set[int] = field(default_factory=set)
    killed_at: float = 0.0
    #: when the sentinels all named the new primary
    promoted_at: float = 0.0
    #: the first acceptance after the kill
    first_after_kill: float | None = None

    @property
    def lost(self) -> list[int]:
        return sorted(set(self.accepted) - self.delivered)

    def lost_window(self) -> tuple[float, float] | None:
        """When the lost messages were accepted, in seconds relative to the kill."""
        lost = self.lost
        if not lost:
            return None
        times = [self.accepted[number] - self.killed_at for number in lost]
        return min(times), max(times)

    def unavailable(self) -> float | None:
        """Seconds from the kill to the first 250 after it."""
        if self.first_after_kill is None:
            return None
        return self.first_after_kill - self.killed_at


def _message(number: int) -> str:
    return (
        f"From: load@remote.test\r\nTo: {ALICE}\r\nSubject: failover {number}\r\n"
        f"Message-ID: <failover-{number}@remote.test>\r\n\r\nMessage {number}.\r\n"
    )


def delivered_numbers(mail_root: Path) -> set[int]:
    found: set[int] = set()
    for path in maildir_files(mail_root, ALICE):
        match = NUMBER.search(path.read_bytes())
        if match:
            found.add(int(match.group(1)))
    return found


async def _sender(
    port: int, numbers: Callable[[], int], outcome: Outcome, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        number = numbers()
        try:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, timeout=30, start_tls=False
            ) as client:
                await client.sendmail("load@remote.test", [ALICE], _message(number))
        except aiosmtplib.SMTPRecipientsRefused as exc:
            kind = ",".join(str(recipient.code) for recipient in exc.recipients)
            outcome.refused[kind] = outcome.refused.get(kind, 0) + 1
            continue
        except aiosmtplib.SMTPResponseException as exc:
            kind = f"{exc.code}"
            outcome.refused[kind] = outcome.refused.get(kind, 0) + 1
            continue
        except (aiosmtplib.SMTPException, OSError) as exc:
            kind = type(exc).__name__
            outcome.refused[kind] = outcome.refused.get(kind, 0) + 1
            continue
        now = time.monotonic()
        outcome.accepted[number] = now
        if outcome.killed_at and outcome.first_after_kill is None:
            outcome.first_after_kill = now


async def _drained(settings: WorkerSettings) -> bool:
    try:
        return await queue_empty(settings)
    except RedisError:
        return False


async def _until(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what()}")
        await asyncio.sleep(0.05)


async def kill_primary_under_load(
    group: SentinelGroup,
    tmp_path: Path,
    telemetry: Telemetry,
    *,
    enqueue_replicas: int,
    senders: int = 8,
    before_kill: int = 150,
    after_rejoin: int = 50,
    deliver_timeout: float = 180.0,
    **gateway: Any,
) -> Outcome:
    outcome = Outcome(enqueue_replicas)
    sentinels: dict[str, Any] = {**group.settings(), "redis_timeout": "2s"}
    url = group.primary().url  # its scheme and database: the sentinels give the address
    mail_root = tmp_path / "mail"
    worker = worker_settings(url, mail_root, key_prefix="mailkube", **sentinels)
    counter = iter(range(1, 10**9))
    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(running_worker(worker, telemetry))
        gw = await stack.enter_async_context(
            running_gateway(
                url,
                tmp_path,
                enqueue_replicas=enqueue_replicas,
                max_connections_per_ip=senders * 4,
                # the load is one sender and one recipient: no rate limit may refuse it
                max_messages_per_minute=10**6,
                max_recipient_messages_per_minute=10**6,
                **sentinels,
                **gateway,
            )
        )
        tasks = [
            asyncio.create_task(_sender(gw.mx, lambda: next(counter), outcome, stop))
            for _ in range(senders)
        ]
        try:
            await _until(
                lambda: len(outcome.accepted) >= before_kill,
                120,
                lambda: f"load before the kill (refused: {outcome.refused})",
            )
            old = await asyncio.to_thread(group.primary)
            outcome.killed_at = time.monotonic()
            await asyncio.to_thread(old.kill)
            await asyncio.to_thread(group.wait_for_failover, old)
            outcome.promoted_at = time.monotonic()
            # in this thread: only the main thread's children die with this process
            old.restart()
            await asyncio.to_thread(group.wait_until_ready)
            target = len(outcome.accepted) + after_rejoin
            await _until(
                lambda: len(outcome.accepted) >= target,
                120,
                lambda: f"load after the rejoin (refused: {outcome.refused})",
            )
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

        # until every accepted message is there, or the queue is empty (no more will come)
        deadline = time.monotonic() + deliver_timeout
        while time.monotonic() < deadline:
            drained = await _drained(worker)
            outcome.delivered = delivered_numbers(mail_root)
            if not outcome.lost or drained:
                break
            await asyncio.sleep(0.2)
    return outcome
