"""Which checks a connection gets (screening/screen.py): MX only, none at all when everything
is off, exempt networks neither paused nor refused, bad list settings refused at start."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from mailkube_core.settings import GatewaySettings, SettingsError
from mailkube_gateway.mailauth.resolver import DnsResolver
from mailkube_gateway.screening.screen import Screening

#: nothing listens there: lookups fail, which these tests never wait for
RESOLVER = DnsResolver(["127.0.0.1"], port=9, timeout=1)


def screening(**settings: Any) -> Screening:
    return Screening(GatewaySettings(**settings), RESOLVER, Redis(port=9))


def test_a_bad_filter_stops_the_gateway_naming_the_setting() -> None:
    # the settings validator checks the form; the octet's range is checked here
    with pytest.raises(SettingsError, match=r"dnsbl_zones.*bl\.example=127\.0\.0\.300"):
        screening(dnsbl_zones=["bl.example=127.0.0.300"])


async def test_nothing_when_everything_is_off_or_not_mx() -> None:
    assert screening(client_rdns="off").start("mx", "192.0.2.1") is None
    busy = screening(dnsbl_zones=["bl.example"], greet_pause="1s")
    assert busy.start("submission", "192.0.2.1") is None
    assert busy.start("submissions", "192.0.2.1") is None
    assert busy.start("mx", "unknown") is None  # a PROXY LOCAL connection


async def test_the_reverse_name_alone_refuses_nobody() -> None:
    screen = screening().start("mx", "192.0.2.1")  # client_rdns: record, the default
    assert screen is not None
    try:
        assert (screen.gating, screen.greet_pause) == (False, 0)
    finally:
        screen.close()


async def test_exempt_clients_are_neither_paused_nor_refused() -> None:
    checks = screening(dnsbl_zones=["bl.example"], greet_pause="1s", client_rdns="require",
                       spam_exempt_networks=["192.0.2.0/24", "2001:db8::/32"])  # fmt: skip
    for ip in ("192.0.2.1", "2001:db8::1", "::ffff:192.0.2.7"):
        screen = checks.start("mx", ip)
        assert screen is not None
        try:
            assert (screen.gating, screen.greet_pause, screen.require_rdns) == (False, 0, False)
            assert screen.trace_field() is None
        finally:
            screen.close()
    screen = checks.start("mx", "::ffff:198.51.100.1")
    assert screen is not None
    try:
        assert screen.ip == "198.51.100.1"  # the IPv4 client behind a mapped address
        assert (screen.gating, screen.greet_pause, screen.require_rdns) == (True, 1.0, True)
    finally:
        screen.close()
