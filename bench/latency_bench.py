"""Transaction latency at a fixed concurrency: the gateway (MX, no TLS, email authentication
off, Redis AOF `always`) beside Postfix 3.7 discarding (bench/postfix_peer.py), driven in the
same run by the same client: N sessions, each a loop of new connection, EHLO, MAIL, RCPT,
DATA, QUIT, timed from connect to the answer after the message's end (the 250 that says it is
queued). Reports p50, p90, p99 and max per server, and the rate reached.

    .venv/bin/python bench/latency_bench.py                       # 50 sessions, 2 KiB
    .venv/bin/python bench/latency_bench.py --sessions 10 --size 102400 --messages 3000

The client is Python on uvloop, on the same cores as the servers, for both: its own cost is
in every figure alike, so the figures compare the servers, not absolute latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from dns_server import DnsServer  # noqa: E402
from gateway_bench import BENCH_ZONE, RECIPIENT, REVERSE_ZONE, Stack  # noqa: E402
from postfix_peer import Postfix  # noqa: E402


def body(size: int) -> bytes:
    head = f"From: sender@bench.test\r\nTo: {RECIPIENT}\r\nSubject: latency\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def transaction(port: int, message: bytes) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def reply() -> bytes:
            while (line := await reader.readline())[3:4] == b"-":
                pass
            return line

        if not (await reply()).startswith(b"220"):
            raise RuntimeError("no greeting")
        for command in (b"EHLO client.bench.test", b"MAIL FROM:<sender@bench.test>",
                        f"RCPT TO:<{RECIPIENT}>".encode(), b"DATA"):  # fmt: skip
            writer.write(command + b"\r\n")
            answer = await reply()
            if answer[:1] not in (b"2", b"3"):
                raise RuntimeError(f"{command!r}: {answer!r}")
        writer.write(message + b".\r\n")
        answer = await reply()
        elapsed = time.perf_counter() - started
        if not answer.startswith(b"250"):
            raise RuntimeError(f"end of data: {answer!r}")
        writer.write(b"QUIT\r\n")
        await reply()
        return elapsed
    finally:
        writer.close()


async def drive(port: int, sessions: int, messages: int, size: int) -> tuple[list[float], float]:
    message = body(size)
    left = messages
    times: list[float] = []

    async def session() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            times.append(await transaction(port, message))

    started = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(sessions)))
    return times, messages / (time.perf_counter() - started)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(name: str, port: int, args: argparse.Namespace) -> str:
    uvloop.run(drive(port, args.sessions, args.warmup, args.size))
    times, rate = uvloop.run(drive(port, args.sessions, args.messages, args.size))
    ms = [t * 1000 for t in times]
    return (
        f"{name:<10} {rate:>7,.0f} {statistics.median(ms):>7.1f} {percentile(ms, 0.9):>7.1f} "
        f"{percentile(ms, 0.99):>7.1f} {max(ms):>7.1f}"
    )


def commit() -> str:
    result = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio"])
    args = parser.parse_args()
    print(f"command:  {' '.join([Path(sys.executable).name, *sys.argv])}")
    load = os.getloadavg()[0]
    print(f"date:     {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; commit {commit()}; "
          f"nproc {os.cpu_count()}; {platform.machine()}; load {load:.1f}")  # fmt: skip
    print(f"cell:     {args.sessions} sessions, {args.size} bytes, {args.messages} messages")
    print(f"{'server':<10} {'msg/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    dns = DnsServer().start()
    dns.add_zone("bench.test", BENCH_ZONE)
    dns.add_zone("127.in-addr.arpa", REVERSE_ZONE)
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        Path(tmp).chmod(0o755)  # Postfix's processes run as the postfix user
        extra = {"MAILKUBE_EVENT_LOOP": args.event_loop} if args.event_loop else {}
        stack = Stack(Path(tmp), "gateway", 1, dns, extra_env=extra)
        try:
            print(measure("mailkube", stack.smtp_port, args), flush=True)
        finally:
            stack.stop()
        postfix = Postfix(Path(tmp) / "postfix", "discard")
        try:
            print(measure("postfix", postfix.port, args), flush=True)
        finally:
            postfix.stop()


if __name__ == "__main__":
    main()
