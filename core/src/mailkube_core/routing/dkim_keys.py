"""DKIM key pairs in the routing table's DkimKey format: PEM (PKCS#8) for RSA, base64 of the
32-byte private seed for Ed25519 (as dkimpy takes it); and the DNS record that publishes the
public half. The operator makes its keys with these, and so does `mailkube dev`."""

from __future__ import annotations

import base64
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]


def generate(algorithm: Algorithm) -> str:
    """A new private key in DkimKey format."""
    if algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return pem.decode()
    seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(seed).decode()


def public_record(algorithm: Algorithm, private_key: str) -> str:
    """The DKIM TXT record value (RFC 6376 §3.6.1; Ed25519: RFC 8463 §4)."""
    if algorithm == "rsa-sha256":
        key = serialization.load_pem_private_key(private_key.encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("not an RSA private key")
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    seed = base64.b64decode(private_key, validate=True)
    raw = (
        ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
