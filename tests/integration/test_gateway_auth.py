"""AUTH throttling through a real gateway, clients placed anywhere by the PROXY protocol (the
gateway trusts loopback as a proxy here): the guessing network is throttled, guessing one user
from many networks is slowed and never refused, and a network the user logged in from is never
refused for that user, whatever strangers do elsewhere. The waits are recorded, not slept."""

from __future__ import annotations

import base64
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from gateway_harness import (
    ALICE,
    ALICE_PASSWORD,
    BOB,
    BOB_PASSWORD,
    Running,
    apply_routing,
    running_gateway,
)
from redis_servers import RedisServer

from mailkube_gateway.auth_throttle import failure_delay

MAX_FAILURES = 3


class Waits:
    """The gateway's waits before password checks, recorded instead of slept."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)

    def take(self) -> list[float]:
        taken, self.delays = self.delays, []
        return taken


@asynccontextmanager
async def throttling_gateway(
    redis_url: str, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[Running, Waits]]:
    async with running_gateway(
        redis_url, tmp_path, auth_max_failures=MAX_FAILURES,
        proxy_protocol_listeners=["submission"], trusted_proxies=["127.0.0.0/8"], **overrides,
    ) as gw:  # fmt: skip
        waits = Waits()
        gw.app.gateway.authenticator.sleep = waits
        yield gw, waits


@asynccontextmanager
async def client_at(gw: Running, address: str) -> AsyncIterator[aiosmtplib.SMTP]:
    """A submission client (STARTTLS, EHLO done) whose address the gateway takes as
    `address`, from the PROXY header its loopback "proxy" sends."""
    family = "TCP6" if ":" in address else "TCP4"
    server = "2001:db8::25" if family == "TCP6" else "192.0.2.25"
    sock = socket.create_connection(("127.0.0.1", gw.submission))
    sock.sendall(f"PROXY {family} {address} {server} 40000 587\r\n".encode())
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", sock=sock, start_tls=True, tls_context=gw.tls.client_context(),
        timeout=20,
    )  # fmt: skip
    async with smtp:
        await smtp.ehlo()
        yield smtp


async def login(gw: Running, address: str, user: str, password: str) -> tuple[int, str]:
    """One AUTH PLAIN from `address`: (code, text)."""
    async with client_at(gw, address) as smtp:
        blob = base64.b64encode(f"\0{user}\0{password}".encode())
        response = await smtp.execute_command(b"AUTH", b"PLAIN", blob)
        return response.code, response.message


async def closed_after(smtp: aiosmtplib.SMTP) -> bool:
    try:
        await smtp.noop()
    except aiosmtplib.SMTPServerDisconnected:
        return True
    return False


async def test_a_strangers_failures_elsewhere_do_not_stop_alice_at_her_known_address(
    redis_url: str, tmp_path: Path
) -> None:
    async with throttling_gateway(redis_url, tmp_path) as (gw, waits):
        home = "198.51.100.7"
        assert (await login(gw, home, ALICE, ALICE_PASSWORD))[0] == 235
        # strangers guess alice's password from many networks, past every threshold
        for host in range(1, 4):
            for _ in range(MAX_FAILURES):
                code, _ = await login(gw, f"203.0.113.{host}", ALICE, "guess")
                assert code in (535, 454)
        waits.take()
        # alice at home: in at once, not refused, not slowed
        assert (await login(gw, home, ALICE, ALICE_PASSWORD))[0] == 235
        assert waits.take() == []
        # her own typo at home slows her there by her own failures only
        assert (await login(gw, home, ALICE, "typo"))[0] == 535
        assert waits.take() == []
        assert (await login(gw, home, ALICE, ALICE_PASSWORD))[0] == 235
        assert waits.take() == [failure_delay(1, 15.0)]
        # ... and her success there forgets them
        assert (await login(gw, home, ALICE, ALICE_PASSWORD))[0] == 235
        assert waits.take() == []
        # from a network she never used: slowed by the strangers' failures, but let in
        assert (await login(gw, "192.0.2.44", ALICE, ALICE_PASSWORD))[0] == 235
        assert waits.take() == [15.0]
        # which is now known too
        assert (await login(gw, "192.0.2.44", ALICE, ALICE_PASSWORD))[0] == 235
        assert waits.take() == []


async def test_the_guessing_network_is_throttled_and_no_one_else(
    redis_url: str, tmp_path: Path
) -> None:
    async with throttling_gateway(redis_url, tmp_path) as (gw, _):
        guesser = "203.0.113.5"
        async with client_at(gw, guesser) as smtp:
            for attempt in range(1, MAX_FAILURES + 1):
                with pytest.raises(aiosmtplib.SMTPAuthenticationError) as error:
                    await smtp.auth_plain(f"user{attempt}@example.test", "guess")
                expected = (535, "5.7.8") if attempt < MAX_FAILURES else (454, "4.7.0")
                assert (error.value.code, error.value.message[:5]) == expected
            assert await closed_after(smtp)
        # the guesser's network stays refused, even with a right password it never used
        code, text = await login(gw, guesser, BOB, BOB_PASSWORD)
        assert (code, text[:5]) == (454, "4.7.0")
        # another address is not concerned
        assert (await login(gw, "203.0.113.6", BOB, BOB_PASSWORD))[0] == 235

        # IPv6: the client's /64 is the network
        for host in (1, 2, 3):
            await login(gw, f"2001:db8:1:1::{host}", BOB, "guess")
        code, text = await login(gw, "2001:db8:1:1:ffff::99", BOB, BOB_PASSWORD)
        assert (code, text[:5]) == (454, "4.7.0")
        assert (await login(gw, "2001:db8:1:2::1", BOB, BOB_PASSWORD))[0] == 235
        # an IPv4-mapped address is its IPv4 address
        code, _ = await login(gw, "::ffff:203.0.113.5", BOB, BOB_PASSWORD)
        assert code == 454


async def test_guessing_one_user_from_many_networks_is_slowed_not_refused(
    redis_url: str, tmp_path: Path
) -> None:
    async with throttling_gateway(redis_url, tmp_path, auth_max_delay="10s") as (gw, waits):
        codes = [(await login(gw, f"198.18.0.{host}", BOB, "guess"))[0] for host in range(1, 9)]
        assert codes == [535] * 8  # one try per network: none throttled
        # after the first, each try waited longer than the last before its password was
        # checked, up to auth_max_delay
        assert waits.take() == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
        # bob himself, from a new network, is slowed as much, and let in
        assert (await login(gw, "198.18.1.1", BOB, BOB_PASSWORD))[0] == 235
        assert waits.take() == [10.0]
        # another user is not slowed
        assert (await login(gw, "198.18.1.2", ALICE, ALICE_PASSWORD))[0] == 235
        assert waits.take() == []


async def test_failures_are_logged_without_anything_secret(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailkube_gateway")
    async with throttling_gateway(redis_url, tmp_path) as (gw, _):
        # a password typed into the user name field, then a real user's wrong password
        await login(gw, "203.0.113.9", "Hunter2-Secret", "also-secret")
        await login(gw, "203.0.113.9", ALICE, "wrong-secret")
    failed = [r for r in caplog.records if r.getMessage() == "authentication failed"]
    assert [getattr(r, "user", "missing") for r in failed] == [None, ALICE]
    assert all(getattr(r, "client_ip", None) == "203.0.113.9" for r in failed)
    for record in caplog.records:
        text = repr(vars(record)).lower()
        assert "secret" not in text, record


async def test_redis_keys_hold_no_user_name(redis_url: str, tmp_path: Path) -> None:
    async with throttling_gateway(redis_url, tmp_path) as (gw, _):
        await login(gw, "203.0.113.9", "Hunter2-Secret", "x")
        await login(gw, "203.0.113.10", ALICE, ALICE_PASSWORD)
        keys = [key.decode() for key in await gw.app.redis.keys("*auth*")]
    assert keys
    assert not [key for key in keys if "hunter2" in key.lower() or "alice" in key]
    assert "{mailkube:authfail:203.0.113.9/32}" in keys


async def test_a_throttled_network_is_refused_on_every_gateway_and_after_a_restart(
    redis_url: str, tmp_path: Path
) -> None:
    async with throttling_gateway(redis_url, tmp_path) as (gw, _):
        for _ in range(MAX_FAILURES):
            await login(gw, "203.0.113.77", BOB, "guess")
        await login(gw, "198.51.100.8", BOB, BOB_PASSWORD)
    await apply_routing(redis_url)
    async with throttling_gateway(redis_url, tmp_path / "second") as (gw, _):
        assert (await login(gw, "203.0.113.77", BOB, BOB_PASSWORD))[0] == 454
        assert (await login(gw, "198.51.100.8", BOB, BOB_PASSWORD))[0] == 235


async def test_redis_down_at_auth_is_a_temporary_failure_never_a_login(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async with throttling_gateway(private_redis.url, tmp_path) as (gw, _):
        async with client_at(gw, "198.51.100.20") as smtp:
            private_redis.kill()
            blob = base64.b64encode(f"\0{ALICE}\0{ALICE_PASSWORD}".encode())
            response = await smtp.execute_command(b"AUTH", b"PLAIN", blob)
            assert (response.code, response.message[:5]) == (454, "4.7.0")
        private_redis.restart()
        assert (await login(gw, "198.51.100.20", ALICE, ALICE_PASSWORD))[0] == 235
