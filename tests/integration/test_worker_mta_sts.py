"""MTA-STS (RFC 8461) applied by a running worker: the `_mta-sts` TXT record and the
`mta-sts.<domain>` host from the test DNS server, the policy from a loopback HTTPS server
whose certificate comes from a trustme CA the worker is told to trust, fake MX hosts with
good, wrong-name, expired and self-signed certificates and with STARTTLS stripped."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from conditions import eventually
from dns_server import DnsServer
from fake_mx import Certificates, MxFarm, Script
from sts_server import StsServer
from tls_delivery import CAROL, first_attempt, outcomes
from worker_harness import (
    apply_routing,
    enqueue,
    maildir_files,
    parse,
    queue_empty,
    running_worker,
    table,
)
from worker_harness import worker_settings as make_settings

from mailkube_core.queue import Queue, QueueAdmin
from mailkube_core.redis_client import connect_redis
from mailkube_core.settings import WorkerSettings
from mailkube_core.telemetry import Telemetry
from mailkube_worker.mx import MxResolver
from mailkube_worker.tlspolicy.tlsrpt_store import day_of
from mailkube_worker.tlspolicy.wiring import tls_reporter

STS_HOST = "127.0.0.50"
MX_ADDRESS = "127.0.0.26"


@pytest.fixture
def sts_server(certificates: Certificates) -> Iterator[StsServer]:
    server = StsServer(STS_HOST, certificates.server_context("mta-sts.unused.test"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path, dns_server: DnsServer, mx_port: int,
             sts_server: StsServer, certificates: Certificates) -> WorkerSettings:  # fmt: skip
    return make_settings(
        redis_url, tmp_path / "mail", dns_nameservers=[dns_server.host],
        dns_port=dns_server.port, smtp_port=mx_port, smtp_connect_timeout=5,
        mta_sts_port=sts_server.port, smtp_tls_ca_file=certificates.ca_file,
        mta_sts_fetch_timeout=5,
    )  # fmt: skip


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    return "\r\n".join(["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx),
                        f"max_age: {max_age}", ""])  # fmt: skip


def publish(dns: DnsServer, sts: StsServer, certificates: Certificates, policy: str | None,
            *, record_id: str = "1", mx_name: str = "mx", extra: str = "") -> str:  # fmt: skip
    """A fresh domain whose MX is `mx_name`.<domain> at MX_ADDRESS, publishing `policy`."""
    domain = f"s{uuid.uuid4().hex[:8]}.sts.test"
    lines = [f"@ 60 IN SOA ns.{domain}. h.{domain}. 1 3600 600 86400 60",
             f"@ 60 IN MX 10 {mx_name}", f"{mx_name} 60 IN A {MX_ADDRESS}",
             f"mta-sts 60 IN A {STS_HOST}"]  # fmt: skip
    if policy is not None:
        lines.append(f'_mta-sts 60 IN TXT "v=STSv1; id={record_id};"')
        sts.serve(domain, policy)
    sts.certificate(domain, certificates.server_context(f"mta-sts.{domain}"))
    dns.add_zone(domain, "\n".join(lines) + "\n" + extra.replace("{domain}", domain))
    return domain


def mx_context(certificates: Certificates, kind: str, name: str) -> ssl.SSLContext | None:
    """The certificate a fake MX presents: good, wrong-name, expired, self-signed, or none
    (STARTTLS stripped)."""
    if kind == "none":
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if kind == "good":
        certificates.ca.issue_cert(name).configure_cert(context)
    elif kind == "wrong-name":
        certificates.ca.issue_cert("other.example").configure_cert(context)
    elif kind == "expired":
        past = datetime.now(UTC) - timedelta(days=2)
        certificates.ca.issue_cert(name, not_before=past - timedelta(days=90),
                                   not_after=past).configure_cert(context)  # fmt: skip
    elif kind == "self-signed":
        trustme.CA().issue_cert(name).configure_cert(context)
    return context


RESULT = {"good": "success", "wrong-name": "certificate-host-mismatch",
          "expired": "certificate-expired", "self-signed": "certificate-not-trusted",
          "none": "starttls-not-supported"}  # fmt: skip


@pytest.mark.parametrize("mode", ["enforce", "testing", "none"])
@pytest.mark.parametrize("server", ["good", "wrong-name", "expired", "self-signed", "none"])
async def test_policy_mode_and_mx_certificate(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates,
    dns_server: DnsServer, sts_server: StsServer, mode: str, server: str,
) -> None:  # fmt: skip
    domain = publish(dns_server, sts_server, certificates, policy_text(mode, "mx.{d}"))
    # the policy names the MX host of this very domain
    sts_server.serve(domain, policy_text(mode, f"mx.{domain}"))
    mx = mx_farm.start(MX_ADDRESS, tls=mx_context(certificates, server, f"mx.{domain}"))
    info = await first_attempt(settings, telemetry, f"rcpt@{domain}")
    if mode == "enforce" and server != "good":
        # never downgraded: deferred, and nothing reached the host
        assert mx.received == []
        (result,) = info.results.values()
        assert result.status == "deferred"
        assert result.enhanced_code in ("4.7.5", "4.7.4")
    else:
        await eventually(lambda: _count(mx.received, 1))
        assert mx.received[0].tls is (server != "none")
    got = await outcomes(settings, domain)
    if mode == "none":
        assert {o.policy_type for o in got} == {"no-policy-found"}
    else:
        ((outcome, count),) = got.items()
        assert (outcome.policy_type, outcome.result, count) == ("sts", RESULT[server], 1)
        assert outcome.mx_patterns == (f"mx.{domain}",)
        assert outcome.mx_host == f"mx.{domain}"
        assert outcome.ip == MX_ADDRESS


async def _count(received: list[Any], n: int) -> bool:
    return len(received) >= n


@pytest.mark.parametrize(("mode", "server", "override", "delivered"), [
    ("enforce", "wrong-name", "opportunistic", True),  # the operator's escape hatch
    ("testing", "wrong-name", "sts", False),  # a testing policy enforced
    ("testing", "good", "sts", True),
    (None, "wrong-name", "sts", False),  # sts wanted, none published
    (None, "wrong-name", "required", False),
    (None, "good", "required", True),
])  # fmt: skip
async def test_routing_table_overrides(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates,
    dns_server: DnsServer, sts_server: StsServer, mode: str | None, server: str, override: str,
    delivered: bool,
) -> None:  # fmt: skip
    domain = publish(dns_server, sts_server, certificates, "placeholder" if mode else None)
    if mode is not None:
        sts_server.serve(domain, policy_text(mode, f"mx.{domain}"))
    mx = mx_farm.start(MX_ADDRESS, tls=mx_context(certificates, server, f"mx.{domain}"))
    info = await first_attempt(settings, telemetry, f"rcpt@{domain}", {domain: override})
    if delivered:
        await eventually(lambda: _count(mx.received, 1))
    else:
        assert mx.received == []
        (result,) = info.results.values()
        assert (result.status, result.enhanced_code) == ("deferred", "4.7.5")
    if override == "opportunistic":
        assert f"mta-sts.{domain}" not in sts_server.requests  # not even looked up


async def test_enforce_never_uses_an_mx_host_the_policy_does_not_name(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates,
    dns_server: DnsServer, sts_server: StsServer,
) -> None:  # fmt: skip
    domain = publish(dns_server, sts_server, certificates,
                     policy_text("enforce", "mx.elsewhere.test"), mx_name="rogue")  # fmt: skip
    mx = mx_farm.start(MX_ADDRESS, tls=mx_context(certificates, "good", f"rogue.{domain}"))
    info = await first_attempt(settings, telemetry, f"rcpt@{domain}")
    (result,) = info.results.values()
    assert (result.status, result.enhanced_code) == ("deferred", "4.7.5")
    assert "not an MX host of the MTA-STS policy" in result.diagnostic
    assert mx.handler.connections == 0
    ((outcome, _),) = (await outcomes(settings, domain)).items()
    assert outcome.result == "validation-failure"


async def test_the_policy_is_cached_in_redis_for_max_age(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates,
    dns_server: DnsServer, sts_server: StsServer,
) -> None:  # fmt: skip
    domain = publish(dns_server, sts_server, certificates, "placeholder")
    text = policy_text("enforce", f"mx.{domain}", max_age=3600)
    sts_server.serve(domain, text)
    mx_farm.start(MX_ADDRESS, tls=mx_context(certificates, "good", f"mx.{domain}"))
    routing = await apply_routing(settings, table(CAROL))
    async with running_worker(settings, telemetry):
        for _ in range(3):
            await enqueue(settings, [f"rcpt@{domain}"], mail_from="carol@example.test",
                          routing=routing)  # fmt: skip
        await eventually(lambda: queue_empty(settings))
    assert sts_server.requests[f"mta-sts.{domain}"] == 1  # fetched once for three messages
    redis = connect_redis(settings)
    try:
        key = f"{settings.key_prefix}:sts:{domain}"
        cached = json.loads(await redis.get(key))
        assert cached["id"] == "1"
        assert cached["text"] == text
        assert 3500 < await redis.ttl(key) <= 3600
    finally:
        await redis.aclose()


async def test_tls_rpt_reports_the_day_to_mailto_and_https(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates,
    dns_server: DnsServer, sts_server: StsServer,
) -> None:  # fmt: skip
    """The issue's "done when": enforce + an MX certificate for the wrong name stays deferred,
    and the day's TLS-RPT report says so, by mail through our own queue and by HTTPS POST."""
    rua = f"https://collector.{{domain}}:{sts_server.port}/v1/tlsrpt"
    domain = publish(dns_server, sts_server, certificates, "placeholder", extra="\n".join([
        f'_smtp._tls 60 IN TXT "v=TLSRPTv1; rua=mailto:tls@inbox.{{domain}},{rua}"',
        "inbox 60 IN A 127.0.0.28", f"collector 60 IN A {STS_HOST}", ""]))  # fmt: skip
    sts_server.serve(domain, policy_text("enforce", f"mx.{domain}"))
    sts_server.certificate(domain, certificates.server_context(f"collector.{domain}"),
                           host="collector")  # fmt: skip
    mx = mx_farm.start(MX_ADDRESS, tls=mx_context(certificates, "wrong-name", f"mx.{domain}"))
    inbox = mx_farm.start("127.0.0.28")
    info = await first_attempt(settings, telemetry, f"rcpt@{domain}")
    assert mx.received == []
    redis = connect_redis(settings)
    queue = Queue.from_settings(settings, redis)
    try:
        attempts = (await QueueAdmin.of(queue).inspect(info.id)).attempts  # the worker has stopped
        routing = await apply_routing(settings, table(CAROL))
        resolver = MxResolver([dns_server.host], port=dns_server.port)
        reporter = tls_reporter(settings, redis, resolver, queue, lambda: routing)
        assert reporter is not None
        today = day_of(datetime.now(UTC))
        assert await reporter.send_day(today) == 1
        assert await reporter.send_day(today) == 0  # once a day
        async with running_worker(settings, telemetry):
            await eventually(lambda: _count(inbox.received, 1))
    finally:
        await redis.aclose()
    (got,) = inbox.received
    assert got.rcpt_tos == [f"tls@inbox.{domain}"]
    message = email.message_from_bytes(got.data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message["TLS-Report-Domain"] == domain
    _, attachment = message.iter_parts()  # type: ignore[attr-defined]
    report = json.loads(gzip.decompress(attachment.get_content()))
    (policy,) = report["policies"]
    assert policy["policy"]["policy-type"] == "sts"
    assert policy["policy"]["mx-host"] == [f"mx.{domain}"]
    assert policy["summary"] == {"total-successful-session-count": 0,
                                 "total-failure-session-count": attempts}  # fmt: skip
    (detail,) = policy["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == f"mx.{domain}"
    ((host, path, media_type, body),) = sts_server.posts
    assert (host.split(":")[0], path, media_type) == (f"collector.{domain}", "/v1/tlsrpt",
                                                      "application/tlsrpt+gzip")  # fmt: skip
    assert json.loads(gzip.decompress(body)) == report


def probe(settings: WorkerSettings, domain: str) -> subprocess.CompletedProcess[str]:
    """`mailkube delivery probe DOMAIN` with the worker's settings in MAILKUBE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
    for name in ("dns_port", "smtp_port", "mta_sts_port", "smtp_tls_ca_file",
                 "dns_dnssec_trusted", "hostname"):  # fmt: skip
        env[f"MAILKUBE_{name.upper()}"] = str(getattr(settings, name))
    env["MAILKUBE_DNS_NAMESERVERS"] = ",".join(settings.dns_nameservers)
    env["MAILKUBE_REDIS_URL"] = "redis://127.0.0.1:1/0"  # not used: no Redis needed
    command = [sys.executable, "-m", "mailkube_core.cli.main", "delivery", "probe", domain]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("server", ["good", "wrong-name"])
def test_probe_shows_the_policy_and_each_hosts_certificate(
    settings: WorkerSettings, mx_farm: MxFarm, certificates: Certificates,
    dns_server: DnsServer, sts_server: StsServer, server: str,
) -> None:  # fmt: skip
    domain = publish(dns_server, sts_server, certificates, "placeholder", extra=(
        '_smtp._tls 60 IN TXT "v=TLSRPTv1; rua=mailto:tls@{domain}"\n'))  # fmt: skip
    sts_server.serve(domain, policy_text("enforce", f"mx.{domain}"))
    mx_farm.start(MX_ADDRESS, tls=mx_context(certificates, server, f"mx.{domain}"))
    result = probe(settings, domain)
    out = result.stdout
    assert f"  MX  10 mx.{domain} [{MX_ADDRESS}]" in out, result.stderr
    assert f"MTA-STS: id 1; mode enforce, max_age 86400, mx mx.{domain}" in out
    assert f"TLS-RPT: rua mailto:tls@{domain}" in out
    assert "DANE: off" in out
    assert f"host mx.{domain} [{MX_ADDRESS}]\n  policy: sts\n  TLS: TLSv1.3" in out
    names = f"mx.{domain}" if server == "good" else "other.example"
    assert "  certificate 0: subject OU=Testing cert" in out
    assert f"names {names}; issuer" in out
    if server == "good":
        assert "  verdict: satisfies the policy" in out
        assert result.returncode == 0
    else:
        assert "  verdict: FAILS, mail deferred: certificate-host-mismatch" in out
        assert result.returncode == 1


async def bounce_status(settings: WorkerSettings) -> tuple[str, str]:
    """(Status, Diagnostic-Code) of the one DSN that came back to carol."""

    async def dsn() -> Path | None:
        paths = maildir_files(settings.mail_root, "carol@example.test")
        return paths[0] if paths else None

    report = parse(await eventually(dsn))
    _, status, _ = report.get_payload()  # type: ignore[misc]
    block = status.get_payload()[1]
    return block["Status"], block["Diagnostic-Code"]


@pytest.mark.parametrize(("mode", "server", "offers", "outcome"), [
    ("enforce", "good", True, "delivered"),
    ("testing", "good", True, "delivered"),  # testing mode validates too (RFC 8689 §4.2.1)
    ("enforce", "good", False, "does not offer REQUIRETLS"),
    (None, "good", True, "neither an MTA-STS policy nor DANE"),
    ("testing", "wrong-name", True, "certificate-host-mismatch"),  # enforced all the same
    ("enforce", "none", True, "STARTTLS"),
])  # fmt: skip
async def test_requiretls_goes_only_over_validated_tls_to_hosts_offering_it(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates,
    dns_server: DnsServer, sts_server: StsServer, mode: str | None, server: str, offers: bool,
    outcome: str,
) -> None:  # fmt: skip
    domain = publish(dns_server, sts_server, certificates, "placeholder" if mode else None)
    if mode is not None:
        sts_server.serve(domain, policy_text(mode, f"mx.{domain}"))
    mx = mx_farm.start(MX_ADDRESS, Script(requiretls=offers),
                       tls=mx_context(certificates, server, f"mx.{domain}"))  # fmt: skip
    await first_attempt(settings, telemetry, f"rcpt@{domain}", requiretls=True)
    if outcome == "delivered":
        await eventually(lambda: _count(mx.received, 1))
        assert "REQUIRETLS" in mx.received[0].mail_options  # passed on to the next hop
        return
    status, diagnostic = await bounce_status(settings)
    assert status == "5.7.30"  # bounced, not retried
    assert outcome in diagnostic
    assert mx.received == []


async def test_tls_required_no_waives_the_policies(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, certificates: Certificates,
    dns_server: DnsServer, sts_server: StsServer,
) -> None:  # fmt: skip
    """RFC 8689 §5: a message whose sender says `TLS-Required: No` is delivered even where
    the domain's enforced policy would defer it (still over TLS when offered)."""
    domain = publish(dns_server, sts_server, certificates, "placeholder")
    sts_server.serve(domain, policy_text("enforce", f"mx.{domain}"))
    mx = mx_farm.start(MX_ADDRESS, tls=mx_context(certificates, "wrong-name", f"mx.{domain}"))
    body = b"From: carol@example.test\r\nTLS-Required: No\r\nSubject: x\r\n\r\nhi\r\n"
    await first_attempt(settings, telemetry, f"rcpt@{domain}", body=body)
    await eventually(lambda: _count(mx.received, 1))
    assert mx.received[0].tls
