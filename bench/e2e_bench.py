"""End to end: messages per second from an SMTP client into the mailbox, Mailkube beside
Postfix in the same run, on the same cores.

Mailkube is the real local stack, as `make run` starts it but without rspamd: a private
redis-server (AOF `appendfsync always`), one `mailkube-gateway` (MX listener, email
authentication checks off, as the peers check nothing) and N `mailkube-worker` processes.
Postfix 3.7 is a private instance (bench/postfix_peer.py): smtpd → cleanup → qmgr →
virtual(8) into one Maildir (fsync per file), as peers-bench's `postfix-maildir`.

Load: Postfix's `smtp-source`, a new connection per message, S sessions, M messages of the
given size to one mailbox. The clock runs from smtp-source's start until the last message
is a file in the mailbox's `new/`; the run then checks that `new/` gained exactly M files.
Mode `remote`: the mail goes on to an `smtp-sink` (counted there): for Postfix through
relay_domains + a transport to the sink + smtp(8) (peers-bench's `postfix-relay`); for
Mailkube the same: `remote.test` is a domain it relays for (the routing table's
`inbound_relay`, next hop the sink), so gateway → remote lane → worker → sink. Mode
`forward`: the recipient is a local user with `forward_to` the remote address, so gateway →
local worker (a new message in the remote lane) → remote worker → the MX found by a loopback
DNS server: one more queue hop than Postfix's relay makes (the `remote` mode of the figures
before 2026-12-07 evening).

Each server's files go in a directory of their own, spread by the filesystem: on ext4 without
a journal (the root filesystem of the VM measured on 2026-12-07), creating a file scans every
inode of its block group freed in the last seconds or minutes, so Mailkube's maildir, placed
beside Postfix's queue, paid up to 0.7 ms per file for the queue files Postfix had just
deleted (see `spread`).

Reported per cell: msgs/s of each (median of the runs and the range), the ratio, and CPU ms
per message of the workers, the gateway, Redis and all of Postfix, and the workers' peak RSS.

    .venv/bin/python bench/e2e_bench.py                                  # the grid
    .venv/bin/python bench/e2e_bench.py --sessions 10 --sizes 2048 --runs 1
    .venv/bin/python bench/e2e_bench.py --modes remote --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_bench import (
    BENCH_ZONE,
    RECIPIENT,
    REVERSE_ZONE,
    SMTP_SINK,
    SMTP_SOURCE,
    DnsServer,
    Stack,
    cpu_seconds,
    free_ports,
    http_status,
    listening,
    wait_until,
)
from postfix_peer import Postfix
from redis.asyncio import Redis

from mailkube_core.mailbox import mailbox_dir
from mailkube_core.routing import Domain, InboundRelay, RoutingStore, RoutingTable, User

REMOTE_RECIPIENT = "rcpt@remote.test"
REMOTE_ZONE = """$TTL 3600
@   SOA ns hostmaster 1 3600 600 86400 3600
@   MX  10 mx
mx  A   127.0.0.1
"""


def smtp_source(port: int, sessions: int, messages: int, size: int, to: str) -> None:
    done = subprocess.run(
        [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-f", "sender@bench.test", "-t", to, f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"e2e_bench: smtp-source failed: {done.stderr.strip()[:300]}")


def count_files(directory: Path) -> Callable[[], int]:
    def count() -> int:
        try:
            return len(os.listdir(directory))
        except FileNotFoundError:
            return 0

    return count


class Sink:
    """`smtp-sink -c` (it prints "sess=N quit=N mesg=N" on every event) on a free port."""

    def __init__(self, tmp: Path) -> None:
        (self.port,) = free_ports(1)
        self.out = tmp / f"sink-{self.port}.out"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
        self.process = subprocess.Popen(
            [SMTP_SINK, *user, "-c", f"127.0.0.1:{self.port}", "1024"],
            stdout=self.out.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(lambda: listening(self.port), 10, "smtp-sink")

    def received(self) -> int:
        with self.out.open("rb") as f:
            f.seek(max(0, self.out.stat().st_size - 200))
            found = re.findall(rb"mesg=(\d+)", f.read())
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@dataclass
class Measured:
    rates: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)  # until smtp-source is done
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def add_cpu(self, name: str, seconds: float, messages: int) -> None:
        self.cpu.setdefault(name, []).append(seconds * 1000 / messages)

    def ms(self, name: str) -> float:
        return statistics.median(self.cpu.get(name, [0.0]))


def timed(
    port: int,
    sessions: int,
    messages: int,
    size: int,
    to: str,
    delivered: Callable[[], int],
    groups: dict[str, Callable[[], float]],
    out: Measured,
    timeout: float,
) -> None:
    """One run: smtp-source, then wait until `delivered` grew by `messages` exactly."""
    before = delivered()
    cpu0 = {name: seconds() for name, seconds in groups.items()}
    start = time.monotonic()
    smtp_source(port, sessions, messages, size, to)
    out.accepted.append(messages / (time.monotonic() - start))
    deadline = start + timeout
    while (now := delivered()) < before + messages:
        if time.monotonic() > deadline:
            raise SystemExit(f"e2e_bench: {now - before} of {messages} delivered in {timeout}s")
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    for name, seconds in groups.items():
        out.add_cpu(name, seconds() - cpu0[name], messages)
    if now != before + messages:
        raise SystemExit(f"e2e_bench: {now - before} delivered for {messages} sent")
    out.rates.append(messages / elapsed)


class Mailkube:
    """Redis + gateway (gateway_bench.Stack) and `workers` worker processes."""

    def __init__(self, tmp: Path, mode: str, workers: int, dns: DnsServer, args: argparse.Namespace
                 ) -> None:  # fmt: skip
        self.tmp = tmp
        self.sink = Sink(tmp) if mode != "local" else None
        self.stack = Stack(tmp, f"mk-{mode}", args.gateway_processes, dns)
        self.mail = tmp / f"mail-{mode}"
        if self.sink is not None:
            asyncio.run(self._remote_routing(mode, self.sink.port))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
        env.update({
            "MAILKUBE_REDIS_URL": self.stack.redis.url, "MAILKUBE_HOSTNAME": "bench.example.test",
            "MAILKUBE_MAIL_ROOT": str(self.mail), "MAILKUBE_LOG_LEVEL": "WARNING",
            "MAILKUBE_ROLE": "local" if mode == "local" else "all",
            "MAILKUBE_DNS_NAMESERVERS": dns.host, "MAILKUBE_DNS_PORT": str(dns.port),
        })  # fmt: skip
        if args.queue_workers:
            env["MAILKUBE_QUEUE_WORKERS"] = str(args.queue_workers)
        if args.worker_event_loop:
            env["MAILKUBE_EVENT_LOOP"] = args.worker_event_loop
        if self.sink is not None:
            env["MAILKUBE_SMTP_PORT"] = str(self.sink.port)
        self.workers: list[subprocess.Popen[bytes]] = []
        health = free_ports(workers)
        for n in range(workers):
            command = [sys.executable, "-m", "mailkube_worker"]
            if args.profile:
                command[1:1] = ["-m", "cProfile", "-o", str(Path(args.profile) / f"w{n}.prof")]
            self.workers.append(subprocess.Popen(command, env={
                **env, "HOSTNAME": f"bench-{n}",
                "MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{health[n]}"}))  # fmt: skip
        wait_until(
            lambda: all(http_status(f"http://127.0.0.1:{p}/readyz") == 200 for p in health),
            60,
            "every worker",
        )
        self.new = self.mail / mailbox_dir(RECIPIENT) / "new"

    async def _remote_routing(self, mode: str, sink_port: int) -> None:
        client = Redis.from_url(self.stack.redis.url)
        if mode == "forward":
            table = RoutingTable(
                domains=[Domain(name="example.test")],
                users=[User(address=RECIPIENT, forward_to=[REMOTE_RECIPIENT])],
            )
        else:  # remote.test relayed to the sink, as Postfix's relay_domains + transport
            hop = InboundRelay(host="127.0.0.1", port=sink_port)
            table = RoutingTable(
                domains=[Domain(name="example.test"),
                         Domain(name="remote.test", inbound_relay=hop)],
                users=[User(address=REMOTE_RECIPIENT)],
            )  # fmt: skip
        await RoutingStore(client).replace(table)
        await client.aclose()

    def delivered(self) -> int:
        return self.sink.received() if self.sink is not None else count_files(self.new)()

    def groups(self) -> dict[str, Callable[[], float]]:
        return {
            "workers": lambda: cpu_seconds([w.pid for w in self.workers]),
            "gateway": lambda: cpu_seconds(self.stack.pids),
            "redis": lambda: cpu_seconds([self.stack.redis_pid]),
        }

    def worker_rss(self) -> int:
        total = 0
        for worker in self.workers:
            for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total = max(total, int(line.split()[1]) * 1024)
        return total

    def stop(self) -> None:
        for worker in self.workers:
            worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        self.stack.stop()
        if self.sink is not None:
            self.sink.stop()


class PostfixPeer:
    def __init__(self, tmp: Path, mode: str) -> None:
        self.sink = Sink(tmp) if mode != "local" else None
        relay = self.sink.port if self.sink is not None else None
        self.postfix = Postfix(
            tmp / f"postfix-{mode}", "maildir" if mode == "local" else "relay", relay_port=relay
        )

    def delivered(self) -> int:
        return self.sink.received() if self.sink is not None else self.postfix.delivered()

    def cpu(self) -> float:
        """Postfix's live processes, plus those that exited (master reaps them: its cutime)."""
        fields = Path(f"/proc/{self.postfix.master}/stat").read_text().rsplit(")", 1)[1].split()
        reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        return cpu_seconds(self.postfix.pids) + reaped

    def stop(self) -> None:
        self.postfix.stop()
        if self.sink is not None:
            self.sink.stop()


