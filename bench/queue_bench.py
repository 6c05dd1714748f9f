"""Queue throughput on this machine: enqueue, then claim + record + settle, against a private
redis-server (docs/architecture.md "Queue").

For every AOF mode (`appendfsync always` / `everysec`) and message size, one run is one child
process of this script that starts its own redis-server on a free loopback port (never 6379;
tests/redis_servers.py) with its data dir in a temp dir, and measures:

- enqueue: N messages from C asyncio tasks sharing one client (`Queue.enqueue`, one recipient);
- claim+settle: W consumer tasks, each looping claim(count=16, block=None) -> record a
  delivered result for every recipient -> settle (or ack, --finish ack), until the queue is empty;
- Redis used_memory / RSS and the AOF size after the enqueue phase, CPU of both processes per
  phase, and the client's peak RSS (getrusage; a child per run, so the peak is that run's own).

    .venv/bin/python bench/queue_bench.py            # full run, a table on stdout
    .venv/bin/python bench/queue_bench.py --quick    # small run, a few seconds
    .venv/bin/python bench/queue_bench.py --json     # machine-readable, on stdout
    .venv/bin/python bench/queue_bench.py --json results.json   # the table, and JSON to a file
    .venv/bin/python bench/queue_bench.py --profile --runs 1    # where the client's time goes

Everything is bounded: a fixed message count, a deadline per phase and per child, and the
redis-server dies with its child. The temp dirs are removed after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from redis_servers import RedisServer  # noqa: E402

from mailkube_core.queue import Queue, QueueAdmin  # noqa: E402
from mailkube_core.queue.envelope import (  # noqa: E402
    Envelope,
    Recipient,
    RecipientResult,
    RecipientStatus,
)
from mailkube_core.redis_client import connect_redis  # noqa: E402
from mailkube_core.settings import CommonSettings  # noqa: E402

KIB = 1024
DEFAULT_MESSAGES = {2 * KIB: 20000, 100 * KIB: 5000}
QUICK_MESSAGES = {2 * KIB: 2000, 100 * KIB: 500}
TARGET = (2 * KIB, "always", 3000.0)  # enqueue of a 2 KiB message, AOF always, msgs/s
LANE = "local"
PREFIX = "bench"


# --- one run, in a child process ----------------------------------------------------------


def make_body(size: int) -> bytes:
    """An RFC 5322 message of exactly `size` bytes: headers, then base64 of random bytes (like
    an attachment), so the RDB preamble of a rewritten AOF cannot compress it away."""
    head = (
        b"From: Bench <bench@example.org>\r\nTo: <rcpt@example.org>\r\n"
        b"Subject: queue bench\r\nMessage-ID: <bench@example.org>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
    )
    encoded = base64.encodebytes(random.Random(size).randbytes(size)).replace(b"\n", b"\r\n")
    return (head + encoded)[:size]


def make_envelope(recipients: int) -> Envelope:
    return Envelope(
        mail_from="sender@example.org",
        recipients=[Recipient(address=f"rcpt{i}@example.org") for i in range(recipients)],
        client_address="192.0.2.10",
        client_helo="client.example.org",
        listener="mx",
        trace_context={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def redis_cpu(client: Any) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def aof_bytes(data_dir: Path) -> int:
    """Bytes of every AOF file (Redis 7 keeps base + incr files in appendonlydir/)."""
    return sum(p.stat().st_size for p in data_dir.rglob("appendonly*") if p.is_file())


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def enqueue_phase(
    queue: Queue, envelope: Envelope, body: bytes, count: int, concurrency: int, deadline: float
) -> tuple[float, list[float]]:
    """`count` enqueues from `concurrency` tasks; (seconds, per-call latencies)."""
    remaining = count
    latencies: list[float] = []

    async def producer() -> None:
        nonlocal remaining
        while remaining > 0:
            if time.monotonic() > deadline:
                raise TimeoutError("enqueue phase passed its deadline")
            remaining -= 1
            started = time.perf_counter()
            await queue.enqueue(envelope, body, is_local=lambda _address: True)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def drain_phase(
    queue: Queue, workers: int, batch: int, finish: str, deadline: float
) -> tuple[float, int]:
    """`workers` consumers claim, record every recipient delivered, settle/ack, until a full
    round over the partitions finds nothing new; (seconds, messages done)."""
    done = 0

    async def worker(number: int) -> None:
        nonlocal done
        name = f"bench-{number}"
        partitions = queue.partitions
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("claim phase passed its deadline")
            found = 0
            for step in range(partitions):
                partition = (number + step) % partitions
                claimed = await queue.claim(name, LANE, partition, count=batch, block=None)
                found += len(claimed)
                for item in claimed:
                    delivered = RecipientResult(
                        status=RecipientStatus.DELIVERED,
                        enhanced_code="2.0.0",
                        smtp_code=250,
                        diagnostic="delivered to maildir",
                    )
                    await queue.record(item, {i: delivered for i in item.pending()})
                    if finish == "settle":
                        settlement = await queue.settle(item)
                        if settlement.outcome != "done":
                            raise RuntimeError(f"settle gave {settlement}")
                    else:
                        await queue.ack(item)
                    done += 1
            if not found:
                return

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(workers)))
    return time.perf_counter() - started, done


@contextlib.contextmanager
def profiling(
    profiler: cProfile.Profile | None, result: dict[str, Any], phase: str
) -> Iterator[None]:
    """cProfile the block when asked; the top functions by own time go to result["profile"]."""
    if profiler is None:
        yield
        return
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        result.setdefault("profile", {})[phase] = out.getvalue()


async def run_cell(spec: dict[str, Any], url: str, data_dir: Path) -> dict[str, Any]:
    size, count = spec["size"], spec["messages"]
    deadline_s = spec["phase_timeout"]
    client = connect_redis(
        CommonSettings(redis_url=url, redis_max_connections=spec["max_connections"])
    )
    queue = Queue(client, prefix=PREFIX, partitions=spec["partitions"])
    envelope, body = make_envelope(spec["recipients"]), make_body(size)
    result: dict[str, Any] = {}
    try:
        await queue.ensure_groups()
        # warm-up: open the pool's connections and load every script, then drain it again
        warm = max(spec["concurrency"], min(200, count // 10))
        await enqueue_phase(
            queue, envelope, body, warm, spec["concurrency"], time.monotonic() + deadline_s
        )
        await drain_phase(
            queue, spec["workers"], spec["batch"], spec["finish"], time.monotonic() + deadline_s
        )
        aof_before = aof_bytes(data_dir)

        profiler = cProfile.Profile() if spec["profile"] else None
        cpu0, rcpu0 = cpu_seconds(), await redis_cpu(client)
        with profiling(profiler, result, "enqueue"):
            seconds, latencies = await enqueue_phase(
                queue, envelope, body, count, spec["concurrency"], time.monotonic() + deadline_s
            )
        cpu1, rcpu1 = cpu_seconds(), await redis_cpu(client)
        memory = await client.info("memory")
        # an automatic AOF rewrite may still run: let it end, so the size is a settled one
        # and the claim phase does not share the machine with it
        rewrite_deadline = time.monotonic() + deadline_s
        while True:
            persistence = await client.info("persistence")
            busy = int(persistence["aof_rewrite_in_progress"]) or int(
                persistence["aof_rewrite_scheduled"]
            )
            if not busy or time.monotonic() > rewrite_deadline:
                break
            await asyncio.sleep(0.05)
        stats = await QueueAdmin.of(queue).stats()
        if stats.messages != count:
            raise RuntimeError(f"{stats.messages} messages queued, expected {count}")
        result["enqueue"] = {
            "messages": count,
            "seconds": seconds,
            "rate": count / seconds,
            "latency_p50_ms": percentile(latencies, 0.50) * 1000,
            "latency_p99_ms": percentile(latencies, 0.99) * 1000,
            "client_cpu": (cpu1 - cpu0) / seconds,
            "redis_cpu": (rcpu1 - rcpu0) / seconds,
        }
        result["redis_used_memory"] = int(memory["used_memory"])
        result["redis_rss"] = int(memory["used_memory_rss"])
        result["aof_bytes"] = aof_bytes(data_dir)
        result["aof_growth_bytes"] = result["aof_bytes"] - aof_before
        result["aof_rewrites"] = int(persistence.get("aof_rewrites", 0))

        profiler = cProfile.Profile() if spec["profile"] else None
        cpu0, rcpu0 = cpu_seconds(), await redis_cpu(client)
        with profiling(profiler, result, "drain"):
            seconds, done = await drain_phase(
                queue, spec["workers"], spec["batch"], spec["finish"], time.monotonic() + deadline_s
            )
        cpu1, rcpu1 = cpu_seconds(), await redis_cpu(client)
        stats = await QueueAdmin.of(queue).stats()
        left = stats.messages + sum(lane.ready + lane.active for lane in stats.lanes)
        if done != count or left:
            raise RuntimeError(f"claimed {done} of {count}; {left} left in the queue")
        result["drain"] = {
            "messages": done,
            "seconds": seconds,
            "rate": done / seconds,
            "client_cpu": (cpu1 - cpu0) / seconds,
            "redis_cpu": (rcpu1 - rcpu0) / seconds,
        }
    finally:
        await client.aclose()
    result["client_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB
    return result


def child_main(spec: dict[str, Any]) -> None:
    data_dir = Path(spec["data_dir"])
    server = RedisServer(data_dir, appendfsync=spec["aof"], config=spec["redis_config"])
    server.start()  # from the main thread: the server dies with this process
    try:
        result = asyncio.run(run_cell(spec, server.url, data_dir))
    finally:
        server.stop()
    print(json.dumps(result))


# --- the parent: plan, children, table -----------------------------------------------------


def parse_size(text: str) -> int:
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    for suffix, factor in (("k", KIB), ("m", KIB * KIB)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def size_label(size: int) -> str:
    return f"{size // KIB} KiB" if size % KIB == 0 else f"{size} B"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total() -> str:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return human(int(line.split()[1]) * KIB)
    return "unknown"


def filesystem_of(path: Path) -> str:
    """Device and type of the mount holding `path` (where the AOF is written)."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if str(path).startswith(mount) and len(mount) > len(best[0]):
                best = (mount, device, fstype)
    return f"{best[1]} ({best[2]}) at {best[0]}"


