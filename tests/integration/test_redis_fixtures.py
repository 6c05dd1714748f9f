"""The Redis fixtures themselves: durability across a crash, a working Cluster, no port 6379."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient
from redis_servers import ExternalRedis, RedisCluster, RedisServer


def test_private_server_keeps_acknowledged_write_across_sigkill(
    private_redis: RedisServer,
) -> None:
    client = private_redis.client(decode_responses=True)
    try:
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        client.set("durable", "yes")
    finally:
        client.close()
    port = private_redis.port

    private_redis.kill()
    assert not private_redis.running
    private_redis.restart()

    assert private_redis.port == port
    client = private_redis.client(decode_responses=True)
    try:
        assert client.get("durable") == "yes"
    finally:
        client.close()


def test_private_server_stop_and_restart(private_redis: RedisServer) -> None:
    private_redis.stop()
    assert not private_redis.running
    private_redis.restart()
    client = private_redis.client()
    try:
        assert client.ping()
    finally:
        client.close()


@pytest.mark.cluster
def test_cluster_serves_keys_in_different_slots(redis_cluster: RedisCluster) -> None:
    client = ClusterClient.from_url(redis_cluster.url, decode_responses=True)
    try:
        keys = ["{a}key", "{b}key", "{c}key", "{d}key", "{e}key"]
        slots = {client.keyslot(key) for key in keys}
        assert len(slots) == len(keys)
        owners = {client.get_node_from_key(key).port for key in keys}
        assert len(owners) > 1, "keys should land on more than one master"
        for key in keys:
            client.set(key, f"value of {key}")
        for key in keys:
            assert client.get(key) == f"value of {key}"
        assert len(client.get_primaries()) == 3
    finally:
        client.close()


def test_session_server_is_not_the_default_port(
    redis_server: RedisServer | ExternalRedis, redis_url: str
) -> None:
    if isinstance(redis_server, ExternalRedis):
        assert redis_url == os.environ["REDIS_URL"]
        return
    assert urlsplit(redis_url).port not in (None, 6379)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("left-over", "1")
    finally:
        client.close()


def test_redis_url_is_flushed_between_tests(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.get("left-over") is None
    finally:
        client.close()
