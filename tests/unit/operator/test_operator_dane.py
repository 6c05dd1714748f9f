"""TLSA records for our MX host (dane.py): the `3 1 1` digest of the gateway's key as openssl
computes it, the next key cert-manager keeps in a labelled Secret, and the DNSVerified reason
when the next key is not published (the classic DANE outage)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from typing import Any

import trustme

from mailkube_core.settings import OperatorSettings
from mailkube_operator import dnscheck
from mailkube_operator.dane import (
    NEXT_KEY_LABEL,
    DaneKeys,
    keys_from,
    secret_location,
    spki_sha256,
    tlsa_records,
)


def openssl_digest(cert_pem: bytes) -> str:
    """The digest the way operators compute it by hand (RFC 7671 §5.1 examples)."""
    public = subprocess.run(["openssl", "x509", "-noout", "-pubkey"], input=cert_pem,
                            capture_output=True, check=True).stdout  # fmt: skip
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=public,
                         capture_output=True, check=True).stdout  # fmt: skip
    return hashlib.sha256(der).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_digest_of_the_certificate_and_of_its_key_is_openssls() -> None:
    cert = trustme.CA().issue_cert("mail.example.org")
    cert_pem, key_pem = cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes()
    assert spki_sha256(cert_pem) == spki_sha256(key_pem) == openssl_digest(cert_pem)
    other = trustme.CA().issue_cert("mail.example.org").cert_chain_pems[0].bytes()
    assert spki_sha256(other) != spki_sha256(cert_pem)


def test_keys_from_the_secret_and_cert_managers_next_key_secret() -> None:
    current = trustme.CA().issue_cert("mail.example.org")
    upcoming = trustme.CA().issue_cert("mail.example.org")
    data = {"tls.crt": b64(current.cert_chain_pems[0].bytes()),
            "tls.key": b64(current.private_key_pem.bytes())}  # fmt: skip

    def next_secret(owner: str, key: bytes, labelled: bool = True) -> dict[str, Any]:
        return {
            "metadata": {
                "name": f"{owner}-x7k2p",
                "labels": {NEXT_KEY_LABEL: "true"} if labelled else {},
                "ownerReferences": [{"kind": "Certificate", "name": owner}],
            },
            "data": {"tls.key": b64(key)},
        }

    stranger = next_secret("someone-else", trustme.CA().issue_cert("x").private_key_pem.bytes())
    keys = keys_from(data, [stranger], "gw-tls")
    assert keys == DaneKeys(spki_sha256(current.cert_chain_pems[0].bytes()), None)

    ours = next_secret("gw-tls", upcoming.private_key_pem.bytes())
    keys = keys_from(data, [stranger, ours], "gw-tls")
    assert keys.next == spki_sha256(upcoming.cert_chain_pems[0].bytes())
    # the next key is the current one (rotationPolicy: Never): nothing new to publish
    same = next_secret("gw-tls", current.private_key_pem.bytes())
    assert keys_from(data, [same], "gw-tls").next is None
    # no Secret, or garbage in it: no record rather than a wrong one
    assert keys_from(None, [], "gw-tls") == DaneKeys(None, None)
    assert keys_from({"tls.crt": b64(b"junk")}, [], "gw-tls") == DaneKeys(None, None)

    records = tlsa_records("Mail.Example.org.", keys)
    assert [(r.type, r.name, r.value, r.purpose) for r in records] == [
        ("TLSA", "_25._tcp.Mail.Example.org.", f"3 1 1 {keys.current}", "tlsa"),
        ("TLSA", "_25._tcp.Mail.Example.org.", f"3 1 1 {keys.next}", "tlsa-next"),
    ]
    assert tlsa_records("mail.example.org", None) == []
    assert tlsa_records("mail.example.org", DaneKeys(None, None)) == []


def test_secret_location_defaults_to_the_operators_namespace() -> None:
    assert secret_location(OperatorSettings()) is None
    named = OperatorSettings(mx_tls_secret="gw-tls", namespace="mail")
    assert secret_location(named) == ("mail", "gw-tls")
    assert secret_location(OperatorSettings(mx_tls_secret="other/gw-tls")) == ("other", "gw-tls")


def test_only_the_next_key_missing_is_its_own_warning() -> None:
    missing_next = dnscheck.Finding("TLSA _25._tcp.mx.: expected '3 1 1 ab'", purpose="tlsa-next")
    verdict = dnscheck.verdict([missing_next], 7)
    assert (verdict.status, verdict.reason) == ("False", "NextKeyNotInTLSA")
    assert "publish the tlsa-next record now" in verdict.message
    both = [missing_next, dnscheck.Finding("TXT x: expected y", purpose="spf")]
    assert dnscheck.verdict(both, 7).reason == "RecordsMismatch"
