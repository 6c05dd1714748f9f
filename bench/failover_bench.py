"""What a Redis failover costs: the primary killed (SIGKILL) under load, with Sentinel, with and
without enqueue_replicas. Each run starts a primary, a replica and three redis-sentinel
processes (tests/redis_sentinels.py), a gateway and a delivery worker (in this process), and
eight senders, each message its own SMTP session to one local mailbox
(tests/failover_load.py). After 150 acceptances the primary is killed; the sentinels promote
the replica; the killed server comes back as its replica; the load goes on for 50 more.

Reported per run: messages accepted (250), lost (accepted, never delivered), when the lost
ones were accepted relative to the kill (the loss window), temporary refusals, and the seconds
from the kill to the next 250 (how long the gateway could not accept).

    .venv/bin/python bench/failover_bench.py                    # 5 runs each of 0 and 1
    .venv/bin/python bench/failover_bench.py --runs 10 --replicas 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from failover_load import Outcome, kill_primary_under_load  # noqa: E402
from redis_sentinels import SentinelGroup  # noqa: E402

from mailkube_core.telemetry import Telemetry, setup_telemetry  # noqa: E402


async def one_run(enqueue_replicas: int, senders: int, telemetry: Telemetry) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="failover-bench-") as tmp:
        base = Path(tmp)
        # in the main thread: only its children die with this process (PR_SET_PDEATHSIG)
        group = SentinelGroup(base / "redis").start()
        try:
            return await kill_primary_under_load(
                group,
                base,
                telemetry,
                enqueue_replicas=enqueue_replicas,
                senders=senders,
                log_level="ERROR",
            )
        finally:
            group.stop()


def line(outcome: Outcome) -> str:
    window = outcome.lost_window()
    unavailable = outcome.unavailable()
    cells = [
        str(outcome.enqueue_replicas),
        str(len(outcome.accepted)),
        str(len(outcome.lost)),
        f"{window[0]:+.3f} s to {window[1]:+.3f} s" if window else "-",
        f"{outcome.promoted_at - outcome.killed_at:.1f}",
        f"{unavailable:.1f}" if unavailable is not None else "-",
        ", ".join(f"{kind}: {n}" for kind, n in sorted(outcome.refused.items())) or "-",
    ]
    return "| " + " | ".join(cells) + " |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--replicas", default="0,1", help="enqueue_replicas values, e.g. 0,1")
    parser.add_argument("--senders", type=int, default=8)
    args = parser.parse_args()
    telemetry = setup_telemetry("failover-bench")
    commit = _commit()
    print(f"# failover_bench {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores), "
          f"redis-server {_redis_version()}")  # fmt: skip
    print("| enqueue_replicas | accepted | lost | lost were accepted at (from the kill) "
          "| kill to promotion (s) | kill to next 250 (s) | refused |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    totals: dict[int, list[int]] = {}
    for replicas in (int(value) for value in args.replicas.split(",")):
        for _ in range(args.runs):
            outcome = await one_run(replicas, args.senders, telemetry)
            print(line(outcome), flush=True)
            accepted, lost = totals.setdefault(replicas, [0, 0])
            totals[replicas] = [accepted + len(outcome.accepted), lost + len(outcome.lost)]
    for replicas, (accepted, lost) in totals.items():
        print(f"enqueue_replicas {replicas}: {lost} lost of {accepted} accepted, {args.runs} runs")


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip()


def _redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return next((part[2:] for part in out.split() if part.startswith("v=")), "?")


if __name__ == "__main__":
    # SIGTERM: exit through atexit, which stops every server this run started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    asyncio.run(main())
