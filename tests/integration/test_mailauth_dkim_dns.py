"""DKIM verification with keys from DNS (the test DNS server): the RFC 8463 Appendix A example
(one message signed with Ed25519 and with RSA) passes under both signatures with the RFC's own
key records (tests/dns/zones/football.example.com.zone); DNS failures are temperror."""

from __future__ import annotations

from pathlib import Path

from dns_server import DnsServer

from mailkube_gateway.mailauth.dkim_verify import DkimResult, verify_dkim

ZONE = Path(__file__).resolve().parents[1] / "dns" / "zones" / "football.example.com.zone"

#: RFC 8463 Appendix A.3, byte for byte: the RFC's three-space page indentation removed, CRLF
#: line endings, a blank line after "Joe."
RFC_8463_MESSAGE = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    b" date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n"
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
    b"\r\n"
)


def test_rfc_8463_example_passes_both_signatures(dns_server: DnsServer) -> None:
    results = verify_dkim(RFC_8463_MESSAGE, dns_server.dkim_txt)
    domain = "football.example.com"
    assert results == [
        DkimResult("pass", domain, "brisbane", "ed25519-sha256", "/gCrinpcQOoI", ""),
        DkimResult("pass", domain, "test", "rsa-sha256", "F45dVWDfMbQD", ""),
    ]
    asked = {(name, rtype) for name, rtype, _ in dns_server.queries}
    assert ("brisbane._domainkey.football.example.com.", "TXT") in asked
    assert ("test._domainkey.football.example.com.", "TXT") in asked


def test_rfc_8463_example_changed_fails_both(dns_server: DnsServer) -> None:
    dnsfunc = dns_server.dkim_txt
    body = RFC_8463_MESSAGE.replace(b"hungry", b"angry")
    assert [(r.result, r.reason) for r in verify_dkim(body, dnsfunc)] == [
        ("fail", "body hash mismatch")
    ] * 2
    header = RFC_8463_MESSAGE.replace(b"Is dinner ready?", b"Is lunch ready?")
    assert [(r.result, r.reason) for r in verify_dkim(header, dnsfunc)] == [
        ("fail", "signature did not verify")
    ] * 2


def test_servfail_is_temperror_and_missing_key_permerror() -> None:
    server = DnsServer().start()  # its own server: SERVFAIL names stay out of the shared one
    try:
        server.add_zone("football.example.com", ZONE.read_text())
        server.fail("brisbane._domainkey.football.example.com")
        dnsfunc = server.dkim_txt
        results = verify_dkim(RFC_8463_MESSAGE, dnsfunc)
        assert [(r.selector, r.result, r.reason) for r in results] == [
            ("brisbane", "temperror", "key lookup failed: DNS error"),
            ("test", "pass", ""),
        ]
        gone = RFC_8463_MESSAGE.replace(b"s=test;", b"s=gone;")
        assert [(r.result, r.reason) for r in verify_dkim(gone, dnsfunc)][1] == (
            "permerror",
            "no key",
        )
    finally:
        server.stop()
