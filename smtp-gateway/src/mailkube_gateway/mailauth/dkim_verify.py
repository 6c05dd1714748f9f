"""DKIM verification of every signature of a message (RFC 6376, Ed25519: RFC 8463), with dkimpy.

`verify_dkim` returns one RFC 8601 result per DKIM-Signature field, for Authentication-Results
and DMARC. It never raises: whatever the bytes, every outcome is a result. It blocks on DNS (the
`dnsfunc`), so the gateway calls it in a thread; each call has its own dkimpy objects, so calls
may run in several threads at once.

Beyond what dkimpy checks: rsa-sha1 is refused and RSA keys must have 1024 bits or more
(RFC 8301), h= must cover From, the key record must allow the signature (k=, h=, s=, t=s,
revocation: RFC 6376 §3.6.1), and a body length limit (l=) that leaves content unsigned is
reported as "policy" (RFC 6376 §8.2).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import dkim  # type: ignore[import-untyped]
from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]
from dkim.util import parse_tag_value  # type: ignore[import-untyped]

from mailkube_core.addresses import normalize_domain

#: dkimpy's dnsfunc: (name: bytes, timeout=5) -> the TXT record (strings joined) or None;
#: raises dkim.DnsTimeoutError when the answer cannot be had now (timeout, SERVFAIL)
DnsFunc = Callable[..., bytes | None]

#: RFC 6376 §6.1 lets verifiers limit the signatures they check; each one may cost a DNS
#: lookup, and a sender can add as many as it likes. The ones past this are not reported.
MAX_SIGNATURES = 10
#: RFC 8301 §3.2: verifiers MUST NOT accept RSA keys under 1024 bits
MIN_RSA_BITS = 1024
ALGORITHMS = (b"rsa-sha256", b"ed25519-sha256")
REQUIRED_TAGS = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")

#: dkimpy logs every failed signature at ERROR, with bits of the message: routine for an MX,
#: and the results carry the outcome. Its log goes nowhere unless someone attaches a handler.
DKIMPY_LOG = logging.getLogger("mailkube_gateway.mailauth.dkimpy")
DKIMPY_LOG.addHandler(logging.NullHandler())
DKIMPY_LOG.propagate = False

_SELECTOR = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")
_TOKEN = re.compile(rb"[a-z0-9-]{1,32}")
_BASE64 = re.compile(rb"[A-Za-z0-9+/=]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9 .,:;=/+_@'\[\]-]")


@dataclass(frozen=True)
class DkimResult:
    #: RFC 8601 §2.7.1: pass, fail, neutral, policy, temperror, permerror
    result: str
    #: d= (lower-case A-labels), "" if unparseable
    domain: str
    #: s=, "" if unparseable
    selector: str
    #: a=, "" if unparseable
    algorithm: str
    #: the first 12 characters of b= (RFC 6008 header.b), "" if none
    header_b: str
    #: short, ASCII, no CR/LF or parentheses: fit for a header comment
    reason: str


def verify_dkim(content: bytes, dnsfunc: DnsFunc, *, timeout: float = 5) -> list[DkimResult]:
    """One result per DKIM-Signature field, top first (at most MAX_SIGNATURES); [] when the
    message has none (dkim=none)."""
    try:
        verifier = dkim.DKIM(content, logger=DKIMPY_LOG, minkey=MIN_RSA_BITS, timeout=timeout)
        fields = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
    except Exception:
        # a header line that is neither a field nor a continuation: nothing can be verified
        return [
            _result("permerror", _tags(value), "message header not parseable")
            for value in raw_fields(content, b"dkim-signature")[:MAX_SIGNATURES]
        ]
    lookups = CachingDns(dnsfunc)
    results = []
    for index, value in enumerate(fields[:MAX_SIGNATURES]):
        try:
            results.append(_verify_one(verifier, index, value, lookups))
        except Exception:  # a dkimpy surprise must not cost the other signatures
            results.append(_result("permerror", _tags(value), "signature not verifiable"))
    return results


def _verify_one(verifier: dkim.DKIM, index: int, value: bytes, lookups: CachingDns) -> DkimResult:
    try:
        tags = parse_tag_value(value)
    except Exception:
        return _result("permerror", {}, "malformed signature")
    problem = _signature_problem(tags)
    if problem:
        return _result("permerror", tags, problem)
    error: Exception | None = None
    lookups.asked.clear()
    try:
        verified = bool(verifier.verify(idx=index, dnsfunc=lookups))
    except Exception as exc:
        verified, error = False, exc
    key_name = tags[b"s"] + b"._domainkey." + tags[b"d"] + b"."
    if key_name in lookups.asked:  # dkimpy got as far as the key
        answer = lookups.answers[key_name]
        if isinstance(answer, Exception):
            return _result("temperror", tags, "key lookup failed: DNS error")
        if not answer:
            return _result("permerror", tags, "no key")  # RFC 6376 §6.1.2
        problem = _key_problem(answer, tags)
        if problem:
            return _result("permerror", tags, problem)
    if error is not None:
        return _error_result(error, tags, verifier)
    if not verified:
        return _result("fail", tags, "signature did not verify")
    return _length_result(verifier, tags)


def _signature_problem(tags: dict[bytes, bytes]) -> str | None:
    """RFC 6376 §6.1.1 checks dkimpy leaves out, and RFC 8301's algorithm rules."""
    for tag in REQUIRED_TAGS:
        if tag not in tags:
            return f"missing {tag.decode()}= tag"
    if tags[b"a"] == b"rsa-sha1":
        return "rsa-sha1 not accepted"  # RFC 8301 §3.1
    if tags[b"a"] not in ALGORITHMS:
        return "unsupported algorithm"
    signed = {name.strip().lower() for name in tags[b"h"].split(b":")}
    if b"from" not in signed:
        return "From not signed"
    if not _domain(tags):
        return "invalid d= domain"
    return None


