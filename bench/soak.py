"""Soak: the whole stack under steady load for a long time while faults are injected on a
schedule, every process's memory and file descriptors sampled, and at the end every accepted
message accounted for.

The stack: a private redis-server (AOF `appendfsync always`), a gateway process and a delivery
worker process writing into maildirs in a temporary directory, on loopback. The load: `--rate`
messages per second from `--senders` concurrent SMTP clients (aiosmtplib, a new connection per
message) to alice@example.test through the MX listener; each message carries a sequence
number. A sender that gets a 4xx or loses its connection tries the same message again later,
as a sending MTA would. Faults, one every `--fault-every` seconds in turn:

    gateway-kill   SIGKILL the gateway, start it again
    worker-kill    SIGKILL the worker, start it again
    redis-kill     SIGKILL Redis, start it again from its AOF
    redis-freeze   SIGSTOP Redis for `--freeze` seconds, then SIGCONT

At the end the load stops, the queue drains, and the maildir is read. Each attempt to send a
message carries an attempt number beside the message's sequence number, and every attempt
answered 250 must be delivered exactly once: "lost" and "duplicated" count the ones that were
not. Two more figures are SMTP's, not the stack's: an attempt delivered without a 250 (the
gateway was killed after queueing it, before the client read the reply: "unconfirmed"), and
a message delivered twice because the client sent it again after such a lost reply
("resent"; RFC 1047's duplicates, which every MTA has).

RSS and open file descriptors of each process are sampled every `--sample-every` seconds;
the longest-lived process of each component shows whether memory or descriptors leak.

    .venv/bin/python bench/soak.py                       # an hour
    .venv/bin/python bench/soak.py --duration 60 --fault-every 10   # the smoke run the tests do

Exit status 0 when nothing accepted was lost or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import aiosmtplib  # noqa: E402
from gateway_harness import (  # noqa: E402
    apply_routing,
    free_port,
    http_status,
    loopback_dns,
    make_tls,
    wait_until,
)
from redis_servers import RedisServer  # noqa: E402

from mailkube_core.queue import QueueAdmin  # noqa: E402
from mailkube_core.redis_client import connect_redis  # noqa: E402
from mailkube_core.settings import CommonSettings  # noqa: E402

ALICE = "alice@example.test"
FAULTS = ("gateway-kill", "worker-kill", "redis-kill", "redis-freeze")
SEQUENCE_FIELD = "X-Soak-Seq"
ATTEMPT_FIELD = "X-Soak-Attempt"


class Component:
    """A Mailkube process (`python -m <module>`) with its health port, restartable."""

    def __init__(self, name: str, module: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.module = module
        self.health = free_port()
        self.env = {**env, "MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{self.health}"}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], env=self.env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(self.alive_and_ready, 60, f"{self.name} ready")

    def alive_and_ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited; see {self.log}")
        return http_status(f"http://127.0.0.1:{self.health}/readyz") == 200

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


@dataclass
class Samples:
    """RSS (bytes) and open file descriptors of a component's process over time, per process
    (a restart starts a new one); the longest-lived one shows a leak, if any."""

    by_pid: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def add(self, pid: int | None) -> None:
        if pid is None:
            return
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return
        rss = next((int(line.split()[1]) * 1024 for line in status.splitlines()
                    if line.startswith("VmRSS:")), 0)  # fmt: skip
        self.by_pid.setdefault(pid, []).append((rss, fds))

    def summary(self) -> str:
        if not self.by_pid:
            return "no samples"
        longest = max(self.by_pid.values(), key=len)
        rss, fds = [s[0] for s in longest], [s[1] for s in longest]
        mib = 2**20
        return (
            f"{len(self.by_pid)} process(es); the longest-lived over {len(longest)} samples: "
            f"RSS {rss[0] / mib:.0f} -> {rss[-1] / mib:.0f} MiB (peak {max(rss) / mib:.0f}), "
            f"fds {fds[0]} -> {fds[-1]} (peak {max(fds)})"
        )


@dataclass
class Ledger:
    next_seq: int = 0
    next_attempt: int = 0
    #: attempts answered 250, and the message (sequence number) of each
    accepted: dict[int, int] = field(default_factory=dict)
    #: attempts answered 4xx or cut off, retried
    retries: int = 0
    refused: Counter[str] = field(default_factory=Counter)


def message(seq: int, attempt: int) -> str:
    date = datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    return (
        f"From: soak@remote.test\r\nTo: {ALICE}\r\nSubject: soak {seq}\r\nDate: {date}\r\n"
        f"Message-ID: <soak-{seq}@remote.test>\r\n{SEQUENCE_FIELD}: {seq}\r\n"
        f"{ATTEMPT_FIELD}: {attempt}\r\n\r\n" + "soak load line\r\n" * 40
    )


async def sender(
    port: int, ledger: Ledger, tokens: asyncio.Queue[None], stop: asyncio.Event
) -> None:
    pending: list[int] = []
    while not stop.is_set():
        try:
            await asyncio.wait_for(tokens.get(), 1)
        except TimeoutError:
            continue
        if pending:
            seq = pending.pop()
        else:
            seq, ledger.next_seq = ledger.next_seq, ledger.next_seq + 1
        attempt, ledger.next_attempt = ledger.next_attempt, ledger.next_attempt + 1
        try:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, timeout=30, start_tls=False
            ) as smtp:
                await smtp.sendmail("soak@remote.test", [ALICE], message(seq, attempt))
            ledger.accepted[attempt] = seq
        except aiosmtplib.SMTPResponseException as error:
            if error.code >= 500:
                ledger.refused[f"{error.code} {error.message[:60]}"] += 1
                why = f"{error.code} {error.message}"
                raise RuntimeError(f"message {seq} refused for good: {why}") from None
            ledger.retries += 1
            pending.append(seq)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            ledger.retries += 1
            pending.append(seq)
    # what is still pending was never answered 250: not the stack's to keep


async def pace(rate: float, tokens: asyncio.Queue[None], stop: asyncio.Event) -> None:
    interval = 1 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        next_at += interval
        if tokens.qsize() < rate * 2:  # the senders fell behind: do not pile up a backlog
            tokens.put_nowait(None)
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def delivered(mail_root: Path) -> Counter[tuple[int, int]]:
    """(sequence, attempt) of each file in alice's maildir, counted."""
    found: Counter[tuple[int, int]] = Counter()
    mailbox = mail_root / "example.test" / "alice"
    for folder in ("new", "cur"):
        directory = mailbox / folder
        if not directory.exists():
            continue
        for path in directory.iterdir():
            fields: dict[bytes, int] = {}
            with path.open("rb") as file:
                for line in file:
                    if line in (b"\r\n", b"\n"):
                        break
                    name, _, value = line.partition(b":")
                    if name in (SEQUENCE_FIELD.encode(), ATTEMPT_FIELD.encode()):
                        fields[name] = int(value)
            found[fields[SEQUENCE_FIELD.encode()], fields[ATTEMPT_FIELD.encode()]] += 1
    return found


