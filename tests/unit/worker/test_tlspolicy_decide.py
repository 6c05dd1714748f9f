"""Per-host TLS policy decisions and the judging of presented chains (tlspolicy/decide.py,
certs.py, dane.py): pure functions, real certificates from trustme CAs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import Store

from mailkube_worker.remote import tls_not_required
from mailkube_worker.tlspolicy.certs import webpki_failure
from mailkube_worker.tlspolicy.dane import Tlsa, TlsaAnswer, dane_failure
from mailkube_worker.tlspolicy.decide import HostPolicy, Refusal, host_policy, judge
from mailkube_worker.tlspolicy.mta_sts import StsPolicy

HOST = "mx.example.test"
ENFORCE = StsPolicy("enforce", 86400, ("mx.example.test", "*.backup.test"))
TESTING = StsPolicy("testing", 86400, ("mx.example.test",))


def der_chain(cert: trustme.LeafCert) -> list[bytes]:
    return [x509.load_pem_x509_certificate(b.bytes()).public_bytes(Encoding.DER)
            for b in cert.cert_chain_pems]  # fmt: skip


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def roots(ca: trustme.CA) -> Store:
    return Store([x509.load_pem_x509_certificate(ca.cert_pem.bytes())])


def tlsa(usage: int, selector: int, mtype: int, der: bytes) -> Tlsa:
    certificate = x509.load_der_x509_certificate(der)
    data = der if selector == 0 else certificate.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return Tlsa(usage, selector, mtype, data)


# --- which policy a host gets -----------------------------------------------------------------

SECURE = TlsaAnswer("secure", (Tlsa(3, 1, 1, b"x" * 32),))


@pytest.mark.parametrize(("override", "sts", "tlsa_answer", "host", "expected"), [
    (None, None, None, HOST, "opportunistic"),
    (None, ENFORCE, None, HOST, "sts"),
    (None, ENFORCE, None, "a.backup.test", "sts"),
    (None, ENFORCE, None, "evil.test", "validation-failure"),  # not in the policy's mx
    (None, TESTING, None, "evil.test", "sts-testing"),  # testing: still used, reported
    (None, StsPolicy("none", 0, ()), None, HOST, "opportunistic"),
    (None, ENFORCE, SECURE, "evil.test", "dane"),  # DANE first (RFC 8461 §2)
    (None, ENFORCE, TlsaAnswer("none"), HOST, "sts"),
    (None, None, TlsaAnswer("bogus", error="SERVFAIL"), HOST, "dnssec-invalid"),
    ("dane", ENFORCE, TlsaAnswer("none"), HOST, "dane-required"),
    ("dane", None, SECURE, HOST, "dane"),
    ("sts", TESTING, None, HOST, "sts"),  # the override enforces a testing policy
    ("sts", None, None, HOST, "sts-policy-fetch-error"),
    ("sts", ENFORCE, SECURE, HOST, "sts"),  # sts: DANE not used
    ("required", ENFORCE, SECURE, "evil.test", "required"),
    ("opportunistic", ENFORCE, TlsaAnswer("bogus"), "evil.test", "opportunistic"),
])  # fmt: skip
def test_host_policy(override: str | None, sts: StsPolicy | None, tlsa_answer: TlsaAnswer | None,
                     host: str, expected: str) -> None:  # fmt: skip
    got = host_policy(host, override, "opportunistic", sts, tlsa_answer)  # type: ignore[arg-type]
    assert (got.result_type if isinstance(got, Refusal) else got.kind) == expected


def test_the_configured_minimum_applies_without_policies() -> None:
    got = host_policy(HOST, None, "required", None, TlsaAnswer("none"))
    assert isinstance(got, HostPolicy)
    assert got.kind == "required"
    assert got.tls_required


# --- judging what a host presented ------------------------------------------------------------


def test_webpki(ca: trustme.CA, roots: Store) -> None:
    good = der_chain(ca.issue_cert(HOST))
    assert webpki_failure(good, HOST, roots) is None
    assert webpki_failure(good, "other.test", roots) == "certificate-host-mismatch"
    wildcard = der_chain(ca.issue_cert("*.example.test"))
    assert webpki_failure(wildcard, HOST, roots) is None
    assert webpki_failure(wildcard, "a.mx.example.test", roots) == "certificate-host-mismatch"
    past = datetime.now(UTC) - timedelta(days=1)
    expired = der_chain(ca.issue_cert(HOST, not_before=past - timedelta(days=30), not_after=past))
    assert webpki_failure(expired, HOST, roots) == "certificate-expired"
    stranger = der_chain(trustme.CA().issue_cert(HOST))
    assert webpki_failure(stranger, HOST, roots) == "certificate-not-trusted"
    assert webpki_failure([], HOST, roots) == "certificate-not-trusted"
    assert webpki_failure([b"garbage"], HOST, roots) == "certificate-not-trusted"


def test_webpki_through_an_intermediate(ca: trustme.CA, roots: Store) -> None:
    chain = der_chain(ca.create_child_ca().issue_cert(HOST))
    assert len(chain) == 2
    assert webpki_failure(chain, HOST, roots) is None
    assert webpki_failure(chain[:1], HOST, roots) == "certificate-not-trusted"  # no issuer


@pytest.mark.parametrize("record", ["3 1 1", "3 0 1", "3 1 2", "3 0 0", "3 1 0"])
def test_dane_ee_matches_the_leaf_whatever_its_name_or_issuer(record: str) -> None:
    chain = der_chain(trustme.CA().issue_cert("some.other.name"))
    usage, selector, mtype = map(int, record.split())
    assert dane_failure(chain, (tlsa(usage, selector, mtype, chain[0]),), HOST) is None


def test_dane_ee_mismatch() -> None:
    chain = der_chain(trustme.CA().issue_cert(HOST))
    other = der_chain(trustme.CA().issue_cert(HOST))
    assert dane_failure(chain, (tlsa(3, 1, 1, other[0]),), HOST) is not None
    assert dane_failure([], (tlsa(3, 1, 1, other[0]),), HOST) is not None


@pytest.mark.parametrize("selector_mtype", [(0, 1), (1, 1), (0, 0), (1, 2)])
def test_dane_ta_matches_an_issuer_in_the_chain_and_checks_the_name(
    selector_mtype: tuple[int, int],
) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    chain = der_chain(intermediate.issue_cert(HOST))
    for anchor in chain[1:]:  # the intermediate, or the root if sent
        record = tlsa(2, *selector_mtype, anchor)
        assert dane_failure(chain, (record,), HOST) is None
        assert dane_failure(chain, (record,), "other.test") is not None  # name checked
    unrelated = der_chain(trustme.CA().issue_cert(HOST))
    assert dane_failure(unrelated, (tlsa(2, *selector_mtype, chain[1]),), HOST) is not None


def test_dane_unusable_records_only_require_tls() -> None:
    chain = der_chain(trustme.CA().issue_cert("whatever.test"))
    pkix = (Tlsa(1, 1, 1, b"\0" * 32), Tlsa(0, 0, 1, b"\0" * 32))
    assert dane_failure(chain, pkix, HOST) is None


@pytest.mark.parametrize(("kind", "tls", "expected", "enforced"), [
    ("opportunistic", False, None, False),
    ("sts", False, "starttls-not-supported", True),
    ("sts-testing", False, "starttls-not-supported", False),
    ("dane", False, "starttls-not-supported", True),
    ("sts", True, "certificate-host-mismatch", True),
    ("sts-testing", True, "certificate-host-mismatch", False),
    ("required", True, "certificate-host-mismatch", True),
    ("opportunistic", True, None, False),
])  # fmt: skip
def test_judge(ca: trustme.CA, roots: Store, kind: str, tls: bool, expected: str | None,
               enforced: bool) -> None:  # fmt: skip
    chain = der_chain(ca.issue_cert("wrong.name.test"))
    policy = HostPolicy(kind, tlsa=SECURE if kind == "dane" else None)  # type: ignore[arg-type]
    verdict = judge(policy, HOST, tls, chain if tls else [], lambda: roots)
    assert verdict.result_type == expected
    assert verdict.refuse is (expected is not None and enforced)


def test_judge_dane_success_and_failure(ca: trustme.CA) -> None:
    chain = der_chain(ca.issue_cert("wrong.name.test"))
    ok = HostPolicy("dane", tlsa=TlsaAnswer("secure", (tlsa(3, 1, 1, chain[0]),)))
    assert judge(ok, HOST, True, chain, lambda: Store([])).result_type is None
    bad = HostPolicy("dane", tlsa=SECURE)
    verdict = judge(bad, HOST, True, chain, lambda: Store([]))
    assert verdict.result_type == "tlsa-invalid"
    assert verdict.refuse


@pytest.mark.parametrize(("message", "waived"), [
    (b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n", True),
    (b"tls-required:no\r\n\r\n", True),
    (b"TLS-Required: Yes\r\n\r\n", False),
    (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),  # in the body, not the header
    (b"X-TLS-Required: No\r\n\r\n", False),
])  # fmt: skip
def test_tls_required_no_header(message: bytes, waived: bool) -> None:
    assert tls_not_required(message) is waived
