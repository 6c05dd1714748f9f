"""Acceptance with content scanning: the gateway asking rspamd (POST /checkv2) beside Postfix
asking the same rspamd as a before-queue milter (`smtpd_milters`, rspamd's proxy worker in
milter mode scanning by itself, as rspamd's quick start sets it up), and the gateway without
rspamd, in one run, on this machine.

Load: Postfix's `smtp-source`, a new connection per message, one local recipient. Postfix
discards what it accepts (its queue file is fsynced before the 250); the gateway queues into
a private Redis with AOF `appendfsync always`. Neither checks SPF/DKIM/DMARC. The gateway's
reverse-DNS lookup of 127.0.0.1 goes to a private unbound on loopback that has the PTR and
the name (Postfix finds 127.0.0.1's name in /etc/hosts) and answers NXDOMAIN from memory for
everything else. One rspamd serves both, its DNS on the same unbound, its Redis a private
one; `--rspamd-workers` normal workers (and as many proxy workers for Postfix). rspamd's
`greylist` action is off: smtp-source's messages (no Date, Message-ID or Subject) score 5.4,
where rspamd advises greylisting, which the gateway would carry out and Postfix's milter
ignores.

Per cell and server: accepted msg/s (median of --runs), CPU ms per message of the MTA (the
gateway processes, or every Postfix process), of its Redis, and of rspamd (all its
processes), and how busy the machine was. "our side" is what asking rspamd costs the
gateway: its CPU per message asking a stub that answers at once with a recorded rspamd answer
("gateway+stub", at the rate of the gateway alone, so batching is alike) minus its CPU per
message without rspamd. At fewer messages per second the gateway batches less and every
message costs it more, so `--matched` also finds the session count at which the gateway alone
runs at the stub's rate ("gateway xN") and gives the difference at the same rate. "ratio" is
gateway+rspamd's rate over postfix+rspamd's.

    .venv/bin/python bench/spam_bench.py                               # 2 KiB, 100 KiB x 10, 50
    .venv/bin/python bench/spam_bench.py --sizes 2048 --sessions 10 --runs 1 --messages 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import dns.exception  # noqa: E402
import dns.resolver  # noqa: E402
from gateway_bench import (  # noqa: E402
    SMTP_SOURCE,
    Stack,
    cpu_seconds,
    free_ports,
    listening,
    machine_ticks,
    queued,
    smtp_source,
    tree,
)
from gateway_harness import wait_until  # noqa: E402
from postfix_peer import POSTFIX, Postfix  # noqa: E402
from redis_servers import RedisServer  # noqa: E402

from mailkube_core.cli.rspamd_local import LocalRspamd  # noqa: E402

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
UNBOUND_CONF = """\
server:
  interface: 127.0.0.1
  port: {port}
  do-ip6: no
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{directory}"
  pidfile: "{directory}/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  # everything but the names below: NXDOMAIN from memory, nothing leaves the machine
  local-zone: "." static
  local-data: "client.bench.test. 3600 IN A 127.0.0.1"
  local-data-ptr: "127.0.0.1 3600 client.bench.test."
remote-control:
  control-enable: no
"""


class Unbound:
    """A private unbound on loopback answering from memory: 127.0.0.1's reverse name (which
    resolves back) and NXDOMAIN for the rest, at C speed, so that neither rspamd's lookups
    (DNS lists, sender domains) nor the gateway's wait on a resolver."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        (self.port,) = free_ports(1)
        config = directory / "unbound.conf"
        config.write_text(UNBOUND_CONF.format(port=self.port, directory=directory))
        self.process = subprocess.Popen([UNBOUND, "-d", "-c", str(config)])
        wait_until(lambda: _answers(self.port), 20, "unbound")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _answers(port: int) -> bool:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], port, 0.5
    try:
        resolver.resolve("client.bench.test", "A")
    except dns.exception.DNSException:
        return False
    return True


class StubRspamd:
    """rspamd's answer without rspamd: a process that reads each request and answers with
    `answer` (a real rspamd answer, recorded), closing the connection as rspamd does. With
    it the gateway runs as fast as without rspamd, so the difference in its CPU per message
    is what asking rspamd costs it, not a slower rate's lesser batching."""

    def __init__(self, answer: bytes, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "answer.json"
        path.write_bytes(answer)
        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--stub", str(self.port), str(path)]
        )
        wait_until(lambda: listening(self.port), 20, "stub rspamd")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def serve_stub(port: int, answer_file: Path) -> None:
    body = answer_file.read_bytes()
    reply = (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: rspamd/3.4\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.received = bytearray()

        def data_received(self, data: bytes) -> None:
            self.received += data
            head, separator, rest = bytes(self.received).partition(b"\r\n\r\n")
            if not separator:
                return
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))  # fmt: skip
            if len(rest) >= length:
                self.transport.write(reply)  # type: ignore[attr-defined]
                self.transport.close()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Answer, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    asyncio.run(run())


