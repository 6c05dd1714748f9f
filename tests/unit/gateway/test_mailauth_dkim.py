"""DKIM verification (every signature, RFC 8601 results, RFC 8301 rules, l=, key records) and
signing (relaxed/relaxed, dual RSA + Ed25519, From over-signed, cached keys), with keys served
from a dict: no DNS server needed."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import parse_pem_private_key
from hypothesis import given, settings
from hypothesis import strategies as st
from mutations import Mutation, mutate, mutations

from mailkube_core.routing import DkimKey
from mailkube_core.routing.dkim_keys import generate, public_record
from mailkube_gateway.headers import parse_header_section
from mailkube_gateway.mailauth import dkim_sign
from mailkube_gateway.mailauth.arc_verify import verify_arc
from mailkube_gateway.mailauth.dkim_sign import SIGNED_HEADERS, sign
from mailkube_gateway.mailauth.dkim_verify import (
    MAX_SIGNATURES,
    DkimResult,
    DnsFunc,
    verify_dkim,
)

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Lunch on Friday\r\n"
    b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <lunch-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Shall we meet at noon?\r\n"
    b"\r\n"
    b"Alice\r\n"
)
RESULTS = {"pass", "fail", "neutral", "policy", "temperror", "permerror"}


@dataclass(frozen=True)
class Keys:
    rsa: DkimKey
    ed: DkimKey
    #: key name (no trailing dot) -> TXT record
    records: dict[str, str]

    def dns(self, **extra: str) -> DnsFunc:
        return zone({**self.records, **extra})

    @property
    def rsa_pem(self) -> bytes:
        return self.rsa.private_key.get_secret_value().encode()


def zone(records: dict[str, str]) -> DnsFunc:
    """dkimpy's dnsfunc over a dict: None for a name that is not there."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        value = records.get(name.decode().rstrip(".").lower())
        return None if value is None else value.encode()

    return dnsfunc


def failing_dns(error: Exception) -> DnsFunc:
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        raise error

    return dnsfunc


@pytest.fixture(scope="module")
def keys() -> Keys:
    rsa = DkimKey(selector="rsa", algorithm="rsa-sha256", private_key=generate("rsa-sha256"))
    ed = DkimKey(selector="ed", algorithm="ed25519-sha256", private_key=generate("ed25519-sha256"))
    records = {
        "rsa._domainkey.example.com": public_record(
            "rsa-sha256", rsa.private_key.get_secret_value()
        ),
        "ed._domainkey.example.com": public_record(
            "ed25519-sha256", ed.private_key.get_secret_value()
        ),
    }
    return Keys(rsa, ed, records)


def dkimpy_sign(message: bytes, pem: bytes, **options: object) -> bytes:
    """A signature made by dkimpy itself, for what our signer never makes (rsa-sha1, l=...)."""
    header: bytes = dkim.sign(
        message, b"rsa", b"example.com", pem, canonicalize=(b"relaxed", b"relaxed"), **options
    )
    return header + message


def summary(results: list[DkimResult]) -> list[tuple[str, str, str]]:
    return [(r.result, r.selector, r.reason) for r in results]


def check_wellformed(results: list[DkimResult]) -> None:
    """What the Authentication-Results writer relies on, whatever the input."""
    assert isinstance(results, list)
    assert len(results) <= MAX_SIGNATURES
    for result in results:
        assert result.result in RESULTS
        for text in (result.domain, result.selector, result.algorithm, result.header_b):
            assert text.isascii()
            assert re.fullmatch(r"[A-Za-z0-9._+/=-]*", text), text
        assert len(result.header_b) <= 12
        assert result.reason.isascii()
        assert not set(result.reason) & set('\r\n()\\"')


# --- verification -----------------------------------------------------------------------------


