"""Connection-level checks in the running gateway: DNS lists, reverse DNS, early talkers.

The gateway asks the loopback DNS server (tests/dns/zones: screen.test.zone for the lists,
127.in-addr.arpa.zone and ip6.arpa.zone for reverse names). Clients connect from 127.0.0.N
(all of 127.0.0.0/8 is loopback) to be the case they need: 127.0.0.1 has a verified name,
127.0.0.5 is on bl-a, and so on (the zone file lists them)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import authres
from conditions import eventually
from gateway_harness import (
    ALICE,
    RawClient,
    Running,
    free_port,
    loopback_dns,
    message,
    running_gateway,
)
from redis.asyncio import Redis
from redis_writes import record_writes

from mailkube_gateway.screening import screen

REFUSED_MAIL = "554 5.7.1 Service unavailable; client [{ip}] blocked using {zone}"


async def connect(port: int, source: str = "127.0.0.1", *, greet: bool = True) -> RawClient:
    """A raw client whose address is `source`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    client = RawClient(reader, writer)
    if greet:
        greeting = await client.reply()
        assert greeting.startswith("220 "), greeting
    return client


def smtp_from(gw: Running, source: str) -> aiosmtplib.SMTP:
    return gw.client(gw.mx, start_tls=False, source_address=(source, 0),
                     local_hostname="client.screen.test")  # fmt: skip


async def send_from(gw: Running, source: str) -> bytes:
    """A message from `source`, accepted; its queued body."""
    async with smtp_from(gw, source) as smtp:
        await smtp.sendmail("someone@remote.test", [ALICE], message())
    infos = await gw.messages()
    bodies = [await gw.body(info.id) for info in infos if info.envelope.client_address == source]
    assert len(bodies) == 1
    return bodies[0]


def field(body: bytes, name: str) -> str | None:
    """The unfolded value of the first `name` field of the header section."""
    header = body.split(b"\r\n\r\n", 1)[0].decode()
    for line in header.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n"):
        if line.lower().startswith(name.lower() + ":"):
            return line.split(":", 1)[1].strip()
    return None


def iprev_of(body: bytes) -> Any:
    value = field(body, "Authentication-Results")
    assert value is not None
    parsed = authres.AuthenticationResultsHeader.parse_value(value)
    [iprev] = [result for result in parsed.results if result.method == "iprev"]
    return iprev


async def refused_at_mail(client: RawClient) -> str:
    assert (await client.command("EHLO client.test")).startswith("250")
    return (await client.command("MAIL FROM:<someone@remote.test>")).strip()


# --- DNS lists --------------------------------------------------------------------------------


async def test_a_listed_client_is_greeted_then_refused_but_may_say_hello_and_goodbye(
    redis_url: str, tmp_path: Path
) -> None:
    blocked = screen._checks.value({"check": "dnsbl", "verdict": "blocked"})
    async with running_gateway(redis_url, tmp_path, dnsbl_zones=["bl-a.screen.test*3"],
                               dnsbl_threshold=3) as gw:  # fmt: skip
        client = await connect(gw.mx, "127.0.0.5")
        refusal = REFUSED_MAIL.format(ip="127.0.0.5", zone="bl-a.screen.test")
        assert await refused_at_mail(client) == refusal
        for command in ("RCPT TO:<alice@example.test>", "DATA", "STARTTLS", "VRFY x", "HELP"):
            assert (await client.command(command)).strip() == refusal, command
        for command in ("NOOP", "RSET", "HELO client.test"):
            assert (await client.command(command)).startswith("250"), command
        assert (await client.command("QUIT")).startswith("221")
        await client.close()
        # a client that is not listed is not held up
        body = await send_from(gw, "127.0.0.1")
        assert field(body, "X-Mailkube-DNSBL") == "score=0"
        assert await gw.messages() != []
    assert screen._checks.value({"check": "dnsbl", "verdict": "blocked"}) == blocked + 1


