"""The DNS check (DNSVerified) against the loopback DNS server: the records a MailDomain's status
lists, published in a zone made from that status at runtime (the DKIM key is the operator's),
then missing, wrong, duplicated, or not resolvable."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.name
import kmock
import pytest
import trustme
from dns_server import DnsServer, zone_from_records
from kube_emulator import KubeEmulator
from operator_harness import Api, OperatorRun, condition, events, eventually, operator_settings

from mailkube_core.settings import OperatorSettings
from mailkube_operator import dkim, dnscheck
from mailkube_operator.dane import NEXT_KEY_LABEL, DaneKeys, spki_sha256, tlsa_records

pytestmark = pytest.mark.kmock(cls=KubeEmulator)


def settings_for(dns_server: DnsServer, redis_url: str, kube_url: str) -> OperatorSettings:
    return operator_settings(
        redis_url, kube_url,
        dns_check_interval="1s", dns_nameservers=[dns_server.host], dns_port=dns_server.port,
        dns_timeout="2s",
    )  # fmt: skip


async def test_dns_verified_then_a_missing_and_a_wrong_record_are_named(
    kmock: kmock.KubernetesEmulator, api: Api, redis_url: str, dns_server: DnsServer
) -> None:
    run = OperatorRun(settings_for(dns_server, redis_url, str(kmock.url)))
    await run.start()
    try:
        spec = {"domain": "verified.test", "dkim": {"selector": "k1", "algorithm": "both"}}
        await api.apply("maildomains", "verified", spec)

        async def records() -> list[dict[str, Any]]:
            obj = await api.get("maildomains", "verified")
            listed = obj["status"]["dnsRecords"]
            assert sorted(r["purpose"] for r in listed) == ["dkim", "dkim", "dmarc", "mx", "spf"]
            # the server does not serve the zone yet (REFUSED): nobody knows
            unknown = condition(obj, "DNSVerified")
            assert (unknown["status"], unknown["reason"]) == ("Unknown", "LookupFailed"), unknown
            assert "MX verified.test. could not be resolved" in unknown["message"]
            return list(listed)

        listed = await eventually(records)
        dns_server.add_zone("verified.test.", zone_from_records("verified.test.", listed))

        async def verified() -> None:
            ok = condition(await api.get("maildomains", "verified"), "DNSVerified")
            assert (ok["status"], ok["reason"]) == ("True", "Verified"), ok
            assert ok["message"] == "all 5 records are published"
            assert ("Normal", "Verified") in await events(api, "verified")

        await eventually(verified)

        # the DMARC record goes, the SPF record is changed
        dns_server.add_zone("verified.test.", zone_from_records(
            "verified.test.", listed, drop="dmarc", replace={"spf": "v=spf1 -all"}))  # fmt: skip

        async def mismatch() -> None:
            obj = await api.get("maildomains", "verified")
            bad = condition(obj, "DNSVerified")
            assert (bad["status"], bad["reason"]) == ("False", "RecordsMismatch"), bad
            assert "TXT _dmarc.verified.test. does not exist" in bad["message"]
            assert (
                "TXT verified.test.: expected 'v=spf1 mx -all', found 'v=spf1 -all'"
                in bad["message"]
            )
            assert "_domainkey" not in bad["message"]  # the DKIM records are still right
            assert condition(obj, "Ready")["status"] == "True"  # DNS does not make it unready
            assert ("Warning", "RecordsMismatch") in await events(api, "verified")

        await eventually(mismatch)
    finally:
        await run.stop()


async def test_changed_records_are_checked_at_once(
    kmock: kmock.KubernetesEmulator, api: Api, redis_url: str, dns_server: DnsServer
) -> None:
    """A new DKIM record is not 'verified' by an earlier check: records are checked as soon as
    they are listed or change, not only every dns_check_interval (an hour here). The DKIM key
    is one the owner made (an existing Secret is used, never overwritten), so the zone can be
    published before the MailDomain exists."""
    seed = dkim.generate("ed25519-sha256")
    await api.create_secret(
        "rotating-dkim", {"old.ed25519-sha256": seed}, labels={dkim.DKIM_LABEL: "rotating"}
    )
    published = [
        {"type": "MX", "name": "rotating.test.", "value": "10 mx.example.test.", "purpose": "mx"},
        {"type": "TXT", "name": "rotating.test.", "value": "v=spf1 mx -all", "purpose": "spf"},
        {"type": "TXT", "name": "old._domainkey.rotating.test.", "purpose": "dkim",
         "value": dkim.public_record("ed25519-sha256", seed)},
        {"type": "TXT", "name": "_dmarc.rotating.test.", "purpose": "dmarc",
         "value": "v=DMARC1; p=quarantine; rua=mailto:postmaster@rotating.test"},
    ]  # fmt: skip
    dns_server.add_zone("rotating.test.", zone_from_records("rotating.test.", published))
    hourly = OperatorSettings.model_validate({"dns_check_interval": "1h"}).dns_check_interval
    settings = settings_for(dns_server, redis_url, str(kmock.url))
    run = OperatorRun(settings.model_copy(update={"dns_check_interval": hourly}))
    await run.start()
    try:
        spec = {"domain": "rotating.test", "dkim": {"selector": "old", "algorithm": "ed25519"}}
        await api.apply("maildomains", "rotating", spec)
        await eventually(lambda: _dns_verified(api, "rotating", "True"))
        secret = await api.secret("rotating-dkim")
        assert secret is not None
        assert dkim.decode_data(secret["data"]) == {"old.ed25519-sha256": seed}

        await api.patch("maildomains", "rotating", {"spec": {"dkim": {"selector": "new"}}})

        async def new_record_missing() -> None:
            obj = await api.get("maildomains", "rotating")
            assert len([r for r in obj["status"]["dnsRecords"] if r["purpose"] == "dkim"]) == 2
            bad = condition(obj, "DNSVerified")
            assert (bad["status"], bad["reason"]) == ("False", "RecordsMismatch"), bad
            assert bad["message"].startswith("TXT new._domainkey.rotating.test. does not exist")

        await eventually(new_record_missing)
    finally:
        await run.stop()


async def _dns_verified(api: Api, name: str, status: str) -> None:
    assert condition(await api.get("maildomains", name), "DNSVerified")["status"] == status


async def test_check_against_the_server(dns_server: DnsServer) -> None:
    """dnscheck.check on its own: each kind of finding, and lookups that fail are not
    mismatches."""
    dns_server.add_zone("findings.test.", """
