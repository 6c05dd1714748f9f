"""Fixtures of the loopback network, for tests/integration and tests/e2e (their conftest.py
import them):

- dns_server (session)  an authoritative DNS server on 127.0.0.1 (UDP and TCP, a free port)
                        serving tests/dns/zones/*.zone (see tests/dns_server.py)
- mx_port    (session)  one port free on every fake MX address (127.0.0.20-44 and ::1)
- mx_farm    (function) starts fake MX hosts (aiosmtpd) on that port; stops them after
- certificates (function) a trustme CA and server certificates (tests/fake_mx.py)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dns_server import DnsServer
from fake_mx import Certificates, MxFarm, free_port_on, loopback_hosts
from gateway_harness import loopback_dns


@pytest.fixture(scope="session")
def dns_server() -> DnsServer:
    """The same server the gateway harness points gateways at (stopped at exit)."""
    return loopback_dns()


@pytest.fixture(scope="session")
def mx_port() -> int:
    return free_port_on(list(loopback_hosts()))


@pytest.fixture
def mx_farm(mx_port: int) -> Iterator[MxFarm]:
    farm = MxFarm(mx_port)
    try:
        yield farm
    finally:
        farm.stop()


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)
