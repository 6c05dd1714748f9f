"""Local delivery by a running worker: real Redis, real maildirs in a temp dir."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conditions import eventually
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis_servers import RedisServer
from worker_harness import (
    apply_routing,
    enqueue,
    maildir_files,
    message,
    parse,
    queue_empty,
    running_worker,
    table,
    worker_settings,
)

from mailkube_core.cli import queue_cmd
from mailkube_core.queue import Queue, QueueAdmin
from mailkube_core.queue.envelope import utcnow
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import User
from mailkube_core.telemetry import Telemetry
from mailkube_worker.app import consumer_name
from mailkube_worker.counters import Counters
from mailkube_worker.local import LocalDelivery

ALICE = User(address="alice@example.test", aliases=["info@example.test"])
CAROL = User(address="carol@example.test")


async def test_message_lands_in_new_with_return_path_and_delivered_to(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail", role="local")
    routing = await apply_routing(settings, table(ALICE))
    body = message(subject="first")
    async with running_worker(settings, telemetry):
        await enqueue(settings, ["Alice@Example.test"], body, routing=routing)
        files = await eventually(lambda: _files(tmp_path, "alice@example.test"))
        await eventually(lambda: queue_empty(settings))
    assert len(files) == 1
    raw = files[0].read_bytes()
    assert raw.startswith(b"Return-Path: <bob@remote.test>\nDelivered-To: alice@example.test\n")
    assert b"\r\n" not in raw  # maildir files use LF line ends
    assert parse(files[0])["Subject"] == "first"
    box = tmp_path / "mail" / "example.test" / "alice"
    assert list((box / "tmp").iterdir()) == []
    assert files[0].name.endswith(f",S={len(raw)}")
    redis = connect_redis(settings)
    counters = Counters(redis, settings.key_prefix)
    usage = await counters.usage("alice@example.test")
    events = await redis.xrange(counters.events_key)
    await redis.aclose()
    assert (usage.messages, usage.bytes) == (1, len(raw))
    assert len(events) == 1
    fields = events[0][1]
    assert fields[b"mailbox"] == b"alice@example.test"
    assert int(fields[b"size"]) == len(raw)


async def test_alias_catch_all_and_quarantine(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail", role="local")
    routing = await apply_routing(settings, table(ALICE, CAROL, catch_all="carol@example.test"))
    async with running_worker(settings, telemetry):
        await enqueue(settings, ["info@example.test"], message("via alias"), routing=routing)
        await enqueue(settings, ["whoever@example.test"], message("catch-all"), routing=routing)
        await enqueue(settings, ["alice@example.test"], message("spam"), routing=routing,
                      annotations={"quarantine": "dmarc"})  # fmt: skip
        await eventually(lambda: queue_empty(settings))
    inbox = [parse(p)["Subject"] for p in maildir_files(tmp_path / "mail", "alice@example.test")]
    junk = maildir_files(tmp_path / "mail", "alice@example.test", "Junk")
    carol = maildir_files(tmp_path / "mail", "carol@example.test")
    assert inbox == ["via alias"]
    assert [parse(p)["Subject"] for p in junk] == ["spam"]
    assert (tmp_path / "mail/example.test/alice/.Junk/maildirfolder").exists()
    assert [parse(p)["Subject"] for p in carol] == ["catch-all"]
    assert parse(carol[0])["Delivered-To"] == "carol@example.test"


async def test_user_and_its_alias_in_one_message_get_one_copy(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail", role="local")
    routing = await apply_routing(settings, table(ALICE))
    async with running_worker(settings, telemetry):
        await enqueue(settings, ["alice@example.test", "info@example.test"], routing=routing)
        await eventually(lambda: queue_empty(settings))
    assert len(maildir_files(tmp_path / "mail", "alice@example.test")) == 1


async def test_unknown_mailbox_bounces_to_a_local_sender_into_her_maildir(
    redis_url: str, tmp_path: Path, telemetry: Telemetry, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail", role="local")
    routing = await apply_routing(settings, table(ALICE, CAROL))
    async with running_worker(settings, telemetry):
        await enqueue(settings, ["nobody@example.test", "alice@example.test"],
                      message("to nobody", sender="carol@example.test"),
                      mail_from="carol@example.test", routing=routing)  # fmt: skip
        bounces = await eventually(lambda: _files(tmp_path, "carol@example.test"))
        await eventually(lambda: queue_empty(settings))
    assert len(maildir_files(tmp_path / "mail", "alice@example.test")) == 1
    assert len(bounces) == 1
    raw = bounces[0].read_bytes()
    assert raw.startswith(b"Return-Path: <>\n")
    dsn = parse(bounces[0])
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["From"] == f"Mail Delivery System <MAILER-DAEMON@{settings.hostname}>"
    assert dsn["Auto-Submitted"] == "auto-replied"
    _human, status, original = dsn.get_payload()  # type: ignore[misc]
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == f"dns; {settings.hostname}"
    assert [r["Final-Recipient"] for r in per_recipient] == ["rfc822;nobody@example.test"]
    assert per_recipient[0]["Action"] == "failed"
    assert per_recipient[0]["Status"] == "5.1.1"
    assert original.get_content_type() == "text/rfc822-headers"
    assert "Subject: to nobody" in original.get_content()
    # the bounce rate of example.test: 1 delivered, 1 bounced; the DSN itself counts for <>
    redis = connect_redis(settings)
    try:
        stats = await Counters(redis, settings.key_prefix).outcome_stats(utcnow().date())
        await queue_cmd.stats(QueueAdmin.from_settings(settings, redis))
    finally:
        await redis.aclose()
    assert stats["example.test"] == {"delivered": 1, "deferred": 0, "bounced": 1}
    assert stats["<>"] == {"delivered": 1, "deferred": 0, "bounced": 0}
    out = capsys.readouterr().out
    assert "SENDER DOMAIN" in out
    (row,) = [line.split() for line in out.splitlines() if line.startswith("example.test")]
    assert row == ["example.test", "1", "0", "1", "50.0%"]


async def test_over_quota_defers_then_bounces_when_retries_run_out(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail", role="local", max_retries=1)
    tiny = User(address="alice@example.test", quota=100)
    routing = await apply_routing(settings, table(tiny))
    redis = connect_redis(settings)
    admin = QueueAdmin.from_settings(settings, redis)
    try:
        async with running_worker(settings, telemetry):
            (message_id,) = await enqueue(settings, ["alice@example.test"], routing=routing)

            async def bounce_queued() -> list[Any]:
                return [m for m in await admin.list_messages() if m.envelope.mail_from == ""]

            (dsn,) = await eventually(bounce_queued)
        body = await admin.body(dsn.id)
    finally:
        await redis.aclose()
    assert maildir_files(tmp_path / "mail", "alice@example.test") == []
    assert dsn.lane == "remote"  # the sender bob@remote.test is not ours
    assert [r.address for r in dsn.envelope.recipients] == ["bob@remote.test"]
    assert body is not None
    assert b"Status: 4.4.7" in body
    assert b"mailbox full" in body
    assert message_id.encode() in body


async def test_forward_to_a_remote_address_becomes_a_remote_message(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail", role="local")
    forwarder = User(address="alice@example.test", forward_to=["al@elsewhere.test"],
                     keep_copy=True)  # fmt: skip
    routing = await apply_routing(settings, table(forwarder))
    redis = connect_redis(settings)
    admin = QueueAdmin.from_settings(settings, redis)
    try:
        async with running_worker(settings, telemetry):
            await enqueue(settings, ["alice@example.test"], routing=routing)

            async def forwarded() -> list[Any]:
                return [m for m in await admin.list_messages() if m.lane == "remote"]

            (copy,) = await eventually(forwarded)
        body = await admin.body(copy.id)
    finally:
        await redis.aclose()
    assert len(maildir_files(tmp_path / "mail", "alice@example.test")) == 1
    assert copy.envelope.mail_from == "bob@remote.test"  # bounces still reach the author
    assert [r.address for r in copy.envelope.recipients] == ["al@elsewhere.test"]
    assert body is not None
    assert body.startswith(b"Delivered-To: alice@example.test\r\n")


async def test_forwarding_loop_fails_with_5_4_6(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail", role="local")
    forwarder = User(address="alice@example.test", forward_to=["al@elsewhere.test"])
    routing = await apply_routing(settings, table(forwarder, CAROL))
    looped = b"Delivered-To: alice@example.test\r\n" + message()
    async with running_worker(settings, telemetry):
        await enqueue(settings, ["alice@example.test"], looped, mail_from="carol@example.test",
                      routing=routing)  # fmt: skip
        (bounce,) = await eventually(lambda: _files(tmp_path, "carol@example.test"))
    assert b"Status: 5.4.6" in bounce.read_bytes()


async def test_retry_after_a_crash_between_write_and_record_writes_no_second_copy(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    """A worker wrote the file, then died before recording it: the next one must not write
    a second copy, nor count it twice."""
    settings = worker_settings(redis_url, tmp_path / "mail", role="local",
                               visibility_timeout=timedelta(milliseconds=300))  # fmt: skip
    routing = await apply_routing(settings, table(ALICE))
    await enqueue(settings, ["alice@example.test"], routing=routing)
    redis = connect_redis(settings)
    queue = Queue.from_settings(settings, redis)
    await queue.ensure_groups()
    (claimed,) = await queue.claim("dead-pod", "local", 0, count=1, block=None)
    counters = Counters(redis, settings.key_prefix)
    local = LocalDelivery(settings.mail_root, settings.hostname, lambda: routing, counters)
    outcome = await local.deliver(claimed, 0, set())  # written, never recorded
    assert outcome.result.status == "delivered"
    (first,) = maildir_files(tmp_path / "mail", "alice@example.test")
    # an IMAP client has seen it meanwhile: new/ -> cur/ with flags
    (first.parent.parent / "cur").mkdir(exist_ok=True)
    first.rename(first.parent.parent / "cur" / (first.name + ":2,S"))
    try:
        async with running_worker(settings, telemetry):
            await eventually(lambda: queue_empty(settings))
            # the dead pod's consumer leaves the group once its entry was taken over
            stream = queue.keys(0).stream("local")

            async def only_live_consumers() -> bool:
                consumers = await redis.xinfo_consumers(stream, "workers")
                return [c["name"] for c in consumers] == [consumer_name(settings).encode()]

            await eventually(only_live_consumers)
        usage = await counters.usage("alice@example.test")
    finally:
        await redis.aclose()
    assert maildir_files(tmp_path / "mail", "alice@example.test") == []
    assert len(list((first.parent.parent / "cur").iterdir())) == 1
    assert usage.messages == 1


async def _files(tmp_path: Path, address: str) -> list[Path]:
    return maildir_files(tmp_path / "mail", address)


async def test_delivery_continues_the_smtp_sessions_trace(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    exporter = InMemorySpanExporter()
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    settings = worker_settings(redis_url, tmp_path / "mail", role="local")
    routing = await apply_routing(settings, table(ALICE))
    async with running_worker(settings, telemetry):
        await enqueue(settings, ["alice@example.test"], routing=routing,
                      trace_context={"traceparent": f"00-{trace_id}-{parent}-01"})  # fmt: skip
        await eventually(lambda: queue_empty(settings))
    exporter.shutdown()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "deliver local"]
    assert span.context is not None
    assert span.parent is not None
    assert f"{span.context.trace_id:032x}" == trace_id
    assert f"{span.parent.span_id:016x}" == parent
    assert span.attributes is not None
    assert span.attributes["mailkube.outcome"] == "done"


async def test_a_worker_started_before_redis_waits_for_it(
    private_redis: RedisServer, tmp_path: Path, telemetry: Telemetry,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """On a fresh install the workers may start before Redis: they retry, not exit."""
    settings = worker_settings(private_redis.url, tmp_path / "mail")
    private_redis.kill()

    async def retrying() -> bool:
        return any("routing table not loaded yet" in r.getMessage() for r in caplog.records)

    async with asyncio.timeout(60):
        started = asyncio.create_task(_run_until_ready(settings, telemetry))
        await eventually(retrying)
        private_redis.restart()
        await started


async def _run_until_ready(settings: Any, telemetry: Telemetry) -> None:
    async with running_worker(settings, telemetry):
        routing = await apply_routing(settings, table(ALICE))
        await enqueue(settings, ["alice@example.test"], routing=routing)
        await eventually(lambda: queue_empty(settings))
    assert len(maildir_files(settings.mail_root, "alice@example.test")) == 1
