"""Memory per idle SMTP connection: one gateway process (MX listener, no TLS) with a private
redis-server, N client connections opened and greeted (and, with --ehlo, past EHLO), held
idle, and the gateway's RSS read from /proc before and after. Reports RSS per connection and
checks that every connection was greeted and that the gateway still takes a message with all
of them open.

    .venv/bin/python bench/idle_connections.py                    # 10,000 connections
    .venv/bin/python bench/idle_connections.py --connections 2000 --ehlo --event-loop asyncio

The client side needs a descriptor per connection too: the script raises its own open-file
limit to the hard limit, and refuses to start when that is too low.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gateway_harness import apply_routing, free_port, http_status, make_tls  # noqa: E402
from redis_servers import RedisServer  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def commit() -> str:
    result = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.stdout.strip() or "unknown"


async def open_idle(port: int, count: int, ehlo: bool) -> list[asyncio.StreamWriter]:
    """Open `count` connections, 200 at a time; each has read its greeting (and its EHLO
    answer)."""
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await reader.readline()
        if not greeting.startswith(b"220 "):
            raise RuntimeError(f"no greeting: {greeting!r}")
        if ehlo:
            writer.write(b"EHLO idle.bench.test\r\n")
            while not (line := await reader.readline()).startswith(b"250 "):
                if not line.startswith(b"250-"):
                    raise RuntimeError(f"EHLO: {line!r}")
        writers.append(writer)

    for start in range(0, count, 200):
        await asyncio.gather(*(one() for _ in range(min(200, count - start))))
    return writers


async def one_message(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [b"EHLO busy.bench.test", b"MAIL FROM:<a@remote.test>",
             b"RCPT TO:<alice@example.test>", b"DATA"]  # fmt: skip
    await reader.readline()
    reply = b""
    for line in lines:
        writer.write(line + b"\r\n")
        while (reply := await reader.readline())[3:4] == b"-":
            pass
    writer.write(b"From: a@remote.test\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    reply = await reader.readline()
    writer.close()
    return reply.decode().strip()


async def run(args: argparse.Namespace, tmp: Path) -> None:
    redis = RedisServer(tmp / "redis", appendfsync="everysec").start()
    try:
        await apply_routing(redis.url)
        tls = make_tls(tmp / "tls")
        port, health = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
        env.update({
            "MAILKUBE_REDIS_URL": redis.url, "MAILKUBE_HOSTNAME": "mx.bench.test",
            "MAILKUBE_MX_LISTEN": f"127.0.0.1:{port}",
            "MAILKUBE_SUBMISSION_LISTEN": f"127.0.0.1:{free_port()}",
            "MAILKUBE_SUBMISSIONS_LISTEN": f"127.0.0.1:{free_port()}",
            "MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{health}",
            "MAILKUBE_TLS_CERT_FILE": str(tls.cert_file),
            "MAILKUBE_TLS_KEY_FILE": str(tls.key_file),
            "MAILKUBE_LOG_LEVEL": "WARNING", "MAILKUBE_INBOUND_AUTH_CHECKS": "false",
            "MAILKUBE_MAX_CONNECTIONS": str(args.connections + 100),
            "MAILKUBE_MAX_CONNECTIONS_PER_IP": str(args.connections + 100),
            "MAILKUBE_READ_TIMEOUT": "10m", "MAILKUBE_CLIENT_RDNS": "off",
            "MAILKUBE_GREET_PAUSE": "0s", "MAILKUBE_DNSBL_ZONES": "",
        })  # fmt: skip
        if args.event_loop:
            env["MAILKUBE_EVENT_LOOP"] = args.event_loop
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailkube_gateway", env=env
        )
        try:
            deadline = time.monotonic() + 30
            while http_status(f"http://127.0.0.1:{health}/readyz") != 200:
                if time.monotonic() > deadline or gateway.returncode is not None:
                    raise SystemExit("idle_connections: the gateway did not get ready")
                await asyncio.sleep(0.1)
            # one message first: every lazy import and cache of a transaction is in
            warm = await one_message(port)
            before = rss_kib(gateway.pid)
            started = time.monotonic()
            writers = await open_idle(port, args.connections, args.ehlo)
            opened = time.monotonic() - started
            await asyncio.sleep(1)  # the leases' Redis answers arrive (a measurement, not a test)
            after = rss_kib(gateway.pid)
            busy = await one_message(port)
            per = (after - before) / args.connections
            print(f"command:  {' '.join([Path(sys.executable).name, *sys.argv])}")
            print(f"date:     {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; commit {commit()}; "
                  f"nproc {os.cpu_count()}; {platform.machine()}")  # fmt: skip
            print(f"loop:     {args.event_loop or 'default'}; ehlo: {args.ehlo}")
            print(f"opened:   {len(writers):,} connections in {opened:.1f}s, all greeted")
            print(f"RSS:      {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after: "
                  f"{per:.1f} KiB per idle connection")  # fmt: skip
            print(f"message:  {warm[:40]} / with all open: {busy[:40]}")
            for writer in writers:
                writer.close()
        finally:
            gateway.terminate()
            await asyncio.wait_for(gateway.wait(), 30)
    finally:
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--ehlo", action="store_true", help="send EHLO on each first")
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio"])
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.connections + 200:
        raise SystemExit(f"idle_connections: the open-file hard limit {hard} is too low")
    with tempfile.TemporaryDirectory(prefix="idle-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