async def test_weights_add_up_across_lists(redis_url: str, tmp_path: Path) -> None:
    lists = ["bl-a.screen.test*1", "bl-b.screen.test=127.0.0.[2..9]*2"]
    async with running_gateway(redis_url, tmp_path, dnsbl_zones=lists,
                               dnsbl_threshold=3) as gw:  # fmt: skip
        # on bl-a only: 1, under the threshold; recorded beside Authentication-Results
        body = await send_from(gw, "127.0.0.5")
        assert field(body, "X-Mailkube-DNSBL") == "score=1; bl-a.screen.test=127.0.0.2*1"
        assert body.index(b"X-Mailkube-DNSBL:") < body.index(b"Authentication-Results:")
        # on both (bl-b's 127.0.0.11 is filtered out, its 127.0.0.4 counts): 3, refused,
        # naming the list of the highest weight
        client = await connect(gw.mx, "127.0.0.6")
        refusal = REFUSED_MAIL.format(ip="127.0.0.6", zone="bl-b.screen.test")
        assert await refused_at_mail(client) == refusal
        await client.close()


async def test_an_allow_list_cancels_a_block(redis_url: str, tmp_path: Path) -> None:
    lists = ["bl-a.screen.test*3", "wl.screen.test=127.0.[0..255].[1..3]*-5"]
    async with running_gateway(redis_url, tmp_path, dnsbl_zones=lists) as gw:
        client = await connect(gw.mx, "127.0.0.5")  # bl-a only: blocked
        assert await refused_at_mail(client) == REFUSED_MAIL.format(
            ip="127.0.0.5", zone="bl-a.screen.test"
        )
        await client.close()
        body = await send_from(gw, "127.0.0.7")  # bl-a and the allow list: -2
        assert field(body, "X-Mailkube-DNSBL") == (
            "score=-2; bl-a.screen.test=127.0.0.2*3; wl.screen.test=127.0.10.2*-5"
        )


async def test_a_list_that_never_answers_holds_the_client_no_longer_than_the_timeout(
    redis_url: str, tmp_path: Path
) -> None:
    loopback_dns().never_answer("silent.screen.test")
    lists = ["silent.screen.test*5", "bl-a.screen.test"]
    async with running_gateway(redis_url, tmp_path, dnsbl_zones=lists, dnsbl_timeout="1s",
                               dns_timeout="10s") as gw:  # fmt: skip
        async with asyncio.timeout(6):  # the 1 s deadline, not the resolver's 10 s
            body = await send_from(gw, "127.0.0.1")
        assert field(body, "X-Mailkube-DNSBL") == "score=0; unanswered=silent.screen.test"


async def test_ipv6_clients_are_asked_about_by_nibbles(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, dnsbl_zones=["bl-a.screen.test"],
                               mx_listen=[f"[::1]:{free_port()}"]) as gw:  # fmt: skip
        reader, writer = await asyncio.open_connection("::1", gw.mx)
        client = RawClient(reader, writer)
        assert (await client.reply()).startswith("220")
        assert await refused_at_mail(client) == REFUSED_MAIL.format(
            ip="::1", zone="bl-a.screen.test"
        )
        await client.close()


async def test_exempt_networks_and_other_listeners_are_not_asked_about(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path, dnsbl_zones=["bl-a.screen.test"],
                               spam_exempt_networks=["127.0.0.5/32"]) as gw:  # fmt: skip
        body = await send_from(gw, "127.0.0.5")
        assert field(body, "X-Mailkube-DNSBL") is None  # not asked
        # submission: a user on a listed address (a home connection) is not refused
        client = await connect(gw.submission, "127.0.0.6")
        assert (await client.command("EHLO client.test")).startswith("250")
        assert (await client.command("STARTTLS")).startswith("220")
        await client.close()


