"""`mailkube dev`: the whole stack on this machine, in the foreground.

A private redis-server (AOF appendfsync always, data in .run/redis), a private rspamd
(rspamd_local: config, compiled rules and logs in .run/rspamd, its Redis data in database 1
of that Redis), the routing table from examples/dev-routing.yaml, a self-signed certificate in
.run/tls, and the gateway and worker processes as those components exist. Ctrl-C (or SIGTERM)
stops the components first, then rspamd, Redis last; the servers also get SIGTERM when this
process dies in any other way (mailkube_core.parent_death). A component whose entry point
exits 0 before it is ready is still a placeholder and is reported as not built yet.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis
import yaml
from pydantic import SecretStr

from ..parent_death import preexec as follow_this_process
from ..redis_client import connect_redis
from ..routing import DkimKey, RoutingStore, RoutingTable
from ..routing.dkim_keys import generate
from ..settings import CommonSettings, split_host_port
from .devcert import ensure_self_signed
from .routing_cmd import RoutingFileError, read_routing_file
from .rspamd_local import GTUBE, LocalRspamd, RspamdError
from .spam_cmd import CONTROLLER_ENV

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
#: rspamd's own first start compiles its rules for about 10 s (much longer on a busy machine)
RSPAMD_READY_TIMEOUT = 120.0
#: beside a system rspamd (11333 normal, 11334 controller, 11332 proxy), not on its ports
RSPAMD_PORT = 11433
RSPAMD_CONTROLLER_PORT = 11434
#: rspamd's Bayes statistics and history in this database of the dev Redis (Mailkube: 0)
RSPAMD_REDIS_DB = 1


class DevError(Exception):
    pass


@dataclass
class Component:
    name: str
    module: str
    telemetry_port: int
    process: subprocess.Popen[bytes] | None = None
    built: bool = True


@dataclass
class DevStack:
    run_dir: Path
    routing_file: Path
    redis_port: int = 6479
    mx_port: int = 2525
    submission_port: int = 2587
    submissions_port: int = 2465
    gateway_telemetry_port: int = 9125
    worker_telemetry_port: int = 9126
    rspamd_port: int = RSPAMD_PORT
    rspamd_controller_port: int = RSPAMD_CONTROLLER_PORT
    #: the resolver (ip:port, [ipv6]:port) of the gateway, the worker and rspamd; None: the
    #: system's
    dns: str | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    redis: subprocess.Popen[bytes] | None = None
    rspamd: LocalRspamd = field(init=False)
    components: list[Component] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir = self.run_dir.resolve()
        self.rspamd = LocalRspamd(
            self.run_dir / "rspamd",
            normal_port=self.rspamd_port,
            controller_port=self.rspamd_controller_port,
            proxy_port=None,  # no MTA here speaks milter
            redis_url=self.redis_url,
            redis_db=RSPAMD_REDIS_DB,
            dns=self.dns,
        )
        self.components = [
            Component("gateway", "mailkube_gateway", self.gateway_telemetry_port),
            Component("worker", "mailkube_worker", self.worker_telemetry_port),
        ]

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def config_file(self) -> Path:
        return self.run_dir / "mailkube.yaml"

    def start(self) -> None:
        for port in (self.redis_port, self.rspamd_port, self.rspamd_controller_port,
                     self.mx_port, self.submission_port, self.submissions_port,
                     *(c.telemetry_port for c in self.components)):  # fmt: skip
            if _in_use(port):
                raise DevError(
                    f"127.0.0.1:{port} is already in use (another `mailkube dev`?); stop it first"
                )
        self._start_redis()
        self._start_rspamd()
        if self.stopping.is_set():
            return
        self._write_config()
        asyncio.run(self._apply_routing())
        for component in self.components:
            if self.stopping.is_set():
                return
            self._start_component(component)

    def _start_redis(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise DevError("redis-server is not installed (`make run` installs it)")
        data = self.run_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self.redis = subprocess.Popen(
            [server, "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--dir", str(data), "--appendonly", "yes", "--appendfsync", "always",
             # as the chart's Redis (charts/mailkube/values.yaml, redis.aofRewriteMinSize)
             "--auto-aof-rewrite-min-size", "1gb",
             "--save", "", "--daemonize", "no", "--logfile", str(data / "redis.log")],
            start_new_session=True,  # Ctrl-C reaches us only; we stop Redis last
            preexec_fn=follow_this_process(),
        )  # fmt: skip
        client = redis.Redis(port=self.redis_port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.redis.poll() is not None or time.monotonic() > deadline:
                    raise DevError(
                        f"redis-server did not start; see {data / 'redis.log'}"
                    ) from None
                self.stopping.wait(0.05)
            finally:
                client.close()
        _say(f"redis    ready  {self.redis_url}  (AOF appendfsync always, data in {data})")

    def _start_rspamd(self) -> None:
        rspamd = self.rspamd
        compiled = rspamd.has_compiled_rules
        try:
            # a session of its own, like Redis: Ctrl-C reaches us only, we stop it after the
            # gateway
            rspamd.start(new_session=True, stop_with_parent=True)
        except OSError as exc:
            raise DevError(f"cannot start rspamd: {exc}") from None
        except RspamdError as exc:
            raise DevError(str(exc)) from None
        if not compiled:
            _say(f"rspamd   compiling its rules, about 10 s on a first start (kept in "
                 f"{rspamd.directory / 'db'}, later starts take a second)")  # fmt: skip
        try:
            rspamd.wait_ready(RSPAMD_READY_TIMEOUT, stopping=self.stopping)
        except RspamdError as exc:
            raise DevError(str(exc)) from None
        if not self.stopping.is_set():
            _say(f"rspamd   ready  {rspamd.url}  (controller {rspamd.controller_url}, "
                 f"Redis database {RSPAMD_REDIS_DB}, log {rspamd.log_file})")  # fmt: skip

    def _write_config(self) -> None:
        tls = self.run_dir / "tls"
        cert, key = tls / "cert.pem", tls / "key.pem"
        if ensure_self_signed(cert, key):
            _say(f"tls      wrote a self-signed certificate for localhost in {tls}")
        mail = self.run_dir / "mail"
        mail.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "redis_url": self.redis_url,
            "hostname": "localhost",
            "log_format": "text",
            "mx_listen": [f"127.0.0.1:{self.mx_port}"],
            "submission_listen": [f"127.0.0.1:{self.submission_port}"],
            "submissions_listen": [f"127.0.0.1:{self.submissions_port}"],
            "tls_cert_file": str(cert),
            "tls_key_file": str(key),
            "mail_root": str(mail),
            # every message scanned; spam_policy stays the default, reject: GTUBE is refused
            "rspamd_url": self.rspamd.url,
            # SPF/DMARC of test senders go to this machine's resolver; without a network
            # that is a DNS temporary error, which should not stop local tests
            "dns_temp_error": "accept",
        }
        if self.dns is not None:
            host, port = split_host_port(self.dns)
            config.update(dns_nameservers=[host], dns_port=port)
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    async def _apply_routing(self) -> None:
        table = self._with_dev_dkim_keys(read_routing_file(self.routing_file))
        client = connect_redis(CommonSettings(redis_url=self.redis_url))
        try:
            version = await RoutingStore(client, "mailkube").replace(table)
        finally:
            await client.aclose()
        _say(f"routing  table version {version}: {len(table.domains)} domain(s), "
             f"{len(table.users)} user(s)")  # fmt: skip

    def _with_dev_dkim_keys(self, table: RoutingTable) -> RoutingTable:
        """Domains of the dev table without a DKIM key get one (selector "dev", RSA), kept in
        .run/dkim/ so that signatures stay verifiable across restarts."""
        domains = []
        for domain in table.domains:
            if not domain.dkim:
                pem = _dev_key(self.run_dir / "dkim" / f"{domain.name}.pem")
                key = DkimKey(selector="dev", algorithm="rsa-sha256", private_key=SecretStr(pem))
                domain = domain.model_copy(update={"dkim": [key]})
                _say(f"dkim     {domain.name} signs with selector dev (key in {self.run_dir}/dkim)")
            domains.append(domain)
        return table.model_copy(update={"domains": domains})

    def _start_component(self, component: Component) -> None:
        env = dict(os.environ)
        env["MAILKUBE_CONFIG"] = str(self.config_file)
        env["MAILKUBE_TELEMETRY_LISTEN"] = f"127.0.0.1:{component.telemetry_port}"
        component.process = subprocess.Popen(
            [sys.executable, "-m", component.module],
            env=env,
            start_new_session=True,
            preexec_fn=follow_this_process(),
        )
        url = f"http://127.0.0.1:{component.telemetry_port}/readyz"
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.stopping.is_set():
            code = component.process.poll()
            if code == 0:
                component.built = False
                component.process = None
                _say(f"{component.name:<8} not built yet: nothing to run")
                return
            if code is not None:
                raise DevError(f"{component.name} exited with status {code} before it was ready")
            if _ready(url):
                _say(f"{component.name:<8} ready  (metrics and health on 127.0.0.1:"
                     f"{component.telemetry_port})")  # fmt: skip
                return
            if time.monotonic() > deadline:
                raise DevError(
                    f"{component.name} was not ready within {READY_TIMEOUT:.0f}s ({url})"
                )
            self.stopping.wait(0.1)

    def supervise(self) -> int:
        """Until Ctrl-C/SIGTERM (0) or a process dies (1)."""
        while not self.stopping.wait(0.5):
            if self.redis is not None and self.redis.poll() is not None:
                _say(f"redis exited with status {self.redis.returncode}; stopping")
                return 1
            rspamd = self.rspamd.process
            if rspamd is not None and rspamd.poll() is not None:
                _say(f"rspamd exited with status {rspamd.returncode} (see "
                     f"{self.rspamd.log_file}); stopping")  # fmt: skip
                return 1
            for component in self.components:
                if component.process is not None and component.process.poll() is not None:
                    _say(f"{component.name} exited with status {component.process.returncode}; "
                         "stopping")  # fmt: skip
                    return 1
        return 0

    def stop(self) -> None:
        for component in self.components:
            if component.process is not None:
                _terminate(component.process, component.name)
        if self.rspamd.process is not None:
            _terminate(self.rspamd.process, "rspamd")
            self.rspamd.process = None
        if self.redis is not None:
            _terminate(self.redis, "redis")
        _say("stopped")

    def print_usage(self) -> None:
        gateway = next(c for c in self.components if c.name == "gateway")
        print(f"""
