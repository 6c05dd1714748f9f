"""Wiring: settings → Redis, routing table, queue, lane deliveries → a QueueConsumer that runs
until SIGTERM, then drains (deliveries in flight finish within `shutdown_grace`; unclaimed work
stays in the queue for the other workers)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from mailkube_core.queue import Lane, Queue, QueueConsumer
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import RoutingReader, RoutingSnapshot, RoutingStore
from mailkube_core.service import Service
from mailkube_core.settings import WorkerSettings

from .bounces import Bouncer
from .connections import ConnectionPool
from .counters import Counters
from .handler import DeliveryHandler
from .janitor import Janitor
from .local import LocalDelivery
from .mx import MxResolver
from .remote import RemoteDelivery

log = logging.getLogger(__name__)

LANES_OF_ROLE: dict[str, Sequence[Lane]] = {
    "local": ("local",),
    "remote": ("remote",),
    "all": ("local", "remote"),
}


def consumer_name(settings: WorkerSettings) -> str:
    """The pod name on Kubernetes (HOSTNAME), so a restarted pod reclaims its own entries."""
    return os.environ.get("HOSTNAME") or settings.hostname


async def serve(settings: WorkerSettings, service: Service) -> None:
    redis = connect_redis(settings)
    routing = RoutingReader(RoutingStore(redis, settings.key_prefix),
                            settings.routing_check_interval)  # fmt: skip
    lanes = LANES_OF_ROLE[settings.role]
    remote: RemoteDelivery | None = None
    # maildir writes and fsyncs block: one thread per delivery that may be in flight
    executor = ThreadPoolExecutor(settings.queue_workers, thread_name_prefix="maildir")
    # not ready (no traffic, no rollout progress) until the routing table is loaded
    loaded = asyncio.Event()
    service.health.add_readiness_check("routing", loaded.is_set)
    try:
        if not await routing.start_when_available(service.stopping):
            return
        loaded.set()

        def snapshot() -> RoutingSnapshot:
            return routing.snapshot

        bouncer = Bouncer(settings, snapshot)
        queue = Queue.from_settings(settings, redis, on_failure=bouncer.on_failure)
        bouncer.attach(queue)
        counters = Counters(
            redis, settings.key_prefix, settings.events_max_length,
            is_ours=lambda domain: routing.snapshot.is_local_domain(domain),
        )  # fmt: skip
        local = None
        if "local" in lanes:
            settings.mail_root.mkdir(parents=True, exist_ok=True)
            local = LocalDelivery(settings.mail_root, settings.hostname, snapshot, counters,
                                  queue, executor)  # fmt: skip
        if "remote" in lanes:
            resolver = MxResolver(
                settings.dns_nameservers,
                port=settings.dns_port,
                timeout=settings.dns_timeout,
                address_limit=settings.mx_address_limit,
            )
            pool = ConnectionPool(
                settings.destination_concurrency,
                settings.connection_cache_time.total_seconds(),
                settings.failed_host_ttl.total_seconds(),
            )
            remote = RemoteDelivery(settings, snapshot, resolver, pool)
        consumer = QueueConsumer(
            queue,
            consumer_name(settings),
            lanes,
            DeliveryHandler(queue, bouncer, counters, local, remote),
            concurrency=settings.queue_workers,
            visibility_timeout=settings.visibility_timeout,
            poll=settings.queue_poll_interval,
        )
        janitor = Janitor(queue, lanes, consumer.consumer, settings.visibility_timeout * 2)
        sweeping = asyncio.create_task(janitor.run(service.stopping, settings.visibility_timeout))
        counting = asyncio.create_task(counters.run(service.stopping))
        service.health.add_readiness_check("queue", lambda: consumer.ready)
        log.info(
            "worker started",
            extra={"role": settings.role, "consumer": consumer.consumer, "lanes": list(lanes)},
        )
        await consumer.run(service.stopping, drain=settings.shutdown_grace)
        await asyncio.gather(sweeping, counting)
    finally:
        if remote is not None:
            await remote.close()
        await routing.stop()
        await redis.aclose()
        executor.shutdown(wait=False)
