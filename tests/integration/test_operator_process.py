"""The `mailkube-operator` process as it runs in its pod (`python -m mailkube_operator`, settings
from the environment) against the emulator and a Redis of the test's own: /healthz and /readyz
on the telemetry server, readiness failing while Redis is down, and a clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import kmock
import pytest
from kube_emulator import KubeEmulator
from operator_harness import NS, Api, eventually, operator_settings
from redis_servers import RedisServer, free_port

from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import RoutingStore

pytestmark = pytest.mark.kmock(cls=KubeEmulator)


class OperatorProcess:
    def __init__(self, redis_url: str, kube_url: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        env = {
            **os.environ,
            "MAILKUBE_REDIS_URL": redis_url,
            "MAILKUBE_KUBE_API_SERVER": kube_url,
            "MAILKUBE_NAMESPACE": NS,
            "MAILKUBE_HOSTNAME": "operator-0",
            "MAILKUBE_PUBLIC_HOSTNAME": "mx.example.test",
            "MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{self.port}",
            "MAILKUBE_RETRY_DELAY": "0.5s",
            "MAILKUBE_INITIAL_PUBLISH_DELAY": "0.2s",
        }
        env.pop("MAILKUBE_CONFIG", None)
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailkube_operator"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def get(self, path: str) -> tuple[int, str]:
        """(status, body) of GET path on the telemetry server; (0, '') if nothing listens."""
        assert self.process.poll() is None, self.log.read_text()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return 0, ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        response = (await reader.read()).decode()
        writer.close()
        head, _, body = response.partition("\r\n\r\n")
        return int(head.split()[1]), body

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


async def test_probes_follow_kopf_and_redis_and_sigterm_stops_cleanly(
    kmock: kmock.KubernetesEmulator, api: Api, private_redis: RedisServer, tmp_path: Path
) -> None:
    process = OperatorProcess(private_redis.url, str(kmock.url), tmp_path / "operator.log")
    try:
        await api.apply("maildomains", "example", {"domain": "example.test"})

        async def ready() -> None:
            assert await process.get("/healthz") == (200, "ok\n")
            status, body = await process.get("/readyz")
            assert status == 200, body

        await eventually(ready)
        settings = operator_settings(private_redis.url, str(kmock.url))
        redis = connect_redis(settings)
        try:
            snapshot = await RoutingStore(redis, settings.key_prefix).load()
        finally:
            await redis.aclose()
        assert [d.name for d in snapshot.table.domains] == ["example.test"]

        await asyncio.to_thread(private_redis.kill)

        async def unready() -> None:
            status, body = await process.get("/readyz")
            assert status == 503, body
            assert "routing" in body
            assert "kopf" not in body  # kopf itself is fine
            assert (await process.get("/healthz"))[0] == 200  # no reason to restart the pod

        await eventually(unready)

        await asyncio.to_thread(private_redis.restart)
        await eventually(ready)

        process.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.process.wait, 20)
        log = process.log.read_text()
        assert code == 0, log
        assert '"msg": "stopped"' in log
        assert "Traceback" not in log
    finally:
        process.kill()