def test_rsa_signature_passes(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa]) + MESSAGE
    [result] = verify_dkim(signed, keys.dns())
    b_value = re.search(rb"\bb=([^;]+)", signed.split(b"\r\nFrom:")[0]).group(1)
    assert result == DkimResult(
        result="pass",
        domain="example.com",
        selector="rsa",
        algorithm="rsa-sha256",
        header_b=re.sub(rb"\s+", b"", b_value)[:12].decode(),
        reason="",
    )


def test_ed25519_signature_passes(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.ed]) + MESSAGE
    [result] = verify_dkim(signed, keys.dns())
    assert (result.result, result.algorithm, result.selector) == ("pass", "ed25519-sha256", "ed")
    assert len(result.header_b) == 12


def test_both_signatures_of_one_message_pass(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa, keys.ed]) + MESSAGE
    assert summary(verify_dkim(signed, keys.dns())) == [("pass", "rsa", ""), ("pass", "ed", "")]


def test_changed_body_fails(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa, keys.ed]) + MESSAGE
    changed = signed.replace(b"at noon", b"at one")
    assert summary(verify_dkim(changed, keys.dns())) == [
        ("fail", "rsa", "body hash mismatch"),
        ("fail", "ed", "body hash mismatch"),
    ]


def test_changed_signed_header_fails(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa, keys.ed]) + MESSAGE
    changed = signed.replace(b"Subject: Lunch on Friday", b"Subject: Lunch on Monday")
    assert summary(verify_dkim(changed, keys.dns())) == [
        ("fail", "rsa", "signature did not verify"),
        ("fail", "ed", "signature did not verify"),
    ]


def test_unsigned_header_may_be_added(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa]) + MESSAGE
    relayed = b"Received: from a by b; Tue, 24 Nov 2026 10:00:01 +0000\r\n" + signed
    assert summary(verify_dkim(relayed, keys.dns())) == [("pass", "rsa", "")]


def test_missing_key_is_permerror(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa]) + MESSAGE
    [result] = verify_dkim(signed, zone({}))
    assert (result.result, result.reason) == ("permerror", "no key")


@pytest.mark.parametrize(
    "record", ["v=DKIM1; k=rsa; p=", "v=DKIM1; p=", "v=DKIM1; k=ed25519; p= ; t=y"]
)
def test_revoked_key_is_permerror(keys: Keys, record: str) -> None:
    """RFC 6376 §3.6.1: an empty p= means the key was revoked."""
    signed = sign(MESSAGE, "example.com", [keys.rsa]) + MESSAGE
    [result] = verify_dkim(signed, keys.dns(**{"rsa._domainkey.example.com": record}))
    assert (result.result, result.reason) == ("permerror", "key revoked")


@pytest.mark.parametrize(
    "error", [dkim.DnsTimeoutError("timed out"), OSError("network unreachable")]
)
def test_dns_failure_is_temperror(keys: Keys, error: Exception) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa, keys.ed]) + MESSAGE
    results = verify_dkim(signed, failing_dns(error))
    assert summary(results) == [
        ("temperror", "rsa", "key lookup failed: DNS error"),
        ("temperror", "ed", "key lookup failed: DNS error"),
    ]


def test_rsa_key_under_1024_bits_never_passes(keys: Keys) -> None:
    """RFC 8301 §3.2. The signature itself is good: only the key size refuses it."""
    pem = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True).stdout
    signed = dkimpy_sign(MESSAGE, pem)
    public = _public_record_of(pem)
    assert dkim.verify(signed, dnsfunc=zone({"rsa._domainkey.example.com": public}), minkey=512)
    [result] = verify_dkim(signed, zone({"rsa._domainkey.example.com": public}))
    assert (result.result, result.reason) == ("permerror", "key too short: 512 bits")