def fsync_probe(tmp_root: Path, size: int, count: int = 200) -> str:
    """Median and p99 of write(size) + fsync in the AOF's filesystem: what `always` waits on."""
    times = []
    with tempfile.TemporaryDirectory(dir=tmp_root) as scratch:
        fd = os.open(Path(scratch) / "probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            block = b"x" * size
            for _ in range(count):
                started = time.perf_counter()
                os.write(fd, block)
                os.fsync(fd)
                times.append(time.perf_counter() - started)
        finally:
            os.close(fd)
    return (
        f"{size_label(size)} append+fsync p50 {statistics.median(times) * 1000:.2f} ms, "
        f"p99 {percentile(times, 0.99) * 1000:.2f} ms"
    )


def environment(tmp_root: Path) -> dict[str, Any]:
    version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False, timeout=10
    ).stdout.strip()
    from importlib.metadata import version as installed

    return {
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "ram": mem_total(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_py": installed("redis"),
        "redis_server": version,
        "aof_filesystem": filesystem_of(tmp_root),
        "fsync": f"{fsync_probe(tmp_root, 4 * KIB)}; {fsync_probe(tmp_root, 100 * KIB)}",
    }


def run_child(spec: dict[str, Any], tmp_root: Path, timeout: float) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="mailkube-queue-bench-", dir=tmp_root))
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--cell", json.dumps({**spec, "data_dir": str(data_dir)})],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"run exceeded {timeout:g}s"}
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def median_of(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [run for run in runs if "error" not in run]
    if not ok:
        return {"error": runs[0]["error"] if runs else "no runs"}
    summary: dict[str, Any] = {"runs": len(ok)}
    for phase in ("enqueue", "drain"):
        summary[phase] = {
            key: median_of(ok, phase, key)
            for key in ("rate", "seconds", "client_cpu", "redis_cpu")
            + (("latency_p50_ms", "latency_p99_ms") if phase == "enqueue" else ())
        }
        rates = [run[phase]["rate"] for run in ok]
        summary[phase]["rate_min"], summary[phase]["rate_max"] = min(rates), max(rates)
    for key in ("redis_used_memory", "redis_rss", "aof_bytes", "aof_rewrites", "client_peak_rss"):
        summary[key] = median_of(ok, key)
    if len(ok) < len(runs):
        summary["failed_runs"] = [run["error"] for run in runs if "error" in run]
    return summary


def table(env: dict[str, Any], cells: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"command:  {env['command']}",
        f"date:     {env['date']}",
        f"machine:  nproc {env['nproc']}, {env['cpu_model']}, RAM {env['ram']}, "
        f"kernel {env['kernel']}",
        f"software: {env['redis_server']}; Python {env['python']}, redis-py {env['redis_py']}",
        f"AOF on:   {env['aof_filesystem']}; {env['fsync']}",
        f"setup:    concurrency {args.concurrency}, pool {args.max_connections} connections, "
        f"{args.workers} consumers, claim count {args.batch}, {args.partitions} partition(s), "
        f"{args.recipients} recipient(s); finish with {args.finish}; "
        f"median of {args.runs} run(s) per cell",
        "redis:    appendonly yes, save off, otherwise defaults"
        + "".join(f", {k} {v}" for k, v in args.redis_config_map.items()),
        "",
    ]
    head = (
        "size", "AOF", "msgs", "enqueue/s", "p50 ms", "p99 ms", "cli CPU", "redis CPU",
        f"{args.finish}/s", "cli CPU", "redis CPU", "used_mem", "redis RSS", "AOF size",
        "rewrites", "client RSS",
    )  # fmt: skip
    rows = [head]
    for cell in cells:
        s = cell["summary"]
        if "error" in s:
            rows.append((size_label(cell["size"]), cell["aof"], str(cell["messages"]), s["error"]))
            continue
        enq, drn = s["enqueue"], s["drain"]
        rows.append(
            (
                size_label(cell["size"]),
                cell["aof"],
                str(cell["messages"]),
                f"{enq['rate']:,.0f}",
                f"{enq['latency_p50_ms']:.1f}",
                f"{enq['latency_p99_ms']:.1f}",
                f"{enq['client_cpu']:.0%}",
                f"{enq['redis_cpu']:.0%}",
                f"{drn['rate']:,.0f}",
                f"{drn['client_cpu']:.0%}",
                f"{drn['redis_cpu']:.0%}",
                human(s["redis_used_memory"]),
                human(s["redis_rss"]),
                human(s["aof_bytes"]),
                f"{s['aof_rewrites']:.0f}",
                human(s["client_peak_rss"]),
            )
        )
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(head))]
    for row in rows:
        lines.append("  ".join(col.rjust(widths[i]) for i, col in enumerate(row)).rstrip())
    lines.append("")
    lines.append(
        "CPU columns: share of one core used during the phase (client process / redis-server); "
        "p50/p99: latency of one enqueue call; used_mem, redis RSS: right after the enqueue "
        "phase; AOF size: after it and any automatic AOF rewrite it set off (rewrites: how many "
        "ran); client RSS: peak of the run's process."
    )
    size, aof, target = TARGET
    for cell in cells:
        s = cell["summary"]
        if cell["size"] == size and cell["aof"] == aof and "enqueue" in s:
            verdict = "meets" if s["enqueue"]["rate"] >= target else "BELOW"
            lines.append(
                f"target: enqueue {size_label(size)} with AOF {aof} >= {target:,.0f}/s: "
                f"{s['enqueue']['rate']:,.0f}/s, {verdict}"
            )
    for cell in cells:
        for run in cell["runs"]:
            for phase, text in run.get("profile", {}).items():
                lines += ["", f"profile of {phase}, {size_label(cell['size'])} {cell['aof']}:"]
                lines.append(text)
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--messages",
        type=int,
        help="messages per run (default 20000 for 2 KiB, 5000 for 100 KiB, else 5000)",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="enqueue tasks (64)")
    parser.add_argument("--workers", type=int, default=8, help="consumer tasks (8)")
    parser.add_argument("--batch", type=int, default=16, help="claim count (16)")
    parser.add_argument("--sizes", default="2k,100k", help="message sizes (2k,100k)")
    parser.add_argument("--aof", default="always,everysec", help="appendfsync modes")
    parser.add_argument("--partitions", type=int, default=1, help="queue partitions (1)")
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message (1)")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="redis_max_connections of the client pool (64, the settings default)",
    )
    parser.add_argument(
        "--finish",
        choices=("settle", "ack"),
        default="settle",
        help="how consumers finish a message (settle, as the worker does)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per cell; median shown (3)")
    parser.add_argument("--quick", action="store_true", help="small counts, one run")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="machine-readable results: on stdout instead of the table, or into PATH as well",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile both phases")
    parser.add_argument("--phase-timeout", type=float, default=240, help="seconds per phase")
    parser.add_argument(
        "--tmpdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the private servers' data dirs go",
    )
    parser.add_argument(
        "--redis-config",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra redis.conf line for the private servers, e.g. auto-aof-rewrite-percentage=0",
    )
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 1
    for name in ("concurrency", "workers", "batch", "partitions", "recipients", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.max_connections < 2:
        parser.error("--max-connections must be at least 2")
    args.redis_config_map = {}
    for item in args.redis_config:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            parser.error(f"--redis-config wants NAME=VALUE, got {item!r}")
        args.redis_config_map[name.strip()] = value.strip()
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.aof_list = [mode.strip() for mode in args.aof.split(",") if mode.strip()]
    for mode in args.aof_list:
        if mode not in ("always", "everysec", "no"):
            parser.error(f"--aof: unknown appendfsync mode {mode!r}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.cell:
        child_main(json.loads(args.cell))
        return 0
    if shutil.which("redis-server") is None:
        print("redis-server not found on PATH (run `make setup`)", file=sys.stderr)
        return 2
    env = environment(args.tmpdir)
    defaults = QUICK_MESSAGES if args.quick else DEFAULT_MESSAGES
    cells = [
        {
            "size": size,
            "aof": aof,
            "messages": args.messages or defaults.get(size, 500 if args.quick else 5000),
            "runs": [],
        }
        for aof in args.aof_list
        for size in args.size_list
    ]
    child_timeout = 2 * args.phase_timeout + 60
    started = time.monotonic()
    for number in range(args.runs):  # runs outermost: drift spreads over every cell
        for cell in cells:
            spec = {
                "size": cell["size"],
                "aof": cell["aof"],
                "messages": cell["messages"],
                "concurrency": args.concurrency,
                "workers": args.workers,
                "batch": args.batch,
                "partitions": args.partitions,
                "recipients": args.recipients,
                "max_connections": args.max_connections,
                "finish": args.finish,
                "phase_timeout": args.phase_timeout,
                "profile": args.profile,
                "redis_config": args.redis_config_map,
            }
            print(
                f"run {number + 1}/{args.runs}: {size_label(cell['size'])} AOF {cell['aof']}, "
                f"{cell['messages']} messages ...",
                end=" ",
                file=sys.stderr,
                flush=True,
            )
            run = run_child(spec, args.tmpdir, child_timeout)
            cell["runs"].append(run)
            if "error" in run:
                print(f"failed: {run['error']}", file=sys.stderr)
            else:
                print(
                    f"enqueue {run['enqueue']['rate']:,.0f}/s, "
                    f"{args.finish} {run['drain']['rate']:,.0f}/s",
                    file=sys.stderr,
                )
    for cell in cells:
        cell["summary"] = summarize(cell["runs"])
    env["elapsed_seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        options = {k: v for k, v in vars(args).items() if k not in ("cell", "tmpdir")}
        options["tmpdir"] = str(args.tmpdir)
        document = json.dumps({"environment": env, "options": options, "cells": cells}, indent=2)
        if args.json == "-":
            print(document)
        else:
            Path(args.json).write_text(document + "\n")
    if args.json != "-":
        print(table(env, cells, args))
        print(f"\nelapsed: {env['elapsed_seconds']:.0f} s")
    failed = any("error" in run for cell in cells for run in cell["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