async def test_a_forged_trace_field_is_removed(redis_url: str, tmp_path: Path) -> None:
    forged = "X-Mailkube-DNSBL: score=-100\r\n" + message()
    async with running_gateway(redis_url, tmp_path) as gw:
        async with smtp_from(gw, "127.0.0.1") as smtp:
            await smtp.sendmail("someone@remote.test", [ALICE], forged)
        [info] = await gw.messages()
        assert b"X-Mailkube-DNSBL" not in await gw.body(info.id)


# --- reverse DNS ------------------------------------------------------------------------------


async def test_the_reverse_name_is_recorded_the_postfix_way(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:  # client_rdns: record (default)
        verified = await send_from(gw, "127.0.0.1")
        mismatched = await send_from(gw, "127.0.0.2")
        nameless = await send_from(gw, "127.0.0.3")
    assert b"from client.screen.test (client.screen.test [127.0.0.1])" in verified
    result = iprev_of(verified)
    assert (result.result, result.policy_iprev) == ("pass", "127.0.0.1")
    # the name in a comment (authres does not keep comments: read the field itself)
    assert "iprev=pass (client.screen.test) policy.iprev=127.0.0.1;" in str(
        field(verified, "Authentication-Results")
    )
    assert b"(unknown [127.0.0.2])" in mismatched
    assert iprev_of(mismatched).result == "fail"
    assert b"(unknown [127.0.0.3])" in nameless
    assert iprev_of(nameless).result == "permerror"


async def test_a_silent_reverse_zone_holds_a_message_no_longer_than_the_dns_timeout(
    redis_url: str, tmp_path: Path
) -> None:
    loopback_dns().never_answer("10.0.0.127.in-addr.arpa")
    async with running_gateway(redis_url, tmp_path, dns_timeout="1s") as gw:
        async with asyncio.timeout(6):  # bounded by the 1 s lookup, whatever the server does
            body = await send_from(gw, "127.0.0.10")
    assert b"(unknown [127.0.0.10])" in body
    assert iprev_of(body).result == "temperror"


async def test_required_reverse_names(redis_url: str, tmp_path: Path) -> None:
    loopback_dns().fail("4.0.0.127.in-addr.arpa")
    async with running_gateway(redis_url, tmp_path, client_rdns="require",
                               spam_exempt_networks=["127.0.0.8/32"]) as gw:  # fmt: skip
        for source, reply in [
            ("127.0.0.2", "550 5.7.25 Client host rejected: cannot find your reverse hostname,"
                          " [127.0.0.2]"),
            ("127.0.0.3", "550 5.7.25 Client host rejected: cannot find your reverse hostname,"
                          " [127.0.0.3]"),
            ("127.0.0.4", "450 4.7.25 Client host rejected: cannot find your reverse hostname,"
                          " [127.0.0.4]"),
        ]:  # fmt: skip
            client = await connect(gw.mx, source)
            assert await refused_at_mail(client) == reply
            await client.close()
        assert b"(client.screen.test [127.0.0.1])" in await send_from(gw, "127.0.0.1")
        # exempt: no name needed, but the lookup is still recorded
        assert b"(unknown [127.0.0.8])" in await send_from(gw, "127.0.0.8")


async def test_no_lookup_when_off(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, client_rdns="off") as gw:
        body = await send_from(gw, "127.0.0.1")
    assert b"from client.screen.test ([127.0.0.1])" in body
    assert b"iprev" not in body


# --- early talkers ----------------------------------------------------------------------------


async def early_talk(port: int, source: str = "127.0.0.1") -> str:
    """Connect and talk at once; what the gateway answers before it closes."""
    client = await connect(port, source, greet=False)
    await client.send(b"EHLO early.test\r\n")
    reply = await client.reply()
    assert await client.closed()
    return reply.strip()


async def test_an_early_talker_is_refused_then_remembered(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, greet_pause="0.5s") as gw:
        talked = await early_talk(gw.mx)
        assert talked == "554 5.5.1 Protocol error: client talked before the greeting"
        talkers = gw.app.gateway.screening.early_talkers  # type: ignore[union-attr]
        redis = Redis.from_url(redis_url)

        async def remembered() -> bool:  # written in the background after the hang-up
            return bool(await redis.exists(talkers.key("127.0.0.1")))

        try:
            await eventually(remembered)
        finally:
            await redis.aclose()
        # remembered (in Redis, for every gateway): greeted, then refused
        client = await connect(gw.mx)
        assert await refused_at_mail(client) == (
            "554 5.7.1 Service unavailable; client [127.0.0.1] blocked: it talked before the "
            "greeting"
        )
        assert (await client.command("QUIT")).startswith("221")
        await client.close()
        # another address is not
        assert await send_from(gw, "127.0.0.2")
        # forgotten: welcome again
        redis = Redis.from_url(redis_url)
        try:
            assert await redis.delete(talkers.key("127.0.0.1")) == 1
        finally:
            await redis.aclose()
        assert await send_from(gw, "127.0.0.1")


async def test_a_polite_client_waits_the_pause_and_no_more(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, greet_pause="1s") as gw:
        started = time.monotonic()
        async with asyncio.timeout(5):
            client = await connect(gw.mx)
        assert time.monotonic() - started >= 0.9  # greeted after the pause
        assert (await client.command("EHLO client.test")).startswith("250")
        await client.close()


async def test_no_pause_where_it_does_not_apply(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, greet_pause="2s",
                               spam_exempt_networks=["127.0.0.9/32"]) as gw:  # fmt: skip
        for port, source in ((gw.submission, "127.0.0.1"), (gw.mx, "127.0.0.9")):
            client = await connect(port, source, greet=False)
            await client.send(b"EHLO early.test\r\n")  # no pause, nothing to talk early into
            assert (await client.reply()).startswith("220")
            assert (await client.reply()).startswith("250")
            await client.close()
    async with running_gateway(redis_url, tmp_path / "2") as gw:  # greet_pause 0: the default
        client = await connect(gw.mx, greet=False)
        await client.send(b"EHLO early.test\r\n")
        assert (await client.reply()).startswith("220")
        assert (await client.reply()).startswith("250")
        await client.close()


async def test_the_pause_starts_after_a_proxy_header(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, greet_pause="1s",
                               trusted_proxies=["127.0.0.0/8"],
                               proxy_protocol_listeners=["mx"]) as gw:  # fmt: skip
        # the header first is right; a command right behind it is talking early
        client = await connect(gw.mx, greet=False)
        await client.send(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n")
        assert (await client.reply()).startswith("220")
        await client.close()
        client = await connect(gw.mx, greet=False)
        await client.send(b"PROXY TCP4 203.0.113.8 192.0.2.1 40000 25\r\nEHLO x\r\n")
        assert (await client.reply()).startswith("554 5.5.1")
        assert await client.closed()
        talkers = gw.app.gateway.screening.early_talkers  # type: ignore[union-attr]
        assert talkers is not None
        assert await talkers.remembered("203.0.113.8")
        assert not await talkers.remembered("127.0.0.1")


async def test_the_early_talker_check_leaves_with_the_connection_lease(
    redis_url: str, tmp_path: Path
) -> None:
    """Both scripts in one write on the hot path's shared Redis connection: the check costs
    no round trip of its own."""
    async with running_gateway(redis_url, tmp_path, greet_pause="0.2s") as gw:
        client = await connect(gw.mx)  # loads both scripts, opens the shared connection
        await client.command("QUIT")
        await client.close()

        async def released() -> bool:  # the first connection's lease release has gone out
            redis = Redis.from_url(redis_url)
            try:
                return not await redis.keys("*conn*")
            finally:
                await redis.aclose()

        await eventually(released)
        writes = record_writes(gw.app.redis)
        client = await connect(gw.mx)
        await client.close()
        [first, *_] = writes
        assert first.count(b"EVALSHA") == 2
        assert b"{mailkube:conn:127.0.0.1}" in first
        assert b"{mailkube:early:127.0.0.1}" in first
