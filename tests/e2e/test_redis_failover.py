"""A Redis primary killed (SIGKILL) under load, with Sentinel: the sentinels promote the replica,
the gateway and the worker follow it, and with enqueue_replicas: 1 every message the gateway
answered 250 to is delivered (tests/failover_load.py). Without it, how many are lost is
measured by bench/failover_bench.py, not asserted here."""

from __future__ import annotations

from pathlib import Path

from failover_load import kill_primary_under_load
from redis_sentinels import SentinelGroup

from mailkube_core.telemetry import Telemetry


async def test_a_primary_killed_under_load_loses_nothing_with_enqueue_replicas(
    sentinel_group: SentinelGroup, tmp_path: Path, telemetry: Telemetry
) -> None:
    outcome = await kill_primary_under_load(sentinel_group, tmp_path, telemetry, enqueue_replicas=1)
    assert len(outcome.accepted) >= 200  # 150 before the kill, 50 after the rejoin
    assert outcome.first_after_kill is not None  # the gateway followed: 250s after the kill
    assert outcome.lost == [], (
        f"{len(outcome.lost)} of {len(outcome.accepted)} accepted messages lost: "
        f"{outcome.lost[:20]}"
    )
