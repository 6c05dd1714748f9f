"""Reverse DNS (screening/rdns.py): the iprev results of RFC 8601 §2.7.3 from PTR names and
their forward lookups, as a pure function and against the loopback DNS server."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from dns_server import DnsServer
from redis.asyncio import Redis

from mailkube_core.settings import GatewaySettings
from mailkube_gateway.mailauth.resolver import DnsResolver
from mailkube_gateway.screening.rdns import (
    MAX_NAMES,
    ReverseDns,
    cached_reverse_dns,
    check_reverse_dns,
    judge,
    ptr_names,
)
from mailkube_gateway.screening.screen import Screening

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
CLIENT = V4("192.0.2.7")


def test_a_name_that_resolves_back_passes() -> None:
    assert judge(CLIENT, ["mx.example"], [["192.0.2.7"]]) == ReverseDns("pass", "mx.example")


def test_any_name_of_several_may_confirm() -> None:
    result = judge(CLIENT, ["a.example", "b.example"], [["192.0.2.1"], ["192.0.2.9", "192.0.2.7"]])
    assert result == ReverseDns("pass", "b.example")
    # a failed lookup of another name does not spoil a confirmation
    assert judge(CLIENT, ["a.example", "b.example"], [None, ["192.0.2.7"]]).verified


def test_names_that_do_not_resolve_back_fail() -> None:
    assert judge(CLIENT, ["a.example"], [["192.0.2.1"]]) == ReverseDns("fail", "a.example")
    # NXDOMAIN or no data for the forward name is a fail too (§2.7.3)
    assert judge(CLIENT, ["a.example", "b.example"], [[], []]) == ReverseDns("fail", "a.example")


def test_a_failed_forward_lookup_without_a_match_is_a_temporary_error() -> None:
    result = judge(CLIENT, ["a.example", "b.example"], [["192.0.2.1"], None])
    assert result == ReverseDns("temperror", "a.example")
    assert not result.verified


def test_no_ptr_is_a_permanent_error() -> None:
    assert judge(CLIENT, [], []) == ReverseDns("permerror")


def test_addresses_compare_as_addresses() -> None:
    client = V6("2001:db8::1")
    assert judge(client, ["v6.example"], [["2001:DB8:0:0::1"]]).verified
    assert not judge(client, ["v6.example"], [["garbage"]]).verified


def _ptr(*targets: str) -> list[dns.rdata.Rdata]:
    return [dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.PTR, t) for t in targets]


def test_ptr_names_are_lower_case_once_each_and_bounded() -> None:
    names = ptr_names(_ptr("MX.Example.", "mx.example.", *(f"n{i}.example." for i in range(9))))
    assert names[0] == "mx.example"
    assert len(names) == MAX_NAMES
    assert len(set(names)) == MAX_NAMES


# --- against the loopback DNS server ------------------------------------------------------------

REVERSE_ZONE = """
@          SOA ns.names.test. hostmaster.names.test. 1 3600 600 86400 60
7.2.0      PTR good.names.test.
8.2.0      PTR bad.names.test.
9.2.0      PTR slow.silent.test.
"""
NAMES_ZONE = """
@          SOA ns hostmaster 1 3600 600 86400 60
good       A    192.0.2.7
bad        A    192.0.2.1
six        AAAA 2001:db8::7
"""
SIX_PTR = "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"


@pytest.fixture(scope="module")
def names_dns() -> Iterator[DnsServer]:
    server = DnsServer().start()
    server.add_zone("192.in-addr.arpa", REVERSE_ZONE)
    server.add_zone("names.test", NAMES_ZONE)
    server.add_zone("ip6.arpa", "@ SOA ns.names.test. h.names.test. 1 3600 600 86400 60\n"
                                f"{SIX_PTR}. PTR six.names.test.\n")  # fmt: skip
    server.never_answer("silent.test")
    server.fail("10.2.0.192.in-addr.arpa")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def resolver(names_dns: DnsServer) -> DnsResolver:
    return DnsResolver([names_dns.host], names_dns.port, timeout=1)


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("192.0.2.7", ReverseDns("pass", "good.names.test")),
        ("192.0.2.8", ReverseDns("fail", "bad.names.test")),
        ("192.0.2.11", ReverseDns("permerror")),  # NXDOMAIN
        ("192.0.2.10", ReverseDns("temperror")),  # SERVFAIL
        ("192.0.2.9", ReverseDns("temperror", "slow.silent.test")),  # the forward one is silent
        ("2001:db8::7", ReverseDns("pass", "six.names.test")),  # AAAA for IPv6
    ],
)
async def test_lookups(resolver: DnsResolver, client: str, expected: ReverseDns) -> None:
    assert await check_reverse_dns(resolver, ipaddress.ip_address(client)) == expected


async def test_a_client_seen_within_the_ttls_is_answered_from_the_cache(
    resolver: DnsResolver, names_dns: DnsServer
) -> None:
    client = V4("192.0.2.7")
    assert cached_reverse_dns(resolver, client) is None
    await check_reverse_dns(resolver, client)
    asked = len(names_dns.queries)
    found = cached_reverse_dns(resolver, client)
    assert found is not None
    result, until = found
    assert result == ReverseDns("pass", "good.names.test")
    assert until > time.monotonic()  # as long as the answers it came from
    assert len(names_dns.queries) == asked


async def test_a_returning_client_shares_its_finished_screen_until_the_ttls_run_out(
    resolver: DnsResolver, names_dns: DnsServer
) -> None:
    checks = Screening(GatewaySettings(), resolver, Redis(port=9))  # client_rdns: record
    first = checks.start("mx", "192.0.2.7")
    assert first is not None
    assert (await first.facts()).reverse_name == "good.names.test"  # looked up
    asked = len(names_dns.queries)
    second = checks.start("mx", "192.0.2.7")
    assert second is not None
    assert (await second.facts()).reverse_verified
    third = checks.start("mx", "192.0.2.7")
    assert third is second  # from the answers the resolver holds, then kept
    assert len(names_dns.queries) == asked
    # a check that may refuse: every connection gets its own screen
    refusing = Screening(GatewaySettings(client_rdns="require"), resolver, Redis(port=9))
    one, two = refusing.start("mx", "192.0.2.7"), refusing.start("mx", "192.0.2.7")
    assert one is not two
    assert len(names_dns.queries) == asked
