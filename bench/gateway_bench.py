"""SMTP gateway acceptance throughput: Postfix's `smtp-source` against `mailkube-gateway` (MX
listener, no TLS, one local recipient) with a private redis-server (AOF `appendfsync always`),
beside `smtp-sink` (the protocol ceiling) measured in the same run.

For every cell (sessions by message size) a fresh Redis and gateway are started, and every
gateway process must be listening before a warm-up and the timed runs begin; each message is a
new connection (EHLO, MAIL, RCPT, DATA, QUIT), as smtp-source does by default. The run checks
that the queue holds every message it accepted, samples the peak RSS of the gateway processes,
and reports the CPU time per message of the gateway processes and of Redis, and how busy the
whole machine was (on a shared machine, rates move with the neighbours; CPU per message moves
less). Email authentication (SPF, DKIM, DMARC) is off, as in the peers it is compared with:
this measures acceptance. The gateway's DNS is a loopback server: the client's reverse name
(client_rdns: record, the default) is client.bench.test, which resolves back, with long TTLs,
as a real resolver's cache would serve a returning client. Nothing leaves 127.0.0.1.

    .venv/bin/python bench/gateway_bench.py                         # full grid
    .venv/bin/python bench/gateway_bench.py --sessions 10 --sizes 2048 --processes 1,2 --runs 3
    .venv/bin/python bench/gateway_bench.py --serve --processes 2   # for peers-bench (external)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dns_server import DnsServer  # noqa: E402
from gateway_harness import http_status, serving_pids, wait_until  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from redis_servers import RedisServer  # noqa: E402

from mailkube_core.cli.devcert import ensure_self_signed  # noqa: E402
from mailkube_core.queue import QueueAdmin  # noqa: E402
from mailkube_core.routing import Domain, RoutingStore, RoutingTable, User  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
RECIPIENT = "rcpt@example.test"
#: the sender's domain for --auth-checks: smtp-source's MAIL FROM and From are sender@bench.test,
#: so SPF passes and DMARC passes aligned; long TTLs, as the gateway's cache would keep them
BENCH_ZONE = """
@       3600 IN SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 86400 3600
@       3600 IN NS  ns
ns      3600 IN A   127.0.0.1
@       3600 IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc  3600 IN TXT "v=DMARC1; p=reject"
client  3600 IN A   127.0.0.1
"""
#: the client's reverse name (the gateway looks it up for Received: and iprev)
REVERSE_ZONE = """
@       3600 IN SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 86400 3600
@       3600 IN NS  ns.bench.test.
1.0.0   3600 IN PTR client.bench.test.
"""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def tree(pid: int) -> list[int]:
    """A process and its children (the gateway starts `processes - 1` of them)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [pid, *(int(c) for c in children)]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def machine_ticks() -> tuple[int, int]:
    """(all, idle) jiffies of the whole machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


class RssSampler(threading.Thread):
    """Peak summed RSS of a process and its children, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stopped = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak = max(self.peak, _tree_rss(self.pid))


def _tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
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
    count = (await QueueAdmin(client).stats()).messages
    await client.aclose()
    return count


