"""DANE for our own MX host (RFC 7672): the TLSA record of the gateway's key, and of the key
cert-manager will issue the next certificate with, for each MailDomain's status.dnsRecords
(docs/dns.md "DANE for our MX host").

`3 1 1` (DANE-EE, SubjectPublicKeyInfo, SHA-256; RFC 7671 §5.1 recommends it) matches the key,
not the certificate: renewals that keep the key (cert-manager ``rotationPolicy: Never``) keep
the record valid. A new key must be published before it is used ("publish next key first"):
cert-manager keeps the key it is about to use in a Secret labelled
``cert-manager.io/next-private-key`` owned by the Certificate, and its record is listed (purpose
``tlsa-next``) so that the DNS check warns while it is not published.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from mailkube_core.settings import OperatorSettings

from .kube import Kube
from .models import DnsRecord

log = logging.getLogger(__name__)

#: the label cert-manager puts on the Secret holding the next private key of a Certificate
NEXT_KEY_LABEL = "cert-manager.io/next-private-key"


@dataclass(frozen=True)
class DaneKeys:
    """SHA-256 of the SubjectPublicKeyInfo (hex) of the key in use, and of the next one."""

    current: str | None
    next: str | None = None


def spki_sha256(pem: bytes) -> str:
    """The `3 1 1` association data of a PEM certificate or private key. ValueError if `pem`
    is neither."""
    public: Any
    if b"-----BEGIN CERTIFICATE-----" in pem:
        public = x509.load_pem_x509_certificate(pem).public_key()
    else:
        try:
            public = load_pem_private_key(pem, password=None).public_key()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"neither a certificate nor an unencrypted key: {exc}") from None
    der: bytes = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def keys_from(
    secret_data: Mapping[str, str] | None, secrets: list[dict[str, Any]], certificate: str
) -> DaneKeys:
    """The keys from the gateway's TLS Secret (`secret_data`: base64 values) and from the
    next-private-key Secret among `secrets` owned by the Certificate named `certificate`."""
    current = _digest(secret_data, "tls.crt")
    upcoming = None
    for secret in secrets:
        meta = secret.get("metadata") or {}
        if (meta.get("labels") or {}).get(NEXT_KEY_LABEL) != "true":
            continue
        owners = meta.get("ownerReferences") or []
        if any(o.get("kind") == "Certificate" and o.get("name") == certificate for o in owners):
            upcoming = _digest(secret.get("data"), "tls.key")
    return DaneKeys(current, upcoming if upcoming != current else None)


def _digest(data: Mapping[str, str] | None, key: str) -> str | None:
    value = (data or {}).get(key)
    if not value:
        return None
    try:
        return spki_sha256(base64.b64decode(value))
    except ValueError as exc:
        log.warning("cannot read the key in %s for TLSA: %s", key, exc)
        return None


def tlsa_records(mx_hostname: str, keys: DaneKeys | None) -> list[DnsRecord]:
    """TLSA at _25._tcp.<MX host> (RFC 7672 §2.2) for the current key, and the next one."""
    if keys is None or keys.current is None:
        return []
    name = f"_25._tcp.{mx_hostname.rstrip('.')}."
    records = [DnsRecord(type="TLSA", name=name, value=f"3 1 1 {keys.current}", purpose="tlsa")]
    if keys.next is not None:
        records.append(DnsRecord(
            type="TLSA", name=name, value=f"3 1 1 {keys.next}", purpose="tlsa-next",
            note="the key cert-manager issues the next certificate with: publish this record "
            "now, keep the current one until the new certificate is in use",
        ))  # fmt: skip
    return records


def secret_location(settings: OperatorSettings) -> tuple[str, str] | None:
    """(namespace, name) of the gateway's TLS Secret, from mx_tls_secret."""
    if not settings.mx_tls_secret:
        return None
    namespace, _, name = settings.mx_tls_secret.rpartition("/")
    return namespace or settings.namespace or "default", name


async def read_keys(kube: Kube, namespace: str, name: str) -> DaneKeys:
    """The chart names the Certificate after its Secret."""
    data = await kube.read_secret_data(namespace, name)
    secrets = await kube.list_secrets_labelled(namespace, f"{NEXT_KEY_LABEL}=true")
    return keys_from(data, secrets, name)


async def check_loop(
    kube: Kube,
    settings: OperatorSettings,
    changed: Callable[[DaneKeys], Awaitable[None]],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Read the keys every dns_check_interval (at least every minute: cert-manager's next key
    lives only while it issues) and call `changed` when they moved (runs until cancelled)."""
    location = secret_location(settings)
    if location is None:
        return
    interval = min(settings.dns_check_interval.total_seconds() or 60.0, 60.0)
    last: DaneKeys | None = None
    failing = False
    while True:
        try:
            keys = await read_keys(kube, *location)
        except Exception as exc:  # the API away, no permission: say so once, try again
            if not failing:
                log.warning("reading the gateway's TLS key for TLSA failed: %r", exc)
            failing = True
        else:
            failing = False
            if keys != last:
                last = keys
                log.info("gateway TLS keys for TLSA", extra={"current": keys.current,
                                                              "next": keys.next})  # fmt: skip
                try:
                    await changed(keys)
                except Exception:  # a bug: say so, keep checking
                    log.exception("the reconcile after a TLS key change failed")
        await sleep(interval)
