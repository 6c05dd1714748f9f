"""The tests' rspamd: a real daemon (mailkube_core.cli.rspamd_local), one per test process,
on free loopback ports, its DNS lookups on the loopback DNS server and its Redis data in
database 1 of the suite's Redis (tests flush database 0 only)."""

from __future__ import annotations

import atexit
from pathlib import Path

from gateway_harness import free_port, loopback_dns

from mailkube_core.cli.rspamd_local import LocalRspamd, RspamdError

_rspamd: LocalRspamd | None = None


def shared_rspamd(directory: Path, redis_url: str) -> LocalRspamd:
    """Started on first use (about ten seconds, rspamd compiles its rules), stopped at exit."""
    global _rspamd
    if _rspamd is None:
        dns = loopback_dns()
        for attempt in range(3):
            server = LocalRspamd(
                directory,
                normal_port=free_port(),
                controller_port=free_port(),
                proxy_port=free_port(),
                redis_url=redis_url,
                dns=f"{dns.host}:{dns.port}",
            )
            server.start()
            try:
                server.wait_ready()
            except RspamdError:
                # a port picked free may be taken before rspamd binds it (other test runs
                # on the machine): rspamd exits, and gets new ports
                server.stop()
                if attempt == 2:
                    raise
                continue
            atexit.register(server.stop)
            _rspamd = server
            break
    assert _rspamd is not None
    return _rspamd
