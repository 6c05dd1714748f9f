"""The worker's outbound client and a peer's CHUNKING (RFC 3030) and LIMITS (RFC 9422): the
content goes by `BDAT <size> LAST` (not dot-stuffed) to a peer offering CHUNKING, by DATA to
one without it, and a peer's RCPTMAX splits the recipients into several transactions. Against
a scripted server that records every byte, and against the real gateway process as the
worker's relay (gateway ← worker)."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from conditions import eventually
from gateway_harness import apply_routing as apply_gateway_routing
from gateway_harness import make_tls, start_gateway_process, stop_gateway_process
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

from mailkube_core.queue import Envelope, Queue, QueueAdmin
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import Domain, RoutingTable, User
from mailkube_core.settings import GatewaySettings, WorkerSettings
from mailkube_core.telemetry import Telemetry
from mailkube_worker import smtp_client

CAROL = User(address="carol@example.test")
#: lines starting with a dot (DATA would stuff them), long enough for many TCP segments
BODY = (
    b"From: carol@example.test\r\nTo: x@far.test\r\nSubject: chunks\r\n\r\n"
    + b"".join(b".line %d of the message, dotted\r\n" % n for n in range(6000))
    + b".\r\n..\r\nend\r\n"
)
#: BINARYMIME content (RFC 3030 §3): header lines, then octets DATA could not carry (NUL,
#: bare CR and LF, CRLF "." CRLF)
BINARY = (
    b"From: carol@example.test\r\nTo: x@far.test\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    + bytes(range(256)) * 64
    + b"\r\n.\r\n\n.\r"
)


@dataclass
class Recording:
    """A peer that offers `extensions` and records each transaction: its commands and the
    content as it arrived (BDAT's octets, or DATA's lines before the final dot)."""

    extensions: list[str]
    commands: list[str] = field(default_factory=list)
    contents: list[bytes] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 recording ESMTP\r\n")
        while line := await reader.readline():
            command = line.decode().rstrip("\r\n")
            self.commands.append(command)
            verb = command.split(" ", 1)[0].upper()
            if verb == "EHLO":
                lines = ["recording", *self.extensions]
                writer.write("".join(f"250-{x}\r\n" for x in lines[:-1]).encode()
                             + f"250 {lines[-1]}\r\n".encode())  # fmt: skip
            elif verb == "BDAT":
                size = int(command.split()[1])
                self.contents.append(await reader.readexactly(size))
                writer.write(b"250 2.0.0 chunk taken\r\n")
            elif verb == "DATA":
                writer.write(b"354 go on\r\n")
                data = b""
                while (part := await reader.readline()) != b".\r\n":
                    data += part
                self.contents.append(data)
                writer.write(b"250 2.0.0 taken\r\n")
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def recording(*extensions: str) -> AsyncIterator[Recording]:
    peer = Recording(list(extensions))
    server = await asyncio.start_server(peer.serve, "127.0.0.1", 0)
    peer.port = server.sockets[0].getsockname()[1]
    try:
        yield peer
    finally:
        server.close()


def via(settings: WorkerSettings, port: int) -> WorkerSettings:
    return WorkerSettings.model_validate(
        {**settings.model_dump(), "smart_host": {"host": "127.0.0.1", "port": port, "tls": "none"}}
    )


async def deliver(
    settings: WorkerSettings,
    telemetry: Telemetry,
    recipients: list[str],
    body: bytes = BODY,
    **envelope: Any,
) -> None:
    routing = await apply_routing(settings, table(CAROL))
    async with running_worker(settings, telemetry):
        await enqueue(
            settings, recipients, body, mail_from="carol@example.test", routing=routing, **envelope
        )
        await eventually(lambda: queue_empty(settings))


async def test_bdat_to_a_peer_with_chunking_and_rcptmax_splits_the_transactions(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail")
    async with recording("PIPELINING", "CHUNKING", "LIMITS RCPTMAX=2 MAILMAX=100") as peer:
        await deliver(via(settings, peer.port), telemetry, [f"r{n}@far.test" for n in range(5)])
    mails = [c for c in peer.commands if c.startswith("MAIL")]
    rcpts = [c for c in peer.commands if c.startswith("RCPT")]
    assert len(mails) == 3, "5 recipients at RCPTMAX=2: three transactions"
    assert len(rcpts) == 5
    assert [c for c in peer.commands if c.startswith("BDAT")] == [f"BDAT {len(BODY)} LAST"] * 3
    assert "DATA" not in peer.commands
    assert peer.contents == [BODY] * 3, "the octets as queued: no dot-stuffing"


async def test_data_to_a_peer_without_chunking(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail")
    async with recording("PIPELINING", "8BITMIME") as peer:
        await deliver(via(settings, peer.port), telemetry, ["r@far.test", "s@far.test"])
    assert [c for c in peer.commands if c.startswith(("BDAT", "DATA"))] == ["DATA"]
    # DATA's dot-stuffing (RFC 5321 §4.5.2): every line starting with a dot got one more
    stuffed = b"".join(b"." + line if line.startswith(b".") else line
                       for line in BODY.splitlines(keepends=True))  # fmt: skip
    assert peer.contents == [stuffed]


async def test_binarymime_goes_by_bdat_to_a_peer_offering_it(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail")
    async with recording("CHUNKING", "BINARYMIME", "8BITMIME") as peer:
        await deliver(via(settings, peer.port), telemetry, ["r@far.test"], BINARY,
                      body_type="BINARYMIME")  # fmt: skip
    mail = [c for c in peer.commands if c.startswith("MAIL")]
    assert len(mail) == 1
    assert mail[0].endswith(" BODY=BINARYMIME"), mail
    assert [c for c in peer.commands if c.startswith(("BDAT", "DATA"))] == [
        f"BDAT {len(BINARY)} LAST"
    ]
    assert peer.contents == [BINARY]


async def test_binarymime_to_a_peer_without_it_bounces_with_the_headers_only(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    """RFC 3030 §3: binary content is never sent to a peer that did not offer BINARYMIME;
    the sender gets a failure report, whose returned part is the headers (the report is not
    binary), even with RET=FULL."""
    settings = worker_settings(redis_url, tmp_path / "mail")
    async with recording("CHUNKING", "8BITMIME") as peer:
        await deliver(via(settings, peer.port), telemetry, ["r@far.test"], BINARY,
                      body_type="BINARYMIME", ret="FULL")  # fmt: skip
    assert not [c for c in peer.commands if c.startswith(("MAIL", "BDAT", "DATA"))]
    [report] = maildir_files(settings.mail_root, CAROL.address)
    dsn = parse(report)
    text = report.read_bytes()
    assert b"5.6.3" in text
    assert b"does not support BINARYMIME" in text
    parts = [part.get_content_type() for part in dsn.walk()]
    assert "text/rfc822-headers" in parts
    assert "message/rfc822" not in parts
    assert bytes(range(256)) not in text


async def test_a_binarymime_message_is_stored_byte_for_byte_in_the_maildir(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    """Text gets LF line ends in a maildir; binary content keeps every octet (its CR LF pairs
    are data), after the Return-Path and Delivered-To lines, which end in CRLF as its own."""
    settings = worker_settings(redis_url, tmp_path / "mail")
    await deliver(settings, telemetry, [CAROL.address], BINARY, body_type="BINARYMIME")
    [stored] = maildir_files(settings.mail_root, CAROL.address)
    head = b"Return-Path: <carol@example.test>\r\nDelivered-To: carol@example.test\r\n"
    assert stored.read_bytes() == head + BINARY


@pytest.fixture
def gateway_redis_url(redis_url: str) -> Iterator[str]:
    """The gateway's own database on the test's Redis (the worker's queue is on db 0),
    emptied after the test as `redis_url` empties db 0."""
    base, _, _ = redis_url.rpartition("/")
    yield f"{base}/1"
    client = redis.Redis.from_url(f"{base}/1")
    try:
        client.flushdb()
    finally:
        client.close()


async def test_worker_relays_to_the_gateway_by_bdat_within_its_rcptmax(
    redis_url: str, gateway_redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    """gateway ← worker: the gateway process offers CHUNKING and LIMITS RCPTMAX=2; the
    worker's five recipients arrive in three transactions, every one accepted (none deferred
    by a 452 past the limit), the content byte for byte as queued."""
    far = [f"dave{n}@far.test" for n in range(5)]
    await apply_gateway_routing(
        gateway_redis_url,
        RoutingTable(domains=[Domain(name="far.test")], users=[User(address=a) for a in far]),
    )
    gateway = start_gateway_process(
        gateway_redis_url, make_tls(tmp_path / "tls"),
        MAILKUBE_MAX_RECIPIENTS="2", MAILKUBE_INBOUND_AUTH_CHECKS="false",
        MAILKUBE_MAX_MESSAGES_PER_MINUTE="100000",
        MAILKUBE_MAX_RECIPIENT_MESSAGES_PER_MINUTE="100000",
    )  # fmt: skip
    try:
        settings = worker_settings(redis_url, tmp_path / "mail")
        await deliver(via(settings, gateway.mx), telemetry, far)
        client = connect_redis(GatewaySettings(redis_url=gateway_redis_url, hostname="mx.test"))
        try:
            queue = Queue(client)
            infos = await QueueAdmin.of(queue).list_messages()
            bodies = [await QueueAdmin.of(queue).body(info.id) for info in infos]
        finally:
            await client.aclose()
    finally:
        stop_gateway_process(gateway)
    assert sorted(len(i.envelope.recipients) for i in infos) == [1, 2, 2]
    assert sorted(r.address for i in infos for r in i.envelope.recipients) == far
    for body in bodies:
        assert body is not None
        assert body.endswith(BODY), "content changed on the way"
        parsed = email.message_from_bytes(body, policy=email.policy.SMTP)
        assert parsed["Subject"] == "chunks"


async def test_binarymime_from_the_worker_to_the_gateway_byte_for_byte(
    redis_url: str, gateway_redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    """gateway ← worker, BINARYMIME both ways: the gateway offers it, the worker sends
    BODY=BINARYMIME by BDAT, and the gateway queues the octets unchanged as BINARYMIME."""
    await apply_gateway_routing(
        gateway_redis_url,
        RoutingTable(domains=[Domain(name="far.test")], users=[User(address="dave@far.test")]),
    )
    gateway = start_gateway_process(
        gateway_redis_url, make_tls(tmp_path / "tls"), MAILKUBE_INBOUND_AUTH_CHECKS="false"
    )
    try:
        settings = worker_settings(redis_url, tmp_path / "mail")
        await deliver(via(settings, gateway.mx), telemetry, ["dave@far.test"], BINARY,
                      body_type="BINARYMIME")  # fmt: skip
        client = connect_redis(GatewaySettings(redis_url=gateway_redis_url, hostname="mx.test"))
        try:
            admin = QueueAdmin(client)
            [info] = await admin.list_messages()
            body = await admin.body(info.id)
        finally:
            await client.aclose()
    finally:
        stop_gateway_process(gateway)
    envelope: Envelope = info.envelope
    assert envelope.body_type == "BINARYMIME"
    assert body is not None
    assert body.endswith(BINARY), "content changed on the way"


@pytest.mark.parametrize(
    ("crlf_checked", "dot_lines"), [(True, True), (True, False), (False, True)]
)
async def test_data_takes_what_the_producer_checked_and_sends_the_same_lines(
    redis_url: str,
    tmp_path: Path,
    telemetry: Telemetry,
    monkeypatch: pytest.MonkeyPatch,
    crlf_checked: bool,
    dot_lines: bool,
) -> None:
    """Envelope.crlf_checked and dot_lines spare the worker its scans, and only that: the peer
    gets the same content either way (dot_lines False is said only of a body without dotted
    lines)."""
    body = BODY if dot_lines else BODY.replace(b"\r\n.", b"\r\n_")
    checked: list[int] = []
    crlf_lines = smtp_client.crlf_lines

    def counting_crlf_lines(content: bytes) -> bytes:
        checked.append(len(content))
        return crlf_lines(content)

    monkeypatch.setattr(smtp_client, "crlf_lines", counting_crlf_lines)
    settings = worker_settings(redis_url, tmp_path / "mail")
    async with recording("PIPELINING", "8BITMIME") as peer:
        await deliver(via(settings, peer.port), telemetry, ["r@far.test"], body,
                      crlf_checked=crlf_checked, dot_lines=dot_lines)  # fmt: skip
    assert checked == ([] if crlf_checked else [len(body)])  # the scan only when unchecked
    stuffed = b"".join(b"." + line if line.startswith(b".") else line
                       for line in body.splitlines(keepends=True))  # fmt: skip
    assert peer.contents == [stuffed]
