"""Staged DKIM key rotation end to end: the operator on the Kubernetes emulator, its DNS check
against the loopback DNS server, the routing table in a real Redis. The next key is listed
before it signs, signs only once its record is in DNS (or after the propagation delay), and
the old one stays listed for the overlap, then leaves the Secret and the status."""

from __future__ import annotations

from typing import Any

import kmock
import pytest
from dns_server import DnsServer, zone_from_records
from kube_emulator import KubeEmulator
from operator_harness import Api, OperatorRun, condition, events, eventually, operator_settings

from mailkube_operator import dkim, rotation

pytestmark = pytest.mark.kmock(cls=KubeEmulator)

DOMAIN = "rot.test"


def dkim_records(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The DKIM records a MailDomain's status lists, by selector."""
    return {r["name"].split(".")[0]: r for r in obj["status"]["dnsRecords"]
            if r["purpose"] == "dkim"}  # fmt: skip


async def signing(run: OperatorRun) -> list[str]:
    domain = (await run.table()).domain(DOMAIN)
    assert domain is not None
    return sorted(k.selector for k in domain.signing_keys())


async def secret_keys(api: Api) -> list[str]:
    secret = await api.secret("rot-dkim")
    assert secret is not None
    return sorted(k for k in dkim.decode_data(secret["data"]) if k != rotation.STATE_KEY)


async def test_rotation_waits_for_dns_then_overlaps_then_retires(
    kmock: kmock.KubernetesEmulator, api: Api, redis_url: str, dns_server: DnsServer
) -> None:
    settings = operator_settings(
        redis_url, str(kmock.url), dns_check_interval="1s",
        dns_nameservers=[dns_server.host], dns_port=dns_server.port, dns_timeout="2s",
    )  # fmt: skip
    run = OperatorRun(settings)
    await run.start()
    try:
        rotating = {"selector": "mk", "algorithm": "ed25519", "rotation": {"overlap": "3s"}}
        spec = {"domain": DOMAIN, "dkim": rotating}
        await api.apply("maildomains", "rot", spec)

        async def idle() -> list[dict[str, Any]]:
            obj = await api.get("maildomains", "rot")
            state = condition(obj, rotation.CONDITION)
            assert (state["status"], state["reason"]) == ("False", "Idle"), state
            assert list(dkim_records(obj)) == ["mk"]
            return list(obj["status"]["dnsRecords"])

        first = await eventually(idle)
        dns_server.add_zone(f"{DOMAIN}.", zone_from_records(f"{DOMAIN}.", first))
        await eventually(lambda: _dns(api, "True"))
        assert await signing(run) == ["mk"]

        annotate = {"metadata": {"annotations": {rotation.ROTATE_ANNOTATION: "now"}}}
        await api.patch("maildomains", "rot", annotate)

        async def listed_not_signing() -> list[dict[str, Any]]:
            obj = await api.get("maildomains", "rot")
            assert rotation.ROTATE_ANNOTATION not in (obj["metadata"].get("annotations") or {})
            records = dkim_records(obj)
            assert list(records) == ["mk", "mk-2"]
            assert "note" not in records["mk"]
            assert records["mk-2"]["note"].startswith("next key")
            waiting = condition(obj, rotation.CONDITION)
            assert (waiting["status"], waiting["reason"]) == ("True", "WaitingForPublication")
            assert "mk-2._domainkey.rot.test." in waiting["message"]
            # the DNS check has looked, and not found it
            dns = condition(obj, "DNSVerified")
            assert dns["status"] == "False", dns
            assert "mk-2._domainkey.rot.test." in dns["message"]
            assert await secret_keys(api) == ["mk-2.ed25519-sha256", "mk.ed25519-sha256"]
            assert ("Normal", "DKIMRotationStarted") in await events(api, "rot")
            return list(obj["status"]["dnsRecords"])

        both = await eventually(listed_not_signing)
        # the check runs every second: a few more rounds, and still the old key signs
        checks = len(dns_server.queries)
        await eventually(lambda: _more_queries(dns_server, checks + 10))
        assert await signing(run) == ["mk"]
        assert condition(await api.get("maildomains", "rot"), rotation.CONDITION)["reason"] == (
            "WaitingForPublication"
        )

        dns_server.add_zone(f"{DOMAIN}.", zone_from_records(f"{DOMAIN}.", both))

        async def switched() -> None:
            assert await signing(run) == ["mk-2"]
            obj = await api.get("maildomains", "rot")
            records = dkim_records(obj)
            assert list(records) == ["mk-2", "mk"]
            assert records["mk"]["note"].startswith("retiring key")
            overlap = condition(obj, rotation.CONDITION)
            assert (overlap["status"], overlap["reason"]) == ("True", "Overlap"), overlap
            assert ("Normal", "DKIMKeySwitched") in await events(api, "rot")

        await eventually(switched)

        async def retired() -> None:
            obj = await api.get("maildomains", "rot")
            assert list(dkim_records(obj)) == ["mk-2"]
            assert await secret_keys(api) == ["mk-2.ed25519-sha256"]
            done = condition(obj, rotation.CONDITION)
            assert (done["status"], done["reason"]) == ("False", "Idle"), done
            reasons = [r for _, r in await events(api, "rot")]
            assert reasons.index("DKIMRotationStarted") < reasons.index("DKIMKeySwitched")
            assert reasons.index("DKIMKeySwitched") < reasons.index("DKIMKeyRetired")

        await eventually(retired)
        assert await signing(run) == ["mk-2"]
    finally:
        await run.stop()


async def test_scheduled_rotation_without_the_dns_check_and_a_restart(
    kmock: kmock.KubernetesEmulator, api: Api, redis_url: str
) -> None:
    """every, propagationDelay and overlap from the spec; the state survives a restart."""
    run = OperatorRun(operator_settings(redis_url, str(kmock.url)))
    await run.start()
    try:
        timed = {"every": "2s", "propagationDelay": "1s", "overlap": "1s"}
        spec = {"domain": DOMAIN,
                "dkim": {"selector": "mk", "algorithm": "rsa-2048", "rotation": timed}}  # fmt: skip
        await api.apply("maildomains", "rot", spec)

        async def rotated_and_retired() -> None:
            reasons = [r for _, r in await events(api, "rot")]
            assert "DKIMKeyRetired" in reasons
            assert "mk.rsa-sha256" not in await secret_keys(api)
            assert "mk" not in await signing(run)

        await eventually(rotated_and_retired)
        # switch rotation off (no `every`): it settles on one key
        await api.patch("maildomains", "rot", {"spec": {"dkim": {"rotation": {"every": None}}}})

        async def settled() -> list[str]:
            obj = await api.get("maildomains", "rot")
            assert condition(obj, rotation.CONDITION)["reason"] == "Idle"
            keys = await secret_keys(api)
            assert len(keys) == 1
            return keys

        keys = await eventually(settled)
        now_signing = await signing(run)
        assert [f"{s}.rsa-sha256" for s in now_signing] == keys
    finally:
        await run.stop()

    again = OperatorRun(operator_settings(redis_url, str(kmock.url)))
    await again.start()
    try:

        async def same_key() -> None:
            snapshot = await again.table()
            domain = snapshot.domain(DOMAIN)
            assert domain is not None
            assert sorted(k.selector for k in domain.signing_keys()) == now_signing

        await eventually(same_key)
        assert await secret_keys(api) == keys
    finally:
        await again.stop()


async def _dns(api: Api, status: str) -> None:
    assert condition(await api.get("maildomains", "rot"), "DNSVerified")["status"] == status


async def _more_queries(dns_server: DnsServer, count: int) -> None:
    assert len(dns_server.queries) >= count
