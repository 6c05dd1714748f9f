"""The soak script's smoke run (bench/soak.py): a minute of steady load on the whole stack
(Redis with AOF always, a gateway process, a worker process) while the gateway, the worker
and Redis are killed and Redis is frozen in turn; every message answered 250 is delivered
exactly once. The hour-long run is for docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_a_minute_of_faults_loses_and_duplicates_nothing() -> None:
    done = subprocess.run(
        [sys.executable, str(SOAK), "--duration", "45", "--fault-every", "8", "--rate", "25",
         "--senders", "8", "--freeze", "2", "--sample-every", "5"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    output = done.stdout
    assert "{" in output, (output, done.stderr[-3000:])  # the report, or why there is none
    report = json.loads(output[output.index("{") :])
    assert done.returncode == 0, (output, done.stderr[-3000:])
    assert report["accepted"] > 500
    assert report["lost"] == 0
    assert report["duplicated"] == 0
    assert report["left_in_queue"] == 0
    assert set(report["faults"]) == {"gateway-kill", "worker-kill", "redis-kill", "redis-freeze"}
    assert report["exit_codes"] == {"gateway": 0, "worker": 0}  # SIGTERM at the end: clean
