"""The whole stack, as on Kubernetes: the operator (kopf, on kmock's Kubernetes emulator)
turns MailDomain and MailUser resources into the routing table in a real Redis and makes the
DKIM keys; a gateway and a delivery worker (in this event loop) serve mail with it; the DNS
records the operator lists in the MailDomain's status are published on the loopback DNS server.

One mail of each kind goes through:
- inbound: a remote server sends to alice on the MX listener; it lands in her maildir with
  Authentication-Results;
- local submission: alice (AUTH on 587) writes to bob; it lands in his maildir DKIM-signed
  with the operator's keys (RSA and Ed25519), and both signatures verify against the records
  from the status;
- outbound: alice writes to a remote address; the worker delivers it to that domain's MX (a
  fake MX on loopback), where SPF, DKIM and DMARC of example.test all pass, checked with the
  records the operator asked the domain owner to publish.
Then deleting bob's MailUser makes the gateway refuse mail to him.
"""

from __future__ import annotations

import asyncio
import email
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import kmock
import pytest
from dns_server import DnsServer, zone_from_records
from fake_mx import MxFarm
from gateway_harness import gateway_settings, make_tls
from kube_emulator import KubeEmulator
from operator_harness import Api, OperatorRun, condition, eventually, operator_settings
from worker_harness import maildir_files, running_worker, worker_settings

from mailkube_core.telemetry import Telemetry
from mailkube_gateway.app import GatewayApp
from mailkube_gateway.mailauth.dkim_verify import verify_dkim
from mailkube_gateway.mailauth.dmarc_check import check_dmarc
from mailkube_gateway.mailauth.resolver import DnsResolver, ThreadBridge
from mailkube_gateway.mailauth.spf_check import check_spf

pytestmark = pytest.mark.kmock(cls=KubeEmulator)

ALICE, BOB, FAR = "alice@example.test", "bob@example.test", "someone@far.test"
FAR_MX = "127.0.0.43"


async def publish_records(api: Api, dns_server: DnsServer) -> list[dict[str, Any]]:
    """Wait for the domain to be ready, then serve the records of its status."""

    async def ready() -> list[dict[str, Any]]:
        domain = await api.get("maildomains", "example")
        assert condition(domain, "Ready")["status"] == "True"
        assert condition(domain, "DKIMKeyReady")["status"] == "True"
        records = domain["status"]["dnsRecords"]
        assert sum(r["purpose"] == "dkim" for r in records) == 2  # algorithm: both
        return list(records)

    records = await eventually(ready)
    # the MX host the records name (public_hostname) is this machine: SPF "mx" passes for it
    dns_server.add_zone(
        "example.test.", zone_from_records("example.test.", records, extra="mx A 127.0.0.1")
    )
    dns_server.add_zone(
        "far.test.", zone_from_records("far.test.", [], extra=f"@ MX 10 mx\nmx A {FAR_MX}")
    )
    return records


def mail(sender: str, to: str, subject: str) -> str:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@e2e.test>\r\n\r\nHello from the e2e test.\r\n"
    )


async def test_mail_flows_through_the_stack_the_operator_configured(
    api: Api,
    kmock: kmock.KubernetesEmulator,
    redis_url: str,
    tmp_path: Path,
    dns_server: DnsServer,
    mx_farm: MxFarm,
    mx_port: int,
    telemetry: Telemetry,
) -> None:
    operator = OperatorRun(
        operator_settings(redis_url, str(kmock.url), public_hostname="mx.example.test")
    )
    await operator.start()
    try:
        await api.create_secret("alice-pw", {"password": "alice-e2e-password"})
        await api.create_secret("bob-pw", {"password": "bob-e2e-password"})
        await api.apply(
            "maildomains",
            "example",
            {"domain": "example.test", "dkim": {"selector": "e2e", "algorithm": "both"}},
        )
        await api.apply(
            "mailusers", "alice", {"address": ALICE, "passwordSecretRef": {"name": "alice-pw"}}
        )
        await api.apply("mailusers", "bob", {
            "address": BOB, "passwordSecretRef": {"name": "bob-pw"}})  # fmt: skip
        await publish_records(api, dns_server)

        async def users_ready() -> None:
            for name in ("alice", "bob"):
                assert condition(await api.get("mailusers", name), "Ready")["status"] == "True"

        await eventually(users_ready)

        async def published() -> None:
            snapshot = await operator.table()
            assert snapshot.user(ALICE) is not None
            assert snapshot.user(BOB) is not None
            assert snapshot.domain("example.test").signing_keys()  # type: ignore[union-attr]

        await eventually(published)
        await run_mail(redis_url, tmp_path, dns_server, mx_farm, mx_port, telemetry, api)
    finally:
        await operator.stop()