def test_rsa_sha1_never_passes(keys: Keys) -> None:
    """RFC 8301 §3.1, although dkimpy itself would pass it."""
    signed = dkimpy_sign(MESSAGE, keys.rsa_pem, signature_algorithm=b"rsa-sha1")
    assert dkim.verify(signed, dnsfunc=keys.dns())
    [result] = verify_dkim(signed, keys.dns())
    assert (result.result, result.algorithm, result.reason) == (
        "permerror",
        "rsa-sha1",
        "rsa-sha1 not accepted",
    )


def test_body_length_covering_the_whole_body_passes(keys: Keys) -> None:
    signed = dkimpy_sign(MESSAGE, keys.rsa_pem, length=True)
    assert re.search(rb"\bl=\d+", signed)
    assert summary(verify_dkim(signed, keys.dns())) == [("pass", "rsa", "")]


def test_body_length_with_content_appended_is_policy(keys: Keys) -> None:
    """RFC 6376 §8.2: what follows the l= octets is unsigned, so the signature does not vouch
    for the message as delivered."""
    signed = dkimpy_sign(MESSAGE, keys.rsa_pem, length=True)
    appended = signed + b"Click here: http://phish.example/\r\n"
    [result] = verify_dkim(appended, keys.dns())
    assert result.result == "policy"
    assert re.fullmatch(r"l= signs \d+ of \d+ body bytes", result.reason)


def test_body_cut_below_the_body_length_fails(keys: Keys) -> None:
    signed = dkimpy_sign(MESSAGE, keys.rsa_pem, length=True)
    cut = signed.replace(b"Alice\r\n", b"")  # the body is now shorter than l=
    [result] = verify_dkim(cut, keys.dns())
    assert (result.result, result.reason) == ("fail", "body hash mismatch")


def test_body_length_longer_than_the_body_is_permerror(keys: Keys) -> None:
    """RFC 6376 §3.5: l= MUST NOT be larger than the body (dkimpy would pass it)."""
    signed = sign_with_tags(MESSAGE, keys.rsa_pem, [b"from", b"to"], [(b"l", b"100000")])
    assert dkim.verify(signed, dnsfunc=keys.dns())
    [result] = verify_dkim(signed, keys.dns())
    assert (result.result, result.reason) == ("permerror", "l= longer than the body")


def test_one_bad_signature_does_not_affect_the_others(keys: Keys) -> None:
    other = DkimKey(selector="gone", algorithm="rsa-sha256", private_key=keys.rsa.private_key)
    fields = sign(MESSAGE, "example.com", [keys.rsa, other, keys.ed])
    rsa_field, gone_field, ed_field = re.split(rb"(?=DKIM-Signature:)", fields)[1:]
    broken_ed = corrupt_signature(ed_field)
    signed = rsa_field + gone_field + broken_ed + MESSAGE
    assert summary(verify_dkim(signed, keys.dns())) == [
        ("pass", "rsa", ""),
        ("permerror", "gone", "no key"),
        ("fail", "ed", "signature did not verify"),
    ]


def test_message_without_signature_has_no_results(keys: Keys) -> None:
    assert verify_dkim(MESSAGE, keys.dns()) == []


def test_signatures_past_the_limit_are_not_checked(keys: Keys) -> None:
    field = sign(MESSAGE, "example.com", [keys.ed])
    asked: list[bytes] = []
    dns = keys.dns()

    def counting(name: bytes, timeout: float = 5) -> bytes | None:
        asked.append(name)
        return dns(name, timeout=timeout)

    results = verify_dkim(field * (MAX_SIGNATURES + 5) + MESSAGE, counting)
    assert [r.result for r in results] == ["pass"] * MAX_SIGNATURES
    assert asked == [b"ed._domainkey.example.com."]  # one lookup per key name and message


