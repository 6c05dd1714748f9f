"""Fixtures of this directory: the loopback network's (tests/loopback_fixtures.py)."""

from loopback_fixtures import certificates, dns_server, mx_farm, mx_port

__all__ = ["certificates", "dns_server", "mx_farm", "mx_port"]
