"""SPF (pyspf) and DMARC (the dmarc library) through the gateway's resolver, against the
loopback DNS server serving tests/dns/zones/mailauth.test.zone."""

from __future__ import annotations

import asyncio

import pytest
from conditions import eventually
from dns_server import DnsServer

from mailkube_gateway.mailauth.dkim_verify import DkimResult
from mailkube_gateway.mailauth.dmarc_check import check_dmarc, organizational_domain
from mailkube_gateway.mailauth.resolver import DnsResolver, DnsTempError, ThreadBridge
from mailkube_gateway.mailauth.spf_check import SpfResult, check_spf


@pytest.fixture
def resolver(dns_server: DnsServer) -> DnsResolver:
    return DnsResolver([dns_server.host], dns_server.port, timeout=3)


async def spf(resolver: DnsResolver, mail_from: str, *, ip: str = "127.0.0.1",
              helo: str = "client.example") -> SpfResult:  # fmt: skip
    bridge = ThreadBridge(resolver, asyncio.get_running_loop())
    return await asyncio.to_thread(check_spf, bridge, ip, mail_from, helo)


# --- resolver -------------------------------------------------------------------------------


async def test_resolver_joins_txt_strings_and_answers_empty_for_missing_names(
    resolver: DnsResolver,
) -> None:
    assert await resolver.txt("long.auth.test.") == [b"part one of a long record, part two of it"]
    assert await resolver.txt("nothing-here.auth.test.") == []  # NXDOMAIN
    assert await resolver.txt("mx.auth.test.") == []  # the name exists, no TXT


async def test_resolver_caches_answers_for_their_ttl(
    resolver: DnsResolver, dns_server: DnsServer
) -> None:
    before = len(dns_server.queries)
    for _ in range(3):
        assert await resolver.txt("pass.mailauth.test.")
    asked = [q for q in dns_server.queries[before:] if q[0].startswith("pass.mailauth.test")]
    assert len(asked) == 1


async def test_a_cached_answer_lasts_its_ttl_and_threads_read_it_without_the_loop(
    resolver: DnsResolver, dns_server: DnsServer
) -> None:
    zone = '$TTL 3\n@ SOA ns hostmaster 1 3600 600 86400 3\nshort TXT "{value}"\n'
    dns_server.add_zone("ttl.mailauth.test", zone.format(value="first"))
    name = "short.ttl.mailauth.test."
    assert await resolver.txt(name) == [b"first"]
    dns_server.add_zone("ttl.mailauth.test", zone.format(value="second"))
    # called on the loop's own thread, a bridge that had to go through the loop would block
    # until its timeout: only the cache can answer at once
    bridge = ThreadBridge(resolver, asyncio.get_running_loop())
    assert bridge.dkim_txt(name.encode()) == b"first"

    async def renewed() -> bool:
        return await resolver.txt(name) == [b"second"]

    await eventually(renewed, timeout=15)  # after the TTL, 3 s, not at once
    assert resolver.cached(name, "TXT") is not None


async def test_resolver_servfail_is_a_temporary_error(
    resolver: DnsResolver, dns_server: DnsServer
) -> None:
    dns_server.fail("broken-dns.mailauth.test")
    with pytest.raises(DnsTempError):
        await resolver.txt("broken-dns.mailauth.test.")


# --- SPF ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("a@pass.mailauth.test", "pass"),
        ("a@fail.mailauth.test", "fail"),
        ("a@softfail.mailauth.test", "softfail"),
        ("a@neutral.mailauth.test", "neutral"),
        ("a@none.mailauth.test", "none"),
        ("a@syntax.mailauth.test", "permerror"),
        ("a@toomany.mailauth.test", "permerror"),  # RFC 7208 §4.6.4: more than 10 lookups
    ],
)
async def test_spf_results(resolver: DnsResolver, sender: str, expected: str) -> None:
    result = await spf(resolver, sender)
    assert result.result == expected, result
    assert result.scope == "mailfrom"
    assert result.domain == sender.partition("@")[2]


async def test_spf_pass_over_ipv6(resolver: DnsResolver) -> None:
    assert (await spf(resolver, "a@pass.mailauth.test", ip="::1")).result == "pass"


async def test_spf_temperror_when_the_dns_fails(
    resolver: DnsResolver, dns_server: DnsServer
) -> None:
    dns_server.fail("temperror.mailauth.test")
    assert (await spf(resolver, "a@temperror.mailauth.test")).result == "temperror"


async def test_spf_checks_helo_for_the_null_sender(resolver: DnsResolver) -> None:
    """RFC 7208 §2.4: with MAIL FROM <> the identity is postmaster@<HELO name>."""
    result = await spf(resolver, "", helo="helo.mailauth.test")
    assert (result.result, result.scope, result.domain) == ("pass", "helo", "helo.mailauth.test")
    other = await spf(resolver, "", helo="helo.mailauth.test", ip="192.0.2.99")
    assert other.result == "fail"


# --- DMARC ----------------------------------------------------------------------------------


def spf_result(result: str, domain: str) -> SpfResult:
    return SpfResult(result, "mailfrom", domain)


