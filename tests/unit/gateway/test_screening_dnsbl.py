"""DNS lists (screening/dnsbl.py): the zone[=filter][*weight] syntax, the answers that count,
the weights added up, the names asked, and the lists asked at once under one deadline (against
the loopback DNS server)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator

import pytest
from dns_server import DnsServer

from mailkube_core.settings import GatewaySettings
from mailkube_gateway.mailauth.resolver import DnsResolver
from mailkube_gateway.screening.dnsbl import (
    DnsblResult,
    DnsList,
    ask_lists,
    parse_list,
    parse_lists,
    query_name,
    remove_trace_fields,
    score,
)

V4 = ipaddress.IPv4Address


# --- the syntax -------------------------------------------------------------------------------


def test_a_bare_zone_counts_any_answer_once() -> None:
    assert parse_list("zen.spamhaus.org") == DnsList("zen.spamhaus.org", None, 1)
    assert parse_list("ZEN.Spamhaus.org.") == DnsList("zen.spamhaus.org", None, 1)


def test_weights_may_be_negative() -> None:
    assert parse_list("list.dnswl.org*-2").weight == -2
    assert parse_list("bl.example*3").weight == 3
    assert parse_list("bl.example*0").weight == 0


def test_filters_take_numbers_ranges_and_lists() -> None:
    spec = parse_list("zen.spamhaus.org=127.0.0.[2..11]*3")
    assert spec.filter == (((127, 127),), ((0, 0),), ((0, 0),), ((2, 11),))
    assert spec.weight == 3
    listed = parse_list("bl.example=127.0.[0..255].[1;3;5..7]")
    assert listed.filter == (((127, 127),), ((0, 0),), ((0, 255),), ((1, 1), (3, 3), (5, 7)))
    assert listed.weight == 1


@pytest.mark.parametrize(
    "item",
    [
        "zen",  # one label is not a zone
        "",
        "bl.example=127.0.0",  # three octets
        "bl.example=127.0.0.1.1",
        "bl.example=127.0.0.256",
        "bl.example=127.0.0.[5..2]",  # backwards
        "bl.example=127.0.0.[1;]",
        "bl.example=127.0.0.1..2",  # a range outside brackets
        "bl.example=127.0.0.x",
        "bl.example*x",
        "bl.example*",
        "bl..example",
        "bl.exa mple",
    ],
)
def test_bad_forms_are_refused_with_the_item_named(item: str) -> None:
    with pytest.raises(ValueError, match="not a DNS list") as error:
        parse_list(item)
    assert repr(item) in str(error.value)


def test_what_the_settings_accept_parses() -> None:
    items = [
        "zen.spamhaus.org=127.0.0.[2..11]*3",
        "list.dnswl.org=127.0.[0..255].[1..3]*-2",
        "b.barracudacentral.org",
        "bl.example.=127.0.0.[2;4;6..8]*10",
    ]
    settings = GatewaySettings(dnsbl_zones=items)
    assert [spec.zone for spec in parse_lists(settings.dnsbl_zones)] == [
        "zen.spamhaus.org", "list.dnswl.org", "b.barracudacentral.org", "bl.example",
    ]  # fmt: skip


# --- answers and scores -----------------------------------------------------------------------


def test_a_filter_keeps_only_the_answers_it_names() -> None:
    spec = parse_list("zen.spamhaus.org=127.0.0.[2..9]")
    assert spec.matches("127.0.0.2")
    assert spec.matches("127.0.0.9")
    assert not spec.matches("127.0.0.10")  # the PBL, left out
    assert not spec.matches("127.0.1.2")
    assert not spec.matches("not an address")
    assert parse_list("any.example").matches("127.0.0.200")


def test_weights_add_up_and_each_list_counts_once() -> None:
    lists = parse_lists(["a.example*2", "b.example=127.0.0.[2..3]*3", "c.example"])
    answers: dict[str, list[str] | None] = {
        "a.example": ["127.0.0.2", "127.0.0.4"],  # two answers, one weight
        "b.example": ["127.0.0.3"],
        "c.example": [],
    }
    result = score(lists, answers, threshold=5)
    assert result.score == 5
    assert result.hits == ("a.example=127.0.0.2*2", "b.example=127.0.0.3*3")
    assert result.blocked_by == "b.example"  # the listing of the highest weight
    assert not result.allow_listed


def test_below_the_threshold_is_not_blocked() -> None:
    lists = parse_lists(["a.example*2", "b.example*3"])
    result = score(lists, {"a.example": ["127.0.0.2"], "b.example": []}, threshold=3)
    assert (result.score, result.blocked_by) == (2, None)


def test_an_allow_list_cancels_a_block() -> None:
    lists = parse_lists(["bl.example*3", "list.dnswl.org=127.0.[0..255].[1..3]*-5"])
    answers: dict[str, list[str] | None] = {
        "bl.example": ["127.0.0.2"], "list.dnswl.org": ["127.0.10.2"],
    }  # fmt: skip
    result = score(lists, answers, threshold=1)
    assert result.score == -2
    assert result.blocked_by is None
    assert result.allow_listed
    assert result.hits == ("bl.example=127.0.0.2*3", "list.dnswl.org=127.0.10.2*-5")


def test_a_filtered_out_allow_answer_does_not_count() -> None:
    lists = parse_lists(["list.dnswl.org=127.0.[0..255].[1..3]*-5"])
    result = score(lists, {"list.dnswl.org": ["127.0.10.0"]}, threshold=1)
    assert result == DnsblResult()


def test_nothing_blocks_at_zero_or_below_whatever_the_threshold() -> None:
    lists = parse_lists(["a.example*0", "b.example*-1"])
    answers: dict[str, list[str] | None] = {"a.example": ["127.0.0.2"], "b.example": []}
    assert score(lists, answers, threshold=0).blocked_by is None
    assert score(lists, answers, threshold=-5).blocked_by is None
    assert score(parse_lists(["a.example"]), {"a.example": ["127.0.0.2"]}, 0).blocked_by


def test_a_list_that_did_not_answer_lists_nobody_and_is_named() -> None:
    lists = parse_lists(["slow.example*5", "a.example"])
    result = score(lists, {"slow.example": None, "a.example": []}, threshold=1)
    assert (result.score, result.blocked_by, result.unanswered) == (0, None, ("slow.example",))
    assert result.trace_field() == "X-Mailkube-DNSBL: score=0; unanswered=slow.example"


def test_the_same_zone_with_two_filters_counts_each() -> None:
    lists = parse_lists(["zen.example=127.0.0.[2..9]*3", "zen.example=127.0.0.[10..11]*1"])
    result = score(lists, {"zen.example": ["127.0.0.11", "127.0.0.4"]}, threshold=10)
    assert result.score == 4
    assert result.trace_field() == (
        "X-Mailkube-DNSBL: score=4; zen.example=127.0.0.4*3; zen.example=127.0.0.11*1"
    )


# --- names ------------------------------------------------------------------------------------


def test_ipv4_octets_are_reversed_under_the_zone() -> None:
    assert query_name(V4("192.0.2.99"), "zen.spamhaus.org") == "99.2.0.192.zen.spamhaus.org"


def test_ipv6_is_asked_as_nibbles() -> None:
    # RFC 5782 §2.4's example
    address = ipaddress.IPv6Address("2001:db8:1:2:3:4:567:89ab")
    assert query_name(address, "ugly.example.com") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com"
    )


def test_incoming_trace_fields_are_removed() -> None:
    content = (
        b"X-Mailkube-DNSBL: score=-10\r\nFrom: a@b.example\r\n"
        b"x-mailkube-dnsbl: score=-3;\r\n\tfolded\r\nSubject: hi\r\n\r\n"
        b"X-Mailkube-DNSBL: in the body stays\r\n"
    )
    header_size = content.index(b"\r\n\r\n") + 2
    assert remove_trace_fields(content, header_size) == (
        b"From: a@b.example\r\nSubject: hi\r\n\r\nX-Mailkube-DNSBL: in the body stays\r\n"
    )


# --- asking -----------------------------------------------------------------------------------

LISTS_ZONE = """
@                    SOA ns hostmaster 1 3600 600 86400 60
2.0.0.127.a          A   127.0.0.2
2.0.0.127.a          A   127.0.0.3
2.0.0.127.b          A   127.0.0.4
"""


@pytest.fixture
def lists_dns() -> Iterator[DnsServer]:
    server = DnsServer().start()
    server.add_zone("lists.test", LISTS_ZONE)
    server.never_answer("silent.lists.test")
    server.fail("2.0.0.127.broken.lists.test")
    try:
        yield server
    finally:
        server.stop()


async def test_every_list_is_asked_once_and_a_silent_one_within_the_deadline(
    lists_dns: DnsServer,
) -> None:
    resolver = DnsResolver([lists_dns.host], lists_dns.port, timeout=5)
    lists = parse_lists([
        "a.lists.test=127.0.0.2", "a.lists.test=127.0.0.3*2", "b.lists.test",
        "c.lists.test", "silent.lists.test*10", "broken.lists.test*10",
    ])  # fmt: skip
    started = time.monotonic()
    answers = await ask_lists(resolver, lists, V4("127.0.0.2"), within=0.5)
    assert time.monotonic() - started < 4  # the deadline, not the resolver's 5 s
    assert sorted(answers.pop("a.lists.test") or []) == ["127.0.0.2", "127.0.0.3"]
    assert answers == {
        "b.lists.test": ["127.0.0.4"],
        "c.lists.test": [],
        "silent.lists.test": None,
        "broken.lists.test": None,
    }
    asked = [name for name, _, _ in lists_dns.queries if name.startswith("2.0.0.127.a.")]
    assert asked == ["2.0.0.127.a.lists.test."]
    answers["a.lists.test"] = ["127.0.0.2", "127.0.0.3"]
    result = score(lists, answers, threshold=4)
    assert (result.score, result.blocked_by) == (4, "a.lists.test")
    assert result.unanswered == ("silent.lists.test", "broken.lists.test")
