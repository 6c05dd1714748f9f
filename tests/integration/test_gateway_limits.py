"""Limits: SIZE declared and actual, recipients, command length, errors, junk and HTTP,
timeouts, mail loops, header sanity, submission header completion, AUTH identities."""

from __future__ import annotations

import base64
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

from mailkube_core.routing.models import DomainLimits


async def test_a_domains_own_size_limit_holds_at_rcpt_and_after_data(
    redis_url: str, tmp_path: Path
) -> None:
    table = routing_table(limits=DomainLimits(max_message_size=2000))
    async with running_gateway(redis_url, tmp_path, table=table, max_message_size=10_000) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        assert (await client.command("MAIL FROM:<a@remote.test> SIZE=3000")).startswith("250")
        reply = await client.command(f"RCPT TO:<{ALICE}>")
        assert reply.startswith("552 5.3.4"), reply
        assert (await client.command("RCPT TO:<lim@limited.test>")).startswith("250")
        await client.command("RSET")
        # no SIZE=: the whole message is refused at its end, for every recipient
        await client.command("MAIL FROM:<a@remote.test>")
        assert (await client.command(f"RCPT TO:<{ALICE}>")).startswith("250")
        assert (await client.command("RCPT TO:<lim@limited.test>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        reply = await client.command(message(body="x" * 900 + "\r\n" + "y" * 1500) + "\r\n.")
        assert reply.startswith("552 5.3.4"), reply
        await client.command("MAIL FROM:<a@remote.test>")
        await client.command(f"RCPT TO:<{ALICE}>")
        await client.command("DATA")
        assert (await client.command(message(body="small") + "\r\n.")).startswith("250 2.0.0")
        await client.close()
        assert len(await gw.messages()) == 1


async def test_size_declared_and_actual(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, max_message_size=10_000) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        reply = await client.command("MAIL FROM:<a@remote.test> SIZE=10001")
        assert reply.startswith("552 5.3.4")
        assert (await client.command("MAIL FROM:<a@remote.test> SIZE=500")).startswith("250")
        await client.command(f"RCPT TO:<{ALICE}>")
        await client.command("DATA")
        big = message(body="x" * 998 + "\r\n" + ("y" * 998 + "\r\n") * 30)
        assert (await client.command(big.encode() + b".")).startswith("552 5.3.4")
        # the session goes on
        assert (await client.command("MAIL FROM:<a@remote.test>")).startswith("250")
        await client.close()
        assert await gw.messages() == []


async def test_too_many_recipients(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, max_recipients=2) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<a@remote.test>")
        assert (await client.command(f"RCPT TO:<{ALICE}>")).startswith("250")
        assert (await client.command(f"RCPT TO:<{BOB}>")).startswith("250")
        assert (await client.command("RCPT TO:<info@example.test>")).startswith("452 4.5.3")
        await client.close()


async def test_errors_junk_http_and_long_lines(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, max_errors=5) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        assert (await client.command("MAIL FROM:<" + "a" * 2000 + "@x.test>")).startswith("500")
        assert (await client.command("XYZZY")).startswith("500 5.5.2")
        assert (await client.command(b"\xff\xfe")).startswith("500")
        assert (await client.command("RCPT TO:<a@b.test>")).startswith("503 5.5.1")
        final = await client.command("FOO")
        assert final.startswith("500 5.5.2")
        assert (await client.reply()).startswith("421 4.7.0 Too many errors")
        assert await client.closed()

        http = await RawClient.connect(gw.mx)
        await http.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await http.closed()
        post = await RawClient.connect(gw.mx)
        await post.send(b"POST /x HTTP/1.0\r\n\r\n")
        assert await post.closed()
        connect = await RawClient.connect(gw.mx)
        await connect.send(b"CONNECT example.test:25 HTTP/1.1\r\n\r\n")
        assert await connect.closed()


async def test_idle_clients_time_out_with_421(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, read_timeout="1s") as gw:
        client = await RawClient.connect(gw.mx)
        await client.command("EHLO client.test")
        assert (await client.reply()).startswith("421 4.4.2")
        assert await client.closed()


async def test_mail_loop_and_header_sanity(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.mx, start_tls=False) as smtp:
            looping = "Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 51
            with pytest.raises(aiosmtplib.SMTPDataError) as error:
                await smtp.sendmail("a@remote.test", [ALICE], looping + message())
            assert (error.value.code, error.value.message[:5]) == (554, "5.4.6")
            fifty = "Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 50
            await smtp.sendmail("a@remote.test", [ALICE], fifty + message())
            for bad in ["Subject: no from\r\n\r\nbody\r\n",
                        "From: a@x\r\nFrom: b@x\r\n\r\nbody\r\n",
                        "From: a@x\r\nSubject: 1\r\nSubject: 2\r\n\r\nbody\r\n"]:  # fmt: skip
                with pytest.raises(aiosmtplib.SMTPDataError) as error:
                    await smtp.sendmail("a@remote.test", [ALICE], bad)
                assert error.value.code == 554
                assert error.value.message.startswith("5.6.0")
        small_gateway = running_gateway(redis_url, tmp_path / "2", max_header_size=1000)
        async with small_gateway as small, small.client(small.mx, start_tls=False) as smtp:
            with pytest.raises(aiosmtplib.SMTPDataError) as error:
                await smtp.sendmail("a@remote.test", [ALICE], "X-Big: " + "b" * 2000 + "\r\n"
                                        + message())  # fmt: skip
            assert error.value.code == 552
        assert len(await gw.messages()) == 1


async def test_submission_adds_date_and_message_id(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.submission, start_tls=True) as smtp:
            await smtp.login(ALICE, ALICE_PASSWORD)
            await smtp.sendmail(ALICE, [BOB], f"From: {ALICE}\r\nTo: {BOB}\r\n\r\nhi\r\n")
        [info] = await gw.messages()
        body = await gw.body(info.id)
        headers = body.split(b"\r\n\r\n")[0]
        assert b"\r\nDate: " in headers
        assert b"\r\nMessage-ID: <" in headers
        assert b"@mx.test>" in headers


async def test_auth_refuses_a_foreign_authorization_identity_and_suspended_users(
    redis_url: str, tmp_path: Path
) -> None:
    """(Throttling of failures: test_gateway_auth.py.)"""
    async with (
        running_gateway(redis_url, tmp_path) as gw,
        gw.client(gw.submission, start_tls=True) as smtp,
    ):
        await smtp.ehlo()
        blob = base64.b64encode(f"{BOB}\0{ALICE}\0{ALICE_PASSWORD}".encode()).decode()
        code, _ = await smtp.execute_command(b"AUTH", b"PLAIN", blob.encode())
        assert code == 535
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as error:
            await smtp.auth_plain("carol@example.test", "x")
        assert error.value.code == 535
