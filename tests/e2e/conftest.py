"""Fixtures of this directory: the loopback network's (tests/loopback_fixtures.py) and the
Kubernetes emulator's client (tests/operator_harness.py)."""

from loopback_fixtures import certificates, dns_server, mx_farm, mx_port
from operator_harness import api

__all__ = ["api", "certificates", "dns_server", "mx_farm", "mx_port"]