@ 300 IN SOA ns.findings.test. hostmaster.findings.test. 1 3600 600 86400 60
@ 300 IN MX 10 MX.Example.Test.
@ 300 IN TXT "v=spf1 mx -all"
@ 300 IN TXT "v=spf1 a -all"
@ 300 IN TXT "site-verification=abc"
_dmarc 300 IN TXT "v=DMARC1; p=none"
sel._domainkey 300 IN TXT "v=DKIM1; k=ed25519; " "p=abc"
""")  # fmt: skip
    dns_server.fail("broken.findings.test.")
    res = dnscheck.resolver(OperatorSettings.model_validate({
        "dns_nameservers": [dns_server.host], "dns_port": dns_server.port,
        "dns_timeout": "2s"}))  # fmt: skip

    def txt(name: str, value: str, purpose: str = "dkim") -> dict[str, str]:
        return {"type": "TXT", "name": name, "value": value, "purpose": purpose}

    try:
        findings = await dnscheck.check(res, [
            {"type": "MX", "name": "findings.test.", "value": "10 mx.example.test.",
             "purpose": "mx"},
            txt("sel._domainkey.findings.test.", "v=DKIM1; k=ed25519; p=abc"),
            txt("findings.test.", "v=spf1 mx -all", "spf"),
            txt("_dmarc.findings.test.", "v=DMARC1; p=quarantine", "dmarc"),
            txt("gone._domainkey.findings.test.", "v=DKIM1; p=x"),
            {"type": "MX", "name": "_dmarc.findings.test.", "value": "10 x.", "purpose": "mx"},
            txt("broken.findings.test.", "v=DKIM1; p=y"),
        ])  # fmt: skip
    finally:
        dns_server.servfail.discard(dns.name.from_text("broken.findings.test."))
    assert [(f.message, f.definite) for f in findings] == [
        ("TXT findings.test.: 2 SPF records, there must be only one", True),
        ("TXT _dmarc.findings.test.: expected 'v=DMARC1; p=quarantine', "
         "found 'v=DMARC1; p=none'", True),
        ("TXT gone._domainkey.findings.test. does not exist", True),
        ("MX _dmarc.findings.test. has no MX record", True),
        ("TXT broken.findings.test. could not be resolved (NoNameservers)", False),
    ]  # fmt: skip
    assert dnscheck.verdict(findings, 7).status == "False"
    lookup_only = dnscheck.verdict(findings[-1:], 7)
    assert (lookup_only.status, lookup_only.reason) == ("Unknown", "LookupFailed")
    assert dnscheck.verdict([], 7).message == "all 7 records are published"


async def test_mta_sts_and_tls_rpt_records_are_checked(dns_server: DnsServer) -> None:
    """The records of spec.mtaSts / spec.tlsRpt: the mta-sts host's CNAME (names compared
    without regard to case), a stale _mta-sts id, and two TLS-RPT records."""
    dns_server.add_zone("sts-check.test.", """
