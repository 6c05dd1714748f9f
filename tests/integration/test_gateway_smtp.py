"""The gateway's listeners with a real SMTP client (aiosmtplib): MX, submission with STARTTLS
and AUTH, implicit TLS; what lands in the queue (envelope, DSN parameters, Received:)."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiosmtplib
import pytest
from gateway_harness import (
    ALICE,
    ALICE_PASSWORD,
    BOB,
    RawClient,
    message,
    routing_table,
    running_gateway,
)

from mailkube_core.queue import Notify
from mailkube_core.routing import Domain, InboundRelay, User
from mailkube_core.telemetry import Telemetry


async def test_mx_accepts_mail_for_a_local_user_and_queues_it(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.mx, start_tls=False) as smtp:
            errors, reply = await smtp.sendmail("someone@remote.test", [ALICE], message())
        assert errors == {}
        assert reply.startswith("2.0.0 Ok: queued as ")
        [info] = await gw.messages()
        assert reply.endswith(info.id)
        assert info.lane == "local"
        envelope = info.envelope
        assert envelope.mail_from == "someone@remote.test"
        assert [r.address for r in envelope.recipients] == [ALICE]
        assert envelope.listener == "mx"
        assert envelope.client_address == "127.0.0.1"
        assert envelope.trace_context["traceparent"].startswith("00-")
        body = await gw.body(info.id)
        assert body.startswith(b"Received: from ")
        received = body.split(b"\r\n\r\n")[0].decode()
        assert "by mx.test (Mailkube) with ESMTP id " in received
        assert "for <alice@example.test>" in received
        assert body.endswith(b"\r\n\r\nhi\r\n")


async def test_mx_accepts_mail_for_a_domain_we_relay_for_into_the_remote_lane(
    redis_url: str, tmp_path: Path, telemetry: Telemetry
) -> None:
    """An inbound relay domain is ours (no AUTH needed, its users say who exists) but not
    local: its mail goes to the remote lane, for the worker to send to its next hop."""
    table = routing_table()
    table.domains.append(
        Domain(name="relayed.test", inbound_relay=InboundRelay(host="mail.internal.test"))
    )
    table.users.append(User(address="staff@relayed.test"))
    async with running_gateway(redis_url, tmp_path, table=table) as gw:
        async with gw.client(gw.mx, start_tls=False) as smtp:
            await smtp.ehlo()
            await smtp.mail("someone@remote.test")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await smtp.rcpt("nobody@relayed.test")
            assert refused.value.code == 550
            assert refused.value.message.startswith("5.1.1")
            await smtp.rset()
            errors, _ = await smtp.sendmail("someone@remote.test", ["staff@relayed.test"],
                                            message())  # fmt: skip
        assert errors == {}
        [info] = await gw.messages()
        assert info.lane == "remote"
        assert [r.address for r in info.envelope.recipients] == ["staff@relayed.test"]


async def test_starttls_on_mx_is_recorded_as_esmtps_with_the_cipher(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.mx, start_tls=True) as smtp:
            assert "starttls" not in smtp.esmtp_extensions
            await smtp.sendmail("someone@remote.test", [ALICE], message())
        [info] = await gw.messages()
        header = (await gw.body(info.id)).split(b"\r\n\r\n")[0].decode()
        assert "with ESMTPS id" in header
        assert "(using TLSv1.3 with cipher TLS_" in header


async def test_ehlo_advertises_the_extensions_of_each_listener(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.mx, start_tls=False) as smtp:
            await smtp.ehlo()
            mx_plain = set(smtp.esmtp_extensions)
            assert smtp.esmtp_extensions["size"] == str(gw.app.settings.max_message_size)
        for name in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes", "dsn",
                     "starttls"):  # fmt: skip
            assert name in mx_plain
        assert "auth" not in mx_plain
        async with gw.client(gw.submission, start_tls=True) as smtp:
            await smtp.ehlo()
            assert smtp.esmtp_extensions["auth"] == "PLAIN LOGIN"
            assert "starttls" not in smtp.esmtp_extensions
        async with gw.client(gw.submissions, use_tls=True) as smtp:
            await smtp.ehlo()
            assert smtp.esmtp_extensions["auth"] == "PLAIN LOGIN"
            assert "starttls" not in smtp.esmtp_extensions


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_submission_with_auth_is_esmtpsa_and_names_the_user(
    redis_url: str, tmp_path: Path, mechanism: str
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.submission, start_tls=True) as smtp:
            await smtp.ehlo()
            code, _ = (
                await smtp.auth_plain(ALICE, ALICE_PASSWORD)
                if mechanism == "PLAIN"
                else (await smtp.auth_login(ALICE, ALICE_PASSWORD))
            )
            assert code == 235
            await smtp.sendmail(ALICE, ["friend@remote.test", BOB], message(sender=ALICE))
        infos = await gw.messages()
        assert sorted(i.lane for i in infos) == ["local", "remote"]
        for info in infos:
            assert info.envelope.auth_user == ALICE
            assert info.envelope.listener == "submission"
        header = (await gw.body(infos[0].id)).split(b"\r\n\r\n")[0].decode()
        assert "with ESMTPSA id" in header
        assert "(authenticated sender: alice@example.test)" in header
        assert " for <" not in header  # two recipients: no for clause (Bcc privacy)


async def test_submission_refuses_mail_before_starttls_and_auth(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.submission)
        assert (await client.command("EHLO client.test")).startswith("250-")
        assert (await client.command("AUTH PLAIN AGFsaWNlAHB3")).startswith("530 5.7.0")
        assert (await client.command("MAIL FROM:<alice@example.test>")).startswith("530 5.7.0")
        await client.close()
        async with gw.client(gw.submission, start_tls=True) as smtp:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.sendmail(ALICE, [BOB], message(sender=ALICE))
            assert refused.value.code == 530


async def test_implicit_tls_submission(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.submissions, use_tls=True) as smtp:
            await smtp.login(ALICE, ALICE_PASSWORD)
            await smtp.sendmail(ALICE, [BOB], message(sender=ALICE, to=BOB))
        [info] = await gw.messages()
        assert info.envelope.listener == "submissions"
        header = (await gw.body(info.id)).split(b"\r\n\r\n")[0].decode()
        assert "with ESMTPSA id" in header
        # a plain-text client on the implicit-TLS port gets no greeting
        reader_client = await RawClient.connect(gw.submissions, greet=False)
        await reader_client.send(b"EHLO x\r\n")
        assert await reader_client.closed()
        untrusting = gw.client(
            gw.submissions, use_tls=True, tls_context=ssl.create_default_context()
        )
        with pytest.raises(aiosmtplib.SMTPConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.connect()


async def test_dsn_parameters_are_stored_in_the_envelope(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.mx, start_tls=False) as smtp:
            await smtp.ehlo()
            await smtp.mail("someone@remote.test", options=["RET=HDRS", "ENVID=QQ+2Bx"])
            await smtp.rcpt(ALICE, options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Alice+40x"])
            await smtp.rcpt(BOB, options=["NOTIFY=NEVER"])
            code, _ = await smtp.data(message())
            assert code == 250
        [info] = await gw.messages()
        envelope = info.envelope
        assert envelope.ret == "HDRS"
        assert envelope.envid == "QQ+x"
        assert envelope.recipients[0].notify == frozenset({Notify.SUCCESS, Notify.FAILURE})
        assert envelope.recipients[0].orcpt == "rfc822;Alice@x"
        assert envelope.recipients[1].notify == frozenset({Notify.NEVER})


async def test_requiretls_is_offered_and_accepted_only_over_tls(
    redis_url: str, tmp_path: Path
) -> None:
    """RFC 8689 §3, §4.1: REQUIRETLS in EHLO only after TLS; MAIL ... REQUIRETLS without TLS
    is refused with 5.7.10; with it the envelope carries the flag to the worker."""
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        assert "REQUIRETLS" not in await client.command("EHLO client.test")
        reply = await client.command("MAIL FROM:<someone@remote.test> REQUIRETLS")
        assert reply.startswith("530 5.7.10")
        await client.close()
        async with gw.client(gw.mx, start_tls=True) as smtp:
            await smtp.ehlo()
            assert "requiretls" in smtp.esmtp_extensions
            await smtp.sendmail("someone@remote.test", [ALICE], message(),
                                mail_options=["REQUIRETLS"])  # fmt: skip
            await smtp.sendmail("someone@remote.test", [ALICE], message())
        flags = sorted(info.envelope.requiretls for info in await gw.messages())
        assert flags == [False, True]