class Stack:
    """A private Redis (AOF always) and a gateway on it, every process listening."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        processes: int,
        dns: DnsServer,
        redis_config: dict[str, str] | None = None,
        auth_checks: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.processes = processes
        # as `make run` and the chart configure it (redis.aofRewriteMinSize)
        config = {"auto-aof-rewrite-min-size": "1gb", **(redis_config or {})}
        self.redis = RedisServer(tmp / f"redis-{name}", appendfsync="always", config=config).start()
        self.smtp_port, health_port, submission_port, submissions_port = free_ports(4)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
        env.update({
            "MAILKUBE_REDIS_URL": self.redis.url, "MAILKUBE_HOSTNAME": "mx.bench.test",
            "MAILKUBE_MX_LISTEN": f"127.0.0.1:{self.smtp_port}",
            "MAILKUBE_SUBMISSION_LISTEN": f"127.0.0.1:{submission_port}",
            "MAILKUBE_SUBMISSIONS_LISTEN": f"127.0.0.1:{submissions_port}",
            "MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{health_port}",
            "MAILKUBE_PROCESSES": str(processes), "MAILKUBE_LOG_LEVEL": "WARNING",
            # the peers check no SPF, DKIM or DMARC either: this measures acceptance
            # (--auth-checks turns them on, against BENCH_ZONE on a loopback DNS server)
            "MAILKUBE_INBOUND_AUTH_CHECKS": "true" if auth_checks else "false",
            # the benchmark sends far more than a real sender may
            "MAILKUBE_MAX_MESSAGES_PER_MINUTE": "10000000",
            "MAILKUBE_MAX_RECIPIENT_MESSAGES_PER_MINUTE": "10000000",
            "MAILKUBE_MAX_CONNECTIONS_PER_IP": "1000",
            "MAILKUBE_DNS_NAMESERVERS": dns.host, "MAILKUBE_DNS_PORT": str(dns.port),
        })  # fmt: skip
        if EVENT_LOOP:
            env["MAILKUBE_EVENT_LOOP"] = EVENT_LOOP
        env.update(extra_env or {})
        cert, key = tmp / "tls/cert.pem", tmp / "tls/key.pem"
        ensure_self_signed(cert, key)
        env.update({"MAILKUBE_TLS_CERT_FILE": str(cert), "MAILKUBE_TLS_KEY_FILE": str(key)})
        asyncio.run(setup_routing(self.redis.url))
        self.gateway = subprocess.Popen([sys.executable, "-m", "mailkube_gateway"], env=env)
        try:
            wait_until(
                lambda: http_status(f"http://127.0.0.1:{health_port}/readyz") == 200, 60, "gateway"
            )
            # the first process is ready before the others have imported everything: wait
            # for all, or the first ones measured are one process short and share the CPU
            # with the others' start-up
            wait_until(
                lambda: len(serving_pids(self.smtp_port, tree(self.gateway.pid))) == processes,
                60,
                "every gateway process",
            )
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        return tree(self.gateway.pid)

    @property
    def redis_pid(self) -> int:
        assert self.redis.process is not None
        return self.redis.process.pid

    def stop(self) -> None:
        self.gateway.terminate()
        self.gateway.wait(60)
        self.redis.stop()


def gateway_cell(
    tmp: Path,
    sessions: int,
    size: int,
    messages: int,
    processes: int,
    runs: int,
    warmup: int,
    dns: DnsServer,
    auth_checks: bool,
) -> dict[str, float]:
    stack = Stack(tmp, f"{sessions}-{size}-{processes}", processes, dns, auth_checks=auth_checks)
    try:
        if warmup:
            smtp_source(stack.smtp_port, sessions, warmup, 2048)
        sampler = RssSampler(stack.gateway.pid)
        sampler.start()
        rates, gateway_cpu, redis_cpu, busy = [], [], [], []
        for _ in range(runs):
            pids, redis_pid = stack.pids, [stack.redis_pid]
            cpu0, rcpu0, (all0, idle0) = cpu_seconds(pids), cpu_seconds(redis_pid), machine_ticks()
            rates.append(smtp_source(stack.smtp_port, sessions, messages, size))
            cpu1, rcpu1, (all1, idle1) = cpu_seconds(pids), cpu_seconds(redis_pid), machine_ticks()
            gateway_cpu.append((cpu1 - cpu0) / messages)
            redis_cpu.append((rcpu1 - rcpu0) / messages)
            busy.append(1 - (idle1 - idle0) / max(1, all1 - all0))
        sampler.stopped.set()
        sampler.join()
        held = asyncio.run(queued(stack.redis.url))
        expected = warmup + runs * messages
        if held != expected:
            raise SystemExit(f"gateway_bench: {expected} accepted but {held} queued")
        return {
            "rate": statistics.median(rates),
            "cpu": statistics.median(gateway_cpu),
            "redis": statistics.median(redis_cpu),
            "busy": statistics.median(busy),
            "rss": sampler.peak,
        }
    finally:
        stack.stop()


def sink_cell(sessions: int, size: int, messages: int, runs: int) -> float:
    (port,) = free_ports(1)
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
    sink = subprocess.Popen([SMTP_SINK, *user, f"127.0.0.1:{port}", "256"])
    try:
        wait_until(lambda: listening(port), 10, "smtp-sink")
        return statistics.median(smtp_source(port, sessions, messages, size) for _ in range(runs))
    finally:
        sink.terminate()
        sink.wait(10)


def serve(processes: int, dns: DnsServer, auth_checks: bool) -> None:
    """Start Redis and a gateway, print what peers-bench's `external` server needs, and run
    until SIGINT or SIGTERM. Nobody empties the queue between runs, so the AOF is never
    rewritten automatically (a rewrite forks and copies everything, in the middle of a run;
    peers-bench rewrites its own Redis only between cells)."""
    with tempfile.TemporaryDirectory(prefix="gwbench-") as tmp:
        config = {"auto-aof-rewrite-percentage": "0"}
        stack = Stack(
            Path(tmp), "serve", processes, dns, redis_config=config, auth_checks=auth_checks
        )
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        try:
            print(
                f"EXTERNAL_PORT={stack.smtp_port} EXTERNAL_PIDS={stack.gateway.pid} "
                f"EXTERNAL_REDIS_PID={stack.redis_pid} TO={RECIPIENT}",
                flush=True,
            )
            stop.wait()
        finally:
            stack.stop()


#: --event-loop: MAILKUBE_EVENT_LOOP of the gateways started (None: their default)
EVENT_LOOP: str | None = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,10,50")
    parser.add_argument("--sizes", default="2048,102400")
    parser.add_argument(
        "--processes", default="1,2", help="gateway processes (sharing the listening sockets)"
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=1, help="timed runs per cell (median)")
    parser.add_argument("--warmup", type=int, default=300, help="messages before timing")
    parser.add_argument("--serve", action="store_true", help="start one stack and wait")
    parser.add_argument(
        "--auth-checks",
        action="store_true",
        help="SPF, DKIM and DMARC checks on, against a loopback DNS server (bench.test: SPF "
        "pass for 127.0.0.1, DMARC p=reject; the messages are unsigned)",
    )
    parser.add_argument(
        "--event-loop", choices=["uvloop", "asyncio"], help="the gateway's (default: its own)"
    )
    args = parser.parse_args()
    global EVENT_LOOP
    EVENT_LOOP = args.event_loop
    processes = [int(p) for p in args.processes.split(",")]
    dns = DnsServer().start()
    dns.add_zone("bench.test", BENCH_ZONE)
    dns.add_zone("127.in-addr.arpa", REVERSE_ZONE)
    if args.serve:
        serve(processes[0], dns, args.auth_checks)
        return
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"gateway_bench: {tool} missing (`make bench` installs postfix)")
    print(f"command:  {' '.join([Path(sys.executable).name, *sys.argv])}")
    machine = platform.processor() or platform.machine()
    print(f"date:     {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; nproc {os.cpu_count()}; "
          f"{machine}; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"checks:   SPF, DKIM, DMARC {'on' if args.auth_checks else 'off'}")
    print("columns:  msg/s (median of runs), gateway and Redis CPU ms per message, machine busy")
    sessions = [int(s) for s in args.sessions.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    header = f"{'size':>7} {'sessions':>8} {'smtp-sink/s':>11}" + "".join(
        f" | x{p}: {'msg/s':>6} {'gw ms':>5} {'redis':>5} {'busy':>4} {'RSS':>6}" for p in processes
    )
    print(header)
    with tempfile.TemporaryDirectory(prefix="gwbench-") as tmp:
        for size in sizes:
            for count in sessions:
                messages = args.messages if size < 50000 else args.messages // 3
                sink = sink_cell(count, size, messages, args.runs)
                row = f"{size:>7} {count:>8} {sink:>11,.0f}"
                for p in processes:
                    cell = gateway_cell(
                        Path(tmp),
                        count,
                        size,
                        messages,
                        p,
                        args.runs,
                        args.warmup,
                        dns,
                        args.auth_checks,
                    )
                    row += (
                        f" | x{p}: {cell['rate']:>6,.0f} {cell['cpu'] * 1000:>5.2f}"
                        f" {cell['redis'] * 1000:>5.2f} {cell['busy']:>4.0%}"
                        f" {cell['rss'] / 2**20:>4.0f}Mi"
                    )
                print(row, flush=True)


if __name__ == "__main__":
    main()
