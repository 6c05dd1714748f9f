"""Spam defence through the whole stack: the operator (kopf, on kmock's Kubernetes emulator)
publishes the MailDomain's spec.spam into the routing table in a real Redis; a gateway with the
tests' real rspamd as its rspamd_url and a delivery worker (in this event loop) serve mail with
it; rspamd and the gateway look names up on the loopback DNS server.

The operator and the gateway get the same installation default, spam_policy quarantine (as the
chart gives both its `spam` values). The domain first sets policy reject of its own:
- GTUBE to alice on the MX listener is refused with 554 5.7.1 and never reaches her maildir.
Then the domain's policy is removed (merge patch), so the installation's quarantine applies:
- a message rspamd answers `add header` for (rspamd_local.ADD_HEADER_PATTERN) is delivered into
  alice's .Junk/new/ with X-Spam: Yes and X-Spam-Status: Yes;
- a clean message (today's Date, from remote.test, a test zone whose SPF lets loopback send)
  is delivered into her new/ with X-Spam-Status: No and no X-Spam field.
"""

from __future__ import annotations

import email
import email.message
import time
from email.utils import formatdate
from pathlib import Path

import aiosmtplib
import kmock
import pytest
from gateway_harness import gateway_settings, make_tls
from kube_emulator import KubeEmulator
from operator_harness import Api, OperatorRun, eventually, operator_settings
from worker_harness import maildir_files, running_worker, worker_settings

from mailkube_core.cli.rspamd_local import ADD_HEADER_PATTERN, GTUBE, LocalRspamd
from mailkube_core.telemetry import Telemetry
from mailkube_gateway.app import GatewayApp

pytestmark = pytest.mark.kmock(cls=KubeEmulator)

ALICE = "alice@example.test"
SENDER = "someone@remote.test"
DEFAULT_POLICY = "quarantine"


def mail(subject: str, body: str) -> str:
    """A message with today's date (an old one is a spam sign to rspamd)."""
    return (
        f"From: {SENDER}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Date: {formatdate(time.time())}\r\nMessage-ID: <{time.time_ns()}@remote.test>\r\n"
        f"\r\n{body}\r\n"
    )


async def send(mx: int, content: str) -> tuple[int, str]:
    """One message on the MX listener, as a remote server sends it: the reply to DATA."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=mx, start_tls=False,
                               local_hostname="mx.remote.test") as smtp:  # fmt: skip
        try:
            await smtp.mail(SENDER)
            await smtp.rcpt(ALICE)
            reply = await smtp.data(content)
        except aiosmtplib.SMTPResponseException as error:
            return error.code, error.message
    return reply.code, reply.message


def read(path: Path) -> email.message.Message:
    return email.message_from_bytes(path.read_bytes())


def unfolded(message: email.message.Message, name: str) -> list[str]:
    return [" ".join(str(value).split()) for value in message.get_all(name, [])]


async def test_spam_is_refused_quarantined_or_delivered_by_the_domain_policy(
    api: Api,
    kmock: kmock.KubernetesEmulator,
    redis_url: str,
    tmp_path: Path,
    rspamd: LocalRspamd,
    telemetry: Telemetry,
) -> None:
    operator = OperatorRun(operator_settings(redis_url, str(kmock.url), spam_policy=DEFAULT_POLICY))
    await operator.start()
    try:
        await api.create_secret("alice-pw", {"password": "alice-e2e-password"})
        await api.apply("maildomains", "example",
                        {"domain": "example.test", "spam": {"policy": "reject"}})  # fmt: skip
        await api.apply(
            "mailusers", "alice", {"address": ALICE, "passwordSecretRef": {"name": "alice-pw"}}
        )

        async def published() -> None:
            snapshot = await operator.table()
            assert snapshot.user(ALICE) is not None
            domain = await api.get("maildomains", "example")
            assert domain["status"]["spam"]["policy"] == "reject"

        await eventually(published)
        await run_mail(api, redis_url, tmp_path, rspamd, telemetry)
    finally:
        await operator.stop()


async def run_mail(
    api: Api, redis_url: str, tmp_path: Path, rspamd: LocalRspamd, telemetry: Telemetry
) -> None:
    mail_root = tmp_path / "mail"
    tls = make_tls(tmp_path / "tls")
    gateway = GatewayApp(gateway_settings(
        redis_url, tls, hostname="mx.example.test", rspamd_url=rspamd.url,
        spam_policy=DEFAULT_POLICY,
    ))  # fmt: skip
    worker = worker_settings(redis_url, mail_root, key_prefix="mailkube",
                             hostname="mx.example.test")  # fmt: skip
    assert await gateway.start()
    try:
        async with running_worker(worker, telemetry):
            mx = gateway.ports("mx")[0]

            def domain_policy() -> str | None:
                domain = gateway.routing.snapshot.domain("example.test")
                assert domain is not None
                return domain.spam.policy

            async def gateway_has_reject() -> None:
                assert domain_policy() == "reject"

            await eventually(gateway_has_reject)

            # the domain's own reject: rspamd's reject (GTUBE) is refused
            assert await send(mx, mail("gtube", GTUBE)) == (554, "5.7.1 Gtube pattern")

            # the domain's policy removed: the installation's default applies
            await api.patch("maildomains", "example", {"spec": {"spam": {"policy": None}}})

            async def default_in_effect() -> None:
                assert domain_policy() is None
                domain = await api.get("maildomains", "example")
                assert domain["status"]["spam"]["policy"] == DEFAULT_POLICY

            await eventually(default_in_effect)

            code, _ = await send(mx, mail("junk", f"Cheap offer\r\n{ADD_HEADER_PATTERN}"))
            assert code == 250
            code, _ = await send(mx, mail("lunch", "Lunch on Friday?"))
            assert code == 250

            async def delivered() -> tuple[Path, Path]:
                junk = maildir_files(mail_root, ALICE, "Junk")
                inbox = maildir_files(mail_root, ALICE)
                assert (len(junk), len(inbox)) == (1, 1), (junk, inbox)
                return junk[0], inbox[0]

            junk_file, inbox_file = await eventually(delivered, timeout=60)
    finally:
        await gateway.stop()

    junk = read(junk_file)
    assert junk["Subject"] == "junk"
    assert unfolded(junk, "X-Spam") == ["Yes"]
    [status] = unfolded(junk, "X-Spam-Status")
    assert status.startswith("Yes, score="), status
    [result] = unfolded(junk, "X-Spamd-Result")
    assert "MAILKUBE_TEST_ADD_HEADER(8.00)[]" in result

    inbox = read(inbox_file)
    assert inbox["Subject"] == "lunch"
    assert unfolded(inbox, "X-Spam") == []
    [status] = unfolded(inbox, "X-Spam-Status")
    assert status.startswith("No, score="), status
    assert "spf=pass" in str(inbox["Authentication-Results"])

    # GTUBE, refused before the other two were sent, is nowhere in the mail store
    stored = [path for path in mail_root.rglob("*")
              if path.is_file() and path.parent.name in ("new", "cur", "tmp")]  # fmt: skip
    assert sorted(stored) == sorted([junk_file, inbox_file])
    assert not any(GTUBE.encode() in path.read_bytes() for path in stored)
