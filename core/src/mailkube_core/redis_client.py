"""One way to open Redis for every component: standalone, through Sentinel, or Cluster; bytes
in and out.

Through Sentinel, each new connection asks the sentinels where the primary is (redis-py's
SentinelConnectionPool): a connection that finds the primary gone (refused, reset) or demoted
(a READONLY reply: redis-py then drops it) is opened again to the primary the sentinels name
now, so every process follows a failover without a restart."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .settings import CommonSettings

#: What components hold: both clients speak the same commands for single-slot operations.
RedisClient = Redis | RedisCluster


def describe_redis(settings: CommonSettings) -> str:
    """Where Redis is, for messages: the sentinels and the master's name, or redis_url."""
    if settings.redis_sentinels:
        sentinels = ", ".join(settings.redis_sentinels)
        return f"primary {settings.redis_sentinel_master!r} of sentinels {sentinels}"
    return settings.redis_url


def connect_redis(settings: CommonSettings, **overrides: Any) -> RedisClient:
    """A client for settings.redis_url. Replies are bytes (bodies are binary); nothing connects
    until the first command. Every request, connect and pool checkout fails after
    settings.redis_timeout (redis-py's TimeoutError; on Cluster, twice that with its retry),
    so a frozen Redis or a path that drops packets cannot hang a caller."""
    timeout = settings.redis_timeout.total_seconds()
    options: dict[str, Any] = {
        "decode_responses": False,
        "health_check_interval": 30,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    if not settings.redis_url.startswith("unix://"):
        # TCP only: redis-py's Unix socket connection refuses the option
        options["socket_keepalive"] = True
    password = settings.redis_secret()
    if password is not None:
        options["password"] = password
    options.update(overrides)
    if settings.redis_cluster:
        # the cluster client has no blocking pool: it fails past max_connections per node,
        # so give it headroom over what one process runs concurrently
        options.pop("health_check_interval", None)
        options.setdefault("max_connections", settings.redis_max_connections * 4)
        # one retry (after a failover, on the refreshed topology), not redis-py's ten: each
        # try may wait redis_timeout for a frozen node
        options.setdefault("retry", Retry(NoBackoff(), 1))
        return RedisCluster.from_url(settings.redis_url, **options)
    if settings.redis_sentinels:
        return _through_sentinels(settings, options, timeout)
    # a blocking pool: a burst of sessions waits for a connection instead of failing
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=timeout,
        **options,
    )
    return Redis.from_pool(pool)


class NamedSentinel(Sentinel):
    """redis-py's Sentinel client, whose "no master found" names the settings to check."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        try:
            return await super().discover_master(service_name)  # type: ignore[no-any-return]
        except MasterNotFoundError as error:
            raise MasterNotFoundError(
                f"{error} (check redis_sentinels and redis_sentinel_master)"
            ) from None


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool, blocking as the standalone one is: a burst of callers waits
    for a free connection (up to the pool's timeout) instead of failing."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client is closing: its sentinels' connections too
            await self.sentinel_manager.aclose()


def _through_sentinels(settings: CommonSettings, options: dict[str, Any], timeout: float) -> Redis:
    """The primary the sentinels name. redis_url gives the database, user, password and TLS
    (rediss://, for the sentinels as well); its host and port are not used."""
    from_url: dict[str, Any] = dict(parse_url(settings.redis_url))
    for unused in ("host", "port", "path", "connection_class"):
        from_url.pop(unused, None)
    tls = settings.redis_url.startswith("rediss://")
    sentinel_options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "socket_keepalive": True,
        "decode_responses": True,
    }
    if tls:
        sentinel_options["ssl"] = True
        sentinel_options.update({k: v for k, v in from_url.items() if k.startswith("ssl_")})
    sentinel_password = settings.redis_sentinel_secret()
    if sentinel_password is not None:
        sentinel_options["password"] = sentinel_password
    sentinel = NamedSentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses(), sentinel_kwargs=sentinel_options
    )
    assert settings.redis_sentinel_master is not None  # settings validate it
    return sentinel.master_for(  # type: ignore[no-any-return]
        settings.redis_sentinel_master,
        redis_class=Redis,
        connection_pool_class=BlockingSentinelPool,
        max_connections=settings.redis_max_connections,
        timeout=timeout,
        ssl=tls,
        **{**from_url, **options},
    )