Mailkube is running locally. Domain example.test, user alice@example.test / alice-password.
{"" if gateway.built else "(The gateway is not built yet, so nothing listens on the SMTP ports.)"}
Send a test mail (install swaks with `apt-get install swaks`; `make run` did):
  # inbound, as another mail server would (MX, port {self.mx_port}):
  swaks --server 127.0.0.1:{self.mx_port} --from someone@remote.test --to alice@example.test
  # submission with STARTTLS and AUTH (port {self.submission_port}):
  swaks --server 127.0.0.1:{self.submission_port} --tls \\
        --tls-verify --tls-ca-path {self.run_dir}/tls/cert.pem \\
        --auth-user alice@example.test --auth-password alice-password \\
        --from alice@example.test --to alice@example.test
  # implicit TLS (port {self.submissions_port}):
  swaks --server 127.0.0.1:{self.submissions_port} --tlsc \\
        --auth-user alice@example.test --auth-password alice-password \\
        --from alice@example.test --to alice@example.test
  # spam: rspamd's GTUBE test line as the body, refused with 554 5.7.1:
  swaks --server 127.0.0.1:{self.mx_port} --from someone@remote.test --to alice@example.test \\
        --body {shlex.quote(GTUBE)}

Mail lands in {self.run_dir}/mail/example.test/alice/new/, with rspamd's verdict in its
header. In another terminal:
  export MAILKUBE_CONFIG={self.config_file}
  export {CONTROLLER_ENV}={self.rspamd.controller_url}
  uv run mailkube queue stats
  uv run mailkube routing show
  # teach rspamd's Bayes filter (files, or maildir folders: their cur/ and new/):
  uv run mailkube spam learn --spam FILE_OR_MAILDIR...   # --ham for wanted mail

