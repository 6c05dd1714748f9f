"""MX lookups (mailkube_worker.mx) against the test DNS server."""

from __future__ import annotations

import pytest
from dns_server import DnsServer

from mailkube_worker.mx import MxLookupError, MxResolver


def resolver(server: DnsServer, limit: int = 5) -> MxResolver:
    return MxResolver([server.host], port=server.port, address_limit=limit)


async def test_preference_order(dns_server: DnsServer) -> None:
    hosts = await resolver(dns_server).hosts("mx-pref.test")
    assert [(h.name, h.address, h.preference) for h in hosts] == [
        ("mx1.mx-pref.test", "127.0.0.21", 10), ("mx2.mx-pref.test", "127.0.0.22", 20),
    ]  # fmt: skip


async def test_equal_preferences_come_in_random_order(dns_server: DnsServer) -> None:
    orders = set()
    for _ in range(40):
        hosts = await resolver(dns_server).hosts("equal.test")
        orders.add(tuple(h.name for h in hosts[:2]))
        # the backup (30) always last; its CNAME followed; IPv6 and IPv4 both
        assert [h.address for h in hosts[2:]] == ["::1", "127.0.0.30"]
    assert orders == {("a.equal.test", "b.equal.test"), ("b.equal.test", "a.equal.test")}


async def test_implicit_mx(dns_server: DnsServer) -> None:
    hosts = await resolver(dns_server).hosts("implicit.test")
    assert [(h.name, h.address) for h in hosts] == [("implicit.test", "127.0.0.23")]


@pytest.mark.parametrize(
    ("domain", "code", "permanent"),
    [
        ("nullmx.test", "5.1.10", True),  # RFC 7505, even though the domain has an A record
        ("nope.mx-pref.test", "5.1.2", True),
        ("nowhere.invalid", "5.1.2", True),  # RFC 6761 §6.4, asks no server
        ("nxmx.test", "5.4.4", True),
        ("outside-every-zone.example", "4.4.3", False),  # REFUSED by every server
    ],
)
async def test_lookup_failures(
    dns_server: DnsServer, domain: str, code: str, permanent: bool
) -> None:
    with pytest.raises(MxLookupError) as info:
        await resolver(dns_server).hosts(domain)
    assert info.value.code == code
    assert info.value.permanent is permanent


async def test_servfail_is_temporary(dns_server: DnsServer) -> None:
    dns_server.fail("retry.test")
    try:
        with pytest.raises(MxLookupError) as info:
            await resolver(dns_server).hosts("retry.test")
    finally:
        dns_server.servfail.clear()
    assert info.value.code == "4.4.3"
    assert not info.value.permanent


async def test_address_limit(dns_server: DnsServer) -> None:
    hosts = await resolver(dns_server, limit=4).hosts("many.test")
    # m1's three addresses (in the order DNS gave them), then one of m2's; m3 never
    assert len(hosts) == 4
    assert {h.address for h in hosts[:3]} == {"127.0.0.31", "127.0.0.32", "127.0.0.33"}
    assert hosts[3].address in ("127.0.0.34", "127.0.0.35")


@pytest.mark.parametrize(
    ("domain", "address"), [("[127.0.0.23]", "127.0.0.23"), ("[IPv6:::1]", "::1")]
)
async def test_address_literals_need_no_dns(
    dns_server: DnsServer, domain: str, address: str
) -> None:
    (host,) = await resolver(dns_server).hosts(domain)
    assert (host.name, host.address) == (domain, address)


@pytest.mark.parametrize("domain", ["[300.1.1.1]", "[::1]", "[IPv6:127.0.0.1x]"])
async def test_bad_address_literals_fail_5_1_2(dns_server: DnsServer, domain: str) -> None:
    with pytest.raises(MxLookupError) as info:
        await resolver(dns_server).hosts(domain)
    assert info.value.code == "5.1.2"