@ 300 IN SOA ns.sts-check.test. hostmaster.sts-check.test. 1 3600 600 86400 60
mta-sts 300 IN CNAME Mail.Example.Test.
_mta-sts 300 IN TXT "v=STSv1; id=old;"
_smtp._tls 300 IN TXT "v=TLSRPTv1; rua=mailto:a@sts-check.test"
_smtp._tls 300 IN TXT "v=TLSRPTv1; rua=mailto:b@sts-check.test"
""")  # fmt: skip
    res = dnscheck.resolver(OperatorSettings.model_validate({
        "dns_nameservers": [dns_server.host], "dns_port": dns_server.port,
        "dns_timeout": "2s"}))  # fmt: skip
    findings = await dnscheck.check(res, [
        {"type": "CNAME", "name": "mta-sts.sts-check.test.", "value": "mail.example.test.",
         "purpose": "mta-sts-host"},
        {"type": "TXT", "name": "_mta-sts.sts-check.test.", "value": "v=STSv1; id=new;",
         "purpose": "mta-sts"},
        {"type": "TXT", "name": "_smtp._tls.sts-check.test.",
         "value": "v=TLSRPTv1; rua=mailto:a@sts-check.test", "purpose": "tls-rpt"},
    ])  # fmt: skip
    assert [f.message for f in findings] == [
        "TXT _mta-sts.sts-check.test.: expected 'v=STSv1; id=new;', found 'v=STSv1; id=old;'",
        "TXT _smtp._tls.sts-check.test.: 2 TLS-RPT records, there must be only one",
    ]


async def test_tlsa_records_of_our_mx_host_and_the_next_key(dns_server: DnsServer) -> None:
    """DANE for our MX host: the current key's TLSA is published, the next key's is not yet:
    DNSVerified says so with its own reason (mail from DANE senders would be deferred once
    cert-manager switches keys); once both are published, all is well."""
    keys = DaneKeys("aa" * 32, "bb" * 32)
    listed = [r.dump() for r in tlsa_records("mx.tlsa-check.test", keys)]
    zone = """
