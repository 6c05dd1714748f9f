"""DKIM signing of outgoing mail (RFC 6376; Ed25519: RFC 8463), one signature per key.

`sign` returns the DKIM-Signature field(s) to put in front of the message: relaxed/relaxed,
the SIGNED_HEADERS the message has, From signed once more than it appears (RFC 6376 §8.15), no
l=. dkimpy parses the message, picks the header fields, canonicalizes, hashes and folds
exactly as its own `DKIM.sign` does (`DomainSigner.gen_header` is mirrored in `_field`); the
private-key operation is cryptography's (OpenSSL: constant-time and blinded, where dkimpy's is
pure-Python big-integer arithmetic whose timing depends on the key, and ten times slower).
Parsed keys are cached by a hash of their text.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Sequence

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]

from mailkube_core.addresses import normalize_domain
from mailkube_core.routing import DkimKey

from .dkim_verify import DKIMPY_LOG, MIN_RSA_BITS

#: Signed when present (RFC 6376 §5.4.1's list, trimmed, plus RFC 8058's List-Unsubscribe-Post,
#: which one-click unsubscription requires to be signed). Resent-* and Received are left out:
#: relays add them.
SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from",
    b"sender",
    b"reply-to",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"content-language",
    b"list-id",
    b"list-help",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"list-subscribe",
    b"list-post",
    b"list-owner",
    b"list-archive",
)
#: signed one more time than they appear, so that another one cannot be added (RFC 6376 §8.15)
OVERSIGNED: tuple[bytes, ...] = (b"from",)
CANONICALIZATION = b"relaxed/relaxed"
_MAX_CACHED_KEYS = 256

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
_keys: dict[bytes, PrivateKey] = {}
_keys_lock = threading.Lock()


def sign(content: bytes, domain: str, keys: Sequence[DkimKey]) -> bytes:
    """The DKIM-Signature fields, each ending in CRLF, for the keys that sign (b"" if none).
    ValueError: a key that is not usable (naming domain and selector, never the key), a domain
    that is not a domain name, or a header dkimpy cannot parse."""
    signing = [key for key in keys if key.signing]
    if not signing:
        return b""
    d = normalize_domain(domain).encode()  # d= in A-labels
    parsed = [(key, _private_key(key, d.decode())) for key in signing]
    try:
        message = dkim.DKIM(content, logger=DKIMPY_LOG, linesep=b"\r\n")
        present = [name.lower() for name, _ in message.headers]
        include = [name for name in present if name in SIGNED_HEADERS] + list(OVERSIGNED)
        now = int(time.time())
        return b"".join(_field(message, key, pk, d, include, now) for key, pk in parsed)
    except Exception:
        raise ValueError("message not signable: its header cannot be parsed") from None


def _field(
    message: dkim.DKIM,
    key: DkimKey,
    private_key: PrivateKey,
    domain: bytes,
    include: list[bytes],
    now: int,
) -> bytes:
    policy = CanonicalizationPolicy.from_c_value(CANONICALIZATION)
    body_hash = hashlib.sha256(policy.canonicalize_body(message.body)).digest()
    tags = [
        (b"v", b"1"),
        (b"a", key.algorithm.encode()),
        (b"c", CANONICALIZATION),
        (b"d", domain),
        (b"s", key.selector.encode()),
        (b"t", str(now).encode()),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(body_hash)),
        (b"b", b"0" * 60),  # a placeholder that folds b= onto a line of its own, as dkimpy does
    ]
    name = b"DKIM-Signature"
    unsigned = dkim.fold(b"; ".join(b"=".join(tag) for tag in tags), namelen=len(name))
    unsigned = dkim.RE_BTAG.sub(b"\\1", unsigned)
    # RFC 6376 §3.7: the signed fields, then this one with an empty b= and no final CRLF
    digest = hashlib.sha256()
    headers = policy.canonicalize_headers(message.headers)
    dkim.hash_headers(digest, policy, headers, include, (name, b" " + unsigned), None)
    if isinstance(private_key, rsa.RSAPrivateKey):
        signature = private_key.sign(
            digest.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
        )
    else:
        signature = private_key.sign(digest.digest())  # RFC 8463 §3: Ed25519 of the SHA-256
    tags[-1] = (b"b", base64.b64encode(signature))
    value = dkim.fold(b"; ".join(b"=".join(tag) for tag in tags) + b"\r\n", namelen=len(name))
    field: bytes = name + b": " + value
    return field


def _private_key(key: DkimKey, domain: str) -> PrivateKey:
    text = key.private_key.get_secret_value().strip()
    cache_key = hashlib.sha256(f"{key.algorithm}\0{text}".encode()).digest()
    with _keys_lock:
        cached = _keys.get(cache_key)
    if cached is not None:
        return cached
    try:
        parsed = _load(key.algorithm, text)
    except Exception:
        # never chain the parser's error: it may quote the key
        raise ValueError(
            f"DKIM key {key.selector!r} ({key.algorithm}) of {domain} is not a usable private key"
        ) from None
    with _keys_lock:
        if len(_keys) >= _MAX_CACHED_KEYS:
            del _keys[next(iter(_keys))]
        _keys[cache_key] = parsed
    return parsed


def _load(algorithm: str, text: str) -> PrivateKey:
    if algorithm == "rsa-sha256":
        pem = serialization.load_pem_private_key(text.encode(), password=None)
        if not isinstance(pem, rsa.RSAPrivateKey) or pem.key_size < MIN_RSA_BITS:
            raise ValueError("not an RSA key of 1024 bits or more")  # RFC 8301 §3.2
        return pem
    if algorithm == "ed25519-sha256":
        seed = base64.b64decode("".join(text.split()), validate=True)
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)  # 32 bytes or ValueError
    raise ValueError(f"unknown algorithm {algorithm}")
