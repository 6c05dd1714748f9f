"""RFC 3461 NOTIFY, no bounce of a bounce, and delay DSNs, with a running worker."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from conditions import eventually
from dns_server import DnsServer
from fake_mx import MxFarm, Script
from worker_harness import (
    apply_routing,
    enqueue,
    maildir_files,
    parse,
    queue_empty,
    running_worker,
    table,
    worker_settings,
)

from mailkube_core.queue import Notify, Queue, QueueAdmin, Recipient
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import User
from mailkube_core.telemetry import Telemetry

ALICE = User(address="alice@example.test")
CAROL = User(address="carol@example.test")


async def test_notify_never_and_success_only_get_no_bounce(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail", role="local")
    routing = await apply_routing(settings, table(ALICE, CAROL))
    recipients = [
        Recipient(address="nobody@example.test", notify=frozenset({Notify.NEVER})),
        Recipient(address="none@example.test", notify=frozenset({Notify.SUCCESS})),
        Recipient(address="ghost@example.test", notify=frozenset({Notify.FAILURE})),
        Recipient(address="alice@example.test"),
    ]
    async with running_worker(settings, telemetry):
        await enqueue(settings, recipients, mail_from="carol@example.test", routing=routing)
        (bounce,) = await eventually(lambda: _files(settings.mail_root, "carol@example.test"))
        await eventually(lambda: queue_empty(settings))
    assert len(maildir_files(settings.mail_root, "alice@example.test")) == 1
    _, status, _ = parse(bounce).get_payload()  # type: ignore[misc]
    assert [b["Final-Recipient"] for b in status.get_payload()[1:]] == ["rfc822;ghost@example.test"]


async def test_a_bounce_that_fails_is_not_bounced(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail", role="local")
    routing = await apply_routing(settings, table(ALICE))
    redis = connect_redis(settings)
    queue = Queue.from_settings(settings, redis)
    try:
        async with running_worker(settings, telemetry):
            await enqueue(settings, ["nobody@example.test", "alice@example.test"], mail_from="",
                          routing=routing)  # fmt: skip
            await eventually(lambda: queue_empty(settings))
        stats = await QueueAdmin.of(queue).stats()
    finally:
        await redis.aclose()
    assert len(maildir_files(settings.mail_root, "alice@example.test")) == 1
    assert stats.messages == 0  # nothing was queued for <>


async def test_delay_dsn_once_after_the_warning_time(
    redis_url: str, tmp_path: Path, telemetry: Telemetry, dns_server: DnsServer,
    mx_farm: MxFarm,
) -> None:  # fmt: skip
    settings = worker_settings(
        redis_url, tmp_path / "mail", dns_nameservers=[dns_server.host],
        dns_port=dns_server.port, smtp_port=mx_farm.port, max_retries=100,
        delay_warning_after=timedelta(milliseconds=300),
    )  # fmt: skip
    mx = mx_farm.start("127.0.0.26", Script(rcpt={
        "slow@retry.test": ["451 4.2.0 later"] * 100,
        "quiet@retry.test": ["451 4.2.0 later"] * 100,
    }))  # fmt: skip
    routing = await apply_routing(settings, table(CAROL))
    redis = connect_redis(settings)
    queue = Queue.from_settings(settings, redis)
    recipients = [
        Recipient(address="slow@retry.test", notify=frozenset({Notify.DELAY, Notify.FAILURE})),
        Recipient(address="quiet@retry.test", notify=frozenset({Notify.FAILURE})),
    ]
    try:
        async with running_worker(settings, telemetry):
            (message_id,) = await enqueue(settings, recipients, mail_from="carol@example.test",
                                          routing=routing)  # fmt: skip
            (notice,) = await eventually(lambda: _files(settings.mail_root, "carol@example.test"))

            async def tried_again() -> Any:
                info = await QueueAdmin.of(queue).inspect(message_id)
                return info if info and info.attempts >= 5 else None

            await eventually(tried_again)
            await QueueAdmin.of(queue).delete(message_id)
    finally:
        await redis.aclose()
    assert len(maildir_files(settings.mail_root, "carol@example.test")) == 1  # only once
    assert mx.received == []
    dsn = parse(notice)
    assert dsn["Subject"] == "Delayed Mail (still being retried)"
    _, status, _ = dsn.get_payload()  # type: ignore[misc]
    (block,) = status.get_payload()[1:]
    assert block["Final-Recipient"] == "rfc822;slow@retry.test"
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.2.0"
    assert block["Will-Retry-Until"]
    assert block["Remote-MTA"] == "dns; mx.retry.test"


async def _files(root: Path, address: str) -> list[Path]:
    return maildir_files(root, address)


async def test_notify_success_gets_a_delivered_or_relayed_notice(
    redis_url: str, tmp_path: Path, telemetry: Telemetry, dns_server: DnsServer,
    mx_farm: MxFarm,
) -> None:  # fmt: skip
    settings = worker_settings(redis_url, tmp_path / "mail", dns_nameservers=[dns_server.host],
                               dns_port=dns_server.port, smtp_port=mx_farm.port)  # fmt: skip
    mx = mx_farm.start("127.0.0.26")  # aiosmtpd offers no DSN extension: ours to say
    routing = await apply_routing(settings, table(ALICE, CAROL))
    success = frozenset({Notify.SUCCESS, Notify.FAILURE})
    recipients = [
        Recipient(address="alice@example.test", notify=success),
        Recipient(address="hank@retry.test", notify=success, orcpt="rfc822;Hank@retry.test"),
        Recipient(address="ivy@retry.test"),  # no NOTIFY: no success notice
    ]
    async with running_worker(settings, telemetry):
        await enqueue(settings, recipients, mail_from="carol@example.test", routing=routing)

        async def two_notices() -> list[Path]:
            files = maildir_files(settings.mail_root, "carol@example.test")
            return files if len(files) == 2 else []

        notices = await eventually(two_notices)
        await eventually(lambda: queue_empty(settings))
    assert [r.rcpt_tos for r in mx.received] == [["hank@retry.test", "ivy@retry.test"]]
    blocks = {}
    for path in notices:
        dsn = parse(path)
        assert dsn["Subject"] == "Successful Mail Delivery Report"
        _, status, _ = dsn.get_payload()  # type: ignore[misc]
        for block in status.get_payload()[1:]:
            blocks[block["Final-Recipient"]] = block
    assert sorted(blocks) == ["rfc822;alice@example.test", "rfc822;hank@retry.test"]
    assert blocks["rfc822;alice@example.test"]["Action"] == "delivered"
    assert blocks["rfc822;alice@example.test"]["Status"] == "2.0.0"
    assert blocks["rfc822;hank@retry.test"]["Action"] == "relayed"
    assert blocks["rfc822;hank@retry.test"]["Original-Recipient"] == "rfc822;Hank@retry.test"
    assert blocks["rfc822;hank@retry.test"]["Remote-MTA"] == "dns; mx.retry.test"
