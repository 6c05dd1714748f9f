"""CPU cost of the outbound TLS policy checks the remote worker adds per new SMTP session
(delivery-worker/.../tlspolicy/): judging a presented chain under MTA-STS (WebPKI, with
cryptography's verifier), under DANE-EE (3 1 1) and DANE-TA (2 0 1), and parsing a policy.
Pure CPU, no network: certificates from a trustme CA (RSA-2048 leaf, one intermediate).

    .venv/bin/python bench/tlspolicy_bench.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import time
from collections.abc import Callable

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import Store

from mailkube_worker.tlspolicy.certs import webpki_failure
from mailkube_worker.tlspolicy.dane import Tlsa, dane_failure
from mailkube_worker.tlspolicy.mta_sts import parse_policy

HOST = "mx.example.test"
POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.test\r\nmx: *.example.net\r\n" \
         "max_age: 604800\r\n"  # fmt: skip


def per_call(function: Callable[[], object], rounds: int) -> float:
    """Microseconds of CPU per call (the best of 3 runs of `rounds` calls)."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(rounds):
            function()
        best = min(best, (time.process_time() - start) / rounds)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    rounds = parser.parse_args().rounds
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert(HOST)
    chain = [x509.load_pem_x509_certificate(b.bytes()).public_bytes(Encoding.DER)
             for b in leaf.cert_chain_pems]  # fmt: skip
    roots = Store([x509.load_pem_x509_certificate(root.cert_pem.bytes())])
    spki = x509.load_der_x509_certificate(chain[0]).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    ee = (Tlsa(3, 1, 1, hashlib.sha256(spki).digest()),)
    ta = (Tlsa(2, 0, 1, hashlib.sha256(chain[1]).digest()),)
    assert webpki_failure(chain, HOST, roots) is None
    assert dane_failure(chain, ee, HOST) is None
    assert dane_failure(chain, ta, HOST) is None
    print(f"# {platform.python_version()}, {platform.machine()}, {rounds} rounds, best of 3")
    cases: list[tuple[str, Callable[[], object]]] = [
        ("MTA-STS policy parse", lambda: parse_policy(POLICY)),
        ("WebPKI chain check (STS)", lambda: webpki_failure(chain, HOST, roots)),
        ("DANE-EE 3 1 1 match", lambda: dane_failure(chain, ee, HOST)),
        ("DANE-TA 2 0 1 match", lambda: dane_failure(chain, ta, HOST)),
    ]
    for name, function in cases:
        print(f"{name:26}{per_call(function, rounds):8.1f} µs")


if __name__ == "__main__":
    main()
