"""Every long-running process goes through `run_service`: bad settings stop it at start with
one line naming the field; SIGTERM stops it cleanly; its health endpoints answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from redis_servers import free_port

SAMPLE = """
import asyncio
from mailkube_core.service import run_service
from mailkube_core.settings import WorkerSettings

async def main(settings, service):
    ready = asyncio.Event()
    service.health.add_readiness_check("sample", ready.is_set)
    ready.set()
    await service.stopping.wait()
    print("main returned", flush=True)

run_service("sample", WorkerSettings, main)
"""


def start(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SAMPLE],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_sigterm_stops_a_service_cleanly() -> None:
    port = free_port()
    process = start({"MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{port}", "MAILKUBE_HOSTNAME": "w1"})
    try:
        deadline = time.monotonic() + 20
        while status(f"http://127.0.0.1:{port}/readyz") != 200:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(0.05)
        assert status(f"http://127.0.0.1:{port}/healthz") == 200
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "main returned" in out
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    messages = [r["msg"] for r in records]
    assert "stopping" in messages
    assert messages[-1] == "stopped"
    assert all(r["service"] == "sample" for r in records)


def test_bad_setting_stops_the_service_at_start_naming_the_field() -> None:
    process = start({"MAILKUBE_QUEUE_WORKERS": "many", "MAILKUBE_TELEMETRY_LISTEN": ""})
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mailkube-sample: invalid setting queue_workers")
    assert "MAILKUBE_QUEUE_WORKERS" in lines[0]
