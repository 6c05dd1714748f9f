"""Checking a presented certificate chain (DER, leaf first) against the WebPKI, with the
result types of RFC 8460 §4.3 for what went wrong. The handshake itself verifies nothing
(the worker's TLS is opportunistic by default): the chain is judged here, afterwards, so the
same session serves an enforced policy, a policy in testing mode, and the report."""

from __future__ import annotations

import functools
import ipaddress
import ssl
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import DNSName
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

Chain = Sequence[bytes]


#: leaf certificates: a subjectAltName (the name is checked against it) and, if there is an
#: extendedKeyUsage, serverAuth in it, whatever their criticality. The CA/Browser Forum's
#: finer rules (webpki_defaults_ee) would turn away certificates that OpenSSL, and so every
#: other MTA, accepts, e.g. those of private CAs such as trustme.
def _server_auth(policy: object, certificate: x509.Certificate,
                 usage: x509.ExtendedKeyUsage | None) -> None:  # fmt: skip
    if usage is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        raise ValueError("extendedKeyUsage without serverAuth")


_EE = (
    ExtensionPolicy.permit_all()
    .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _server_auth)
)


@functools.cache
def load_roots(ca_file: str | None) -> Store:
    """The trust store: the PEM bundle `ca_file`, or the system's (OpenSSL's default)."""
    if ca_file is None:
        paths = ssl.get_default_verify_paths()
        ca_file = paths.cafile or paths.openssl_cafile
    with warnings.catch_warnings():
        # system bundles hold old roots that cryptography warns about (negative serials)
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return Store(x509.load_pem_x509_certificates(Path(ca_file).read_bytes()))


def name_matches(certificate: x509.Certificate, name: str) -> bool:
    """RFC 6125 §6.4: a DNS subjectAltName equal to `name`, or `*.rest` covering its first
    label. (No CN fallback: the WebPKI requires subjectAltName.)"""
    name = name.lower().rstrip(".")
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    for dns_name in san.value.get_values_for_type(x509.DNSName):
        pattern = dns_name.lower().rstrip(".")
        if pattern.startswith("*."):
            label, _, rest = name.partition(".")
            if label and rest == pattern[2:]:
                return True
        elif pattern == name:
            return True
    return False


def webpki_failure(chain: Chain, name: str, roots: Store,
                   now: datetime | None = None) -> str | None:  # fmt: skip
    """None when `chain` is valid for `name` under `roots`; else the RFC 8460 result type:
    certificate-expired, certificate-host-mismatch or certificate-not-trusted."""
    if not chain:
        return "certificate-not-trusted"
    now = now or datetime.now(UTC)
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
        intermediates = [x509.load_der_x509_certificate(c) for c in chain[1:]]
    except ValueError:
        return "certificate-not-trusted"
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        return "certificate-expired"
    if not name_matches(leaf, name):
        return "certificate-host-mismatch"
    if not verified(leaf, intermediates, name, roots, now):
        return "certificate-not-trusted"
    return None


def verified(leaf: x509.Certificate, intermediates: list[x509.Certificate], name: str,
             roots: Store, now: datetime) -> bool:  # fmt: skip
    try:
        ipaddress.ip_address(name)
        return False  # MX names are host names
    except ValueError:
        pass
    verifier = (
        PolicyBuilder()
        .store(roots)
        .time(now)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_EE)
        .build_server_verifier(DNSName(name))
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError:
        return False
    return True
