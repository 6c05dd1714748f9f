"""Suite-wide fixtures: private Redis servers (see redis_servers.py).

- redis_server   (session)  the shared server: private redis-server with AOF always, or
                            ExternalRedis(url) when REDIS_URL is set (no process control)
- redis_url      (function) the shared server's URL; FLUSHALL after the test
- private_redis  (function) a RedisServer of the test's own, to kill() / restart()
- redis_cluster  (session)  RedisCluster of 3 masters (.url, .startup_nodes, .client())
- sentinel_group (function) a primary, a replica and 3 sentinels (redis_sentinels.py), to
                            fail over
- telemetry      (session)  the process-wide OpenTelemetry providers (one per process), with
                            no OTLP exporter; tests that read /metrics use it
- rspamd         (session)  a real rspamd on loopback (rspamd_server.py): .url (normal
                            worker), .controller_url, the test patterns of rspamd_local
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from mailkube_core.telemetry import Telemetry, setup_telemetry

# Make the helper importable as `redis_servers` whatever pytest's import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from redis_sentinels import SentinelGroup  # noqa: E402
from redis_servers import ExternalRedis, RedisCluster, RedisServer  # noqa: E402
from rspamd_server import shared_rspamd  # noqa: E402

from mailkube_core.cli.rspamd_local import LocalRspamd  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | ExternalRedis]:
    external = os.environ.get("REDIS_URL")
    if external:
        yield ExternalRedis(external)
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendfsync="always")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer | ExternalRedis) -> Iterator[str]:
    yield redis_server.url
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("private-redis"), appendfsync="always")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path_factory.mktemp("sentinels"))
    with group:
        yield group


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def rspamd(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer | ExternalRedis
) -> LocalRspamd:
    return shared_rspamd(tmp_path_factory.mktemp("rspamd"), redis_server.url)


@pytest.fixture(scope="session")
def telemetry() -> Iterator[Telemetry]:
    with pytest.MonkeyPatch.context() as mp:
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                     "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):  # fmt: skip
            mp.delenv(name, raising=False)
        tel = setup_telemetry("mailkube-test", version="1.2.3")
    yield tel
    tel.shutdown_sync()
