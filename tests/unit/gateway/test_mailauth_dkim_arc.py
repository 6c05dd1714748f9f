"""ARC chain validation (RFC 8617 §5.2): none, pass over one and two hops, fail for a changed
message, a missing key, a DNS error, a seal reporting failure, out-of-range or missing i=; and
no input makes it raise. Keys come from a dict, sealing from dkimpy's arc_sign."""

from __future__ import annotations

from dataclasses import dataclass

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mutations import Mutation, mutate, mutations

from mailkube_core.routing.dkim_keys import generate, public_record
from mailkube_gateway.mailauth.arc_verify import ArcResult, verify_arc
from mailkube_gateway.mailauth.dkim_verify import DnsFunc

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: list@lists.example.org\r\n"
    b"Subject: Agenda\r\n"
    b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <agenda-1@example.com>\r\n"
    b"\r\n"
    b"1. Lunch\r\n"
)


@dataclass(frozen=True)
class Sealer:
    pem: bytes
    records: dict[bytes, bytes]

    def dns(self) -> DnsFunc:
        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            return self.records.get(name)

        return dnsfunc

    def seal(self, message: bytes, authserv_id: bytes, results: bytes) -> bytes:
        """What an intermediary does: its Authentication-Results, then its ARC set on top."""
        message = b"Authentication-Results: " + authserv_id + b"; " + results + b"\r\n" + message
        fields = dkim.arc_sign(message, b"arc", b"example.org", self.pem, authserv_id)
        assert len(fields) == 3
        return b"".join(fields) + message


@pytest.fixture(scope="module")
def sealer() -> Sealer:
    pem = generate("rsa-sha256")
    record = public_record("rsa-sha256", pem).encode()
    return Sealer(pem.encode(), {b"arc._domainkey.example.org.": record})


@pytest.fixture(scope="module")
def one_hop(sealer: Sealer) -> bytes:
    return sealer.seal(MESSAGE, b"mx.example.org", b"spf=pass smtp.mailfrom=example.com")


@pytest.fixture(scope="module")
def two_hops(sealer: Sealer, one_hop: bytes) -> bytes:
    return sealer.seal(one_hop, b"lists.example.org", b"arc=pass")


def test_no_arc_fields_is_none(sealer: Sealer) -> None:
    assert verify_arc(MESSAGE, sealer.dns()) == ArcResult("none", 0, "")


def test_one_hop_passes(sealer: Sealer, one_hop: bytes) -> None:
    assert verify_arc(one_hop, sealer.dns()) == ArcResult("pass", 1, "")


def test_two_hops_pass(sealer: Sealer, two_hops: bytes) -> None:
    assert verify_arc(two_hops, sealer.dns()) == ArcResult("pass", 2, "")


def test_changed_body_fails(sealer: Sealer, two_hops: bytes) -> None:
    result = verify_arc(two_hops.replace(b"Lunch", b"Dinner"), sealer.dns())
    assert (result.result, result.instance) == ("fail", 2)
    assert result.reason == "Most recent ARC-Message-Signature did not validate"


def test_changed_seal_fails(sealer: Sealer, two_hops: bytes) -> None:
    changed = two_hops.replace(b"i=1; mx.example.org;", b"i=1; mx.example.net;")
    result = verify_arc(changed, sealer.dns())
    assert (result.result, result.instance) == ("fail", 2)
    assert result.reason.startswith("ARC-Seal")


def test_missing_key_fails(one_hop: bytes) -> None:
    result = verify_arc(one_hop, lambda name, timeout=5: None)
    assert (result.result, result.instance) == ("fail", 1)


def test_dns_error_fails_and_says_so(one_hop: bytes) -> None:
    def down(name: bytes, timeout: float = 5) -> bytes | None:
        raise dkim.DnsTimeoutError("timed out")

    assert verify_arc(one_hop, down) == ArcResult("fail", 1, "key lookup failed: DNS error")


def test_seal_reporting_failure_fails(sealer: Sealer, one_hop: bytes) -> None:
    """RFC 8617 §5.2: a chain whose newest seal says cv=fail has failed (dkimpy: None)."""
    failed = sealer.seal(one_hop, b"lists.example.org", b"arc=fail")
    assert b"cv=fail" in failed
    result = verify_arc(failed, sealer.dns())
    assert (result.result, result.instance) == ("fail", 2)


def test_instance_above_50_fails(sealer: Sealer, one_hop: bytes) -> None:
    """RFC 8617 §4.2.1: i= is at most 50; no key is looked up for such a chain."""
    asked: list[bytes] = []

    def dns(name: bytes, timeout: float = 5) -> bytes | None:
        asked.append(name)
        return sealer.dns()(name)

    high = one_hop.replace(b"i=1;", b"i=51;")
    assert verify_arc(high, dns) == ArcResult("fail", 51, "i= above 50")
    assert asked == []


def test_arc_field_without_instance_fails(sealer: Sealer) -> None:
    message = b"ARC-Seal: cv=none; a=rsa-sha256; d=example.org; s=arc; b=AAAA\r\n" + MESSAGE
    assert verify_arc(message, sealer.dns()) == ArcResult("fail", 0, "ARC field without i=")


def test_incomplete_set_fails(sealer: Sealer, two_hops: bytes) -> None:
    without_aar = two_hops.replace(b"ARC-Authentication-Results: i=1;", b"X-Removed: i=1;")
    result = verify_arc(without_aar, sealer.dns())
    assert (result.result, result.instance) == ("fail", 2)
    assert "Incomplete" in result.reason


def test_reasons_do_not_quote_the_message(sealer: Sealer, one_hop: bytes) -> None:
    """dkimpy's messages for malformed fields quote the sender's bytes: not passed on."""
    odd = one_hop.replace(
        b"a=rsa-sha256; d=example.org; s=arc;", b"a=x-evil; d=example.org; s=arc;"
    )
    assert odd != one_hop
    assert verify_arc(odd, sealer.dns()) == ArcResult("fail", 1, "malformed ARC field")


def test_unparseable_header_with_arc_fields_fails(sealer: Sealer, one_hop: bytes) -> None:
    broken = one_hop.replace(b"Subject: Agenda\r\n", b"not a header field\r\n")
    assert verify_arc(broken, sealer.dns()) == ArcResult("fail", 0, "message header not parseable")
    assert verify_arc(b"not a header\r\n\r\nbody", sealer.dns()) == ArcResult("none", 0, "")


MUTATION = mutations(
    st.sampled_from([b"\r\n", b"\r\n ", b":", b";", b"i=", b"i=0", b"cv=", b"\xff", b" "])
)


@settings(max_examples=200, deadline=None)
@given(st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_sealed_messages_never_raise(
    sealer: Sealer, two_hops: bytes, edits: list[Mutation]
) -> None:
    result = verify_arc(mutate(two_hops, edits), sealer.dns())
    assert result.result in ("none", "pass", "fail")
    assert result.instance >= 0
    assert result.reason.isascii()
    assert not set(result.reason) & set('\r\n()\\"')
