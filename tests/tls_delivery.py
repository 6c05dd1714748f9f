"""What the MTA-STS and DANE tests share: one message from carol attempted once by a real
worker under a routing table's TLS overrides, and the TLS-RPT outcomes recorded today."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from conditions import eventually
from worker_harness import apply_routing, enqueue, running_worker, table

from mailkube_core.queue import Queue, QueueAdmin
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import TlsPolicy, User
from mailkube_core.settings import WorkerSettings
from mailkube_core.telemetry import Telemetry
from mailkube_worker.tlspolicy.tlsrpt_store import Outcome, TlsRptStore, day_of

CAROL = User(address="carol@example.test")


async def first_attempt(settings: WorkerSettings, telemetry: Telemetry, recipient: str,
                        tls_policies: dict[str, Any] | None = None, body: bytes | None = None,
                        **envelope: Any) -> Any:  # fmt: skip
    """Run a worker until the first attempt at one message from carol is settled: its queue
    entry after the attempt, or "gone" when it was delivered and removed. The routing table
    overrides the TLS policy of the domains in `tls_policies`."""
    overrides = [TlsPolicy(domain=d, tls=t) for d, t in (tls_policies or {}).items()]
    routing_table = table(CAROL).model_copy(update={"tls_policies": overrides})
    routing = await apply_routing(settings, routing_table)
    redis = connect_redis(settings)
    queue = Queue.from_settings(settings, redis)
    try:
        async with running_worker(settings, telemetry):
            (message_id,) = await enqueue(settings, [recipient], body,
                                          mail_from="carol@example.test", routing=routing,
                                          **envelope)  # fmt: skip

            async def attempted() -> Any:
                info = await QueueAdmin.of(queue).inspect(message_id)
                if info is None:
                    return "gone"  # delivered and removed
                return info if info.attempts >= 1 else None

            return await eventually(attempted)
    finally:
        await redis.aclose()


async def outcomes(settings: WorkerSettings, domain: str) -> dict[Outcome, int]:
    """Today's TLS-RPT outcome counts for the policy domain `domain`."""
    redis = connect_redis(settings)
    try:
        return await TlsRptStore(redis, settings.key_prefix).outcomes(
            day_of(datetime.now(UTC)), domain
        )
    finally:
        await redis.aclose()
