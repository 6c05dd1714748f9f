"""Delivery worker throughput: messages/s from the queue into a maildir (local role) or to an
SMTP server (remote role, Postfix's `smtp-sink` found through an MX record), with 1, 2 and 4
`mailkube-worker` processes.

Each cell gets a fresh private redis-server (AOF `appendfsync always`) and temp dirs. The
workers start first and report ready; then the bench process enqueues N one-recipient messages
from 64 tasks (as gateways would), and the clock runs from the first enqueue until the queue is
empty. The run then checks that every recipient was delivered (the workers' own outcome
counters, plus the files in the maildir for the local role, or smtp-sink's count).

    .venv/bin/python bench/worker_bench.py                 # full grid
    .venv/bin/python bench/worker_bench.py --quick         # a smoke run
    .venv/bin/python bench/worker_bench.py --modes local --sizes 2k --workers 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dns_server import DnsServer  # noqa: E402
from redis_servers import RedisServer  # noqa: E402

from mailkube_core.queue import Envelope, Queue, QueueAdmin, Recipient  # noqa: E402
from mailkube_core.queue.envelope import utcnow  # noqa: E402
from mailkube_core.queue.outcomes import read_outcomes  # noqa: E402
from mailkube_core.redis_client import connect_redis  # noqa: E402
from mailkube_core.routing import Domain, RoutingStore, RoutingTable, User  # noqa: E402
from mailkube_core.settings import CommonSettings  # noqa: E402

KIB = 1024
PREFIX = "bench"
ZONE = """$TTL 300
@   SOA ns hostmaster 1 3600 600 86400 60
@   MX  10 mx
mx  A   127.0.0.1
"""


def make_body(size: int) -> bytes:
    head = (b"From: bench@example.test\r\nTo: rcpt@sink.test\r\nSubject: bench\r\n"
            b"Message-ID: <bench@example.test>\r\n\r\n")  # fmt: skip
    line = b"x" * 76 + b"\r\n"
    body = head + line * ((size - len(head)) // len(line) + 1)
    return body[: size - 2] + b"\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def enqueue_all(url: str, recipient: str, body: bytes, count: int, local: bool) -> None:
    redis = connect_redis(CommonSettings(redis_url=url))
    queue = Queue(redis, prefix=PREFIX)
    envelope = Envelope(mail_from="bench@example.test", recipients=[Recipient(address=recipient)])
    todo = iter(range(count))

    async def producer() -> None:
        for _ in todo:
            await queue.enqueue(envelope, body, is_local=lambda _: local)

    await asyncio.gather(*(producer() for _ in range(64)))
    await redis.aclose()


async def wait_empty(url: str, limit: float) -> None:
    redis = connect_redis(CommonSettings(redis_url=url))
    admin = QueueAdmin(redis, prefix=PREFIX)
    deadline = time.monotonic() + limit
    try:
        while (await admin.stats()).messages:
            if time.monotonic() > deadline:
                stuck = await admin.list_messages(3)
                errors = [(m.state, m.attempts, m.last_error) for m in stuck]
                raise TimeoutError(f"the queue did not drain: {errors}")
            await asyncio.sleep(0.01)
    finally:
        await redis.aclose()


async def delivered(url: str) -> dict[str, int]:
    redis = connect_redis(CommonSettings(redis_url=url))
    try:
        stats = await read_outcomes(redis, PREFIX, utcnow().date())
    finally:
        await redis.aclose()
    return stats.get("example.test", {})


async def setup_routing(url: str) -> None:
    redis = connect_redis(CommonSettings(redis_url=url))
    table = RoutingTable(domains=[Domain(name="example.test")],
                         users=[User(address="alice@example.test")])  # fmt: skip
    await RoutingStore(redis, PREFIX).replace(table)
    await redis.aclose()


def run_cell(
    mode: str, size: int, workers: int, count: int, args: argparse.Namespace
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="worker-bench-", dir=args.tmp))
    redis = RedisServer(tmp / "redis", appendfsync="always").start()
    dns = DnsServer().start()
    dns.add_zone("sink.test", ZONE)
    sink = None
    processes: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        asyncio.run(setup_routing(redis.url))
        env = {**os.environ, "MAILKUBE_REDIS_URL": redis.url, "MAILKUBE_KEY_PREFIX": PREFIX,
               "MAILKUBE_HOSTNAME": "bench.example.test", "MAILKUBE_MAIL_ROOT": str(tmp / "mail"),
               "MAILKUBE_LOG_LEVEL": "WARNING", "MAILKUBE_QUEUE_WORKERS": str(args.queue_workers),
               "MAILKUBE_ROLE": mode, "MAILKUBE_DNS_NAMESERVERS": dns.host,
               "MAILKUBE_DNS_PORT": str(dns.port)}  # fmt: skip
        env.pop("MAILKUBE_CONFIG", None)
        if mode == "remote":
            port = free_port()
            env["MAILKUBE_SMTP_PORT"] = str(port)
            sink_log = (tmp / "sink.out").open("wb")
            privileges = ["-u", "nobody"] if os.geteuid() == 0 else []  # required as root
            sink = subprocess.Popen(
                [shutil.which("smtp-sink") or "/usr/sbin/smtp-sink", *privileges, "-c",
                 f"127.0.0.1:{port}", "1024"], stdout=sink_log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        for n in range(workers):
            health = free_port()
            worker_env = {**env, "HOSTNAME": f"bench-{n}",
                          "MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{health}"}  # fmt: skip
            command = [sys.executable, "-m", "mailkube_worker"]
            if args.profile:
                profile = Path(args.profile) / f"worker-{n}.prof"
                command[1:1] = ["-m", "cProfile", "-o", str(profile)]
            process = subprocess.Popen(command, env=worker_env)
            processes.append((process, health))
        deadline = time.monotonic() + 60
        while not all(ready(h) for _, h in processes):
            if time.monotonic() > deadline or any(p.poll() is not None for p, _ in processes):
                raise RuntimeError("a worker did not start")
            time.sleep(0.05)
        recipient = "alice@example.test" if mode == "local" else "rcpt@sink.test"
        body = make_body(size)
        cpu0 = sum(proc_cpu(p.pid) for p, _ in processes)
        redis_cpu0 = proc_cpu(redis.process.pid)  # type: ignore[union-attr]
        start = time.monotonic()
        asyncio.run(enqueue_all(redis.url, recipient, body, count, mode == "local"))
        enqueued = time.monotonic() - start
        asyncio.run(wait_empty(redis.url, args.timeout))
        elapsed = time.monotonic() - start
        worker_cpu = sum(proc_cpu(p.pid) for p, _ in processes) - cpu0
        redis_cpu = proc_cpu(redis.process.pid) - redis_cpu0  # type: ignore[union-attr]
        for process, _ in processes:  # SIGTERM: each worker writes its last counters
            process.send_signal(signal.SIGTERM)
        for process, _ in processes:
            process.wait(30)
        outcome = asyncio.run(delivered(redis.url))
        ok = outcome.get("delivered") == count and not outcome.get("bounced")
        if mode == "local":
            files = len(os.listdir(tmp / "mail" / "example.test" / "alice" / "new"))
            ok = ok and files == count
        if sink is not None:
            # smtp-sink -c writes "sess=N quit=N mesg=N\r" on every event
            out = (tmp / "sink.out").read_text(errors="replace")
            received = [int(m) for m in re.findall(r"mesg=(\d+)", out)]
            ok = ok and bool(received) and max(received) == count
        return {"mode": mode, "size": size, "workers": workers, "messages": count,
                "elapsed": elapsed, "enqueue_s": enqueued, "rate": count / elapsed,
                "worker_cpu": worker_cpu / elapsed, "redis_cpu": redis_cpu / elapsed,
                "ok": ok}  # fmt: skip
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        if sink is not None and sink.poll() is None:
            sink.kill()
            sink.wait()
        dns.stop()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="local,remote")
    parser.add_argument("--sizes", default="2k,100k")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--messages-small", type=int, default=5000)
    parser.add_argument("--messages-large", type=int, default=1000)
    parser.add_argument("--queue-workers", type=int, default=16, help="queue_workers per process")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--tmp", default=None, help="where maildirs and Redis data go")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", default=None, help="write each worker's cProfile here")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages_small, args.messages_large, args.runs = 500, 100, 1
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sizes = [int(s.rstrip("kK")) * KIB for s in args.sizes.split(",")]
    print(f"# worker bench {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, queue_workers={args.queue_workers}, "
          f"{args.runs} run(s) per cell", flush=True)  # fmt: skip
    print("| Mode | Size | Workers | Msgs | msgs/s median (range) | CPU workers / Redis | ok |")
    print("|---|---|---:|---:|---:|---:|---|", flush=True)
    failed = False
    for mode in args.modes.split(","):
        for size in sizes:
            count = args.messages_small if size < 64 * KIB else args.messages_large
            for workers in [int(w) for w in args.workers.split(",")]:
                runs = [run_cell(mode, size, workers, count, args) for _ in range(args.runs)]
                rates = [r["rate"] for r in runs]
                ok = all(r["ok"] for r in runs)
                failed |= not ok
                cpu = statistics.median(r["worker_cpu"] for r in runs)
                redis_cpu = statistics.median(r["redis_cpu"] for r in runs)
                print(f"| {mode} | {size // KIB} KiB | {workers} | {count} | "
                      f"**{statistics.median(rates):,.0f}** "
                      f"({min(rates):,.0f}-{max(rates):,.0f}) | "
                      f"{cpu:.0%} / {redis_cpu:.0%} | {'yes' if ok else 'NO'} |",
                      flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