async def queue_size(url: str) -> int:
    client = connect_redis(CommonSettings(redis_url=url))
    try:
        return (await QueueAdmin(client).stats()).messages
    finally:
        await client.aclose()


async def soak(args: argparse.Namespace, work: Path) -> int:
    redis = RedisServer(work / "redis", appendfsync="always").start()
    tls = make_tls(work / "tls")
    dns = loopback_dns()
    mail_root = work / "mail"
    mail_root.mkdir()
    await apply_routing(redis.url)
    common = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
    common.update({
        "MAILKUBE_REDIS_URL": redis.url, "MAILKUBE_HOSTNAME": "mx.test", "MAILKUBE_LOG_LEVEL":
        "WARNING", "MAILKUBE_DNS_NAMESERVERS": dns.host, "MAILKUBE_DNS_PORT": str(dns.port),
    })  # fmt: skip
    mx = free_port()
    gateway = Component("gateway", "mailkube_gateway", {
        **common, "MAILKUBE_MX_LISTEN": f"127.0.0.1:{mx}",
        "MAILKUBE_SUBMISSION_LISTEN": f"127.0.0.1:{free_port()}",
        "MAILKUBE_SUBMISSIONS_LISTEN": f"127.0.0.1:{free_port()}",
        "MAILKUBE_TLS_CERT_FILE": str(tls.cert_file), "MAILKUBE_TLS_KEY_FILE": str(tls.key_file),
        "MAILKUBE_MAX_MESSAGES_PER_MINUTE": "10000000",
        "MAILKUBE_MAX_RECIPIENT_MESSAGES_PER_MINUTE": "10000000",
        "MAILKUBE_MAX_CONNECTIONS_PER_IP": "1000", "MAILKUBE_ENQUEUE_TIMEOUT": "5s",
    }, work / "gateway.log")  # fmt: skip
    worker = Component("worker", "mailkube_worker", {
        **common, "MAILKUBE_MAIL_ROOT": str(mail_root), "MAILKUBE_ROLE": "local",
        "MAILKUBE_QUEUE_POLL_INTERVAL": "100ms", "MAILKUBE_RETRY_INTERVALS": "1s",
        "MAILKUBE_VISIBILITY_TIMEOUT": "5s",
    }, work / "worker.log")  # fmt: skip
    gateway.start()
    worker.start()
    samples = {"gateway": Samples(), "worker": Samples(), "redis": Samples()}
    ledger = Ledger()
    stop = asyncio.Event()
    tokens: asyncio.Queue[None] = asyncio.Queue()
    load = [asyncio.create_task(sender(mx, ledger, tokens, stop)) for _ in range(args.senders)]
    pacer = asyncio.create_task(pace(args.rate, tokens, stop))
    faults: Counter[str] = Counter()
    started = time.monotonic()
    next_fault = started + args.fault_every
    next_sample = started + args.warmup
    turn = 0
    try:
        while time.monotonic() - started < args.duration:
            await asyncio.sleep(0.2)
            if any(task.done() for task in load):
                for task in load:
                    if task.done():
                        task.result()  # a permanent refusal: stop and say so
            now = time.monotonic()
            if now >= next_sample:
                samples["gateway"].add(gateway.pid)
                samples["worker"].add(worker.pid)
                samples["redis"].add(redis.process.pid if redis.process else None)
                next_sample = now + args.sample_every
            if args.fault_every and now >= next_fault:
                fault = FAULTS[turn % len(FAULTS)]
                turn += 1
                faults[fault] += 1
                await asyncio.to_thread(inject, fault, gateway, worker, redis, args.freeze)
                next_fault = time.monotonic() + args.fault_every
    finally:
        stop.set()
        pacer.cancel()
        await asyncio.gather(*load, return_exceptions=True)
    # everything accepted is in the queue or delivered: wait until the queue drains
    drain_deadline = time.monotonic() + args.drain_timeout
    while await queue_size(redis.url) and time.monotonic() < drain_deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.5)  # polling Redis: there is no event to wait on
    left = await queue_size(redis.url)
    gateway_code, worker_code = gateway.stop(), worker.stop()
    redis.stop()
    found = delivered(mail_root)
    attempts = {attempt: count for (_, attempt), count in found.items()}
    lost = sorted(set(ledger.accepted) - set(attempts))
    duplicated = sorted(attempt for attempt, count in attempts.items() if count > 1)
    unconfirmed = sorted(set(attempts) - set(ledger.accepted))
    copies = Counter(seq for seq, _ in found)
    resent = sorted(seq for seq, count in copies.items() if count > 1)
    report = {
        "duration_s": round(time.monotonic() - started),
        "accepted": len(ledger.accepted),
        "delivered": sum(found.values()),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "unconfirmed_delivered": len(unconfirmed),
        "resent_delivered_twice": len(resent),
        "retried_attempts": ledger.retries,
        "left_in_queue": left,
        "faults": dict(faults),
        "exit_codes": {"gateway": gateway_code, "worker": worker_code},
        "processes": {name: s.summary() for name, s in samples.items()},
    }
    print(json.dumps(report, indent=2))
    if lost:
        print(f"lost attempts (first 20): {lost[:20]}", file=sys.stderr)
    if duplicated:
        print(f"duplicated attempts (first 20): {duplicated[:20]}", file=sys.stderr)
    return 0 if not lost and not duplicated and not left else 1


def inject(fault: str, gateway: Component, worker: Component, redis: RedisServer,
           freeze: float) -> None:  # fmt: skip
    if fault == "gateway-kill":
        gateway.kill()
        gateway.start()
    elif fault == "worker-kill":
        worker.kill()
        worker.start()
    elif fault == "redis-kill":
        redis.kill()
        redis.start()
    elif fault == "redis-freeze":
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)
        time.sleep(freeze)
        redis.process.send_signal(signal.SIGCONT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3600, help="seconds of load")
    parser.add_argument("--rate", type=float, default=50, help="messages per second offered")
    parser.add_argument("--senders", type=int, default=10, help="concurrent SMTP clients")
    parser.add_argument("--fault-every", type=float, default=60, help="seconds; 0: none")
    parser.add_argument("--freeze", type=float, default=3, help="seconds Redis stays stopped")
    parser.add_argument("--sample-every", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=5, help="seconds before sampling")
    parser.add_argument("--drain-timeout", type=float, default=120)
    args = parser.parse_args()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date:    {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; nproc {os.cpu_count()}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="soak-") as work:
        raise SystemExit(asyncio.run(soak(args, Path(work))))


if __name__ == "__main__":
    main()
