"""DKIM key pairs: generated into a Secret owned by the MailDomain, never overwritten.

The Secret `<maildomain>-dkim` holds one data key per selector and algorithm,
`<selector>.<algorithm>` (`mailkube.rsa-sha256`, `mailkube-ed25519.ed25519-sha256`), in the
routing table's DkimKey format: PEM (PKCS#8) for RSA, base64 of the 32-byte private seed for
Ed25519. Changing the spec's selector adds keys for the new selector next to the old ones:
the new ones sign, the old ones stay published (and listed in status) until someone deletes
them from the Secret.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailkube_core.routing import DkimKey
from mailkube_core.routing.dkim_keys import Algorithm, generate, public_record

from .models import API_VERSION

#: label on every DKIM Secret; its value is the MailDomain's name
DKIM_LABEL = "mailkube.io/dkim-for"
MANAGED_BY = {"app.kubernetes.io/managed-by": "mailkube-operator"}


@dataclass(frozen=True)
class WantedKey:
    selector: str
    algorithm: Algorithm

    @property
    def data_key(self) -> str:
        return f"{self.selector}.{self.algorithm}"


def secret_name(maildomain_name: str) -> str:
    return f"{maildomain_name}-dkim"


def wanted_keys(selector: str, algorithm: str) -> list[WantedKey]:
    """The keys that sign for a spec.dkim (selector, algorithm)."""
    if algorithm == "rsa-2048":
        return [WantedKey(selector, "rsa-sha256")]
    if algorithm == "ed25519":
        return [WantedKey(selector, "ed25519-sha256")]
    return [WantedKey(selector, "rsa-sha256"), WantedKey(f"{selector}-ed25519", "ed25519-sha256")]


def parse_data_key(data_key: str) -> WantedKey | None:
    selector, _, algorithm = data_key.partition(".")
    if algorithm == "rsa-sha256":
        return WantedKey(selector, "rsa-sha256")
    if algorithm == "ed25519-sha256":
        return WantedKey(selector, "ed25519-sha256")
    return None


def missing_keys(data: dict[str, str], wanted: list[WantedKey]) -> dict[str, str]:
    """New data entries for the wanted keys the Secret lacks (existing ones are kept)."""
    return {w.data_key: generate(w.algorithm) for w in wanted if w.data_key not in data}


def secret_body(
    *, namespace: str, domain_name: str, domain_uid: str, data: dict[str, str]
) -> dict[str, Any]:
    """A new DKIM Secret, owned by its MailDomain (garbage-collected with it)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(domain_name),
            "namespace": namespace,
            "labels": {DKIM_LABEL: domain_name, **MANAGED_BY},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "MailDomain",
                    "name": domain_name,
                    "uid": domain_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def decode_data(data: dict[str, str] | None) -> dict[str, str]:
    """A Secret's data (base64) as text; undecodable entries are left out."""
    result: dict[str, str] = {}
    for key, value in (data or {}).items():
        try:
            result[key] = base64.b64decode(value, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            continue
    return result


def record_of(algorithm: Algorithm, private_key: str) -> str:
    """The DKIM TXT record of a private key (core's public_record), but for RSA without
    OpenSSL's check of the private key's consistency: that check takes ~55 ms a key (a minute
    per thousand domains at each start) and only the public half is needed here. The gateway
    loads the key with the check before signing with it."""
    if algorithm != "rsa-sha256":
        return public_record(algorithm, private_key)
    key = serialization.load_pem_private_key(
        private_key.encode(), password=None, unsafe_skip_rsa_key_validation=True
    )
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@dataclass(frozen=True)
class PublishedKey:
    key: DkimKey
    record: str
    #: why a key that does not sign is listed (None: the default retired note)
    note: str | None = None


def keys_from_secret(data: dict[str, str], wanted: list[WantedKey]) -> list[PublishedKey]:
    """Every usable key in the Secret: the wanted ones sign, the others are retired. Signing
    keys first, then retired ones, each in selector order."""
    signing = {w.data_key for w in wanted}
    result: list[PublishedKey] = []
    for data_key in sorted(data, key=lambda k: (k not in signing, k)):
        parsed = parse_data_key(data_key)
        if parsed is None:
            continue
        try:
            record = record_of(parsed.algorithm, data[data_key])
        except ValueError:
            continue
        key = DkimKey(
            selector=parsed.selector,
            algorithm=parsed.algorithm,
            private_key=data[data_key],  # type: ignore[arg-type]
            signing=data_key in signing,
        )
        result.append(PublishedKey(key, record))
    return result