def _key_problem(record: bytes, tags: dict[bytes, bytes]) -> str | None:
    """Whether the key record (RFC 6376 §3.6.1) may verify this signature."""
    try:
        key = parse_tag_value(record)
    except Exception:
        return "bad key record"
    if key.get(b"v", b"DKIM1") != b"DKIM1":
        return "bad key record"
    if b"p" in key and not re.sub(rb"\s+", b"", key[b"p"]):
        return "key revoked"
    try:
        dkim.evaluate_pk(b"", record)
    except Exception:
        return "bad key record"
    if key.get(b"k", b"rsa") != tags[b"a"].split(b"-")[0]:
        return "key type does not match a="
    hashes = key.get(b"h")
    if hashes is not None and b"sha256" not in {h.strip() for h in hashes.split(b":")}:
        return "key does not allow sha256"
    services = {s.strip() for s in key.get(b"s", b"*").split(b":")}
    if not services & {b"*", b"email"}:
        return "key not for email"
    flags = {f.strip() for f in key.get(b"t", b"").split(b":")}
    # t=s: i= must be in exactly the d= domain, not a subdomain
    if (
        b"s" in flags
        and tags.get(b"i", tags[b"d"]).rpartition(b"@")[2].lower() != tags[b"d"].lower()
    ):
        return "i= not in d=, key has t=s"
    return None


def _error_result(error: Exception, tags: dict[bytes, bytes], verifier: dkim.DKIM) -> DkimResult:
    text = str(error)
    if isinstance(error, dkim.ValidationError):
        if text.startswith("body hash mismatch"):
            return _result("fail", tags, "body hash mismatch")
        if text.startswith("x= value is past"):
            return _result("permerror", tags, "signature expired")
        # dkimpy's messages quote the offending value after " (": keep the words only
        return _result("permerror", tags, safe_reason(text.split(" (")[0]))
    if isinstance(error, dkim.KeyFormatError) and text.startswith("public key too small"):
        return _result("permerror", tags, f"key too short: {verifier.keysize} bits")
    if isinstance(error, dkim.KeyFormatError):
        return _result("permerror", tags, "bad key")
    if isinstance(error, dkim.MessageFormatError):
        return _result("permerror", tags, "malformed signature")
    return _result("permerror", tags, "signature not verifiable")


def _length_result(verifier: dkim.DKIM, tags: dict[bytes, bytes]) -> DkimResult:
    """A passed signature with l=: RFC 6376 §8.2, content after the signed part is unsigned."""
    if b"l" not in tags:
        return _result("pass", tags, "")
    policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    body_length = len(policy.canonicalize_body(verifier.body))
    signed_length = int(tags[b"l"])
    if signed_length > body_length:  # RFC 6376 §3.5: l= MUST NOT exceed the body
        return _result("permerror", tags, "l= longer than the body")
    if signed_length < body_length:
        return _result("policy", tags, f"l= signs {signed_length} of {body_length} body bytes")
    return _result("pass", tags, "")


class CachingDns:
    """dkimpy's dnsfunc for one message: each name is asked once and its answer (or error)
    kept, so that a result can say why a key was not found. Any error from the wrapped
    function reaches dkimpy as DnsTimeoutError, which it treats as an unverifiable key."""

    def __init__(self, dnsfunc: DnsFunc) -> None:
        self._dnsfunc = dnsfunc
        self.answers: dict[bytes, bytes | Exception | None] = {}
        #: the names dkimpy asked for since the caller last cleared it
        self.asked: set[bytes] = set()

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.asked.add(name)
        if name not in self.answers:
            try:
                answer = self._dnsfunc(name, timeout=timeout)
                self.answers[name] = answer.encode() if isinstance(answer, str) else answer
            except Exception as exc:
                self.answers[name] = exc
        known = self.answers[name]
        if isinstance(known, Exception):
            raise dkim.DnsTimeoutError("key lookup failed")
        return known

    @property
    def failed(self) -> bool:
        return any(isinstance(answer, Exception) for answer in self.answers.values())


def raw_fields(content: bytes, name: bytes) -> list[bytes]:
    """The values of the header fields called `name`, found leniently (for a header dkimpy
    cannot parse)."""
    header = re.split(rb"\r?\n\r?\n", content, maxsplit=1)[0]
    pattern = rb"(?im)^" + re.escape(name) + rb"[ \t]*:(.*(?:\r?\n[ \t].*)*)"
    return [match.group(1) for match in re.finditer(pattern, header)]


def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
        return tags
    except Exception:
        return {}


def _domain(tags: dict[bytes, bytes]) -> str:
    try:
        return normalize_domain(tags[b"d"].decode())
    except (KeyError, UnicodeDecodeError, ValueError):
        return ""


def _result(result: str, tags: dict[bytes, bytes], reason: str) -> DkimResult:
    selector = tags.get(b"s", b"")
    algorithm = tags.get(b"a", b"").lower()
    signature = re.sub(rb"\s+", b"", tags.get(b"b", b""))[:12]
    return DkimResult(
        result=result,
        domain=_domain(tags),
        selector=selector.decode() if _SELECTOR.fullmatch(selector) else "",
        algorithm=algorithm.decode() if _TOKEN.fullmatch(algorithm) else "",
        header_b=signature.decode() if _BASE64.fullmatch(signature) else "",
        reason=safe_reason(reason),
    )


def safe_reason(text: str) -> str:
    """ASCII, one line, no parentheses or backslashes (it goes in a header comment)."""
    return _UNSAFE.sub("?", " ".join(text.split()))[:100]
