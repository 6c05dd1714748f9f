"""The gateway's MTA-STS policy listener (`mta_sts_listen`): real HTTP over loopback, policies
from the routing table in a real Redis, a changed table seen without a restart, and strict
request parsing (the same reader as the health server)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from gateway_harness import LOCAL, Running, apply_routing, free_port, routing_table, running_gateway

from mailkube_core.routing import Domain, MtaStsPolicy, RoutingTable
from mailkube_worker.tlspolicy.mta_sts import StsPolicy, parse_policy
from mailkube_worker.tlspolicy.sts_fetch import fetch_policy

POLICY = MtaStsPolicy(mode="enforce", max_age=86400, mx=["mx.test"])


async def http(
    port: int, request: bytes, *, tls: ssl.SSLContext | None = None, name: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes), within a deadline."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname=name if tls else None
        )
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def get(host: str, path: str = "/.well-known/mta-sts.txt", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n\r\n".encode()


def table_with(policy: MtaStsPolicy | None) -> RoutingTable:
    return routing_table(mta_sts=policy)


@asynccontextmanager
async def policy_gateway(
    redis_url: str, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[Running, int]]:
    """A gateway serving POLICY for LOCAL, and the port of its MTA-STS listener."""
    listen = f"127.0.0.1:{free_port()}"
    async with running_gateway(
        redis_url, tmp_path, table=table_with(POLICY), mta_sts_listen=listen, **overrides
    ) as gw:
        assert gw.app.mta_sts is not None
        yield gw, gw.app.mta_sts.port


async def test_policy_served_by_host_header_and_follows_the_routing_table(
    redis_url: str, tmp_path: Path
) -> None:
    async with policy_gateway(redis_url, tmp_path) as (gw, port):
        status, headers, body = await http(port, get(f"mta-sts.{LOCAL}"))
        assert status == 200
        assert headers["content-type"].startswith("text/plain")
        # what a sender's parser (ours) makes of it: RFC 8461 §3.2
        assert parse_policy(body.decode()) == StsPolicy("enforce", 86400, ("mx.test",))
        assert body == POLICY.text().encode()

        # Host with a port, in upper case; HEAD has the headers and no body
        assert (await http(port, get(f"MTA-STS.{LOCAL.upper()}:443")))[0] == 200
        status, headers, body = await http(port, get(f"mta-sts.{LOCAL}", method="HEAD"))
        assert (status, body) == (200, b"")
        assert int(headers["content-length"]) == len(POLICY.text())

        # a domain of ours without a policy, a domain not ours, not an mta-sts host, wrong path
        assert (await http(port, get("mta-sts.limited.test")))[0] == 404
        assert (await http(port, get("mta-sts.elsewhere.test")))[0] == 404
        assert (await http(port, get(LOCAL)))[0] == 404
        assert (await http(port, get(f"mta-sts.{LOCAL}", "/.well-known/other")))[0] == 404

        # the table changes: the policy is withdrawn, without a restart
        version = await apply_routing(redis_url, table_with(None))
        async with asyncio.timeout(10):
            await gw.app.routing.wait_for_version(version)
        assert (await http(port, get(f"mta-sts.{LOCAL}")))[0] == 404


async def test_bad_requests_are_refused_and_the_server_keeps_serving(
    redis_url: str, tmp_path: Path
) -> None:
    async with policy_gateway(redis_url, tmp_path) as (_, port):
        path = b"GET /.well-known/mta-sts.txt HTTP/1.1\r\n"
        cases = {
            path + b"\r\n": 400,  # no Host
            path + b"Host: a\r\nHost: b\r\n\r\n": 400,  # two
            path + b"Host mta-sts.example.test\r\n\r\n": 400,  # no colon
            path + b"Host: x\r\n folded\r\n\r\n": 400,  # obsolete line folding
            path + b"X: y\r\n" * 200 + b"\r\n": 431,  # too many fields
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n": 414,
            b"GET /.well-known/mta-sts.txt HTTP/2.0\r\nHost: x\r\n\r\n": 505,
            b"POST /.well-known/mta-sts.txt HTTP/1.1\r\nHost: x\r\n\r\n": 405,
        }
        for request, expected in cases.items():
            assert (await http(port, request))[0] == expected, request[:60]
        assert (await http(port, get(f"mta-sts.{LOCAL}")))[0] == 200


async def test_https_with_a_certificate_for_the_policy_hosts(
    redis_url: str, tmp_path: Path
) -> None:
    """mta_sts_tls_cert_file: the gateway terminates TLS itself (the chart's Service port 443);
    a sender validating the certificate for mta-sts.<domain> (RFC 8461 §3.3) gets the policy."""
    host = f"mta-sts.{LOCAL}"
    ca = trustme.CA()
    issued = ca.issue_cert(host)
    cert_file, key_file = tmp_path / "sts.pem", tmp_path / "sts.key"
    issued.cert_chain_pems[0].write_to_path(str(cert_file))
    issued.private_key_pem.write_to_path(str(key_file))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with policy_gateway(
        redis_url, tmp_path, mta_sts_tls_cert_file=cert_file, mta_sts_tls_key_file=key_file
    ) as (_, port):
        status, _, body = await http(port, get(host), tls=client, name=host)
        assert (status, body) == (200, POLICY.text().encode())
        # our own worker, as a sender (RFC 8461 §3.3: WebPKI-validated HTTPS, text/plain)

        async def loopback(name: str) -> list[str]:
            return ["127.0.0.1"] if name == host else []

        fetched, text = await fetch_policy(LOCAL, loopback, client, limit=10, port=port)
        assert fetched == StsPolicy("enforce", 86400, ("mx.test",))
        assert text == POLICY.text()
        # a sender checking another name refuses the certificate
        with pytest.raises(ssl.SSLCertVerificationError):
            await http(port, get(host), tls=client, name="mta-sts.other.test")
        # plain HTTP to the TLS port gets no policy
        with pytest.raises((ConnectionError, ValueError, IndexError)):
            await http(port, get(host))


async def test_off_by_default(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, table=table_with(POLICY)) as gw:
        assert gw.app.mta_sts is None


def test_policy_domains_of_the_table_are_plain_domain_objects() -> None:
    """The table carries the policy per domain: what the operator publishes from spec.mtaSts."""
    domain = Domain(name="example.org", mta_sts=POLICY)
    assert RoutingTable(domains=[domain]).domains[0].mta_sts == POLICY
