"""`mailkube delivery probe DOMAIN` (like Postfix's posttls-finger): what the worker would
find and do for mail to DOMAIN — its MX hosts, its MTA-STS policy (fetched now), the TLSA
records of each host with their DNSSEC status, its TLS-RPT record, and for each host the
TLS it offers, the certificate chain it presents, and whether that satisfies the policy.

It reads the worker's settings (resolvers, CA file, ports, dns_dnssec_trusted) and asks the
network only; the Redis cache and the routing table's overrides are not consulted.

    python -m mailkube_worker.tlspolicy.probe [-c FILE] DOMAIN
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from datetime import timedelta
from functools import partial

from cryptography import x509
from cryptography.x509.verification import Store

from mailkube_core.settings import WorkerSettings, load_settings_or_exit

from ..mx import MxLookupError, MxResolver
from ..remote import tls_contexts
from ..smtp_client import Peer, SessionError, SmtpSession
from .certs import load_roots
from .decide import HostPolicy, Refusal, host_policy, judge
from .enforcer import DaneResolver, addresses, sts_record
from .mta_sts import StsPolicy
from .sts_fetch import FetchError, fetch_policy
from .tlsrpt_send import report_targets
from .wiring import webpki_context

Print = Callable[[str], None]


async def probe(settings: WorkerSettings, domain: str, out: Print = print) -> int:
    """Print the findings; 0 when every MX host satisfies the policy, 1 otherwise."""
    mx = MxResolver(settings.dns_nameservers, port=settings.dns_port,
                    timeout=settings.dns_timeout, address_limit=100)  # fmt: skip
    ca_file = str(settings.smtp_tls_ca_file) if settings.smtp_tls_ca_file else None
    out(f"domain {domain}")
    try:
        hosts = await mx.hosts(domain)
    except MxLookupError as exc:
        out(f"MX: {exc} ({exc.code})")
        return 1
    for host in hosts:
        out(f"  MX {host.preference:>3} {host.name} [{host.address}]")

    dane = None
    if settings.dns_dnssec_trusted:
        dane = DaneResolver(list(mx.resolver.nameservers), settings.dns_port,  # type: ignore[arg-type]
                            settings.dns_timeout.total_seconds())  # fmt: skip
        secure = await dane.mx_secure(domain)
        out(f"MX records DNSSEC: {'secure' if secure else 'insecure (no DANE)'}")
    else:
        secure = False
        out("DANE: off (dns_dnssec_trusted is false: the resolver's AD bit is not trusted)")

    policy = await _sts(settings, mx, domain, ca_file, out)
    targets = await report_targets(mx.resolver, domain)
    if targets is None:
        out("TLS-RPT: no _smtp._tls record")
    else:
        out(f"TLS-RPT: rua {', '.join([*(f'mailto:{m}' for m in targets.mailto), *targets.https])}")

    failures = 0
    roots = partial(load_roots, ca_file)
    for host in hosts:
        out(f"host {host.name} [{host.address}]")
        tlsa = None
        if dane is not None and secure:
            tlsa = await dane.tlsa(host.name)
            records = ", ".join(r.to_text() for r in tlsa.records) or "none"
            out(f"  TLSA _25._tcp.{host.name}: {tlsa.status}: {tlsa.error or records}")
        decided = host_policy(host.name, None, "opportunistic", policy, tlsa)
        if isinstance(decided, Refusal):
            out(f"  policy: not used ({decided.result_type}: {decided.text})")
            failures += 1
            continue
        out(f"  policy: {decided.kind}")
        failures += not await _session(settings, host.name, host.address, decided, roots, out)
    return 1 if failures else 0


async def _sts(settings: WorkerSettings, mx: MxResolver, domain: str, ca_file: str | None,
               out: Print) -> StsPolicy | None:  # fmt: skip
    try:
        record = await sts_record(mx.resolver, domain)
    except LookupError as exc:
        out(f"MTA-STS: TXT lookup failed: {exc}")
        return None
    if record is None:
        out("MTA-STS: no _mta-sts record")
        return None
    try:
        policy, _ = await fetch_policy(
            domain, partial(addresses, mx.resolver), webpki_context(ca_file),
            limit=settings.mta_sts_fetch_timeout.total_seconds(), port=settings.mta_sts_port,
        )  # fmt: skip
    except FetchError as exc:
        out(f"MTA-STS: id {record.id}; policy fetch failed ({exc.result_type}): {exc}")
        return None
    out(f"MTA-STS: id {record.id}; mode {policy.mode}, max_age {policy.max_age}, "
        f"mx {', '.join(policy.mx) or '-'}")  # fmt: skip
    return policy


async def _session(settings: WorkerSettings, name: str, address: str, policy: HostPolicy,
                   roots: Callable[[], Store], out: Print) -> bool:  # fmt: skip
    loose, _ = tls_contexts(None)  # as deliveries connect: the chain is judged afterwards
    try:
        session = await SmtpSession.open(
            Peer(name, address, settings.smtp_port), helo=settings.hostname,
            tls="opportunistic", tls_context=loose,
            connect_timeout=settings.smtp_connect_timeout.total_seconds(),
        )  # fmt: skip
    except SessionError as exc:
        out(f"  connect: {exc} ({exc.code})")
        return False
    try:
        transport = session.smtp.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        if ssl_object is None:
            out("  STARTTLS: not offered")
        else:
            cipher = ssl_object.cipher()
            out(f"  TLS: {ssl_object.version()} {cipher[0] if cipher else ''}")
        chain = session.peer_chain()
        for depth, der in enumerate(chain):
            out(f"  certificate {depth}: {_describe(der)}")
        verdict = judge(policy, name, session.tls, chain, roots)
    finally:
        await session.close()
    if verdict.result_type is None:
        out("  verdict: satisfies the policy")
        return True
    what = "FAILS, mail deferred" if verdict.refuse else "fails, reported only"
    out(f"  verdict: {what}: {verdict.result_type} {verdict.text}".rstrip())
    return not verdict.refuse


def _describe(der: bytes) -> str:
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        return "unreadable"
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = ",".join(san.value.get_values_for_type(x509.DNSName)) or "-"
    except x509.ExtensionNotFound:
        names = "-"
    return (f"subject {certificate.subject.rfc4514_string() or '-'}; names {names}; "
            f"issuer {certificate.issuer.rfc4514_string() or '-'}; "
            f"not after {certificate.not_valid_after_utc:%Y-%m-%d}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mailkube delivery probe",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("-c", "--config", help="settings file (default: $MAILKUBE_CONFIG)")
    parser.add_argument("domain")
    args = parser.parse_args(argv)
    settings = load_settings_or_exit(WorkerSettings, "mailkube delivery probe", args.config)
    # every lookup and connection has its own deadline; this one bounds the whole probe
    limit = (settings.dns_timeout + settings.mta_sts_fetch_timeout
             + 10 * settings.smtp_connect_timeout + timedelta(minutes=5))  # fmt: skip
    try:
        code = asyncio.run(asyncio.wait_for(probe(settings, args.domain.lower().rstrip(".")),
                                            limit.total_seconds()))  # fmt: skip
    except TimeoutError:
        print("mailkube delivery probe: gave up (no answer in time)", file=sys.stderr)
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