def recorded_answer(rspamd: LocalRspamd, size: int) -> bytes:
    """rspamd's answer to a message like smtp-source's of `size` bytes."""
    body = b"From: <sender@bench.test>\r\nTo: <rcpt@example.test>\r\n\r\n"
    body += b"La de da de da 1.\r\n" * max(1, size // 19)
    request = urllib.request.Request(
        f"{rspamd.url}/checkv2", data=body,
        headers={"IP": "127.0.0.1", "From": "sender@bench.test", "Rcpt": "rcpt@example.test"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


@dataclass
class Cell:
    rate: float
    mta_cpu: float
    redis_cpu: float
    rspamd_cpu: float
    busy: float


def measure(
    port: int,
    sessions: int,
    size: int,
    messages: int,
    runs: int,
    mta: Callable[[], list[int]],
    redis: list[int],
    rspamd: list[int],
) -> Cell:
    rates, mta_cpu, redis_cpu, rspamd_cpu, busy = [], [], [], [], []
    for _ in range(runs):
        before = (cpu_seconds(mta()), cpu_seconds(redis), cpu_seconds(rspamd), machine_ticks())
        rates.append(smtp_source(port, sessions, messages, size))
        after = (cpu_seconds(mta()), cpu_seconds(redis), cpu_seconds(rspamd), machine_ticks())
        mta_cpu.append((after[0] - before[0]) / messages)
        redis_cpu.append((after[1] - before[1]) / messages)
        rspamd_cpu.append((after[2] - before[2]) / messages)
        (all0, idle0), (all1, idle1) = before[3], after[3]
        busy.append(1 - (idle1 - idle0) / max(1, all1 - all0))
    median = statistics.median
    return Cell(median(rates), median(mta_cpu), median(redis_cpu), median(rspamd_cpu),
                median(busy))  # fmt: skip


def gateway_cell(
    tmp: Path, name: str, rspamd: LocalRspamd | StubRspamd | None, dns: Unbound,
    args: argparse.Namespace, sessions: int, size: int, messages: int,
) -> Cell:  # fmt: skip
    env = {}
    if rspamd is not None:
        env.update({"MAILKUBE_RSPAMD_URL": rspamd.url, "MAILKUBE_SPAM_POLICY": "reject"})
    stack = Stack(tmp, name, 1, dns, extra_env=env)
    try:
        if args.warmup:
            smtp_source(stack.smtp_port, sessions, args.warmup, 2048)
        real = isinstance(rspamd, LocalRspamd) and rspamd.process is not None
        rspamd_pids = tree(rspamd.process.pid) if real else []  # type: ignore[union-attr]
        cell = measure(stack.smtp_port, sessions, size, messages, args.runs,
                       lambda: stack.pids, [stack.redis_pid], rspamd_pids)  # fmt: skip
        held = asyncio.run(queued(stack.redis.url))
        expected = args.warmup + args.runs * messages
        if held != expected:
            raise SystemExit(f"spam_bench: {expected} accepted but {held} queued")
        return cell
    finally:
        stack.stop()


def postfix_cell(
    tmp: Path, rspamd: LocalRspamd, args: argparse.Namespace,
    sessions: int, size: int, messages: int,
) -> Cell:  # fmt: skip
    postfix = Postfix(tmp / f"postfix-{sessions}-{size}", "discard", milter_port=rspamd.proxy_port)
    try:
        if args.warmup:
            smtp_source(postfix.port, sessions, args.warmup, 2048)
        assert rspamd.process is not None
        cell = measure(postfix.port, sessions, size, messages, args.runs,
                       lambda: postfix.pids, [], tree(rspamd.process.pid))  # fmt: skip
        expected = args.warmup + args.runs * messages
        deadline = time.monotonic() + 120
        while postfix.discarded() < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        if postfix.discarded() != expected:
            raise SystemExit(f"spam_bench: {expected} accepted, {postfix.discarded()} discarded")
        return cell
    finally:
        postfix.stop()


def matched_rate(
    tmp: Path, dns: Unbound, args: argparse.Namespace, sessions: int, size: int, messages: int,
    rate: float,
) -> tuple[int, Cell] | None:  # fmt: skip
    """The gateway without rspamd, with fewer sessions, at the rate closest to `rate`: its CPU
    per message there is what the gateway with a stub rspamd compares with, batching alike."""
    best: tuple[int, Cell] | None = None
    for count in range(1, sessions):
        name = f"matched-{sessions}-{count}-{size}"
        cell = gateway_cell(tmp, name, None, dns, args, count, size, messages)
        if best is None or abs(cell.rate - rate) < abs(best[1].rate - rate):
            best = (count, cell)
        if cell.rate >= rate:
            break
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="10,50")
    parser.add_argument("--sizes", default="2048,102400")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument("--warmup", type=int, default=200, help="messages before timing")
    parser.add_argument("--rspamd-workers", type=int, default=2)
    parser.add_argument(
        "--matched", action="store_true",
        help="also run the gateway alone with fewer sessions, at the stub's rate, and give "
        "the stub's extra CPU per message at the same rate",
    )  # fmt: skip
    parser.add_argument("--stub", nargs=2, metavar=("PORT", "ANSWER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub:
        serve_stub(int(args.stub[0]), Path(args.stub[1]))
        return
    for tool in (SMTP_SOURCE, POSTFIX, UNBOUND):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"spam_bench: {tool} missing (`make bench` installs it)")
    if os.geteuid() != 0:
        raise SystemExit("spam_bench: run as root (a private Postfix instance needs it)")
    print(f"command:  {' '.join([Path(sys.executable).name, *sys.argv])}")
    machine = platform.processor() or platform.machine()
    print(f"date:     {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; nproc {os.cpu_count()}; "
          f"{machine}; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(
        f"rspamd:   {args.rspamd_workers} normal workers (gateway), as many proxy workers "
        "scanning by themselves (Postfix's milter)"
    )
    print("columns:  msg/s (median), CPU ms per message: MTA, its Redis, rspamd; machine busy")
    with tempfile.TemporaryDirectory(prefix="spambench-") as name:
        tmp = Path(name)
        tmp.chmod(0o755)  # Postfix's processes run as the postfix user
        dns = Unbound(tmp / "unbound")
        rspamd_redis = RedisServer(tmp / "rspamd-redis", appendfsync="everysec").start()
        normal, controller, proxy = free_ports(3)
        rspamd = LocalRspamd(
            tmp / "rspamd", normal_port=normal, controller_port=controller, proxy_port=proxy,
            redis_url=rspamd_redis.url, dns=f"{dns.host}:{dns.port}",
            workers=args.rspamd_workers, proxy_self_scan=True, greylist_action=False,
        )  # fmt: skip
        rspamd.start()
        try:
            rspamd.wait_ready()
            header = (f"{'size':>7} {'sess':>4} | {'server':<16} {'msg/s':>6} {'MTA':>5} "
                      f"{'redis':>5} {'rspamd':>6} {'busy':>4} | ratio  our side")  # fmt: skip
            print(header)
            for size in (int(s) for s in args.sizes.split(",")):
                for sessions in (int(s) for s in args.sessions.split(",")):
                    messages = args.messages if size < 50000 else args.messages // 3
                    stub = StubRspamd(recorded_answer(rspamd, size), tmp / f"stub-{size}")
                    try:
                        stubbed = gateway_cell(tmp, f"stub-{sessions}-{size}", stub, dns,
                                               args, sessions, size, messages)  # fmt: skip
                    finally:
                        stub.stop()
                    cells = {
                        "gateway": gateway_cell(tmp, f"plain-{sessions}-{size}", None, dns,
                                                args, sessions, size, messages),
                        "gateway+stub": stubbed,
                        "gateway+rspamd": gateway_cell(tmp, f"spam-{sessions}-{size}", rspamd,
                                                       dns, args, sessions, size, messages),
                        "postfix+rspamd": postfix_cell(tmp, rspamd, args, sessions, size,
                                                       messages),
                    }  # fmt: skip
                    if args.matched:
                        # the gateway alone at about the stub's rate: fewer sessions
                        found = matched_rate(tmp, dns, args, sessions, size, messages,
                                             stubbed.rate)  # fmt: skip
                        if found is not None:
                            cells[f"gateway x{found[0]}"] = found[1]
                    ours, theirs = cells["gateway+rspamd"], cells["postfix+rspamd"]
                    extra = stubbed.mta_cpu - cells["gateway"].mta_cpu
                    for server, cell in cells.items():
                        tail = ""
                        if server.startswith("gateway x"):
                            same_rate = (stubbed.mta_cpu - cell.mta_cpu) * 1000
                            tail = f" |        {same_rate:+.2f} ms (same rate)"
                        if server == "gateway+rspamd":
                            tail = f" | {ours.rate / theirs.rate:>5.2f}  {extra * 1000:+.2f} ms"
                        print(
                            f"{size:>7} {sessions:>4} | {server:<16} {cell.rate:>6,.0f} "
                            f"{cell.mta_cpu * 1000:>5.2f} {cell.redis_cpu * 1000:>5.2f} "
                            f"{cell.rspamd_cpu * 1000:>6.2f} {cell.busy:>4.0%}{tail}",
                            flush=True,
                        )
        finally:
            rspamd.stop()
            rspamd_redis.stop()
            dns.stop()


if __name__ == "__main__":
    main()
