"""DANE for SMTP (RFC 7672, RFC 6698): the TLSA records of an MX host, trusted only when a
validating resolver says they are authentic (the AD bit, RFC 4035 §3.2.3), and matching them
against the certificate chain a host presents.

- Only for MX hosts from an authenticated MX RRset (§2.2.1).
- Lookup of `_25._tcp.<mx host>` TLSA: `secure` records, `none` (authenticated denial, or an
  insecure zone: no DANE, §2.2), or `bogus` (the validating resolver's SERVFAIL: the records
  may exist and be hidden by an attacker, so the host is not used now, §2.2).
- Usable records (§3.1.3): DANE-TA(2) and DANE-EE(3); PKIX-TA(0)/PKIX-EE(1) are not used in
  SMTP. If every record is unusable, TLS is still required but not authenticated (§2.2).
- DANE-EE(3): the leaf matches; no name or date checks (§3.1.1). DANE-TA(2): a certificate
  of the chain matches and the leaf chains up to it, valid for the MX host name (§3.1.2).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import Store

from .certs import Chain, name_matches, verified

DANE_TA, DANE_EE = 2, 3
Status = Literal["secure", "none", "bogus"]


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) \
            and self.mtype in (0, 1, 2)  # fmt: skip

    def to_text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True)
class TlsaAnswer:
    status: Status
    records: tuple[Tlsa, ...] = ()
    error: str = ""

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(r for r in self.records if r.usable)


def tlsa_name(host: str, port: int = 25) -> str:
    return f"_{port}._tcp.{host.rstrip('.')}."


async def lookup_tlsa(host: str, nameservers: list[str], port: int,
                      limit: float) -> TlsaAnswer:  # fmt: skip
    """The TLSA records of `host`'s SMTP service, as the validating resolvers judge them."""
    query = dns.message.make_query(tlsa_name(host), dns.rdatatype.TLSA, want_dnssec=True)
    query.flags |= dns.flags.AD  # RFC 6840 §5.7: ask for the AD bit
    last = "no resolver"
    for server in nameservers:
        try:
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, server, timeout=limit, port=port
            )
        except (dns.exception.DNSException, OSError) as exc:
            last = f"{server}: {exc or type(exc).__name__}"
            continue
        return answer_of(response)
    return TlsaAnswer("bogus", error=f"TLSA lookup for {host}: {last}")


async def mx_secure(domain: str, nameservers: list[str], port: int, limit: float) -> bool:
    """Whether the domain's MX RRset (or the proof there is none: the implicit MX) is
    DNSSEC-authenticated. RFC 7672 §2.2.1: with an insecure MX RRset the host names may be
    an attacker's, so their TLSA records are not used (and must not outrank MTA-STS)."""
    query = dns.message.make_query(f"{domain.rstrip('.')}.", dns.rdatatype.MX, want_dnssec=True)
    query.flags |= dns.flags.AD
    for server in nameservers:
        try:
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, server, timeout=limit, port=port
            )
        except (dns.exception.DNSException, OSError):
            continue
        return response.rcode() == dns.rcode.NOERROR and bool(response.flags & dns.flags.AD)
    return False


def answer_of(response: dns.message.Message) -> TlsaAnswer:
    """A validating resolver's response, judged (pure)."""
    rcode = response.rcode()
    authentic = bool(response.flags & dns.flags.AD)
    if rcode == dns.rcode.SERVFAIL:
        return TlsaAnswer("bogus", error="SERVFAIL from the validating resolver")
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return TlsaAnswer("bogus", error=f"resolver answered {dns.rcode.to_text(rcode)}")
    if not authentic:
        return TlsaAnswer("none")  # insecure: as if there were no TLSA records (§2.2)
    records = tuple(
        Tlsa(r.usage, r.selector, r.mtype, r.cert)
        for rrset in response.answer if rrset.rdtype == dns.rdatatype.TLSA
        for r in rrset
    )  # fmt: skip
    return TlsaAnswer("secure", records) if records else TlsaAnswer("none")


def _associated(record: Tlsa, certificate: x509.Certificate) -> bool:
    if record.selector == 0:
        data = certificate.public_bytes(Encoding.DER)
    else:
        data = certificate.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def dane_failure(chain: Chain, records: tuple[Tlsa, ...], host: str,
                 now: datetime | None = None) -> str | None:  # fmt: skip
    """None when `chain` satisfies one of the usable `records` for MX `host`; else why not
    (RFC 8460 result type `tlsa-invalid`, with the text for the log)."""
    usable = [r for r in records if r.usable]
    if not usable:
        return None  # §2.2: TLS required, but nothing to authenticate with
    if not chain:
        return "no certificate presented"
    try:
        certificates = [x509.load_der_x509_certificate(c) for c in chain]
    except ValueError:
        return "unreadable certificate"
    leaf = certificates[0]
    if any(r.usage == DANE_EE and _associated(r, leaf) for r in usable):
        return None
    now = now or datetime.now(UTC)
    for record in (r for r in usable if r.usage == DANE_TA):
        for anchor in certificates:
            if not _associated(record, anchor):
                continue
            if anchor is leaf:
                # the TA record names the leaf itself: the name must still be right
                if name_matches(leaf, host):
                    return None
                continue
            if verified(leaf, certificates[1:], host, Store([anchor]), now):
                return None
    return "no TLSA record matches the certificate chain"
