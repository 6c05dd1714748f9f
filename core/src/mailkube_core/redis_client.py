"""One way to open Redis for every component: standalone or Cluster, bytes in and out."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from .settings import CommonSettings

#: What components hold: both clients speak the same commands for single-slot operations.
RedisClient = Redis | RedisCluster


def connect_redis(settings: CommonSettings, **overrides: Any) -> RedisClient:
    """A client for settings.redis_url. Replies are bytes (bodies are binary); nothing connects
    until the first command."""
    options: dict[str, Any] = {
        "decode_responses": False,
        "health_check_interval": 30,
        "socket_keepalive": True,
    }
    password = settings.redis_secret()
    if password is not None:
        options["password"] = password
    options.update(overrides)
    if settings.redis_cluster:
        # the cluster client has no blocking pool: it fails past max_connections per node,
        # so give it headroom over what one process runs concurrently
        options.pop("health_check_interval", None)
        options.setdefault("max_connections", settings.redis_max_connections * 4)
        return RedisCluster.from_url(settings.redis_url, **options)
    # a blocking pool: a burst of sessions waits for a connection instead of failing
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=10,
        **options,
    )
    return Redis.from_pool(pool)
