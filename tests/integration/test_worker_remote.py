"""Remote delivery by a running worker: MX records from the test DNS server, real aiosmtpd
servers on 127.0.0.x / ::1 as the remote hosts, real TLS with a trustme CA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conditions import eventually
from dns_server import DnsServer
from fake_mx import Certificates, MxFarm, Script
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

from mailkube_core.queue import Queue, QueueAdmin, Recipient
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import Domain, InboundRelay, RelayHost, RoutingTable, User
from mailkube_core.settings import WorkerSettings
from mailkube_core.telemetry import Telemetry

CAROL = User(address="carol@example.test")


@pytest.fixture
def settings(redis_url: str, tmp_path: Path, dns_server: DnsServer, mx_port: int) -> WorkerSettings:
    return worker_settings(
        redis_url, tmp_path / "mail", dns_nameservers=[dns_server.host],
        dns_port=dns_server.port, smtp_port=mx_port, smtp_connect_timeout=5,
    )  # fmt: skip


def with_(settings: WorkerSettings, **changes: Any) -> WorkerSettings:
    return WorkerSettings.model_validate({**settings.model_dump(), **changes})


async def send(settings: WorkerSettings, telemetry: Telemetry, recipients: list[Any],
               **options: Any) -> None:  # fmt: skip
    """Queue one message from carol@example.test and run a worker until the queue is empty."""
    routing = await apply_routing(settings, table(CAROL))
    async with running_worker(settings, telemetry):
        await enqueue(settings, recipients, options.pop("body", None),
                      mail_from="carol@example.test", routing=routing, **options)  # fmt: skip
        await eventually(lambda: queue_empty(settings))


async def first_attempt(settings: WorkerSettings, telemetry: Telemetry, recipient: str) -> Any:
    """Queue one message from carol and run a worker until its first attempt is settled;
    returns the message as the queue shows it then."""
    routing = await apply_routing(settings, table(CAROL))
    redis = connect_redis(settings)
    queue = Queue.from_settings(settings, redis)
    try:
        async with running_worker(settings, telemetry):
            (message_id,) = await enqueue(
                settings, [recipient], mail_from="carol@example.test", routing=routing
            )

            async def attempted() -> Any:
                info = await QueueAdmin.of(queue).inspect(message_id)
                return info if info and info.attempts >= 1 else None

            return await eventually(attempted)
    finally:
        await redis.aclose()


def bounces(settings: WorkerSettings) -> list[Any]:
    """DSNs delivered to carol's maildir, parsed: (message, per-recipient status blocks)."""
    out = []
    for path in maildir_files(settings.mail_root, "carol@example.test"):
        dsn = parse(path)
        assert dsn.get_content_type() == "multipart/report"
        _, status, _ = dsn.get_payload()  # type: ignore[misc]
        out.append((dsn, status.get_payload()[1:]))
    return out


