"""A real validating resolver for tests: unbound (Debian's) on a free loopback port, with a
trust anchor for the signed test zones, asking the loopback DNS test server for names under
`test.` (and a root on 127.0.0.1 for any other: no query ever leaves loopback), caching
nothing.

    resolver = Unbound(tmp_path, dns_server.port, anchors=["dane.test. IN DS ..."]).start()
    ... resolver.host, resolver.port ...
    resolver.stop()

And `sign(origin, text)`: a zone signed with dnspython (ECDSA P-256, NSEC), with the DS
record to trust it by.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dns.dnssec
import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec


def sign(origin: str, text: str) -> tuple[str, str]:
    """(signed zone text, the DS trust anchor line) for zone-file `text` at `origin`."""
    zone = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=False)
    key = ec.generate_private_key(ec.SECP256R1())
    dnskey = dns.dnssec.make_dnskey(key.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256,
                                    flags=257)  # fmt: skip
    now = datetime.now(UTC)
    dns.dnssec.sign_zone(zone, keys=[(key, dnskey)], inception=now - timedelta(hours=1),
                         expiration=now + timedelta(days=2), dnskey_ttl=60)  # fmt: skip
    ds = dns.dnssec.make_ds(origin, dnskey, "SHA256")
    return zone.to_text(relativize=False), f"{dns.name.from_text(origin)} IN DS {ds}"


class Unbound:
    def __init__(self, directory: Path, upstream_port: int, anchors: list[str],
                 upstream: str = "127.0.0.1") -> None:  # fmt: skip
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = 0
        self.upstream = f"{upstream}@{upstream_port}"
        self.anchors = anchors
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        anchors = self.directory / "anchors.txt"
        anchors.write_text("\n".join(self.anchors) + "\n")
        # a root on loopback (where nothing answers): no query leaves 127.0.0.1
        hints = self.directory / "root.hints"
        hints.write_text(". 3600 IN NS root.loopback.\nroot.loopback. 3600 IN A 127.0.0.1\n")
        return f"""server:
    interface: {self.host}
    port: {self.port}
    outgoing-interface: {self.host}
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{self.directory}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    val-log-level: 2
    num-threads: 1
    so-reuseport: no
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "validator iterator"
    trust-anchor-file: "{anchors}"
    qname-minimisation: no
    harden-referral-path: no
    prefetch: no
    cache-max-ttl: 0
    cache-max-negative-ttl: 0
    infra-host-ttl: 1
    val-bogus-ttl: 0
    # unbound answers names under test. itself (RFC 6761 §6.2) unless told not to
    local-zone: "test." nodefault
    root-hints: "{hints}"
stub-zone:
    name: "test."
    stub-addr: {self.upstream}
    stub-prime: no
"""

    def start(self) -> Unbound:
        unbound = shutil.which("unbound") or "/usr/sbin/unbound"
        for _ in range(20):
            self.port = _free_udp_tcp_port(self.host)
            config = self.directory / "unbound.conf"
            config.write_text(self._config())
            log = (self.directory / "unbound.log").open("wb")
            self.process = subprocess.Popen([unbound, "-d", "-c", str(config)],
                                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            if self._wait_ready():
                return self
            self.stop()  # the port was taken meanwhile: try another
        raise RuntimeError(f"unbound did not start: {self.log()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 15
        query = dns.message.make_query("version.bind.", "TXT", "CH")
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                dns.query.udp(query, self.host, timeout=0.2, port=self.port)
                return True
            except (OSError, dns.exception.Timeout):
                time.sleep(0.05)
        return False

    def log(self) -> str:
        path = self.directory / "unbound.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def _free_udp_tcp_port(host: str) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no free port for unbound")