def test_from_must_be_signed(keys: Keys) -> None:
    """RFC 6376 §6.1.1: a signature whose h= leaves out From is refused (dkimpy passes it)."""
    signed = sign_with_tags(MESSAGE, keys.rsa_pem, [b"to", b"subject"], [])
    assert dkim.verify(signed, dnsfunc=keys.dns())
    [result] = verify_dkim(signed, keys.dns())
    assert (result.result, result.reason) == ("permerror", "From not signed")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=", "key type"),
        ("v=DKIM1; k=rsa; h=sha1; p={p}", "key does not allow sha256"),
        ("v=DKIM1; k=rsa; s=tlsrpt; p={p}", "key not for email"),
        ("v=DKIM2; k=rsa; p={p}", "bad key record"),
        ("v=DKIM1; k=rsa; p=bm90IGEga2V5", "bad key record"),
        ("this is not a tag list", "bad key record"),
    ],
)
def test_key_record_must_allow_the_signature(keys: Keys, record: str, reason: str) -> None:
    p = keys.records["rsa._domainkey.example.com"].split("p=")[1]
    signed = sign(MESSAGE, "example.com", [keys.rsa]) + MESSAGE
    [result] = verify_dkim(signed, keys.dns(**{"rsa._domainkey.example.com": record.format(p=p)}))
    assert result.result == "permerror"
    assert result.reason.startswith(reason)


def test_strict_key_refuses_a_subdomain_identity(keys: Keys) -> None:
    """RFC 6376 §3.6.1 t=s: i= must be in d= itself, not a subdomain."""
    signed = dkimpy_sign(MESSAGE, keys.rsa_pem, identity=b"@news.example.com")
    assert summary(verify_dkim(signed, keys.dns())) == [("pass", "rsa", "")]
    strict = keys.records["rsa._domainkey.example.com"] + "; t=s"
    [result] = verify_dkim(signed, keys.dns(**{"rsa._domainkey.example.com": strict}))
    assert (result.result, result.reason) == ("permerror", "i= not in d=, key has t=s")


def test_expired_signature_is_permerror(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa]) + MESSAGE
    old = int(time.time()) - 200_000
    expired = signed.replace(b"; t=", f"; x={old}; t=".encode(), 1)
    [result] = verify_dkim(expired, keys.dns())
    assert (result.result, result.reason) == ("permerror", "signature expired")


def test_domain_is_lower_case_a_labels(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa]) + MESSAGE
    upper = signed.replace(b"d=example.com", b"d=EXAMPLE.com")
    [result] = verify_dkim(upper, keys.dns())
    assert result.domain == "example.com"


def test_unparseable_header_gives_one_permerror_per_signature(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa, keys.ed]) + MESSAGE
    broken = signed.replace(b"MIME-Version: 1.0\r\n", b"this line is not a header field\r\n")
    results = verify_dkim(broken, keys.dns())
    assert [(r.result, r.domain, r.reason) for r in results] == [
        ("permerror", "example.com", "message header not parseable")
    ] * 2


def test_verification_from_many_threads_at_once(keys: Keys) -> None:
    signed = sign(MESSAGE, "example.com", [keys.rsa, keys.ed]) + MESSAGE
    tampered = signed.replace(b"noon", b"dawn")
    jobs = [signed, tampered] * 16
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda m: [r.result for r in verify_dkim(m, keys.dns())], jobs))
    assert outcomes == [["pass", "pass"], ["fail", "fail"]] * 16


# --- signing ----------------------------------------------------------------------------------


def signature_fields(fields: bytes) -> list[dict[bytes, bytes]]:
    assert fields.endswith(b"\r\n")
    parts = re.split(rb"(?=DKIM-Signature:)", fields)[1:]
    assert b"".join(parts) == fields
    return [
        dkim.util.parse_tag_value(re.sub(rb"\r\n[ \t]", b" ", part).split(b":", 1)[1])
        for part in parts
    ]


def test_sign_rsa_round_trip(keys: Keys) -> None:
    fields = sign(MESSAGE, "example.com", [keys.rsa])
    [tags] = signature_fields(fields)
    assert tags[b"a"] == b"rsa-sha256"
    assert tags[b"c"] == b"relaxed/relaxed"
    assert (tags[b"d"], tags[b"s"]) == (b"example.com", b"rsa")
    assert abs(int(tags[b"t"]) - time.time()) < 60
    assert b"l" not in tags
    assert dkim.verify(fields + MESSAGE, dnsfunc=keys.dns())


