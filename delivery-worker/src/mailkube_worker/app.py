"""Wiring: settings → Redis, routing table, queue, lane deliveries → a QueueConsumer that runs
until SIGTERM, then drains (deliveries in flight finish within `shutdown_grace`; unclaimed work
stays in the queue for the other workers)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from mailkube_core.queue import Lane, Queue, QueueAdmin, QueueConsumer
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
from .queue_depth import QueueDepth
from .remote import RemoteDelivery
from .tlspolicy.tlsrpt_receive import ReportCounter
from .tlspolicy.wiring import tls_policies, tls_reporter

log = logging.getLogger(__name__)

#: remote lane: messages claimed in one batch. Those to one destination share its SMTP
#: sessions (up to destination_concurrency), one transaction after another; those wholly
#: delivered are settled by one Redis script per destination. (Not a setting yet: a new
#: setting regenerates the chart's values schema.)
REMOTE_BATCH_SIZE = 32

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
    # a local batch's file fsyncs, in parallel (they share the filesystem's journal commits)
    fsyncs = ThreadPoolExecutor(min(settings.local_batch_size, 16), thread_name_prefix="fsync")
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
            partitions=settings.queue_partitions,
        )  # fmt: skip
        reporter = None
        local = None
        if "local" in lanes:
            settings.mail_root.mkdir(parents=True, exist_ok=True)
            reports = (
                ReportCounter(settings.tlsrpt_mailboxes, routing.snapshot.is_local_domain)
                if settings.tlsrpt_mailboxes
                else None
            )
            local = LocalDelivery(settings.mail_root, settings.hostname, snapshot, counters,
                                  executor, fsyncs, reports=reports)  # fmt: skip
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
            remote = RemoteDelivery(settings, snapshot, resolver, pool,
                                    tls_policies(settings, redis, resolver))  # fmt: skip
            reporter = tls_reporter(settings, redis, resolver, queue, snapshot)
        handler = DeliveryHandler(queue, bouncer, counters, local, remote)
        consumer = QueueConsumer(
            queue,
            consumer_name(settings),
            lanes,
            handler,
            concurrency=settings.queue_workers,
            visibility_timeout=settings.visibility_timeout,
            poll=settings.queue_poll_interval,
            batch_handler=handler.batch,
            batch_lanes=lanes,
            batch_size=settings.local_batch_size,
            batch_sizes={"remote": REMOTE_BATCH_SIZE},
            batch_wait=settings.batch_wait,
        )
        janitor = Janitor(queue, lanes, consumer.consumer, settings.visibility_timeout * 2)
        sweeping = asyncio.create_task(janitor.run(service.stopping, settings.visibility_timeout))
        # the daily TLS-RPT reports (RFC 8460), by any remote worker
        reporting = [asyncio.create_task(reporter.run(service.stopping))] if reporter else []
        # the mailkube_queue_messages gauge (dashboards, autoscaling on the queue's depth)
        measuring = [
            asyncio.create_task(QueueDepth(QueueAdmin.of(queue)).run(service.stopping, interval))
            for interval in [settings.queue_stats_interval] if interval
        ]  # fmt: skip
        # the counters' last pass comes after the deliveries drained, so it carries theirs
        drained = asyncio.Event()
        counting = asyncio.create_task(counters.run(drained))
        service.health.add_readiness_check("queue", lambda: consumer.ready)
        log.info(
            "worker started",
            extra={"role": settings.role, "consumer": consumer.consumer, "lanes": list(lanes)},
        )
        try:
            await consumer.run(service.stopping, drain=settings.shutdown_grace)
        finally:
            drained.set()
        await asyncio.gather(sweeping, counting, *reporting, *measuring)
    finally:
        if remote is not None:
            await remote.close()
        await routing.stop()
        await redis.aclose()
        executor.shutdown(wait=False)
        fsyncs.shutdown(wait=False)
