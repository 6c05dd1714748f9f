"""The DNS records a MailDomain's owner must publish: MX, SPF, DKIM, DMARC (docs/dns.md)."""

from __future__ import annotations

from .dkim import PublishedKey
from .models import DnsRecord, MailDomainSpec


def dns_records(
    domain: str, spec: MailDomainSpec, mx_hostname: str, keys: list[PublishedKey]
) -> list[DnsRecord]:
    """Exact names (fully qualified, with the trailing dot) and values (TXT unquoted)."""
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
                note=None
                if published.key.signing
                else "retired key: remove it from the DKIM Secret once mail it signed has "
                "been delivered, then delete this record",
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
    return records