def test_sign_ed25519_round_trip(keys: Keys) -> None:
    fields = sign(MESSAGE, "example.com", [keys.ed])
    [tags] = signature_fields(fields)
    assert (tags[b"a"], tags[b"s"]) == (b"ed25519-sha256", b"ed")
    assert len(base64.b64decode(re.sub(rb"\s+", b"", tags[b"b"]))) == 64
    assert dkim.verify(fields + MESSAGE, dnsfunc=keys.dns())


def test_dual_signing_makes_one_field_per_key(keys: Keys) -> None:
    fields = sign(MESSAGE, "example.com", [keys.rsa, keys.ed])
    assert [t[b"a"] for t in signature_fields(fields)] == [b"rsa-sha256", b"ed25519-sha256"]
    assert summary(verify_dkim(fields + MESSAGE, keys.dns())) == [
        ("pass", "rsa", ""),
        ("pass", "ed", ""),
    ]


def test_keys_that_do_not_sign_are_skipped(keys: Keys) -> None:
    retired = keys.rsa.model_copy(update={"signing": False})
    fields = sign(MESSAGE, "example.com", [retired, keys.ed])
    assert [t[b"s"] for t in signature_fields(fields)] == [b"ed"]
    assert sign(MESSAGE, "example.com", [retired]) == b""
    assert sign(MESSAGE, "example.com", []) == b""


def test_from_is_oversigned(keys: Keys) -> None:
    """RFC 6376 §8.15: h= names From once more than it appears, so a second From added later
    breaks the signature."""
    fields = sign(MESSAGE, "example.com", [keys.rsa, keys.ed])
    for tags in signature_fields(fields):
        names = [n.strip() for n in tags[b"h"].split(b":")]
        assert names.count(b"from") == 2
    forged = fields + b"From: Mallory <ceo@example.com>\r\n" + MESSAGE
    assert [r.result for r in verify_dkim(forged, keys.dns())] == ["fail", "fail"]
    # below the signed one too (a verifier reading From from the bottom)
    forged_below = (fields + MESSAGE).replace(
        b"To: Bob", b"From: Mallory <ceo@example.com>\r\nTo: Bob"
    )
    assert [r.result for r in verify_dkim(forged_below, keys.dns())] == ["fail", "fail"]


def test_signed_header_list(keys: Keys) -> None:
    message = (
        b"Received: from client by mx; Tue, 24 Nov 2026 10:00:00 +0000\r\n"
        b"Return-Path: <alice@example.com>\r\n"
        b"From: Alice <alice@example.com>\r\n"
        b"To: bob@example.org\r\n"
        b"To: carol@example.org\r\n"
        b"Bcc: dave@example.org\r\n"
        b"X-Mailer: test\r\n"
        b"Subject: News\r\n"
        b"List-Unsubscribe: <https://example.com/u/1>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"\r\n"
        b"body\r\n"
    )
    fields = sign(message, "example.com", [keys.rsa])
    [tags] = signature_fields(fields)
    assert [n.strip() for n in tags[b"h"].split(b":")] == [
        b"from",
        b"to",
        b"to",
        b"subject",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"from",
    ]
    assert [r.result for r in verify_dkim(fields + message, keys.dns())] == ["pass"]