async def test_mail_goes_to_the_most_preferred_mx(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    mx1, mx2 = mx_farm.start("127.0.0.21"), mx_farm.start("127.0.0.22")
    body = message(to="dave@mx-pref.test")
    await send(settings, telemetry, ["dave@mx-pref.test"], body=body)
    assert mx2.received == []
    (got,) = mx1.received
    assert got.mail_from == "carol@example.test"
    assert got.rcpt_tos == ["dave@mx-pref.test"]
    assert got.helo == settings.hostname
    assert not got.tls  # not offered
    assert got.data.replace(b"\r\n", b"\n") == body.replace(b"\r\n", b"\n")
    assert "SIZE=" + str(len(body)) in got.mail_options


@pytest.mark.parametrize("failure", ["refused", "greeting 421", "greeting 554", "ehlo 421"])
async def test_next_mx_when_the_first_fails_before_the_transaction(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, failure: str
) -> None:
    if failure.startswith("greeting"):
        code = failure.split()[1]
        seen = mx_farm.refuse_at_greeting("127.0.0.21", f"{code} 4.3.2 not now")
    elif failure == "ehlo 421":
        first = mx_farm.start("127.0.0.21", Script(ehlo="421 4.7.0 go away"))
    mx2 = mx_farm.start("127.0.0.22")
    await send(settings, telemetry, ["dave@mx-pref.test"])
    assert [r.rcpt_tos for r in mx2.received] == [["dave@mx-pref.test"]]
    if failure.startswith("greeting"):
        assert seen == [1]
    elif failure == "ehlo 421":
        assert first.handler.connections == 1
        assert first.received == []


async def test_implicit_mx_and_ipv6(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    implicit, v6 = mx_farm.start("127.0.0.23"), mx_farm.start("::1")
    await send(settings, telemetry, ["erin@implicit.test", "fred@v6.test"])
    assert [r.rcpt_tos for r in implicit.received] == [["erin@implicit.test"]]
    assert [r.rcpt_tos for r in v6.received] == [["fred@v6.test"]]


async def test_null_mx_and_unknown_domain_bounce_at_once(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    implicit = mx_farm.start("127.0.0.23")  # nullmx.test's A record: must not be used
    await send(settings, telemetry, ["x@nullmx.test", "y@nope.mx-pref.test"])
    assert implicit.handler.connections == 0
    ((dsn, blocks),) = bounces(settings)
    statuses = {b["Final-Recipient"]: (b["Action"], b["Status"]) for b in blocks}
    assert statuses == {
        "rfc822;x@nullmx.test": ("failed", "5.1.10"),
        "rfc822;y@nope.mx-pref.test": ("failed", "5.1.2"),
    }
    assert dsn["To"] == "carol@example.test"


async def test_starttls_used_when_offered(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates
) -> None:
    # opportunistic TLS takes a certificate that names another host (RFC 7435)
    mx = mx_farm.start("127.0.0.24", tls=certificates.server_context("other.example"))
    await send(settings, telemetry, ["gina@tls.test"])
    (got,) = mx.received
    assert got.tls


async def test_required_tls_verifies_the_certificate(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates
) -> None:
    mx = mx_farm.start("127.0.0.24", tls=certificates.server_context("mx.tls.test"))
    strict = with_(settings, require_tls_domains=["tls.test"],
                   smtp_tls_ca_file=certificates.ca_file)  # fmt: skip
    await send(strict, telemetry, ["gina@tls.test"])
    (got,) = mx.received
    assert got.tls


@pytest.mark.parametrize("server_tls", ["none", "wrong name"])
async def test_required_tls_defers_without_it(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates,
    server_tls: str,
) -> None:  # fmt: skip
    context = certificates.server_context("other.example") if server_tls != "none" else None
    mx = mx_farm.start("127.0.0.24", tls=context)
    strict = with_(settings, require_tls_domains=["tls.test"],
                   smtp_tls_ca_file=certificates.ca_file)  # fmt: skip
    info = await first_attempt(strict, telemetry, "gina@tls.test")
    assert mx.received == []
    result = info.results[0]
    assert result.status == "deferred"
    assert result.enhanced_code == ("4.7.4" if server_tls == "none" else "4.7.5")


async def test_per_recipient_replies_in_one_transaction(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    mx = mx_farm.start("127.0.0.25", Script(rcpt={
        "bad@mixed.test": "550 5.1.1 no such user here",
        "later@mixed.test": ["450 4.2.1 mailbox busy"],
    }))  # fmt: skip
    recipients = [
        Recipient(address="ok@mixed.test"),
        Recipient(address="bad@mixed.test", orcpt="rfc822;Bad@Mixed.test"),
        Recipient(address="later@mixed.test"),
    ]
    await send(settings, telemetry, recipients)
    # first attempt: ok delivered, bad failed, later deferred; the retry delivers only later
    assert [r.rcpt_tos for r in mx.received] == [["ok@mixed.test"], ["later@mixed.test"]]
    ((dsn, blocks),) = bounces(settings)
    (block,) = blocks
    assert block["Final-Recipient"] == "rfc822;bad@mixed.test"
    assert block["Original-Recipient"] == "rfc822;Bad@Mixed.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx.mixed.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user here"
    assert "bad@mixed.test" in dsn.get_payload()[0].get_content()  # type: ignore[index]


async def test_4xx_at_end_of_data_is_retried_and_then_delivered(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    mx = mx_farm.start("127.0.0.26", Script(data=["451 4.3.0 try again", "452 4.3.1 full"]))
    await send(settings, telemetry, ["hank@retry.test", "ivy@retry.test"])
    assert mx.handler.transactions == 3
    assert [r.rcpt_tos for r in mx.received] == [["hank@retry.test", "ivy@retry.test"]]
    assert bounces(settings) == []


async def test_message_over_the_peers_size_limit_fails_5_3_4_without_sending(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    mx = mx_farm.start("127.0.0.27", size_limit=1000)
    await send(settings, telemetry, ["jo@big.test"], body=message(body="x" * 5000))
    assert mx.handler.transactions == 0
    assert mx.received == []
    ((_, (block,)),) = bounces(settings)
    assert block["Status"] == "5.3.4"


async def test_retries_run_out_then_the_message_bounces_4_4_7(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    mx_farm.start("127.0.0.26", Script(rcpt={"kim@retry.test": ["451 4.2.0 later"] * 10}))
    await send(with_(settings, max_retries=2), telemetry, ["kim@retry.test"])
    ((_, (block,)),) = bounces(settings)
    assert block["Action"] == "failed"
    assert block["Status"] == "4.4.7"
    assert "451 4.2.0 later" in block["Diagnostic-Code"]


async def test_connection_reused_for_the_next_message(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    mx = mx_farm.start("127.0.0.21")
    routing = await apply_routing(settings, table(CAROL))
    async with running_worker(with_(settings, connection_cache_time=30), telemetry):
        for n in range(1, 4):
            await enqueue(settings, [f"n{n}@mx-pref.test"], routing=routing)
            await eventually(lambda n=n: _count(mx.received, n))  # type: ignore[misc]
    assert mx.handler.connections == 1
    assert len(mx.received) == 3


async def test_concurrent_connections_per_destination_are_capped(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    mx = mx_farm.start("127.0.0.21")
    capped = with_(settings, destination_concurrency=1, queue_workers=8, connection_cache_time=0)
    routing = await apply_routing(capped, table(CAROL))
    for n in range(12):
        await enqueue(capped, [f"n{n}@mx-pref.test"], routing=routing)
    async with running_worker(capped, telemetry):
        await eventually(lambda: queue_empty(capped))
    assert len(mx.received) == 12
    assert mx.handler.most_active == 1


async def test_smart_host_with_starttls_and_auth(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates,
    tmp_path: Path,
) -> None:  # fmt: skip
    # the relay's certificate names its address, as the smart_host setting does
    relay = mx_farm.start("127.0.0.41", tls=certificates.server_context("127.0.0.41"),
                          users={"mailkube": "s3cret"})  # fmt: skip
    password = tmp_path / "relay-password"
    password.write_text("s3cret\n")
    via_relay = with_(
        settings,
        smtp_tls_ca_file=certificates.ca_file,
        smart_host={"host": "127.0.0.41", "port": settings.smtp_port, "tls": "starttls",
                    "username": "mailkube", "password_file": password},
    )  # fmt: skip
    await send(via_relay, telemetry, ["x@anywhere.example", "y@mx-pref.test"])
    (got,) = relay.received
    assert sorted(got.rcpt_tos) == ["x@anywhere.example", "y@mx-pref.test"]
    assert got.tls
    assert got.login == "mailkube"


async def _count(received: list[Any], n: int) -> bool:
    return len(received) >= n


async def test_smart_host_refusing_the_login_defers(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates,
    tmp_path: Path,
) -> None:  # fmt: skip
    relay = mx_farm.start("127.0.0.41", tls=certificates.server_context("127.0.0.41"),
                          users={"mailkube": "s3cret"})  # fmt: skip
    password = tmp_path / "relay-password"
    password.write_text("wrong")
    via_relay = with_(
        settings,
        smtp_tls_ca_file=certificates.ca_file,
        smart_host={"host": "127.0.0.41", "port": settings.smtp_port, "tls": "starttls",
                    "username": "mailkube", "password_file": password},
    )  # fmt: skip
    info = await first_attempt(via_relay, telemetry, "x@anywhere.example")
    assert relay.received == []
    assert info.results[0].status == "deferred"
    assert info.results[0].enhanced_code.startswith("4.")
    assert "AUTH: 535" in info.results[0].diagnostic


async def test_smtputf8_message_to_a_host_without_it_bounces_5_6_7(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    mx = mx_farm.start("127.0.0.27", smtputf8=False)
    await send(settings, telemetry, ["jürgen@big.test"], smtputf8=True)
    assert mx.handler.transactions == 0
    ((_, (block,)),) = bounces(settings)
    assert block["Status"] == "5.6.7"
    assert block["Final-Recipient"] == "utf-8;j\\x{FC}rgen@big.test"


async def test_many_messages_to_postfix_smtp_sink(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, tmp_path: Path
) -> None:
    sink = mx_farm.start_sink("127.0.0.42", tmp_path / "sink.log")
    routing = await apply_routing(settings, table(CAROL))
    async with running_worker(settings, telemetry):
        for n in range(30):
            await enqueue(settings, [f"n{n}@sink.test"], mail_from="carol@example.test",
                          routing=routing)  # fmt: skip
        await eventually(lambda: queue_empty(settings))
    assert sink.messages() == 30
    assert bounces(settings) == []


async def test_mail_from_a_domain_with_its_own_relay_goes_through_it(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates
) -> None:
    """The MailDomain's relay (from the routing table, credentials included) wins over MX."""
    relay = mx_farm.start("127.0.0.43", tls=certificates.server_context("127.0.0.43"),
                          users={"example-relay": "pw-from-secret"})  # fmt: skip
    mx = mx_farm.start("127.0.0.21")
    trusted = with_(settings, smtp_tls_ca_file=certificates.ca_file)
    own_relay = RelayHost(host="127.0.0.43", port=trusted.smtp_port, tls="starttls",
                          username="example-relay", password="pw-from-secret")  # fmt: skip
    routing = await apply_routing(trusted, table(CAROL, relay=own_relay))
    async with running_worker(trusted, telemetry):
        await enqueue(trusted, ["dave@mx-pref.test"], mail_from="carol@example.test",
                      routing=routing)  # fmt: skip
        await enqueue(trusted, ["erin@mx-pref.test"], mail_from="someone@elsewhere.test",
                      routing=routing)  # fmt: skip
        await eventually(lambda: queue_empty(trusted))
    assert [(r.rcpt_tos, r.login, r.tls) for r in relay.received] == [
        (["dave@mx-pref.test"], "example-relay", True)
    ]
    assert [r.rcpt_tos for r in mx.received] == [["erin@mx-pref.test"]]


async def test_a_relay_wanting_auth_we_lack_defers_not_bounces(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    """E.g. the relay's credentials Secret is missing, so no AUTH is given: 530 at MAIL."""
    relay = mx_farm.start("127.0.0.41", Script(mail="530 5.7.0 Authentication required"))
    via_relay = with_(settings, smart_host={"host": "127.0.0.41", "port": settings.smtp_port,
                                            "tls": "none"})  # fmt: skip
    info = await first_attempt(via_relay, telemetry, "x@anywhere.example")
    assert relay.received == []
    assert info.results[0].status == "deferred"
    assert info.results[0].enhanced_code == "4.7.0"
    assert "530 5.7.0 Authentication required" in info.results[0].diagnostic
    assert bounces(settings) == []


async def test_mail_to_a_domain_we_relay_for_goes_to_its_next_hop_ahead_of_the_smart_host(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm
) -> None:
    """An inbound relay domain (Postfix's relay_domains + transport): its mail goes to the
    next hop the routing table names, not into a maildir and not to the smart host; a user
    forwarding into it is followed there too."""
    next_hop = mx_farm.start("127.0.0.44")
    smart = mx_farm.start("127.0.0.41")
    via_smart = with_(settings, smart_host={"host": "127.0.0.41", "port": settings.smtp_port,
                                            "tls": "none"})  # fmt: skip
    hop = InboundRelay(host="127.0.0.44", port=settings.smtp_port, tls="none")
    forwarder = User(address="fwd@example.test", forward_to=["staff@relayed.test"])
    routing = RoutingTable(
        domains=[Domain(name="example.test"), Domain(name="relayed.test", inbound_relay=hop)],
        users=[CAROL, forwarder, User(address="staff@relayed.test")],
    )
    snapshot = await apply_routing(via_smart, routing)
    assert not snapshot.is_local("staff@relayed.test")
    assert snapshot.is_local_domain("relayed.test")
    async with running_worker(via_smart, telemetry):
        await enqueue(via_smart, ["staff@relayed.test"], routing=snapshot)
        await enqueue(via_smart, ["fwd@example.test"], routing=snapshot)
        await enqueue(via_smart, ["x@elsewhere.test"], mail_from="carol@example.test",
                      routing=snapshot)  # fmt: skip
        await eventually(lambda: queue_empty(via_smart))
    assert sorted(r.rcpt_tos[0] for r in next_hop.received) == [
        "staff@relayed.test", "staff@relayed.test"
    ]  # fmt: skip
    assert [r.rcpt_tos for r in smart.received] == [["x@elsewhere.test"]]
    assert maildir_files(via_smart.mail_root, "staff@relayed.test") == []
