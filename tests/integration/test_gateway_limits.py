"""Limits: SIZE declared and actual, recipients, command length, errors, junk and HTTP,
timeouts, mail loops, header sanity, submission header completion, AUTH failure lockout."""

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
    apply_routing,
    message,
    running_gateway,
)


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


async def test_auth_failures_lock_out_the_address_and_the_user(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path, auth_max_failures=3) as gw:
        async with gw.client(gw.submission, start_tls=True) as smtp:
            await smtp.ehlo()
            for _ in range(2):
                with pytest.raises(aiosmtplib.SMTPAuthenticationError) as error:
                    await smtp.auth_plain(ALICE, "wrong")
                assert (error.value.code, error.value.message[:5]) == (535, "5.7.8")
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as error:
                await smtp.auth_plain(ALICE, "wrong")
            assert (error.value.code, error.value.message[:5]) == (454, "4.7.0")
        # a new connection from the same address: locked even with the right password
        async with gw.client(gw.submission, start_tls=True) as smtp:
            await smtp.ehlo()
            with pytest.raises((aiosmtplib.SMTPAuthenticationError,
                                aiosmtplib.SMTPServerDisconnected)):  # fmt: skip
                await smtp.auth_plain(ALICE, ALICE_PASSWORD)
        # authorization identity other than the authenticated one, suspended users: 535
        await gw.app.redis.flushdb()
        await apply_routing(redis_url)
        async with gw.client(gw.submission, start_tls=True) as smtp:
            await smtp.ehlo()
            blob = base64.b64encode(f"{BOB}\0{ALICE}\0{ALICE_PASSWORD}".encode()).decode()
            code, _ = await smtp.execute_command(b"AUTH", b"PLAIN", blob.encode())
            assert code == 535
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as error:
                await smtp.auth_plain("carol@example.test", "x")
            assert error.value.code == 535