def test_signed_headers_constant() -> None:
    assert all(name == name.lower() for name in SIGNED_HEADERS)
    assert len(set(SIGNED_HEADERS)) == len(SIGNED_HEADERS)
    for name in (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version"):
        assert name in SIGNED_HEADERS
    for name in (b"content-type", b"reply-to", b"list-unsubscribe", b"list-unsubscribe-post"):
        assert name in SIGNED_HEADERS
    # RFC 6376 §5.4: fields relays add or remove in transit are not signed
    for name in (b"received", b"return-path", b"bcc", b"dkim-signature"):
        assert name not in SIGNED_HEADERS


def test_domain_is_signed_in_a_labels(keys: Keys) -> None:
    fields = sign(MESSAGE, "Bücher.Example", [keys.ed])
    [tags] = signature_fields(fields)
    assert tags[b"d"] == b"xn--bcher-kva.example"
    record = keys.records["ed._domainkey.example.com"]
    dns = zone({"ed._domainkey.xn--bcher-kva.example": record})
    assert [r.result for r in verify_dkim(fields + MESSAGE, dns)] == ["pass"]


@pytest.mark.parametrize(
    ("algorithm", "text"),
    [
        ("rsa-sha256", "-----BEGIN PRIVATE KEY-----\nc2VjcmV0IGtleSBtYXRlcmlhbA==\n-----END"),
        ("rsa-sha256", "secret key material"),
        ("ed25519-sha256", "c2VjcmV0IGtleSBtYXRlcmlhbA=="),  # base64, but not 32 bytes
        ("ed25519-sha256", "secret key material!"),
    ],
)
def test_malformed_key_raises_value_error_without_the_key(algorithm: str, text: str) -> None:
    key = DkimKey(selector="bad", algorithm=algorithm, private_key=text)
    with pytest.raises(ValueError, match=r"'bad'.*example\.com") as caught:
        sign(MESSAGE, "example.com", [key])
    assert "c2VjcmV0" not in str(caught.value)
    assert "secret" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_short_rsa_key_does_not_sign() -> None:
    """RFC 8301 §3.2: signers MUST use at least 1024 bits (verifiers refuse shorter keys)."""
    pem = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True).stdout
    key = DkimKey(selector="short", algorithm="rsa-sha256", private_key=pem.decode())
    with pytest.raises(ValueError, match="'short'"):
        sign(MESSAGE, "example.com", [key])


def test_keys_are_parsed_once(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = DkimKey(
        selector="fresh", algorithm="ed25519-sha256", private_key=generate("ed25519-sha256")
    )
    loads: list[str] = []
    real_load = dkim_sign._load

    def counting_load(algorithm: str, text: str) -> dkim_sign.PrivateKey:
        loads.append(algorithm)
        return real_load(algorithm, text)

    monkeypatch.setattr(dkim_sign, "_load", counting_load)
    first = sign(MESSAGE, "example.com", [fresh])
    second = sign(MESSAGE.replace(b"noon", b"one"), "example.com", [fresh])
    assert loads == ["ed25519-sha256"]
    assert first != second


def test_signing_from_many_threads_at_once(keys: Keys) -> None:
    messages = [MESSAGE.replace(b"noon", f"{n} o'clock".encode()) for n in range(24)]
    with ThreadPoolExecutor(8) as pool:
        signed = list(pool.map(lambda m: sign(m, "example.com", [keys.rsa, keys.ed]) + m, messages))
    for message in signed:
        assert [r.result for r in verify_dkim(message, keys.dns())] == ["pass", "pass"]


# --- no input makes them raise ------------------------------------------------------------------

JUNK = st.sampled_from(
    [
        b"\r\n",
        b"\r\n ",
        b"\n",
        b"\r",
        b":",
        b";",
        b"=",
        b" ",
        b"\x00",
        b"\xff\xfe",
        "é".encode(),
        b"DKIM-Signature: ",
        b"ARC-Seal: i=1; ",
        b"b=",
        b"bh=",
        b"l=",
        b"l=; ",
        b"h=",
        b"i=@",
        b"d=",
        b"a=rsa-sha1",
        b"t=99999999999",
        b"x=1",
        b"c=simple/junk",
    ]
)
MUTATION = mutations(JUNK)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(keys: Keys, data: bytes) -> None:
    check_wellformed(verify_dkim(data, keys.dns()))
    assert verify_arc(data, keys.dns()).result in ("none", "pass", "fail")


@settings(max_examples=300, deadline=None)
@given(st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_signed_messages_never_raise(
    keys: Keys, signed_message: bytes, edits: list[Mutation]
) -> None:
    mutated = mutate(signed_message, edits)
    check_wellformed(verify_dkim(mutated, keys.dns()))
    assert verify_arc(mutated, keys.dns()).result in ("none", "pass", "fail")


TAG_NAMES = st.sampled_from([b"v", b"a", b"b", b"bh", b"c", b"d", b"h", b"i", b"l", b"q", b"s"])
TAG_VALUES = st.sampled_from(
    [b"1", b"rsa-sha256", b"ed25519-sha256", b"from:to", b"example.com", b"rsa", b"ed", b"",
     b"relaxed/relaxed", b"AAAA", b"12", b"@example.com", b"dns/txt"]
) | st.binary(max_size=20)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(TAG_NAMES, TAG_VALUES), max_size=12), st.sampled_from([b"; ", b";"]))
def test_random_signature_fields_never_raise(
    keys: Keys, tags: list[tuple[bytes, bytes]], separator: bytes
) -> None:
    field = b"DKIM-Signature: " + separator.join(n + b"=" + v for n, v in tags) + b"\r\n"
    results = verify_dkim(field + MESSAGE, keys.dns(**{"ed._domainkey.example.com": "v=DKIM1; p="}))
    check_wellformed(results)
    assert all(r.result != "pass" for r in results)