async def run_mail(
    redis_url: str, tmp_path: Path, dns_server: DnsServer, mx_farm: MxFarm, mx_port: int,
    telemetry: Telemetry, api: Api,
) -> None:  # fmt: skip
    far = mx_farm.start(FAR_MX)
    mail_root = tmp_path / "mail"
    dns = {"dns_nameservers": [dns_server.host], "dns_port": dns_server.port}
    tls = make_tls(tmp_path / "tls")
    gateway = GatewayApp(gateway_settings(redis_url, tls, hostname="mx.example.test"))
    worker = worker_settings(redis_url, mail_root, key_prefix="mailkube", smtp_port=mx_port,
                             hostname="mx.example.test", **dns)  # fmt: skip
    assert await gateway.start()
    try:
        async with running_worker(worker, telemetry):
            mx, submission = gateway.ports("mx")[0], gateway.ports("submission")[0]
            context = tls.client_context()

            # inbound, as a remote server would send it
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=mx, start_tls=False,
                                       local_hostname="mx.remote.test") as smtp:  # fmt: skip
                await smtp.sendmail("news@remote.test", [ALICE],
                                    mail("news@remote.test", ALICE, "inbound"))  # fmt: skip
            # submitted by alice: one local, one remote recipient
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=submission,
                                       tls_context=context) as smtp:  # fmt: skip
                await smtp.login(ALICE, "alice-e2e-password")
                await smtp.sendmail(ALICE, [BOB, FAR], mail(ALICE, f"{BOB}, {FAR}", "outbound"))

            async def delivered() -> None:
                assert maildir_files(mail_root, ALICE)
                assert maildir_files(mail_root, BOB)
                assert far.received

            await eventually(delivered, timeout=60)

            inbound = email.message_from_bytes(maildir_files(mail_root, ALICE)[0].read_bytes())
            results = str(inbound["Authentication-Results"])
            assert "spf=pass" in results
            assert "smtp.mailfrom=remote.test" in results

            local_copy = maildir_files(mail_root, BOB)[0].read_bytes()
            await assert_signed_by_operator_keys(local_copy, dns_server)

            [remote_copy] = far.received
            assert remote_copy.rcpt_tos == [FAR]
            await assert_authenticated_at_the_far_end(remote_copy.data, dns_server)

            # the operator's change reaches the gateway: bob is gone
            await api.delete("mailusers", "bob")

            async def bob_refused() -> None:
                async with aiosmtplib.SMTP(hostname="127.0.0.1", port=mx,
                                           start_tls=False) as smtp:  # fmt: skip
                    await smtp.mail("news@remote.test")
                    reply = await smtp.execute_command(f"RCPT TO:<{BOB}>".encode())
                    assert (reply.code, reply.message.split()[0]) == (550, "5.1.1"), reply

            await eventually(bob_refused)
    finally:
        await gateway.stop()


async def assert_signed_by_operator_keys(message: bytes, dns_server: DnsServer) -> None:
    message = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    signatures = [
        value for name, value in dkim.DKIM(message).headers if name.lower() == b"dkim-signature"
    ]
    algorithms = sorted(b"a=ed25519-sha256" in s.replace(b" ", b"") for s in signatures)
    assert algorithms == [False, True], signatures  # one RSA, one Ed25519
    for index in range(len(signatures)):
        assert await asyncio.to_thread(dkim.DKIM(message).verify, index, dns_server.dkim_txt)


async def assert_authenticated_at_the_far_end(message: bytes, dns_server: DnsServer) -> None:
    """What a receiving MX would find, with the records the operator listed."""
    resolver = DnsResolver([dns_server.host], dns_server.port, timeout=3)
    bridge = ThreadBridge(resolver, asyncio.get_running_loop())
    spf = await asyncio.to_thread(check_spf, bridge, "127.0.0.1", ALICE, "mx.example.test")
    assert spf.result == "pass", spf
    results = await asyncio.to_thread(verify_dkim, message, bridge.dkim_txt)
    assert [r.result for r in results] == ["pass", "pass"], results
    assert {r.domain for r in results} == {"example.test"}
    dmarc = await check_dmarc(resolver, "example.test", spf, results)
    assert dmarc.result == "pass", dmarc
