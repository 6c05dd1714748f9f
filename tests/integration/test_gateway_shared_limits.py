"""What gateways share through Redis (two real processes on one Redis): message rates and
connections per client address. And the PROXY protocol from trusted and untrusted peers, and
certificate reload."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from conditions import eventually
from cryptography import x509
from gateway_harness import (
    ALICE,
    RawClient,
    apply_routing,
    make_tls,
    message,
    running_gateway,
    start_gateway_process,
    stop_gateway_process,
)
from redis.asyncio import Redis


async def leases(redis_url: str) -> int:
    """Connection leases held for 127.0.0.1 (ratelimit.py: `{P:conn:<ip>}`)."""
    client = Redis.from_url(redis_url)
    try:
        return int(await client.zcard("{mailkube:conn:127.0.0.1}"))
    finally:
        await client.aclose()


async def send_one(port: int, redis_url: str) -> str:
    client = await RawClient.connect(port)
    try:
        await client.command("EHLO client.test")
        assert (await client.command("MAIL FROM:<a@remote.test>")).startswith("250")
        reply = await client.command(f"RCPT TO:<{ALICE}>")  # the sender's rate is asked here
        if not reply.startswith("250"):
            return reply
        await client.command("DATA")
        return await client.command(message().encode() + b".")
    finally:
        await client.close()
        # its lease is given back after the connection ends, in the background: the next
        # connection must not find it still held (max_connections_per_ip is 2 here)

        async def released() -> bool:
            return await leases(redis_url) == 0

        await eventually(released)


async def test_rates_and_connections_are_shared_by_two_gateways(
    redis_url: str, tmp_path: Path
) -> None:
    await apply_routing(redis_url)
    tls = make_tls(tmp_path / "tls")
    env = {"MAILKUBE_MAX_MESSAGES_PER_MINUTE": "3", "MAILKUBE_MAX_CONNECTIONS_PER_IP": "2"}
    one = start_gateway_process(redis_url, tls, **env)
    two = start_gateway_process(redis_url, tls, **env)
    try:
        replies = [await send_one(port, redis_url) for port in (one.mx, two.mx, one.mx, two.mx)]
        assert [r[:3] for r in replies] == ["250", "250", "250", "450"]
        assert replies[3].startswith("450 4.7.1 Too many messages from this sender")
        first = await RawClient.connect(one.mx)
        second = await RawClient.connect(two.mx)

        async def both_held() -> bool:  # a lease is taken while the greeting travels
            return await leases(redis_url) == 2

        await eventually(both_held)
        # greeted at once, then told 421 when its lease is refused, before any command
        third = await RawClient.connect(one.mx, greet=False)
        assert (await third.reply()).startswith("220")
        assert (await third.reply()).startswith("421 4.7.0")
        assert await third.closed()
        await first.command("QUIT")
        await first.close()

        # the lease is released when the connection ends: a new one is let in
        async def let_in() -> bool:
            again = await RawClient.connect(two.mx)
            reply = await again.command("NOOP")  # 421 instead when refused
            await again.close()
            return reply.startswith("250")

        await eventually(let_in)
        await second.close()
    finally:
        for gateway in (one, two):
            code, stderr = stop_gateway_process(gateway)
            assert code == 0, stderr


async def test_proxy_protocol_from_trusted_and_untrusted_peers(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(
        redis_url, tmp_path, proxy_protocol_listeners=["mx", "submissions"],
        trusted_proxies=["127.0.0.0/8"],
    ) as gw:  # fmt: skip
        client = await RawClient.connect(gw.mx, greet=False)
        await client.send(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n")
        assert (await client.reply()).startswith("220")
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<a@remote.test>")
        await client.command(f"RCPT TO:<{ALICE}>")
        await client.command("DATA")
        assert (await client.command(message().encode() + b".")).startswith("250")
        await client.close()
        [info] = await gw.messages()
        assert info.envelope.client_address == "203.0.113.7"
        # no reverse name for it in the test DNS: "unknown", as Postfix writes it
        assert b"(unknown [203.0.113.7])" in await gw.body(info.id)
        # a trusted proxy that sends no header is dropped
        silent = await RawClient.connect(gw.mx, greet=False)
        await silent.send(b"EHLO x\r\n")
        assert await silent.closed()
        # implicit TLS behind a proxy: the header first, then the handshake
        tls_client = await RawClient.connect(gw.submissions, greet=False)
        await tls_client.send(b"PROXY TCP6 2001:db8::5 2001:db8::1 40000 465\r\n")
        await tls_client.writer.start_tls(gw.tls.client_context(), server_hostname="localhost")
        assert (await tls_client.reply()).startswith("220")
        assert "AUTH PLAIN LOGIN" in await tls_client.command("EHLO client.test")
        await tls_client.close()
    async with running_gateway(
        redis_url, tmp_path / "2", proxy_protocol_listeners=["mx"], trusted_proxies=["10.0.0.0/8"]
    ) as gw:
        # not a trusted proxy: a direct client, whose PROXY line is just a bad command
        client = await RawClient.connect(gw.mx)
        assert (await client.command("PROXY TCP4 203.0.113.7 192.0.2.1 1 25")).startswith("500")
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<a@remote.test>")
        await client.command(f"RCPT TO:<{ALICE}>")
        await client.command("DATA")
        assert (await client.command(message().encode() + b".")).startswith("250")
        await client.close()
        # (the same Redis as above: the first gateway's message is still queued)
        addresses = sorted(str(i.envelope.client_address) for i in await gw.messages())
        assert addresses == ["127.0.0.1", "203.0.113.7"]


async def peer_serial(port: int, context: ssl.SSLContext) -> int:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return int(x509.load_der_x509_certificate(der).serial_number)


async def test_a_replaced_certificate_is_served_to_new_connections(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path, tls_check_interval="0.05s") as gw:
        context = gw.tls.client_context()
        before = await peer_serial(gw.submissions, context)
        kept = gw.client(gw.submissions, use_tls=True)
        await kept.connect()
        gw.tls.reissue()

        async def reloaded() -> bool:
            return await peer_serial(gw.submissions, context) != before

        await eventually(reloaded)
        # the connection made before the change is still served
        code, _ = await kept.noop()
        assert code == 250
        await kept.quit()
