"""A real SMTP gateway for tests: in this event loop (GatewayApp) or as a process (the
`mailkube-gateway` entry point), on loopback ports, with a trustme certificate and a routing
table in the test's Redis."""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import trustme
from dns_server import DnsServer
from redis_servers import free_port

from mailkube_core.queue import MessageInfo, QueueAdmin
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import Domain, DomainLimits, RoutingStore, RoutingTable, User
from mailkube_core.settings import GatewaySettings
from mailkube_gateway.app import GatewayApp

ZONES = Path(__file__).resolve().parent / "dns" / "zones"
LOCAL = "example.test"
ALICE = "alice@example.test"
ALICE_PASSWORD = "alice-password"
BOB = "bob@example.test"
BOB_PASSWORD = "bob-password"
# argon2id hashes made once (hashing costs ~50 ms each)
_HASHES: dict[str, str] = {}


def password_hash(plain: str) -> str:
    from mailkube_core.routing import hash_password

    if plain not in _HASHES:
        _HASHES[plain] = hash_password(plain)
    return _HASHES[plain]


def routing_table(**domain_options: Any) -> RoutingTable:
    return RoutingTable(
        domains=[
            Domain(name=LOCAL, **domain_options),
            Domain(name="xn--bcher-kva.example"),
            Domain(name="limited.test", limits=DomainLimits(max_messages_per_minute=2)),
        ],
        users=[
            User(
                address=ALICE,
                password_hash=password_hash(ALICE_PASSWORD),
                aliases=["info@example.test"],
                send_as=["team@example.test"],
            ),
            User(address=BOB, password_hash=password_hash(BOB_PASSWORD)),
            User(address="carol@example.test", password_hash=password_hash("x"), suspended=True),
            User(address="full@example.test", quota=1000),
            User(address="owner@xn--bcher-kva.example"),
            User(address="lim@limited.test", password_hash=password_hash("lim-password")),
            User(address="pm@example.test"),
        ],
    )


async def apply_routing(redis_url: str, table: RoutingTable | None = None) -> int:
    client = connect_redis(GatewaySettings(redis_url=redis_url, hostname="mx.test"))
    try:
        return await RoutingStore(client).replace(table or routing_table())
    finally:
        await client.aclose()


@dataclass
class Tls:
    ca: trustme.CA
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    @property
    def ca_file(self) -> Path:
        path = self.cert_file.parent / "ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def reissue(self, name: str = "localhost") -> None:
        """A new certificate (same CA) written over the old files."""
        cert = self.ca.issue_cert(name, "127.0.0.1", "::1")
        cert.private_key_pem.write_to_path(str(self.key_file))
        cert.cert_chain_pems[0].write_to_path(str(self.cert_file))


def make_tls(directory: Path) -> Tls:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    tls = Tls(ca, directory / "cert.pem", directory / "key.pem")
    tls.reissue()
    return tls


_dns: DnsServer | None = None


def loopback_dns() -> DnsServer:
    """The loopback DNS server serving tests/dns/zones, one per test process: the gateway's
    SPF, DKIM and DMARC lookups go there and nowhere else."""
    global _dns
    if _dns is None:
        _dns = DnsServer(ZONES).start()
        atexit.register(_dns.stop)
    return _dns


def gateway_settings(redis_url: str, tls: Tls, **overrides: Any) -> GatewaySettings:
    dns = loopback_dns()
    options: dict[str, Any] = {
        "dns_nameservers": [dns.host],
        "dns_port": dns.port,
        "redis_url": redis_url,
        "hostname": "mx.test",
        # port 0: the kernel picks free ports as it binds (a port picked beforehand and then
        # bound can be taken in between, by a client's ephemeral port)
        "mx_listen": ["127.0.0.1:0"],
        "submission_listen": ["127.0.0.1:0"],
        "submissions_listen": ["127.0.0.1:0"],
        "tls_cert_file": tls.cert_file,
        "tls_key_file": tls.key_file,
        "telemetry_listen": "",
        "postmaster": "pm@example.test",
        "max_messages_per_minute": 1000,
        "max_recipient_messages_per_minute": 1000,
    }
    options.update(overrides)
    return GatewaySettings(**options)


@dataclass
class Running:
    app: GatewayApp
    tls: Tls
    redis_url: str

    @property
    def mx(self) -> int:
        return self.app.ports("mx")[0]

    @property
    def submission(self) -> int:
        return self.app.ports("submission")[0]

    @property
    def submissions(self) -> int:
        return self.app.ports("submissions")[0]

    def client(self, port: int, **options: Any) -> aiosmtplib.SMTP:
        options.setdefault("tls_context", self.tls.client_context())
        options.setdefault("timeout", 20)
        return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, **options)

    async def messages(self) -> list[MessageInfo]:
        client = connect_redis(self.app.settings)
        try:
            return await QueueAdmin(client).list_messages()
        finally:
            await client.aclose()

    async def body(self, message_id: str) -> bytes:
        client = connect_redis(self.app.settings)
        try:
            body = await QueueAdmin(client).body(message_id)
        finally:
            await client.aclose()
        assert body is not None
        return body


