"""DKIM Secrets, DNS records in status, rotation, and a restarted operator republishing."""

from __future__ import annotations

import kmock
import pytest
from kube_emulator import KubeEmulator
from operator_harness import Api, OperatorRun, condition, eventually, operator_settings

from mailkube_operator import dkim

pytestmark = pytest.mark.kmock(cls=KubeEmulator)


async def test_dkim_secret_records_rotation_and_restart(
    kmock: kmock.KubernetesEmulator, api: Api, redis_url: str
) -> None:
    run = OperatorRun(operator_settings(redis_url, str(kmock.url)))
    await run.start()
    try:
        await api.apply(
            "maildomains", "example", {"domain": "example.test",
                                       "dkim": {"selector": "s1", "algorithm": "both"}}
        )  # fmt: skip

        created = await api.get("maildomains", "example")

        async def keys_ready() -> dict[str, str]:
            secret = await api.secret("example-dkim")
            assert secret is not None
            owner = secret["metadata"]["ownerReferences"][0]
            assert (owner["kind"], owner["uid"]) == ("MailDomain", created["metadata"]["uid"])
            data = dkim.decode_data(secret["data"])
            assert sorted(data) == ["s1-ed25519.ed25519-sha256", "s1.rsa-sha256"]
            domain = (await run.table()).domain("example.test")
            assert domain is not None
            assert sorted((k.selector, k.signing) for k in domain.dkim) == [
                ("s1", True), ("s1-ed25519", True)]  # fmt: skip
            obj = await api.get("maildomains", "example")
            assert condition(obj, "Ready")["status"] == "True"
            assert obj["status"]["users"] == 0
            records = {(r["type"], r["name"]): r["value"] for r in obj["status"]["dnsRecords"]}
            assert records[("MX", "example.test.")] == "10 mx.example.test."
            assert records[("TXT", "s1._domainkey.example.test.")] == dkim.public_record(
                "rsa-sha256", data["s1.rsa-sha256"])  # fmt: skip
            assert records[("TXT", "s1-ed25519._domainkey.example.test.")].startswith(
                "v=DKIM1; k=ed25519; p=")  # fmt: skip
            return data

        first = await eventually(keys_ready)

        rotation = {"spec": {"dkim": {"selector": "s2", "algorithm": "ed25519"}}}
        await api.patch("maildomains", "example", rotation)

        async def rotated() -> None:
            secret = await api.secret("example-dkim")
            assert secret is not None
            data = dkim.decode_data(secret["data"])
            for key, value in first.items():  # never overwritten
                assert data[key] == value
            assert "s2.ed25519-sha256" in data
            domain = (await run.table()).domain("example.test")
            assert domain is not None
            assert [k.selector for k in domain.signing_keys()] == ["s2"]
            obj = await api.get("maildomains", "example")
            dkim_records = [r for r in obj["status"]["dnsRecords"] if r["purpose"] == "dkim"]
            names = [r["name"].split(".")[0] for r in dkim_records]
            assert names[0] == "s2"
            assert "note" not in dkim_records[0]
            assert sorted(names[1:]) == ["s1", "s1-ed25519"]
            assert all("retired" in r["note"] for r in dkim_records[1:])

        await eventually(rotated)
        version = (await run.table()).version
    finally:
        await run.stop()

    # a new operator publishes the same table again on start (a new version, same content)
    again = OperatorRun(operator_settings(redis_url, str(kmock.url)))
    await again.start()
    try:

        async def republished() -> None:
            snapshot = await again.table()
            assert snapshot.version == version + 1
            domain = snapshot.domain("example.test")
            assert domain is not None
            assert [k.selector for k in domain.signing_keys()] == ["s2"]

        await eventually(republished)
    finally:
        await again.stop()


async def test_nothing_to_serve_publishes_an_empty_table(
    kmock: kmock.KubernetesEmulator, api: Api, redis_url: str
) -> None:
    run = OperatorRun(operator_settings(redis_url, str(kmock.url)))
    await run.start()
    try:

        async def empty() -> None:
            snapshot = await run.table()
            assert snapshot.version >= 1
            assert snapshot.table.domains == []

        await eventually(empty)
    finally:
        await run.stop()
