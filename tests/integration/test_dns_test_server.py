"""The test DNS server answers like an authoritative server, over UDP and TCP."""

from __future__ import annotations

import dns.asyncresolver
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest
from dns_server import DnsServer


def resolver(server: DnsServer) -> dns.asyncresolver.Resolver:
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [server.host]
    r.port = server.port
    r.lifetime = 5
    return r


async def test_records_of_every_kind(dns_server: DnsServer) -> None:
    r = resolver(dns_server)
    mx = await r.resolve("mx-pref.test", "MX")
    assert sorted((x.preference, x.exchange.to_text()) for x in mx) == [
        (10, "mx1.mx-pref.test."), (20, "mx2.mx-pref.test."),
    ]  # fmt: skip
    assert [a.to_text() for a in await r.resolve("mx1.mx-pref.test", "A")] == ["127.0.0.21"]
    assert [a.to_text() for a in await r.resolve("v6.test", "MX")] == ["10 mx.v6.test."]
    assert [a.to_text() for a in await r.resolve("mx.v6.test", "AAAA")] == ["::1"]
    txt = await r.resolve("_dmarc.auth.test", "TXT")
    assert b"".join(txt[0].strings) == b"v=DMARC1; p=reject; rua=mailto:dmarc@auth.test"
    long = await r.resolve("long.auth.test", "TXT")
    assert long[0].strings == (b"part one of a long record, ", b"part two of it")
    assert (await r.resolve("backup.equal.test", "A"))[0].to_text() == "127.0.0.30"  # CNAME


async def test_nxdomain_nodata_refused_and_servfail(dns_server: DnsServer) -> None:
    r = resolver(dns_server)
    with pytest.raises(dns.resolver.NXDOMAIN):
        await r.resolve("nothing.mx-pref.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        await r.resolve("implicit.test", "MX")
    query = dns.message.make_query("example.org", "A")
    response = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=5)
    assert response.rcode() == dns.rcode.REFUSED
    dns_server.fail("broken.auth.test")
    with pytest.raises(dns.resolver.NoNameservers):
        await r.resolve("broken.auth.test", "A")
    query = dns.message.make_query("mx.auth.test", "A")
    response = dns.query.tcp(query, dns_server.host, port=dns_server.port, timeout=5)
    assert response.flags & dns.flags.AA
    assert response.answer[0][0].to_text() == "127.0.0.40"


def test_big_answers_are_truncated_over_udp_and_whole_over_tcp() -> None:
    records = "\n".join(f'@ TXT "{"x" * 200} {i}"' for i in range(20))
    server = DnsServer()
    server.add_zone("big-txt.test", f"$TTL 60\n@ SOA ns hostmaster 1 1 1 1 1\n{records}\n")
    with server:
        query = dns.message.make_query("big-txt.test", "TXT", use_edns=False)
        udp = dns.query.udp(query, server.host, port=server.port, timeout=5)
        tcp = dns.query.tcp(query, server.host, port=server.port, timeout=5)
    assert udp.flags & dns.flags.TC
    assert len(tcp.answer[0]) == 20
