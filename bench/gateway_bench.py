"""SMTP gateway acceptance throughput: Postfix's `smtp-source` against `mailkube-gateway` (MX
listener, no TLS, one local recipient) with a private redis-server (AOF `appendfsync always`),
beside `smtp-sink` (the protocol ceiling) measured in the same run.

For every cell (sessions by message size) a fresh Redis and gateway are started; each message
is a new connection (EHLO, MAIL, RCPT, DATA, QUIT), as smtp-source does by default. The run
checks that the queue holds every message it accepted, and samples the peak RSS of the gateway
processes. Nothing leaves 127.0.0.1.

    .venv/bin/python bench/gateway_bench.py                         # full grid
    .venv/bin/python bench/gateway_bench.py --sessions 10 --sizes 2048 --processes 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from redis.asyncio import Redis  # noqa: E402
from redis_servers import RedisServer  # noqa: E402

from mailkube_core.cli.devcert import ensure_self_signed  # noqa: E402
from mailkube_core.queue import Queue  # noqa: E402
from mailkube_core.routing import Domain, RoutingStore, RoutingTable, User  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
RECIPIENT = "rcpt@example.test"


def free_ports(count: int) -> list[int]:
    """Distinct free ports: the sockets stay open until all are picked."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"gateway_bench: {what} not ready within {timeout:.0f}s")
        time.sleep(0.05)


def http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RssSampler(threading.Thread):
    """Peak summed RSS of a process and its children, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stopped = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak = max(self.peak, _tree_rss(self.pid))


def _tree_rss(pid: int) -> int:
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        return 0
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def smtp_source(port: int, sessions: int, messages: int, size: int) -> float:
    """Accepted messages per second; exits on any smtp-source failure."""
    start = time.monotonic()
    result = subprocess.run(
        [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-f", "sender@bench.test", "-t", RECIPIENT, f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"gateway_bench: smtp-source failed: {result.stderr.strip()[:300]}")
    return messages / elapsed


async def setup_routing(url: str) -> None:
    client = Redis.from_url(url)
    table = RoutingTable(domains=[Domain(name="example.test")], users=[User(address=RECIPIENT)])
    await RoutingStore(client).replace(table)
    await client.aclose()


async def queued(url: str) -> int:
    client = Redis.from_url(url)
    count = (await Queue(client).stats()).messages
    await client.aclose()
    return count


def gateway_cell(tmp: Path, sessions: int, size: int, messages: int, processes: int) -> dict:
    redis = RedisServer(tmp / f"redis-{sessions}-{size}-{processes}", appendfsync="always").start()
    smtp_port, health_port, submission_port, submissions_port = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
    env.update({
        "MAILKUBE_REDIS_URL": redis.url, "MAILKUBE_HOSTNAME": "mx.bench.test",
        "MAILKUBE_MX_LISTEN": f"127.0.0.1:{smtp_port}",
        "MAILKUBE_SUBMISSION_LISTEN": f"127.0.0.1:{submission_port}",
        "MAILKUBE_SUBMISSIONS_LISTEN": f"127.0.0.1:{submissions_port}",
        "MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{health_port}",
        "MAILKUBE_PROCESSES": str(processes), "MAILKUBE_LOG_LEVEL": "WARNING",
        # the benchmark sends far more than a real sender may
        "MAILKUBE_MAX_MESSAGES_PER_MINUTE": "10000000",
        "MAILKUBE_MAX_RECIPIENT_MESSAGES_PER_MINUTE": "10000000",
        "MAILKUBE_MAX_CONNECTIONS_PER_IP": "1000",
    })  # fmt: skip
    cert, key = tmp / "tls/cert.pem", tmp / "tls/key.pem"
    ensure_self_signed(cert, key)
    env.update({"MAILKUBE_TLS_CERT_FILE": str(cert), "MAILKUBE_TLS_KEY_FILE": str(key)})
    asyncio.run(setup_routing(redis.url))
    gateway = subprocess.Popen([sys.executable, "-m", "mailkube_gateway"], env=env)
    try:
        wait_until(lambda: http_ok(health_port), 30, "gateway")
        sampler = RssSampler(gateway.pid)
        sampler.start()
        rate = smtp_source(smtp_port, sessions, messages, size)
        sampler.stopped.set()
        sampler.join()
        held = asyncio.run(queued(redis.url))
        if held != messages:
            raise SystemExit(f"gateway_bench: {messages} accepted but {held} queued")
        return {"rate": rate, "rss": sampler.peak}
    finally:
        gateway.terminate()
        gateway.wait(30)
        redis.stop()


def sink_cell(sessions: int, size: int, messages: int) -> float:
    (port,) = free_ports(1)
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
    sink = subprocess.Popen([SMTP_SINK, *user, f"127.0.0.1:{port}", "256"])
    try:
        wait_until(lambda: listening(port), 10, "smtp-sink")
        return smtp_source(port, sessions, messages, size)
    finally:
        sink.terminate()
        sink.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,10,50")
    parser.add_argument("--sizes", default="2048,102400")
    parser.add_argument("--processes", default="1,2", help="gateway processes (SO_REUSEPORT)")
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"gateway_bench: {tool} missing (`make bench` installs postfix)")
    print(f"command:  {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date:     {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; nproc {os.cpu_count()}; "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    sessions = [int(s) for s in args.sessions.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    processes = [int(p) for p in args.processes.split(",")]
    header = f"{'size':>7} {'sessions':>8} {'smtp-sink/s':>11}" + "".join(
        f" {f'gateway x{p}/s':>13} {f'RSS x{p}':>9}" for p in processes
    )
    print(header)
    with tempfile.TemporaryDirectory(prefix="gwbench-") as tmp:
        for size in sizes:
            for count in sessions:
                messages = args.messages if size < 50000 else args.messages // 3
                row = f"{size:>7} {count:>8} {sink_cell(count, size, messages):>11,.0f}"
                for p in processes:
                    cell = gateway_cell(Path(tmp), count, size, messages, p)
                    row += f" {cell['rate']:>13,.0f} {cell['rss'] / 2**20:>7.0f}Mi"
                print(row, flush=True)


if __name__ == "__main__":
    main()