@ 300 IN SOA ns.tlsa-check.test. hostmaster.tlsa-check.test. 1 3600 600 86400 60
_25._tcp.mx 300 IN TLSA 3 1 1 {current}
"""
    dns_server.add_zone("tlsa-check.test.", zone.format(current="AA" * 32))
    res = dnscheck.resolver(OperatorSettings.model_validate({
        "dns_nameservers": [dns_server.host], "dns_port": dns_server.port,
        "dns_timeout": "2s"}))  # fmt: skip
    findings = await dnscheck.check(res, listed)
    assert [(f.purpose, f.message) for f in findings] == [
        ("tlsa-next", f"TLSA _25._tcp.mx.tlsa-check.test.: expected '3 1 1 {'bb' * 32}', "
                      f"found '3 1 1 {'aa' * 32}'"),
    ]  # fmt: skip
    assert dnscheck.verdict(findings, 2).reason == "NextKeyNotInTLSA"
    dns_server.add_zone("tlsa-check.test.", zone.format(current="AA" * 32)
                        + f"_25._tcp.mx 300 IN TLSA 3 1 1 {'bb' * 32}\n")  # fmt: skip
    assert await dnscheck.check(res, listed) == []


async def test_status_lists_tlsa_of_the_gateways_key_and_warns_before_a_key_rollover(
    kmock: kmock.KubernetesEmulator, api: Api, redis_url: str, dns_server: DnsServer
) -> None:
    """mx_tls_secret: the TLSA record of the key in the gateway's Secret is listed and checked;
    when cert-manager stages its next key (a labelled Secret owned by the Certificate), its
    record is listed too, and DNSVerified warns (NextKeyNotInTLSA, a Warning Event) until it
    is published: the DANE outage caught before the new certificate is in use."""
    current = trustme.CA().issue_cert("mx.example.test")
    upcoming = trustme.CA().issue_cert("mx.example.test")
    await api.create_secret("gw-tls", {
        "tls.crt": current.cert_chain_pems[0].bytes().decode(),
        "tls.key": current.private_key_pem.bytes().decode()})  # fmt: skip
    digest = spki_sha256(current.cert_chain_pems[0].bytes())
    next_digest = spki_sha256(upcoming.cert_chain_pems[0].bytes())
    mx_zone = """
@ 300 IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60
_25._tcp.mx 300 IN TLSA 3 1 1 {digest}
"""
    dns_server.add_zone("example.test.", mx_zone.format(digest=digest))
    settings = settings_for(dns_server, redis_url, str(kmock.url))
    run = OperatorRun(settings.model_copy(update={"mx_tls_secret": "gw-tls"}))
    await run.start()
    try:
        await api.apply("maildomains", "dane", {"domain": "dane.test"})

        async def tlsa_listed() -> list[dict[str, Any]]:
            obj = await api.get("maildomains", "dane")
            listed = obj["status"]["dnsRecords"]
            tlsa = [(r["type"], r["name"], r["value"]) for r in listed if r["type"] == "TLSA"]
            assert tlsa == [("TLSA", "_25._tcp.mx.example.test.", f"3 1 1 {digest}")]
            return [r for r in listed if r["type"] != "TLSA"]

        listed = await eventually(tlsa_listed)
        dns_server.add_zone("dane.test.", zone_from_records("dane.test.", listed))
        await eventually(lambda: _dns_verified(api, "dane", "True"))

        # cert-manager stages the next key (rotationPolicy: Always, a renewal has begun)
        body = {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "gw-tls-x7k2p", "namespace": api.namespace,
                         "labels": {NEXT_KEY_LABEL: "true"},
                         "ownerReferences": [{"apiVersion": "cert-manager.io/v1",
                                              "kind": "Certificate", "name": "gw-tls",
                                              "uid": "0b9c5d1e-cert"}]},
            "stringData": {"tls.key": upcoming.private_key_pem.bytes().decode()},
        }  # fmt: skip
        await asyncio.to_thread(api.core.create_namespaced_secret, api.namespace, body)

        async def warned() -> None:
            obj = await api.get("maildomains", "dane")
            values = [r["value"] for r in obj["status"]["dnsRecords"] if r["type"] == "TLSA"]
            assert values == [f"3 1 1 {digest}", f"3 1 1 {next_digest}"]
            bad = condition(obj, "DNSVerified")
            assert (bad["status"], bad["reason"]) == ("False", "NextKeyNotInTLSA"), bad
            assert ("Warning", "NextKeyNotInTLSA") in await events(api, "dane")

        await eventually(warned)
        dns_server.add_zone("example.test.", mx_zone.format(digest=digest)
                            + f"_25._tcp.mx 300 IN TLSA 3 1 1 {next_digest}\n")  # fmt: skip
        await eventually(lambda: _dns_verified(api, "dane", "True"))
    finally:
        await run.stop()
