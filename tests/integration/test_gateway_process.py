"""The `mailkube-gateway` process: readiness, real swaks clients on every listener, SIGTERM
(idle sessions get 421, a message being received finishes first), Redis down -> 451."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from pathlib import Path

import pytest
from gateway_harness import (
    ALICE,
    ALICE_PASSWORD,
    RawClient,
    apply_routing,
    http_status,
    make_tls,
    start_gateway_process,
    stop_gateway_process,
    wait_until,
)
from redis_servers import RedisServer

from mailkube_core.queue import QueueAdmin
from mailkube_core.redis_client import connect_redis
from mailkube_core.settings import CommonSettings


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--to", ALICE, "--timeout", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def queued(redis_url: str) -> int:
    client = connect_redis(CommonSettings(redis_url=redis_url))
    try:
        return (await QueueAdmin(client).stats()).messages
    finally:
        await client.aclose()


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_swaks_on_every_listener_and_a_clean_sigterm(
    redis_url: str, tmp_path: Path, event_loop: str
) -> None:
    """STARTTLS, implicit TLS and AUTH, under either event loop (event_loop)."""
    await apply_routing(redis_url)
    tls = make_tls(tmp_path / "tls")
    gateway = start_gateway_process(redis_url, tls, MAILKUBE_EVENT_LOOP=event_loop)
    try:
        auth = ["--auth-user", ALICE, "--auth-password", ALICE_PASSWORD, "--from", ALICE]
        runs = [
            swaks(gateway.mx, "--from", "someone@remote.test"),
            swaks(gateway.mx, "--from", "someone@remote.test", "--tls"),
            swaks(gateway.submission, "--tls", "--auth", "PLAIN", *auth),
            swaks(gateway.submission, "--tls", "--auth", "LOGIN", *auth),
            swaks(gateway.submissions, "--tlsc", "--auth", "PLAIN", *auth),
        ]
        for run in runs:
            assert run.returncode == 0, run.stdout + run.stderr
            assert re.search(r"<[-~]  250 2\.0\.0 Ok: queued as ", run.stdout), run.stdout
        assert await queued(redis_url) == 5
        # AUTH is never offered before TLS on submission: swaks refuses to go on
        plain = swaks(gateway.submission, "--auth", "PLAIN", *auth)
        assert plain.returncode != 0
        assert "Host did not advertise authentication" in plain.stderr
    finally:
        code, stderr = stop_gateway_process(gateway)
    assert code == 0, stderr


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_a_proxy_header_names_the_client_under_either_event_loop(
    redis_url: str, tmp_path: Path, event_loop: str
) -> None:
    await apply_routing(redis_url)
    tls = make_tls(tmp_path / "tls")
    gateway = start_gateway_process(
        redis_url, tls, MAILKUBE_EVENT_LOOP=event_loop,
        MAILKUBE_PROXY_PROTOCOL_LISTENERS="mx,submissions",
        MAILKUBE_TRUSTED_PROXIES="127.0.0.0/8",
    )  # fmt: skip
    try:
        client = await RawClient.connect(gateway.mx, greet=False)
        await client.send(b"PROXY TCP4 192.0.2.9 127.0.0.1 40000 25\r\n")
        assert (await client.reply()).startswith("220 ")
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<someone@remote.test>")
        await client.command(f"RCPT TO:<{ALICE}>")
        await client.command("DATA")
        reply = await client.command("From: someone@remote.test\r\n\r\nproxied\r\n.")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        await client.close()
        # the PROXY header, then implicit TLS behind it, the ClientHello in the same write
        context = tls.client_context()
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.submissions)
        writer.write(b"PROXY TCP4 192.0.2.10 127.0.0.1 40001 465\r\n")
        await writer.start_tls(context, server_hostname="localhost")
        assert (await reader.readline()).startswith(b"220 ")
        writer.close()
        client_connection = connect_redis(CommonSettings(redis_url=redis_url))
        try:
            admin = QueueAdmin(client_connection)
            (info,) = await admin.list_messages()
            message = await admin.inspect(info.id)
            assert message is not None
            assert message.envelope.client_address == "192.0.2.9"
        finally:
            await client_connection.aclose()
    finally:
        code, stderr = stop_gateway_process(gateway)
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr


async def test_sigterm_lets_data_finish_and_says_421_to_idle_sessions(
    redis_url: str, tmp_path: Path
) -> None:
    await apply_routing(redis_url)
    tls = make_tls(tmp_path / "tls")
    gateway = start_gateway_process(redis_url, tls)
    try:
        sending = await RawClient.connect(gateway.mx)
        idle = await RawClient.connect(gateway.mx)
        assert (await idle.command("EHLO idle.test")).startswith("250")
        await sending.command("EHLO client.test")
        await sending.command("MAIL FROM:<someone@remote.test>")
        await sending.command(f"RCPT TO:<{ALICE}>")
        assert (await sending.command("DATA")).startswith("354")
        await sending.send(b"From: a@remote.test\r\nSubject: slow\r\n\r\nfirst half\r\n")
        gateway.process.send_signal(signal.SIGTERM)
        assert (await idle.reply()).startswith("421 4.3.2")
        assert await idle.closed()
        # not ready any more, while the message in flight finishes
        wait_until(
            lambda: http_status(f"http://127.0.0.1:{gateway.telemetry}/readyz") != 200,
            10,
            "readiness to fail",
        )
        await sending.send(b"second half\r\n.\r\n")
        assert (await sending.reply()).startswith("250 2.0.0 Ok: queued as ")
        assert (await sending.reply()).startswith("421 4.3.2")
        assert await sending.closed()
        assert await queued(redis_url) == 1
        code = await asyncio.to_thread(gateway.process.wait, 30)
        assert code == 0
    finally:
        stop_gateway_process(gateway)


async def test_redis_down_means_451_and_nothing_accepted(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    await apply_routing(private_redis.url)
    tls = make_tls(tmp_path / "tls")
    gateway = start_gateway_process(private_redis.url, tls, MAILKUBE_ENQUEUE_TIMEOUT="2s")
    try:
        client = await RawClient.connect(gateway.mx)
        await client.command("EHLO client.test")
        assert (await client.command("MAIL FROM:<someone@remote.test>")).startswith("250")
        assert (await client.command(f"RCPT TO:<{ALICE}>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        private_redis.kill()
        reply = await client.command(b"From: a@remote.test\r\n\r\nhello\r\n.")
        assert reply.startswith("451 4.3.0"), reply
        # and the next transaction gets no recipient (MAIL asks Redis nothing; RCPT does)
        assert (await client.command("MAIL FROM:<someone@remote.test>")).startswith("250")
        assert (await client.command(f"RCPT TO:<{ALICE}>")).startswith("451 4.3.0")
        await client.close()
        wait_until(
            lambda: http_status(f"http://127.0.0.1:{gateway.telemetry}/readyz") == 503,
            10,
            "readiness to fail without Redis",
        )
        private_redis.restart()
        assert await queued(private_redis.url) == 0
    finally:
        code, stderr = stop_gateway_process(gateway)
    assert code == 0, stderr