def spread(directory: Path) -> None:
    """Mark `directory` the top of a hierarchy (ext4's TOPDIR flag, `chattr +T`), so the
    directories made in it (Postfix's, Mailkube's) land in different block groups. Without
    a journal, ext4 does not reuse an inode freed within the last 5 s (300 s while its table
    block is unwritten) and scans past each such inode of the group on every file it creates
    (fs/ext4/ialloc.c, recently_deleted()); in one group, Postfix's deleted queue files cost
    the next Mailkube run that scan on every maildir file, a cost neither server has on a
    journalled filesystem. Elsewhere (other filesystems) the flag is ignored or refused."""
    result = subprocess.run(["chattr", "+T", str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"note: chattr +T {directory}: {result.stderr.strip()}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="local", help="local, remote, forward")
    parser.add_argument("--sessions", default="10,50")
    parser.add_argument("--sizes", default="2048,102400")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--gateway-processes", type=int, default=1, help="MAILKUBE_PROCESSES")
    parser.add_argument("--queue-workers", type=int, default=0, help="each (0: the default)")
    parser.add_argument("--worker-event-loop", choices=["uvloop", "asyncio"],
                        help="the workers' MAILKUBE_EVENT_LOOP (default: theirs)")  # fmt: skip
    parser.add_argument("--messages", type=int, default=3000, help="per run at 2 KiB (÷3 large)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--no-postfix", action="store_true", help="Mailkube only")
    parser.add_argument("--profile", default=None, help="write each worker's cProfile here")
    parser.add_argument("--tmp", default=None, help="where maildirs and queues go")
    args = parser.parse_args()
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"e2e_bench: {tool} missing (`make bench` installs postfix)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date:    {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; commit {commit}; nproc "
          f"{os.cpu_count()}; {platform.processor() or platform.machine()}; "
          f"load {os.getloadavg()[0]:.1f}; workers {args.workers} x queue_workers "
          f"{args.queue_workers}; gateway processes {args.gateway_processes}")  # fmt: skip
    print(
        "| mode | size | sessions | msgs | Mailkube msgs/s | Postfix msgs/s | ratio | "
        "accepted msgs/s Mailkube / Postfix | CPU ms/msg workers / gateway / Redis | "
        "Postfix CPU ms/msg | worker RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    dns = DnsServer().start()
    dns.add_zone("remote.test", REMOTE_ZONE)
    dns.add_zone("bench.test", BENCH_ZONE)
    dns.add_zone("127.in-addr.arpa", REVERSE_ZONE)
    with tempfile.TemporaryDirectory(prefix="e2e-bench-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # Postfix's processes run as the postfix user
        spread(tmp)
        for mode in args.modes.split(","):
            to = REMOTE_RECIPIENT if mode == "remote" else RECIPIENT
            mailkube = Mailkube(tmp, mode, args.workers, dns, args)
            peer = None
            to_postfix = "rcpt@example.test" if mode == "local" else REMOTE_RECIPIENT
            try:
                peer = None if args.no_postfix else PostfixPeer(tmp, mode)
                if args.warmup:
                    for port, rcpt, delivered in [(mailkube.stack.smtp_port, to,
                                                   mailkube.delivered)] + (
                        [(peer.postfix.port, to_postfix, peer.delivered)] if peer else []
                    ):  # fmt: skip
                        timed(port, 10, args.warmup, 2048, rcpt, delivered, {}, Measured(),
                              args.timeout)  # fmt: skip
                for size in [int(s) for s in args.sizes.split(",")]:
                    messages = args.messages if size < 50000 else args.messages // 3
                    for sessions in [int(s) for s in args.sessions.split(",")]:
                        ours, theirs = Measured(), Measured()
                        rss = 0
                        for _ in range(args.runs):  # alternate, so drift hits both alike
                            if peer is not None:
                                timed(peer.postfix.port, sessions, messages, size, to_postfix,
                                      peer.delivered, {"postfix": peer.cpu},
                                      theirs, args.timeout)  # fmt: skip
                            timed(mailkube.stack.smtp_port, sessions, messages, size, to,
                                  mailkube.delivered, mailkube.groups(), ours,
                                  args.timeout)  # fmt: skip
                            rss = max(rss, mailkube.worker_rss())
                        row(mode, size, sessions, messages, ours, theirs, rss)
            finally:
                mailkube.stop()
                if peer is not None:
                    peer.stop()
    dns.stop()


def span(rates: list[float]) -> str:
    if not rates:
        return "-"
    if len(rates) == 1:
        return f"{rates[0]:,.0f}"
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"


def row(mode: str, size: int, sessions: int, messages: int, ours: Measured, theirs: Measured,
        rss: int) -> None:  # fmt: skip
    ratio = (
        f"{statistics.median(ours.rates) / statistics.median(theirs.rates):.2f}x"
        if theirs.rates
        else "-"
    )
    print(f"| {mode} | {size // 1024} KiB | {sessions} | {messages} | {span(ours.rates)} | "
          f"{span(theirs.rates)} | {ratio} | {statistics.median(ours.accepted):,.0f} / "
          f"{statistics.median(theirs.accepted) if theirs.accepted else 0:,.0f} | "
          f"{ours.ms('workers'):.2f} / {ours.ms('gateway'):.2f}"
          f" / {ours.ms('redis'):.2f} | {theirs.ms('postfix'):.2f} | "
          f"{rss / 2**20:.0f} MiB |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
