"""Greylisting in the running gateway: deferred first tries, early retries, retries after the
(compressed) delay accepted; networks and SPF-authorised known domains passing; DNS allow
lists; two gateway processes sharing the state; Redis down.

Senders: pass.mailauth.test (SPF passes for 127.0.0.0/8, tests/dns/zones/mailauth.test.zone),
neutral.mailauth.test (SPF neutral)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosmtplib
from conditions import eventually
from gateway_harness import (
    ALICE,
    BOB,
    RawClient,
    apply_routing,
    make_tls,
    message,
    running_gateway,
    start_gateway_process,
    stop_gateway_process,
)
from redis_servers import RedisServer

from mailkube_gateway.spam import greylist

GREYLISTING = {"greylisting": True, "greylist_delay": "1s", "greylist_auto_pass_after": 0}


async def send(port: int, sender: str, to: str = ALICE, source: str = "127.0.0.1") -> str:
    """One message over a new connection: the reply to its DATA (or the refusal before)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    client = RawClient(reader, writer)
    try:
        assert (await client.reply()).startswith("220")
        await client.command("EHLO client.screen.test")
        for command in (f"MAIL FROM:<{sender}>", f"RCPT TO:<{to}>", "DATA"):
            reply = await client.command(command)
            if reply[0] not in "23":
                return reply.strip()
        return (await client.command(message(sender, to).encode() + b".")).strip()
    finally:
        await client.close()


async def accepted_on_retry(port: int, sender: str, to: str = ALICE, **options: Any) -> str:
    """Retry until accepted (within a deadline), as a sending MTA would."""

    async def attempt() -> str | None:
        reply = await send(port, sender, to, **options)
        if reply.startswith("250"):
            return reply
        assert reply.startswith("451 4.7.1 Greylisted"), reply
        return None

    result = await eventually(attempt, timeout=15)
    assert result is not None
    return result


async def test_first_try_deferred_early_retry_deferred_later_retry_accepted(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path, **GREYLISTING) as gw:
        first = await send(gw.mx, "a@neutral.mailauth.test")
        assert first == ("451 4.7.1 Greylisted: this sender is new here, try again in 1 seconds")
        early = await send(gw.mx, "a@neutral.mailauth.test")
        assert early.startswith("451 4.7.1 Greylisted")
        assert await gw.messages() == []
        await accepted_on_retry(gw.mx, "a@neutral.mailauth.test")
        # known now: at once, from another address of the network too
        assert (await send(gw.mx, "a@neutral.mailauth.test", source="127.0.0.9")).startswith("250")
        assert len(await gw.messages()) == 2
        # another recipient: a new triplet
        assert (await send(gw.mx, "a@neutral.mailauth.test", to=BOB)).startswith("451 4.7.1")


async def test_a_network_passes_after_enough_retries(redis_url: str, tmp_path: Path) -> None:
    options = {**GREYLISTING, "greylist_auto_pass_after": 2}
    async with running_gateway(redis_url, tmp_path, **options) as gw:
        for sender in ("a@neutral.mailauth.test", "b@neutral.mailauth.test"):
            assert (await send(gw.mx, sender)).startswith("451 4.7.1")
            await accepted_on_retry(gw.mx, sender)
        auto = greylist._verdicts.value({"reason": "auto_pass_network"})
        assert (await send(gw.mx, "c@remote.test", to=BOB)).startswith("250")
        assert greylist._verdicts.value({"reason": "auto_pass_network"}) == auto + 1


async def test_allow_listed_clients_pass(redis_url: str, tmp_path: Path) -> None:
    lists = ["wl.screen.test=127.0.[0..255].[1..3]*-1"]
    async with running_gateway(redis_url, tmp_path, dnsbl_zones=lists, **GREYLISTING) as gw:
        # 127.0.0.8 is on the allow list (tests/dns/zones/screen.test.zone)
        assert (await send(gw.mx, "a@neutral.mailauth.test", source="127.0.0.8")).startswith("250")
        assert (await send(gw.mx, "a@neutral.mailauth.test")).startswith("451 4.7.1")


async def test_spf_authorised_senders_of_a_known_domain_pass(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path, **GREYLISTING) as gw:
        assert (await send(gw.mx, "a@pass.mailauth.test")).startswith("451 4.7.1")
        await accepted_on_retry(gw.mx, "a@pass.mailauth.test")
        await accepted_on_retry(gw.mx, "a@neutral.mailauth.test")

        # pass.mailauth.test passed once: its SPF-authorised mail passes at once, whoever
        # sends it to whomever; neutral.mailauth.test's (no SPF pass) does not
        async def known() -> bool:
            return (await send(gw.mx, "news@pass.mailauth.test", to=BOB)).startswith("250")

        await eventually(known)  # the domain's mark goes out with the next Redis command
        assert (await send(gw.mx, "news@neutral.mailauth.test", to=BOB)).startswith("451 4.7.1")


async def test_two_gateways_share_the_greylist(redis_url: str, tmp_path: Path) -> None:
    await apply_routing(redis_url)
    tls = make_tls(tmp_path / "tls")
    env = {
        "MAILKUBE_GREYLISTING": "true",
        "MAILKUBE_GREYLIST_DELAY": "1s",
        "MAILKUBE_MAX_MESSAGES_PER_MINUTE": "1000",
        "MAILKUBE_MAX_RECIPIENT_MESSAGES_PER_MINUTE": "1000",
    }  # retries come quickly here
    one = start_gateway_process(redis_url, tls, **env)
    two = start_gateway_process(redis_url, tls, **env)
    try:
        assert (await send(one.mx, "a@neutral.mailauth.test")).startswith("451 4.7.1")
        assert (await send(two.mx, "a@neutral.mailauth.test")).startswith("451 4.7.1")  # early
        await accepted_on_retry(two.mx, "a@neutral.mailauth.test")
        assert (await send(one.mx, "a@neutral.mailauth.test")).startswith("250")
    finally:
        for gateway in (one, two):
            code, stderr = stop_gateway_process(gateway)
            assert code == 0, stderr


async def test_redis_down_while_greylisting_defers_and_loses_nothing(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async with running_gateway(private_redis.url, tmp_path, **GREYLISTING,
                               enqueue_timeout="2s") as gw:  # fmt: skip
        unavailable = greylist._verdicts.value({"reason": "unavailable"})
        async with gw.client(gw.mx, start_tls=False, timeout=30) as smtp:
            await smtp.ehlo()
            await smtp.mail("a@neutral.mailauth.test")
            await smtp.rcpt(ALICE)
            private_redis.kill()  # after RCPT (which asks Redis), before greylisting
            try:
                reply = await smtp.data(message("a@neutral.mailauth.test"))
                code, text = reply.code, reply.message
            except aiosmtplib.SMTPResponseException as error:
                code, text = error.code, error.message
        assert (code, text.split()[0]) == (451, "4.3.0")
        assert greylist._verdicts.value({"reason": "unavailable"}) == unavailable + 1
        private_redis.restart()
        assert await gw.messages() == []  # nothing was queued, nothing lost: the sender retries