Ctrl-C stops everything.
""", flush=True)  # fmt: skip


def _dev_key(path: Path) -> str:
    """The RSA DKIM key at `path`, made on first use (owner-only)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(generate("rsa-sha256"))
    return path.read_text()


def _say(message: str) -> None:
    print(message, flush=True)


def _in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:  # noqa: S310 (loopback)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _terminate(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        _say(f"{name} did not stop within {STOP_TIMEOUT:.0f}s; killing it")
        process.kill()
        process.wait()


def run(args: argparse.Namespace) -> int:
    stack = DevStack(
        Path(args.run_dir),
        Path(args.routing),
        redis_port=args.redis_port,
        mx_port=args.mx_port,
        submission_port=args.submission_port,
        submissions_port=args.submissions_port,
        gateway_telemetry_port=args.gateway_telemetry_port,
        worker_telemetry_port=args.worker_telemetry_port,
        rspamd_port=args.rspamd_port,
        rspamd_controller_port=args.rspamd_controller_port,
        dns=args.dns,
    )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stack.stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        if stack.stopping.is_set():
            return 0
        stack.print_usage()
        return stack.supervise()
    except (DevError, RoutingFileError) as exc:
        print(f"mailkube dev: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


def _resolver(text: str) -> str:
    """IP:PORT or [IPv6]:PORT, for argparse."""
    try:
        host, port = split_host_port(text)
        ipaddress.ip_address(host or "")
        if not 0 < port < 65536:
            raise ValueError(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not IP:PORT: {text!r}") from None
    return text


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = subparsers.add_parser("dev", help="run the whole stack locally in the foreground")
    dev.add_argument("--run-dir", default=".run", help="state directory (default: .run)")
    dev.add_argument("--routing", default="examples/dev-routing.yaml", help="routing table file")
    dev.add_argument("--redis-port", type=int, default=6479)
    for name, default, what in (
        ("mx-port", 2525, "the gateway's MX listener"),
        ("submission-port", 2587, "the gateway's submission listener (STARTTLS)"),
        ("submissions-port", 2465, "the gateway's submissions listener (implicit TLS)"),
        ("gateway-telemetry-port", 9125, "the gateway's /metrics and probes"),
        ("worker-telemetry-port", 9126, "the worker's /metrics and probes"),
    ):
        dev.add_argument(
            f"--{name}", type=int, default=default, help=f"{what} (default: {default})"
        )
    dev.add_argument(
        "--rspamd-port",
        type=int,
        default=RSPAMD_PORT,
        help=f"rspamd's normal worker (default: {RSPAMD_PORT})",
    )
    dev.add_argument(
        "--rspamd-controller-port",
        type=int,
        default=RSPAMD_CONTROLLER_PORT,
        help=f"rspamd's controller (default: {RSPAMD_CONTROLLER_PORT})",
    )
    dev.add_argument(
        "--dns",
        type=_resolver,
        metavar="IP:PORT",
        help="resolver of the gateway, the worker and rspamd (default: the system's)",
    )