def dkim_pass(domain: str) -> DkimResult:
    return DkimResult("pass", domain, "sel", "rsa-sha256", "AbCdEfGhIjKl", "")


def test_organizational_domains_come_from_the_public_suffix_list() -> None:
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("news.mailauth.test") == "mailauth.test"
    assert organizational_domain("Example.COM.") == "example.com"


async def test_dmarc_pass_through_aligned_spf_only(resolver: DnsResolver) -> None:
    result = await check_dmarc(
        resolver, "pass.mailauth.test", spf_result("pass", "pass.mailauth.test"), []
    )
    assert (result.result, result.policy, result.disposition) == ("pass", "reject", "none")


async def test_dmarc_pass_through_aligned_dkim_only(resolver: DnsResolver) -> None:
    result = await check_dmarc(
        resolver, "pass.mailauth.test", spf_result("fail", "pass.mailauth.test"),
        [dkim_pass("pass.mailauth.test")],
    )  # fmt: skip
    assert result.result == "pass"


async def test_relaxed_alignment_accepts_the_same_organizational_domain(
    resolver: DnsResolver,
) -> None:
    result = await check_dmarc(
        resolver, "news.mailauth.test", spf_result("pass", "bounce.mailauth.test"), []
    )
    assert result.result == "pass"
    result = await check_dmarc(
        resolver, "news.mailauth.test", spf_result("fail", "x.test"),
        [dkim_pass("mailauth.test")],
    )  # fmt: skip
    assert result.result == "pass"


async def test_strict_alignment_wants_the_exact_domain(resolver: DnsResolver) -> None:
    spf_other = spf_result("pass", "bounce.mailauth.test")
    result = await check_dmarc(resolver, "strict.mailauth.test", spf_other, [])
    assert (result.result, result.disposition) == ("fail", "reject")
    result = await check_dmarc(
        resolver, "strict.mailauth.test", spf_other, [dkim_pass("mailauth.test")]
    )
    assert result.result == "fail"
    result = await check_dmarc(
        resolver, "strict.mailauth.test", spf_other, [dkim_pass("strict.mailauth.test")]
    )
    assert result.result == "pass"


async def test_subdomain_policy_comes_from_the_organizational_domain(
    resolver: DnsResolver,
) -> None:
    """child.mailauth.test has no record: mailauth.test's applies, with its sp=quarantine."""
    result = await check_dmarc(
        resolver, "child.mailauth.test", spf_result("fail", "child.mailauth.test"), []
    )
    assert (result.result, result.policy, result.disposition) == (
        "fail", "quarantine", "quarantine",
    )  # fmt: skip


async def test_no_record_is_none(resolver: DnsResolver) -> None:
    result = await check_dmarc(resolver, "remote.test", spf_result("fail", "remote.test"), [])
    assert result.result == "none"


async def test_spf_pass_for_an_unaligned_domain_fails_a_reject_policy(
    resolver: DnsResolver,
) -> None:
    result = await check_dmarc(
        resolver, "auth.test", spf_result("pass", "pass.mailauth.test"),
        [dkim_pass("pass.mailauth.test")],
    )  # fmt: skip
    assert (result.result, result.policy, result.disposition) == ("fail", "reject", "reject")


async def test_pct_applies_the_policy_to_that_share_only(resolver: DnsResolver) -> None:
    failing = spf_result("fail", "half.mailauth.test")
    inside = await check_dmarc(resolver, "half.mailauth.test", failing, [], chance=0.2)
    outside = await check_dmarc(resolver, "half.mailauth.test", failing, [], chance=0.7)
    assert (inside.disposition, outside.disposition) == ("reject", "quarantine")


async def test_several_records_or_a_broken_one_mean_no_policy(resolver: DnsResolver) -> None:
    """RFC 7489 §6.6.3: discovery ends with no policy when there is not exactly one record,
    and a record without p= does not count."""
    failing = spf_result("fail", "x.test")
    assert (await check_dmarc(resolver, "twice.mailauth.test", failing, [])).result == "none"
    assert (await check_dmarc(resolver, "broken.mailauth.test", failing, [])).result == "none"


async def test_no_single_from_domain_is_a_permerror(resolver: DnsResolver) -> None:
    assert (await check_dmarc(resolver, None, spf_result("pass", "x.test"), [])).result == (
        "permerror"
    )


async def test_dmarc_lookup_failure_is_a_temperror(
    resolver: DnsResolver, dns_server: DnsServer
) -> None:
    dns_server.fail("_dmarc.dmarc-down.mailauth.test")
    result = await check_dmarc(
        resolver, "dmarc-down.mailauth.test", spf_result("fail", "x.test"), []
    )
    assert result.result == "temperror"


async def test_a_helo_that_is_not_a_multi_label_name_is_none_without_a_lookup(
    resolver: DnsResolver, dns_server: DnsServer
) -> None:
    """RFC 7208 §4.3: HELO localhost or an address literal gives "none"."""
    before = len(dns_server.queries)
    for helo in ("localhost", "[127.0.0.1]"):
        result = await spf(resolver, "", helo=helo)
        assert (result.result, result.scope) == ("none", "helo")
    assert len(dns_server.queries) == before
