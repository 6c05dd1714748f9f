"""Fetching MTA-STS policies over real HTTPS on loopback (tlspolicy/sts_fetch.py, RFC 8461
§3.3): the host name from the test DNS server, certificates from a trustme CA, and every way
a policy host can fail."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from functools import partial

import dns.asyncresolver
import pytest
import trustme
from dns_server import DnsServer
from fake_mx import Certificates
from sts_server import Answer, StsServer

from mailkube_worker.tlspolicy.enforcer import addresses
from mailkube_worker.tlspolicy.sts_fetch import FetchError, fetch_policy

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.test\r\nmax_age: 86400\r\n"
STS_HOST = "127.0.0.50"


@pytest.fixture
def server(certificates: Certificates) -> Iterator[StsServer]:
    sts = StsServer(STS_HOST, certificates.server_context("mta-sts.unused.test"))
    try:
        yield sts
    finally:
        sts.stop()


@pytest.fixture
def domain(dns_server: DnsServer, server: StsServer, certificates: Certificates) -> str:
    name = f"f{uuid.uuid4().hex[:8]}.sts.test"
    dns_server.add_zone(name, f"@ 60 IN SOA ns.{name}. h.{name}. 1 3600 600 86400 60\n"
                              f"mta-sts 60 IN A {STS_HOST}\n")  # fmt: skip
    server.certificate(name, certificates.server_context(f"mta-sts.{name}"))
    return name


async def fetch(dns_server: DnsServer, server: StsServer, certificates: Certificates,
                domain: str, limit: float = 5) -> str:  # fmt: skip
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [dns_server.host], dns_server.port
    context = ssl.create_default_context(cafile=str(certificates.ca_file))
    policy, text = await fetch_policy(domain, partial(addresses, resolver), context,
                                      limit=limit, port=server.port)  # fmt: skip
    assert policy.mx == ("mx.example.test",)
    return text


@pytest.mark.parametrize("answer", [
    Answer(POLICY.encode()),
    Answer(POLICY.encode(), chunked=True),
    Answer(POLICY.encode(), content_type="text/plain; charset=utf-8"),
])  # fmt: skip
async def test_a_policy_is_fetched(dns_server: DnsServer, server: StsServer,
                                   certificates: Certificates, domain: str,
                                   answer: Answer) -> None:  # fmt: skip
    server.serve(domain, answer)
    assert await fetch(dns_server, server, certificates, domain) == POLICY
    assert server.requests == {f"mta-sts.{domain}": 1}


@pytest.mark.parametrize(("answer", "result_type", "why"), [
    (Answer(b"", 301, headers={"Location": "https://elsewhere.test/"}), "sts-policy-fetch-error",
     "HTTP 301"),  # §3.3: redirects are not followed
    (Answer(b"gone", 404), "sts-policy-fetch-error", "HTTP 404"),
    (Answer(POLICY.encode(), content_type="text/html"), "sts-policy-invalid", "text/html"),
    (Answer(b"x: y\n" * 14000), "sts-policy-invalid", "larger than"),
    (Answer(b"x: y\n" * 14000, chunked=True), "sts-policy-invalid", "larger than"),
    (Answer(b"version: STSv1\nmode: bogus\n"), "sts-policy-invalid", "bad mode"),
    (Answer(b"\xff\xfe"), "sts-policy-invalid", "UTF-8"),
])  # fmt: skip
async def test_bad_answers(dns_server: DnsServer, server: StsServer, certificates: Certificates,
                           domain: str, answer: Answer, result_type: str,
                           why: str) -> None:  # fmt: skip
    server.serve(domain, answer)
    with pytest.raises(FetchError, match=why) as error:
        await fetch(dns_server, server, certificates, domain)
    assert error.value.result_type == result_type


@pytest.mark.parametrize("certificate", ["wrong name", "untrusted CA"])
async def test_the_policy_host_needs_a_valid_certificate(
    dns_server: DnsServer, server: StsServer, certificates: Certificates, domain: str,
    certificate: str,
) -> None:  # fmt: skip
    server.serve(domain, POLICY)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if certificate == "wrong name":
        certificates.ca.issue_cert(f"www.{domain}").configure_cert(context)
    else:
        trustme.CA().issue_cert(f"mta-sts.{domain}").configure_cert(context)
    server.certificate(domain, context)
    with pytest.raises(FetchError, match="TLS") as error:
        await fetch(dns_server, server, certificates, domain)
    assert error.value.result_type == "sts-webpki-invalid"
    assert server.requests == {}  # nothing asked of a host we could not authenticate


async def test_a_silent_host_fails_within_the_limit(
    dns_server: DnsServer, server: StsServer, certificates: Certificates, domain: str
) -> None:
    server.hang(domain)
    with pytest.raises(FetchError, match=r"no policy within 0\.5s"):
        await fetch(dns_server, server, certificates, domain, limit=0.5)


async def test_no_policy_host(dns_server: DnsServer, server: StsServer,
                              certificates: Certificates) -> None:  # fmt: skip
    with pytest.raises(FetchError, match="has no address"):
        await fetch(dns_server, server, certificates, "nxmx.test")