@pytest.fixture(scope="module")
def signed_message(keys: Keys) -> bytes:
    return sign(MESSAGE, "example.com", [keys.rsa, keys.ed]) + MESSAGE


# --- helpers ----------------------------------------------------------------------------------


def corrupt_signature(field: bytes) -> bytes:
    """The same field with one character of b= changed (still valid base64)."""
    match = re.search(rb"\bb=([A-Za-z0-9+/])", field)
    assert match is not None
    replacement = b"B" if match.group(1) != b"B" else b"C"
    return field[: match.start(1)] + replacement + field[match.end(1) :]


def sign_with_tags(
    message: bytes, pem: bytes, signed: list[bytes], extra: list[tuple[bytes, bytes]]
) -> bytes:
    """A valid rsa-sha256 signature with whatever h= and tags, made with dkimpy's own field
    writer (its sign() refuses some of what a sender may do)."""
    signer = dkim.DKIM(message)
    signer.hasher = hashlib.sha256
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    body_hash = base64.b64encode(hashlib.sha256(policy.canonicalize_body(signer.body)).digest())
    tags = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", b"example.com"),
        (b"s", b"rsa"),
        *extra,
        (b"h", b" : ".join(signed)),
        (b"bh", body_hash),
        (b"b", b"0" * 60),
    ]
    private_key = parse_pem_private_key(pem)
    value = signer.gen_header(tags, signed, policy, b"DKIM-Signature", private_key)
    return b"DKIM-Signature: " + value + message


def _public_record_of(pem: bytes) -> str:
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def test_a_signature_field_is_counted_by_name_in_any_case_and_only_as_a_field() -> None:
    """What the inbound stage asks before it runs dkimpy (HeaderSection.count)."""

    def has_signature(header: bytes) -> bool:
        return parse_header_section(header + b"\r\nbody", max_size=4096).count("dkim-signature") > 0

    header = (
        b"From: a@x.test\r\nx-note: dkim-signature: not a field\r\n\tdkim-signature: nor this\r\n"
    )
    assert not has_signature(header)
    assert has_signature(header + b"DKIM-Signature : v=1\r\n")
    assert has_signature(b"dkim-signature:v=1\r\n")
    assert not has_signature(header + b"DKIM-Signatures: v=1\r\n")
