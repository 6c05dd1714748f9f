"""DANE (RFC 7672) applied by a running worker through a real validating resolver: unbound
on loopback, trusting a test zone signed with dnspython, in front of the loopback DNS test
server. TLSA records that match (DANE-EE 3 1 1, DANE-TA 2 0 1) and do not, a bogus
signature, a signed zone without TLSA records, and an unsigned zone."""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from conditions import eventually
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from dns_server import DnsServer
from fake_mx import MxFarm
from tls_delivery import first_attempt, outcomes
from unbound_resolver import Unbound, sign
from worker_harness import worker_settings as make_settings

from mailkube_core.settings import WorkerSettings
from mailkube_core.telemetry import Telemetry

MX_ADDRESS = "127.0.0.27"
ZONE = "dane.test."
UNSIGNED = "plain-dane.test."


@dataclass
class Pki:
    ee: trustme.LeafCert  # from a CA nobody trusts, for a name that is not the MX's
    ta_leaf: trustme.LeafCert  # mx.ta.dane.test, from an intermediate CA
    intermediate: trustme.CA
    other: trustme.LeafCert  # a key no TLSA names


def _pem_to_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def spki_sha256(cert: trustme.LeafCert) -> str:
    certificate = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    spki = certificate.public_key().public_bytes(Encoding.DER,
                                                 PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    return hashlib.sha256(spki).hexdigest()


def cert_sha256(pem: bytes) -> str:
    return hashlib.sha256(_pem_to_der(pem)).hexdigest()


@pytest.fixture(scope="module")
def pki() -> Pki:
    stranger, root = trustme.CA(), trustme.CA()
    intermediate = root.create_child_ca()
    return Pki(stranger.issue_cert("unrelated.name.example"),
               intermediate.issue_cert("mx.ta.dane.test"), intermediate,
               trustme.CA().issue_cert("unrelated.name.example"))  # fmt: skip


@pytest.fixture(scope="module")
def resolver(dns_server: DnsServer, pki: Pki,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:  # fmt: skip
    ee, other = spki_sha256(pki.ee), spki_sha256(pki.other)
    ta = cert_sha256(pki.intermediate.cert_pem.bytes())
    lines = ["@ 60 IN SOA ns h 1 3600 600 86400 60", "@ 60 IN NS ns", "ns 60 IN A 127.0.0.1"]
    for name, tlsa in [
        ("ee", f"3 1 1 {ee}"),
        ("ta", f"2 0 1 {ta}"),
        ("wrong", f"3 1 1 {other}"),
        ("bogus", f"3 1 1 {ee}"),
        ("notlsa", None),
        ("stripped", f"3 1 1 {ee}"),
    ]:
        lines += [f"{name} 60 IN MX 10 mx.{name}", f"mx.{name} 60 IN A {MX_ADDRESS}"]
        if tlsa:
            lines.append(f"_25._tcp.mx.{name} 60 IN TLSA {tlsa}")
    signed, anchor = sign(ZONE, "\n".join(lines) + "\n")
    # an attacker's record under a signature made for another: the resolver finds it bogus
    bogus = f"_25._tcp.mx.bogus.dane.test. 60 IN TLSA 3 1 1 {ee}"
    assert bogus in signed
    signed = signed.replace(bogus, bogus[:-64] + other)
    dns_server.add_zone(ZONE, signed)
    dns_server.add_zone(UNSIGNED, "\n".join([
        "@ 60 IN SOA ns h 1 3600 600 86400 60", "@ 60 IN MX 10 mx", f"mx 60 IN A {MX_ADDRESS}",
        f"_25._tcp.mx 60 IN TLSA 3 1 1 {other}",
        # an unsigned MX naming a host with good TLSA records (RFC 7672 §2.2.1)
        "redirect 60 IN MX 10 mx.ee.dane.test.", ""]))  # fmt: skip
    unbound = Unbound(tmp_path_factory.mktemp("unbound"), dns_server.port, [anchor]).start()
    try:
        yield unbound
    finally:
        unbound.stop()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path, resolver: Unbound, mx_port: int) -> WorkerSettings:
    return make_settings(
        redis_url, tmp_path / "mail", dns_nameservers=[resolver.host], dns_port=resolver.port,
        smtp_port=mx_port, smtp_connect_timeout=5, dns_dnssec_trusted=True,
    )  # fmt: skip


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


@pytest.mark.parametrize(("domain", "presented", "expected"), [
    ("ee.dane.test", "ee", "success"),  # 3 1 1: the key, whatever the name or issuer
    ("ta.dane.test", "ta", "success"),  # 2 0 1: the intermediate that issued the leaf
    ("wrong.dane.test", "ee", "tlsa-invalid"),
    ("ta.dane.test", "ee", "tlsa-invalid"),
    ("bogus.dane.test", "ee", "dnssec-invalid"),
    ("stripped.dane.test", None, "starttls-not-supported"),
])  # fmt: skip
async def test_dane(settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, pki: Pki,
                   domain: str, presented: str | None, expected: str) -> None:  # fmt: skip
    cert = {"ee": pki.ee, "ta": pki.ta_leaf}.get(presented or "")
    mx = mx_farm.start(MX_ADDRESS, tls=server_context(cert) if cert else None)
    info = await first_attempt(settings, telemetry, f"rcpt@{domain}")
    if expected == "success":
        await eventually(lambda: _received(mx.received))
        assert mx.received[0].tls
    else:
        assert mx.received == []
        (result,) = info.results.values()
        assert result.status == "deferred"
        assert result.enhanced_code == ("4.7.4" if presented is None else "4.7.5")
        if expected == "dnssec-invalid":
            assert mx.handler.connections == 0  # a host whose TLSA may be forged: not used
            assert "SERVFAIL from the validating resolver" in result.diagnostic
    ((outcome, count),) = (await outcomes(settings, domain)).items()
    assert (outcome.policy_type, outcome.result, count) == ("tlsa", expected, 1)
    if expected != "dnssec-invalid":
        assert outcome.policy_strings  # the TLSA records, for the report


@pytest.mark.parametrize("domain", ["notlsa.dane.test", "plain-dane.test",
                                    "redirect.plain-dane.test"])  # fmt: skip
async def test_no_dane_without_authenticated_tlsa_records(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, pki: Pki, domain: str
) -> None:
    # a signed zone proving there are none, an unsigned zone whose (non-matching) TLSA
    # records prove nothing, an unsigned MX record whose host has TLSA records (the name
    # may be an attacker's): opportunistic TLS, the certificate not checked
    mx = mx_farm.start(MX_ADDRESS, tls=server_context(pki.other))
    await first_attempt(settings, telemetry, f"rcpt@{domain}")
    await eventually(lambda: _received(mx.received))
    ((outcome, _),) = (await outcomes(settings, domain)).items()
    assert (outcome.policy_type, outcome.result) == ("no-policy-found", "success")


@pytest.mark.parametrize(("domain", "override", "presented", "expected"), [
    ("notlsa.dane.test", "dane", "other", "dane-required"),
    ("plain-dane.test", "dane", "other", "dane-required"),
    ("ee.dane.test", "sts", "ee", "sts-policy-fetch-error"),  # sts: DANE not used
    ("wrong.dane.test", "opportunistic", "ee", None),  # DANE not looked up
])  # fmt: skip
async def test_routing_table_overrides(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, pki: Pki, domain: str,
    override: str, presented: str, expected: str | None,
) -> None:  # fmt: skip
    cert = {"ee": pki.ee, "other": pki.other}[presented]
    mx = mx_farm.start(MX_ADDRESS, tls=server_context(cert))
    info = await first_attempt(settings, telemetry, f"rcpt@{domain}", {domain: override})
    if expected is None:
        await eventually(lambda: _received(mx.received))
        return
    assert mx.handler.connections == 0
    (result,) = info.results.values()
    assert (result.status, result.enhanced_code) == ("deferred", "4.7.5")
    ((outcome, _),) = (await outcomes(settings, domain)).items()
    assert outcome.result == expected


async def test_without_a_trusted_resolver_there_is_no_dane(
    settings: WorkerSettings, telemetry: Telemetry, mx_farm: MxFarm, pki: Pki
) -> None:
    mx = mx_farm.start(MX_ADDRESS, tls=server_context(pki.ee))
    untrusted = WorkerSettings.model_validate({**settings.model_dump(),
                                               "dns_dnssec_trusted": False})  # fmt: skip
    await first_attempt(untrusted, telemetry, "rcpt@wrong.dane.test")
    await eventually(lambda: _received(mx.received))


async def _received(received: list[Any]) -> bool:
    return len(received) >= 1


def probe(settings: WorkerSettings, domain: str) -> subprocess.CompletedProcess[str]:
    """`mailkube delivery probe DOMAIN` with the worker's settings in MAILKUBE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
    for name in ("dns_port", "smtp_port", "dns_dnssec_trusted", "hostname"):
        env[f"MAILKUBE_{name.upper()}"] = str(getattr(settings, name))
    env["MAILKUBE_DNS_NAMESERVERS"] = ",".join(settings.dns_nameservers)
    command = [sys.executable, "-m", "mailkube_core.cli.main", "delivery", "probe", domain]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("domain", "lines", "code"), [
    ("ee.dane.test", ["MX records DNSSEC: secure",
                      "  TLSA _25._tcp.mx.ee.dane.test: secure: 3 1 1 {ee}",
                      "  policy: dane", "  verdict: satisfies the policy"], 0),
    ("wrong.dane.test", ["  policy: dane",
                         "  verdict: FAILS, mail deferred: tlsa-invalid"], 1),
    ("bogus.dane.test", ["  TLSA _25._tcp.mx.bogus.dane.test: bogus: SERVFAIL",
                         "  policy: not used (dnssec-invalid"], 1),
    ("plain-dane.test", ["MX records DNSSEC: insecure (no DANE)", "  policy: opportunistic",
                         "  verdict: satisfies the policy"], 0),
])  # fmt: skip
def test_probe_shows_tlsa_records_and_their_dnssec_status(
    settings: WorkerSettings, mx_farm: MxFarm, pki: Pki, domain: str, lines: list[str], code: int
) -> None:
    mx_farm.start(MX_ADDRESS, tls=server_context(pki.ee))
    result = probe(settings, domain)
    for line in lines:
        assert line.format(ee=spki_sha256(pki.ee)) in result.stdout, result.stdout + result.stderr
    assert result.returncode == code
