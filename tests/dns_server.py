"""A small authoritative DNS server on loopback, for tests (dnspython, UDP and TCP).

It serves every zone file of a directory (`<origin>.zone`, e.g. `example.test.zone`), with
whatever records they hold (A, AAAA, MX, TXT, CNAME, ...), and answers like an authoritative
server: AA set, NXDOMAIN for a name that does not exist, NOERROR with the SOA for a name
without records of the type asked (RFC 2308), REFUSED outside its zones. A signed zone (e.g.
one signed with dns.dnssec.sign_zone) is served as DNSSEC asks (RFC 4035 §3.1) to queries
with the DO bit: RRSIGs beside the records, NSEC records proving a name or type absent.
CNAMEs inside the served zones are followed. UDP answers too big for the client's buffer are
truncated (TC), so resolvers retry over TCP.

Tests can add zones (`add_zone`), make names fail with SERVFAIL (`fail`) and make names and
everything below them go unanswered (`never_answer`: a server that has gone silent). A fixed
`port` (e.g. 53, for programs that use the C library's resolver) can be asked for; by default
a free one is picked.

    server = DnsServer(Path("tests/dns/zones")).start()
    resolver.nameservers, resolver.port = [server.host], server.port
    ...
    server.stop()
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import dns.zone

MAX_CNAME_CHAIN = 8


class DnsServer:
    def __init__(
        self, zones_dir: Path | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.host = host
        self.port = port
        #: 0: start() picks a free port (a UDP port whose TCP twin is free too)
        self._fixed_port = port
        self.zones: dict[dns.name.Name, dns.zone.Zone] = {}
        #: names answered with SERVFAIL, whatever the type (a broken authoritative server)
        self.servfail: set[dns.name.Name] = set()
        #: names at and under which queries get no answer at all (the client times out)
        self.silent: set[dns.name.Name] = set()
        self.queries: list[tuple[str, str, str]] = []  # (name, type, transport)
        self._lock = threading.Lock()
        self._servers: list[socketserver.BaseServer] = []
        if zones_dir is not None:
            for path in sorted(zones_dir.glob("*.zone")):
                self.add_zone(path.name.removesuffix(".zone"), path.read_text())

    def add_zone(self, origin: str, text: str) -> None:
        """Serve (or replace) a zone from zone-file text; names are relative to `origin`."""
        zone = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=False)
        with self._lock:
            self.zones[zone.origin] = zone  # type: ignore[index]

    def dkim_txt(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's `dnsfunc`, asking this server only (dnspython's blocking resolver): the
        first TXT record at `name`, None if there is none; dkim.DnsTimeoutError on a timeout
        or SERVFAIL."""
        import dkim

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        try:
            answer = resolver.resolve(
                name.decode(), "TXT", lifetime=timeout, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return None
        except dns.exception.DNSException as error:
            raise dkim.DnsTimeoutError(str(error)) from None
        if not answer.rrset:
            return None
        return b"".join(answer.rrset[0].strings)  # type: ignore[attr-defined]

    def fail(self, name: str) -> None:
        self.servfail.add(dns.name.from_text(name))

    def never_answer(self, name: str) -> None:
        """Queries for `name` and the names below it go unanswered."""
        with self._lock:
            self.silent.add(dns.name.from_text(name))

    def _unanswered(self, name: dns.name.Name) -> bool:
        with self._lock:
            return any(name.is_subdomain(silent) for silent in self.silent)

    # --- answering ------------------------------------------------------------------------

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        with self._lock:
            zone = self._zone_of(qname)
            if qname in self.servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            if zone is None or question.rdclass != dns.rdataclass.IN:
                response.set_rcode(dns.rcode.REFUSED)
                return response
            response.flags |= dns.flags.AA
            dnssec = query.edns >= 0 and bool(query.ednsflags & dns.flags.DO)
            self._fill(response, zone, qname, qtype, dnssec)
        return response

    def _zone_of(self, name: dns.name.Name) -> dns.zone.Zone | None:
        best = None
        for origin, zone in self.zones.items():
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best.origin)):
                best = zone
        return best

    def _fill(
        self,
        response: dns.message.Message,
        zone: dns.zone.Zone,
        qname: dns.name.Name,
        qtype: dns.rdatatype.RdataType,
        dnssec: bool = False,
    ) -> None:
        for _ in range(MAX_CNAME_CHAIN):
            node = zone.get_node(qname)
            if node is None:
                exists = any(name.is_subdomain(qname) for name in zone.nodes)
                if not exists and not response.answer:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                self._soa(response, zone, dnssec)
                if dnssec:  # RFC 4035 §3.1.3.2: the NSECs covering the name and the wildcard
                    self._covering_nsec(response, zone, qname)
                return
            rdataset = node.get_rdataset(dns.rdataclass.IN, qtype)
            if rdataset is not None:
                response.answer.append(_rrset(qname, rdataset))
                if dnssec:
                    self._signatures(response.answer, zone, qname, qtype)
                return
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None:
                self._soa(response, zone, dnssec)  # RFC 2308 §2.2: NODATA
                if dnssec:  # RFC 4035 §3.1.3.1: the name's own NSEC
                    self._signed(response.authority, zone, qname, dns.rdatatype.NSEC)
                return
            response.answer.append(_rrset(qname, cname))
            if dnssec:
                self._signatures(response.answer, zone, qname, dns.rdatatype.CNAME)
            qname = cname[0].target  # type: ignore[attr-defined]
            if not qname.is_subdomain(zone.origin):  # type: ignore[arg-type]
                return

    @classmethod
    def _soa(cls, response: dns.message.Message, zone: dns.zone.Zone,
             dnssec: bool = False) -> None:  # fmt: skip
        assert zone.origin is not None
        soa = zone.get_rdataset(zone.origin, dns.rdatatype.SOA)
        if soa is not None:
            response.authority.append(_rrset(zone.origin, soa))
            if dnssec:
                cls._signatures(response.authority, zone, zone.origin, dns.rdatatype.SOA)

    @staticmethod
    def _signatures(section: list[dns.rrset.RRset], zone: dns.zone.Zone, name: dns.name.Name,
                    covered: dns.rdatatype.RdataType) -> None:  # fmt: skip
        sigs = zone.get_rdataset(name, dns.rdatatype.RRSIG, covers=covered)
        if sigs is not None:
            section.append(_rrset(name, sigs))

    @classmethod
    def _signed(cls, section: list[dns.rrset.RRset], zone: dns.zone.Zone, name: dns.name.Name,
                rdtype: dns.rdatatype.RdataType) -> None:  # fmt: skip
        rdataset = zone.get_rdataset(name, rdtype)
        if rdataset is not None and not any(r.name == name and r.rdtype == rdtype
                                            for r in section):  # fmt: skip
            section.append(_rrset(name, rdataset))
            cls._signatures(section, zone, name, rdtype)

    @classmethod
    def _covering_nsec(cls, response: dns.message.Message, zone: dns.zone.Zone,
                       qname: dns.name.Name) -> None:  # fmt: skip
        """The NSEC whose owner precedes `qname` in canonical order (RFC 4034 §6.1), and the
        one covering the wildcard at its closest encloser."""
        owners = sorted(n for n, node in zone.nodes.items()
                        if node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NSEC))  # fmt: skip
        if not owners:
            return
        encloser = qname.parent()
        while encloser != zone.origin and zone.get_node(encloser) is None:
            encloser = encloser.parent()
        for name in (qname, dns.name.Name((b"*",)).concatenate(encloser)):
            before = [owner for owner in owners if owner < name]
            cls._signed(response.authority, zone, before[-1] if before else owners[-1],
                        dns.rdatatype.NSEC)  # fmt: skip

    def _reply(self, wire: bytes, transport: str, max_size: int) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.question:
            q = query.question[0]
            self.queries.append((q.name.to_text(), dns.rdatatype.to_text(q.rdtype), transport))
            if self._unanswered(q.name):
                return None
        response = self.answer(query)
        if transport == "udp":
            max_size = max(512, query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | dns.flags.AA
            return truncated.to_wire()

    # --- serving ----------------------------------------------------------------------------

    def start(self) -> DnsServer:
        server = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = server._reply(data, "udp", 512)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while header := self.rfile.read(2):
                    if len(header) < 2:
                        return
                    (length,) = struct.unpack("!H", header)
                    reply = server._reply(self.rfile.read(length), "tcp", 65535)
                    if reply is None:
                        return
                    self.wfile.write(struct.pack("!H", len(reply)) + reply)

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class UdpServer(socketserver.ThreadingUDPServer):
            address_family = family
            daemon_threads = True

        class TcpServer(socketserver.ThreadingTCPServer):
            address_family = family
            daemon_threads = True
            allow_reuse_address = True

        fixed = self._fixed_port != 0
        for _ in range(1 if fixed else 50):  # the UDP port's TCP twin may be taken: retry
            udp = UdpServer((self.host, self._fixed_port), Udp)
            port = udp.server_address[1]
            try:
                tcp = TcpServer((self.host, port), Tcp)
            except OSError:
                udp.server_close()
                if fixed:
                    raise
                continue
            self.port = port
            self._servers = [udp, tcp]
            break
        else:
            raise RuntimeError("no free UDP+TCP port pair for the DNS server")
        for srv in self._servers:
            threading.Thread(target=srv.serve_forever, name="dns-server", daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers = []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _rrset(name: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, rdataset.rdclass, rdataset.rdtype)
    rrset.update(rdataset)
    return rrset


def txt_strings(value: str) -> str:
    """A zone-file TXT value: quoted strings of at most 255 octets (RFC 1035 §3.3.14), as a
    2048-bit RSA DKIM key needs."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def zone_from_records(
    origin: str, records: list[dict[str, Any]], *, drop: str = "",
    replace: dict[str, str] | None = None, extra: str = "",
) -> str:  # fmt: skip
    """Zone-file text publishing `records` as a MailDomain's status.dnsRecords lists them
    (type, name, value, purpose), except the one whose purpose is `drop`, with the values of
    `replace` (purpose -> value), and `extra` lines."""
    lines = [f"@ 300 IN SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 60"]
    for record in records:
        if record["purpose"] == drop:
            continue
        value = (replace or {}).get(record["purpose"], record["value"])
        if record["type"] == "TXT":
            value = txt_strings(value)
        lines.append(f"{record['name']} 300 IN {record['type']} {value}")
    return "\n".join([*lines, extra, ""])
