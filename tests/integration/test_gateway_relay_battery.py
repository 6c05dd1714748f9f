"""The relay-attempt battery against a live MX listener: every address trick is refused
without AUTH; after AUTH, anyone may be reached but only from one's own addresses. RCPT
checks for local mailboxes: unknown, suspended, over quota, postmaster."""

from __future__ import annotations

from pathlib import Path

import aiosmtplib
import pytest
from gateway_harness import ALICE, ALICE_PASSWORD, RawClient, message, running_gateway

from mailkube_core.mailbox import BYTES_FIELD, mailbox_key

BATTERY = [
    "<victim@remote.test>",
    "<VICTIM@REMOTE.TEST>",
    "<victim%remote.test@example.test>",
    "<victim%remote.test@EXAMPLE.test>",
    "<remote.test!victim@example.test>",
    '<"victim@remote.test"@example.test>',
    '<"victim%remote.test"@example.test>',
    '<"remote.test!victim"@example.test>',
    "<@example.test:victim@remote.test>",
    "<@example.test,@example.test:victim@remote.test>",
    "<victim@remote.test@example.test>",
    "<victim@remote.test.>",
    "<victim@example.test.remote.test>",
    "<victim@[127.0.0.1]>",
    "<victim@[IPv6:::1]>",
    "<victim@xn--remote-9ya.test>",
    "victim@remote.test",
    "<victim@remote.test",
    "<<victim@remote.test>>",
    "<>",
    "< victim@remote.test>",
    "<victim@remote.test> NOTIFY=NEVER",
    "<victim@remote.test%example.test>",
]


async def test_every_relay_trick_is_refused_without_auth(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, max_errors=100) as gw:
        client = await RawClient.connect(gw.mx)
        assert (await client.command("EHLO attacker.test")).startswith("250")
        for trick in BATTERY:
            assert (await client.command("MAIL FROM:<attacker@remote.test>")).startswith("250")
            reply = await client.command(f"RCPT TO:{trick}")
            assert reply[:1] == "5", (trick, reply)
            assert (await client.command("RSET")).startswith("250")
        # the UTF-8 variants, with SMTPUTF8
        for trick in ["<victim@bücher.remote.test>", "<victim@remote\uff0etest>"]:
            await client.command("MAIL FROM:<attacker@remote.test> SMTPUTF8")
            reply = await client.command(f"RCPT TO:{trick}")
            assert reply.startswith("554 5.7.1"), (trick, reply)
            await client.command("RSET")
        # and the same tricks say "relay denied" where they parse
        await client.command("MAIL FROM:<attacker@remote.test>")
        assert (await client.command("RCPT TO:<victim@remote.test>")).startswith("554 5.7.1")
        assert (await client.command("RCPT TO:<a%b@example.test>")).startswith("554 5.7.1")
        assert (await client.command("RCPT TO:<x@y@example.test>")).startswith("501 5.1.3")
        assert (await client.command("DATA")).startswith("503 5.5.1")
        await client.close()
        assert await gw.messages() == []


async def test_local_domain_tricks_that_are_still_local_are_accepted(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<someone@remote.test> SMTPUTF8")
        for address in ["<ALICE@Example.Test>", '<"alice"@example.test>',
                        "<@relay.test:alice@example.test>", "<info@example.test>",
                        "<owner@bücher.example>"]:  # fmt: skip
            assert (await client.command(f"RCPT TO:{address}")).startswith("250 2.1.5"), address
        await client.close()


async def test_rcpt_checks_for_local_mailboxes(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<someone@remote.test>")
        assert (await client.command("RCPT TO:<nobody@example.test>")).startswith("550 5.1.1")
        assert (await client.command("RCPT TO:<carol@example.test>")).startswith("550 5.2.1")
        assert (await client.command("RCPT TO:<PostMaster>")).startswith("250 2.1.5")
        assert (await client.command("RCPT TO:<postmaster@limited.test>")).startswith("250")
        await gw.app.redis.hset(mailbox_key("mailkube", "full@example.test"), BYTES_FIELD, 5000)
        assert (await client.command("RCPT TO:<full@example.test>")).startswith("452 4.2.2")
        await client.command("RCPT TO:<alice@example.test>")
        assert (await client.command("DATA")).startswith("354")
        reply = await client.command(message().encode() + b".")
        assert reply.startswith("250 2.0.0")
        await client.close()
        [info] = await gw.messages()
        # both postmaster forms go to the configured postmaster mailbox, once
        assert [r.address for r in info.envelope.recipients] == ["pm@example.test", ALICE]


async def test_null_sender_only_on_mx(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.mx, start_tls=False) as smtp:
            await smtp.sendmail("", [ALICE], message(sender="mailer-daemon@remote.test"))
        async with gw.client(gw.submission, start_tls=True) as smtp:
            await smtp.login(ALICE, ALICE_PASSWORD)
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.sendmail("", [ALICE], message())
            assert refused.value.code == 553
        [info] = await gw.messages()
        assert info.envelope.mail_from == ""


async def test_authenticated_users_reach_anyone_but_only_from_their_own_addresses(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.submission, start_tls=True) as smtp:
            await smtp.login(ALICE, ALICE_PASSWORD)
            foreigners = [
                "bob@example.test",
                "ceo@remote.test",
                "alice@remote.test",
                "alice%remote.test@example.test",
                "ALICE@example.test.evil.test",
            ]
            for foreign in foreigners:
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                    await smtp.sendmail(foreign, ["victim@remote.test"], message(sender=foreign))
                assert refused.value.code == 553
                assert "5.7.1" in refused.value.message
                await smtp.rset()
            for own in ["ALICE@example.test", "info@example.test", "team@example.test"]:
                await smtp.sendmail(own, ["victim@remote.test"], message(sender=own))
        infos = await gw.messages()
        assert sorted(i.envelope.mail_from for i in infos) == [
            "ALICE@example.test", "info@example.test", "team@example.test",
        ]  # fmt: skip
        assert {i.lane for i in infos} == {"remote"}