@asynccontextmanager
async def running_gateway(
    redis_url: str, tmp_path: Path, *, table: RoutingTable | None = None, **overrides: Any
) -> AsyncIterator[Running]:
    tls = make_tls(tmp_path / "tls")
    await apply_routing(redis_url, table)
    app = GatewayApp(gateway_settings(redis_url, tls, **overrides))
    assert await app.start()
    try:
        yield Running(app, tls, redis_url)
    finally:
        await app.stop()


def message(
    sender: str = "someone@remote.test", to: str = ALICE, subject: str = "hello", body: str = "hi"
) -> str:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@remote.test>\r\n\r\n{body}\r\n"
    )


# --- raw sockets ---------------------------------------------------------------------------


class RawClient:
    """A byte-level SMTP client for what real clients refuse to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, host: str = "127.0.0.1", greet: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        if greet:
            greeting = await client.reply()
            assert greeting.startswith("220"), greeting
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 20) -> str:
        """One complete (possibly multi-line) reply; '' if the server closed."""
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    return "".join(lines)
                text = line.decode("utf-8", "replace")
                lines.append(text)
                if len(text) < 4 or text[3] != "-":
                    return "".join(lines)

    async def command(self, line: str | bytes) -> str:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 20) -> bool:
        """True once the server has closed the connection (whatever it sent before)."""
        async with asyncio.timeout(timeout):
            while await self.reader.read(65536):
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


# --- a gateway process ----------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def serving_pids(port: int, pids: list[int]) -> set[int]:
    """Which of `pids` serve the IPv4 listening socket on 127.0.0.1-or-any `port`: their
    event loop watches it. Holding its descriptor is not enough: an extra gateway process
    inherits the first one's sockets when it starts, seconds before it serves them. An epoll
    instance's /proc fdinfo names each watched file ("tfd: … ino:<hex>")."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            listening.add(int(fields[9]))
    serving = set()
    for pid in pids:
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in descriptors:
            try:
                if os.readlink(fd) != "anon_inode:[eventpoll]":
                    continue
                info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
            except OSError:
                continue
            watched = {int(m, 16) for m in re.findall(r"^tfd:.*\bino:([0-9a-f]+)", info, re.M)}
            if watched & listening:
                serving.add(pid)
                break
    return serving


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@dataclass
class GatewayProcess:
    process: subprocess.Popen[str]
    mx: int
    submission: int
    submissions: int
    telemetry: int

    def ready(self) -> bool:
        return http_status(f"http://127.0.0.1:{self.telemetry}/readyz") == 200


def start_gateway_process(redis_url: str, tls: Tls, **env: str) -> GatewayProcess:
    ports = [free_port() for _ in range(4)]
    variables = {
        **os.environ,
        "MAILKUBE_REDIS_URL": redis_url,
        "MAILKUBE_HOSTNAME": "mx.test",
        "MAILKUBE_MX_LISTEN": f"127.0.0.1:{ports[0]}",
        "MAILKUBE_SUBMISSION_LISTEN": f"127.0.0.1:{ports[1]}",
        "MAILKUBE_SUBMISSIONS_LISTEN": f"127.0.0.1:{ports[2]}",
        "MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{ports[3]}",
        "MAILKUBE_TLS_CERT_FILE": str(tls.cert_file),
        "MAILKUBE_TLS_KEY_FILE": str(tls.key_file),
        "MAILKUBE_DNS_NAMESERVERS": loopback_dns().host,
        "MAILKUBE_DNS_PORT": str(loopback_dns().port),
        **env,
    }
    variables.pop("MAILKUBE_CONFIG", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "mailkube_gateway"],
        env=variables,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    gateway = GatewayProcess(process, *ports)
    try:
        wait_until(lambda: gateway.ready() or process.poll() is not None, 30, "gateway ready")
    except TimeoutError:
        process.kill()
        raise
    if process.poll() is not None:
        raise RuntimeError(f"gateway exited: {process.communicate()[1]}")
    return gateway


def stop_gateway_process(gateway: GatewayProcess) -> tuple[int, str]:
    if gateway.process.poll() is None:
        gateway.process.terminate()
    try:
        _, stderr = gateway.process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        _, stderr = gateway.process.communicate()
    return gateway.process.returncode, stderr
