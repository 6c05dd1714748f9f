"""The DNS records a MailDomain's owner must publish: MX, SPF, DKIM, DMARC, and with
spec.mtaSts / spec.tlsRpt the MTA-STS and TLS-RPT records (docs/dns.md)."""

from __future__ import annotations

import hashlib

from mailkube_core.routing.models import MtaStsPolicy

from .dkim import PublishedKey
from .models import DnsRecord, MailDomainSpec, MtaStsSpec

RETIRED_NOTE = (
    "retired key: remove it from the DKIM Secret once mail it signed has been "
    "delivered, then delete this record"
)


def dns_records(
    domain: str,
    spec: MailDomainSpec,
    mx_hostname: str,
    keys: list[PublishedKey],
    *,
    mta_sts_host_target: str | None = None,
    tlsa: list[DnsRecord] | None = None,
) -> list[DnsRecord]:
    """Exact names (fully qualified, with the trailing dot) and values (TXT unquoted).
    `mta_sts_host_target`: what mta-sts.<domain> is a CNAME of (default: the MX host); `tlsa`:
    the MX host's TLSA records (dane.tlsa_records), listed last."""
    apex = f"{domain}."
    report_to = spec.dmarc_record.report_to or f"postmaster@{domain}"
    records = [
        DnsRecord(type="MX", name=apex, value=f"10 {mx_hostname.rstrip('.')}.", purpose="mx"),
        DnsRecord(type="TXT", name=apex, value="v=spf1 mx -all", purpose="spf"),
    ]
    for published in keys:
        records.append(
            DnsRecord(
                type="TXT",
                name=f"{published.key.selector}._domainkey.{domain}.",
                value=published.record,
                purpose="dkim",
                note=None if published.key.signing else published.note or RETIRED_NOTE,
            )
        )
    records.append(
        DnsRecord(
            type="TXT",
            name=f"_dmarc.{domain}.",
            value=f"v=DMARC1; p={spec.dmarc_record.policy}; rua=mailto:{report_to}",
            purpose="dmarc",
        )
    )
    if spec.mta_sts is not None:
        policy = mta_sts_policy(spec.mta_sts, mx_hostname).text()
        records += [
            DnsRecord(type="TXT", name=f"_mta-sts.{domain}.",
                      value=f"v=STSv1; id={mta_sts_id(policy)};", purpose="mta-sts",
                      note="the id changes whenever the policy does (RFC 8461 §3.1)"),
            DnsRecord(type="CNAME", name=f"mta-sts.{domain}.",
                      value=f"{(mta_sts_host_target or mx_hostname).rstrip('.')}.",
                      purpose="mta-sts-host",
                      note="serves https://mta-sts.<domain>/.well-known/mta-sts.txt with a "
                      "certificate for this name"),
        ]  # fmt: skip
    if spec.tls_rpt is not None:
        records.append(DnsRecord(type="TXT", name=f"_smtp._tls.{domain}.",
                                 value=f"v=TLSRPTv1; rua={','.join(spec.tls_rpt.rua)}",
                                 purpose="tls-rpt"))  # fmt: skip
    return records + list(tlsa or [])


def mta_sts_policy(spec: MtaStsSpec, mx_hostname: str) -> MtaStsPolicy:
    """The policy the gateway serves (RFC 8461 §3.2): our MX host is the domain's only MX."""
    return MtaStsPolicy(mode=spec.mode, max_age=spec.max_age, mx=[mx_hostname])


def mta_sts_id(policy: str) -> str:
    """The TXT record's id (1-32 letters and digits, §3.1), derived from the policy so that
    it changes exactly when the policy does."""
    return hashlib.sha256(policy.encode()).hexdigest()[:20]
