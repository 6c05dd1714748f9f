"""RFC 8689 §5: the bounce of a REQUIRETLS message is queued with REQUIRETLS (the remote
lane then delivers it only over TLS that MTA-STS or DANE validated, and asks the next hop for
REQUIRETLS); the bounce of any other message is not."""

from __future__ import annotations

from pathlib import Path

import pytest
from worker_harness import apply_routing, table, worker_settings

from mailkube_core.queue import Envelope, FailedRecipients, Queue, QueueAdmin, Recipient
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import User
from mailkube_worker.bounces import Bouncer
from mailkube_worker.results import failed


@pytest.mark.parametrize("requiretls", [True, False])
async def test_a_bounce_carries_the_requiretls_of_the_message(
    redis_url: str, tmp_path: Path, requiretls: bool
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail")
    routing = await apply_routing(settings, table(User(address="alice@example.test")))
    redis = connect_redis(settings)
    try:
        bouncer = Bouncer(settings, lambda: routing)
        queue = Queue.from_settings(settings, redis, on_failure=bouncer.on_failure)
        bouncer.attach(queue)
        envelope = Envelope(mail_from="sender@remote.test", requiretls=requiretls,
                            recipients=[Recipient(address="rcpt@far.test")])  # fmt: skip
        body = b"From: sender@remote.test\r\nSubject: secret\r\n\r\nbody\r\n"
        reason = failed("5.7.30", "REQUIRETLS: neither an MTA-STS policy nor DANE")
        await bouncer.on_failure(FailedRecipients("01M97SDBQCSEHR792Y4SMZ.0", envelope, body,
                                                  [(0, reason)]))  # fmt: skip
        (dsn,) = await QueueAdmin.of(queue).list_messages()
        assert dsn.envelope.mail_from == ""
        assert [r.address for r in dsn.envelope.recipients] == ["sender@remote.test"]
        assert dsn.lane == "remote"
        assert dsn.envelope.requiretls is requiretls
        assert b"5.7.30" in (await QueueAdmin.of(queue).body(dsn.id) or b"")
    finally:
        await redis.aclose()
