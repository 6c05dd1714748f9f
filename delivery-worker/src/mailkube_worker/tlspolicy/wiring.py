"""Settings → the TLS policies of the remote path."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from functools import partial

from mailkube_core.queue import Envelope, Queue
from mailkube_core.redis_client import RedisClient
from mailkube_core.routing import RoutingSnapshot
from mailkube_core.settings import WorkerSettings

from ..mx import MxResolver
from .enforcer import DaneResolver, TlsPolicies, addresses, sts_record
from .sts_cache import StsPolicies
from .sts_fetch import fetch_policy
from .tlsrpt_send import TlsReporter, post, report_targets
from .tlsrpt_store import TlsRptStore


def webpki_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificates verified against the WebPKI trust store (or the configured CA file)."""
    return ssl.create_default_context(cafile=ca_file)


def tls_policies(settings: WorkerSettings, redis: RedisClient, mx: MxResolver) -> TlsPolicies:
    ca_file = str(settings.smtp_tls_ca_file) if settings.smtp_tls_ca_file else None
    resolver = mx.resolver
    sts = None
    if settings.mta_sts:
        context = webpki_context(ca_file)

        async def fetch(domain: str):  # type: ignore[no-untyped-def]
            return await fetch_policy(
                domain, partial(addresses, resolver), context,
                limit=settings.mta_sts_fetch_timeout.total_seconds(),
                port=settings.mta_sts_port,
            )  # fmt: skip

        sts = StsPolicies(redis, settings.key_prefix, partial(sts_record, resolver), fetch)
    dane = None
    if settings.dns_dnssec_trusted:
        dane = DaneResolver(
            list(resolver.nameservers),  # type: ignore[arg-type]
            settings.dns_port,
            settings.dns_timeout.total_seconds(),
        )
    return TlsPolicies(sts=sts, dane=dane, reports=TlsRptStore(redis, settings.key_prefix),
                       ca_file=ca_file)  # fmt: skip


def tls_reporter(settings: WorkerSettings, redis: RedisClient, mx: MxResolver, queue: Queue,
                 routing: Callable[[], RoutingSnapshot]) -> TlsReporter | None:  # fmt: skip
    if not settings.tlsrpt:
        return None
    ca_file = str(settings.smtp_tls_ca_file) if settings.smtp_tls_ca_file else None
    context = webpki_context(ca_file)
    limit = settings.mta_sts_fetch_timeout.total_seconds()
    sender = settings.tlsrpt_from or f"tls-reports@{settings.hostname}"

    async def enqueue(envelope: Envelope, message: bytes) -> list[str]:
        return await queue.enqueue(envelope, message, is_local=routing().is_local)

    async def https(url: str, body: bytes) -> int:
        return await post(url, body, context, limit, partial(addresses, mx.resolver))

    return TlsReporter(
        redis, settings.key_prefix,
        targets=partial(report_targets, mx.resolver), enqueue=enqueue, https=https,
        submitter=settings.hostname, organization=settings.tlsrpt_organization or settings.hostname,
        contact=settings.tlsrpt_contact or sender, sender=sender,
    )  # fmt: skip
