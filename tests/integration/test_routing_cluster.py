"""The routing table's replace script and change notification on a 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

from redis.asyncio.cluster import RedisCluster

from mailkube_core.routing import Domain, RoutingReader, RoutingStore, RoutingTable


async def test_cluster_readers_follow_notifications(redis_cluster: Any) -> None:
    client = RedisCluster.from_url(redis_cluster.url)
    store = RoutingStore(client, f"r{uuid.uuid4().hex[:8]}")
    # a check interval far beyond the test: only the notification can bring the change
    readers = [RoutingReader(store, timedelta(minutes=5)) for _ in range(2)]
    try:
        for reader in readers:
            await reader.start()
        version = await store.replace(RoutingTable(domains=[Domain(name="a.test")]))
        async with asyncio.timeout(1):
            for reader in readers:
                snapshot = await reader.wait_for_version(version)
                assert snapshot.is_local_domain("A.TEST")
    finally:
        for reader in readers:
            await reader.stop()
        await client.aclose()
