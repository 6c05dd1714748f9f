"""`mailkube dev`, the local stack behind `make run`: Redis, rspamd, the routing table, the
gateway and the worker come up, and nothing of it outlives the command, whether it is stopped
with Ctrl-C or killed.

The stack runs on free ports for Redis and rspamd (the gateway's and worker's are fixed), with
every DNS lookup on the loopback DNS server. Both tests share one state directory, so the
second start finds rspamd's compiled rules (the first one compiles them, about 10 s)."""

from __future__ import annotations

import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import yaml
from gateway_harness import free_port, loopback_dns, wait_until

from mailkube_core.cli import dev as dev_command
from mailkube_core.cli import rspamd_local
from mailkube_core.cli.main import build_parser
from mailkube_core.cli.rspamd_local import GTUBE

MAILKUBE = [sys.executable, "-m", "mailkube_core.cli.main"]
REPO = Path(__file__).resolve().parents[2]
#: the first start compiles rspamd's rules: ~10 s alone, more on a busy machine
START_TIMEOUT = 120.0


@dataclass
class Dev:
    run_dir: Path
    process: subprocess.Popen[str]
    redis_port: int
    rspamd_port: int
    controller_port: int
    mx_port: int
    sessions: set[int] = field(default_factory=set)
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def read_until(self, prefix: str, timeout: float = START_TIMEOUT) -> str:
        """Output up to the line starting with `prefix`; fails at the deadline or at EOF."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} within {timeout}s:\n{''.join(seen)}") from None
            if line is None:
                raise AssertionError(f"mailkube dev ended before {prefix!r}:\n{''.join(seen)}")
            seen.append(line)
            if line.startswith(prefix):
                return "".join(seen)

    def rest(self, timeout: float = 30) -> str:
        self.process.wait(timeout)
        lines = []
        while (line := self.lines.get(timeout=timeout)) is not None:
            lines.append(line)
        return "".join(lines)

    def started(self) -> list[int]:
        """The processes of the stack, once it is up (remembered for the end)."""
        self.sessions |= _sessions(self.process.pid)
        return _left_behind(self.sessions)

    def ports(self) -> list[int]:
        return [self.redis_port, self.rspamd_port, self.controller_port]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dev") / "run"


@pytest.fixture
def dev(run_dir: Path) -> Iterator[Dev]:
    dns = loopback_dns()
    ports = free_port(), free_port(), free_port()
    mx = free_port()
    process = subprocess.Popen(
        [*MAILKUBE, "dev", "--run-dir", str(run_dir), "--redis-port", str(ports[0]),
         "--rspamd-port", str(ports[1]), "--rspamd-controller-port", str(ports[2]),
         "--mx-port", str(mx), "--submission-port", str(free_port()),
         "--submissions-port", str(free_port()),
         "--gateway-telemetry-port", str(free_port()),
         "--worker-telemetry-port", str(free_port()),
         "--dns", f"{dns.host}:{dns.port}", "--routing", str(REPO / "examples/dev-routing.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env=_clean_env(),
    )  # fmt: skip
    stack = Dev(run_dir, process, *ports, mx_port=mx)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            stack.lines.put(line)
        stack.lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield stack
    finally:
        if process.poll() is None:
            stack.started()  # what is up now must be gone after
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        # whatever happened in the test, nothing it started may stay behind
        sessions = stack.sessions
        wait_until(lambda: not _left_behind(sessions), 30, "the dev stack's processes to end")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}


def _stat(pid: str) -> tuple[int, int] | None:
    """(parent pid, session id) of a process; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold ")"
    return int(fields[1]), int(fields[3])


def _processes() -> dict[int, tuple[int, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(entry.name)) is not None:
            found[int(entry.name)] = stat
    return found


def _sessions(parent: int) -> set[int]:
    """The sessions of `parent`'s children: dev starts each server in a session of its own
    (rspamd's workers in rspamd's), and renaming processes, as rspamd and Redis do, keeps it."""
    return {session for ppid, session in _processes().values() if ppid == parent}


def _left_behind(sessions: set[int]) -> list[int]:
    return [pid for pid, (_, session) in _processes().items() if session in sessions]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _cli(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MAILKUBE, *args], env={**_clean_env(), "MAILKUBE_CONFIG": str(config), **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_dev_brings_up_redis_rspamd_and_the_routing_table_and_stops_on_ctrl_c(
    dev: Dev, tmp_path: Path
) -> None:
    compiled = any((dev.run_dir / "rspamd" / "db").glob("*.hsmp"))
    output = dev.read_until("Ctrl-C stops everything")
    assert len(dev.started()) >= 6  # redis, rspamd (main, normal, controller), gateway, worker
    run_dir = dev.run_dir
    assert f"redis    ready  redis://127.0.0.1:{dev.redis_port}/0" in output
    assert ("rspamd   compiling its rules" in output) is not compiled
    assert f"rspamd   ready  http://127.0.0.1:{dev.rspamd_port}" in output
    # rspamd is ready before the gateway starts
    assert output.index("rspamd   ready") < output.index("routing  table version")
    assert "routing  table version 1: 1 domain(s), 1 user(s)" in output
    assert "dkim     example.test signs with selector dev" in output
    assert (run_dir / "dkim/example.test.pem").stat().st_mode & 0o077 == 0
    assert f"swaks --server 127.0.0.1:{dev.mx_port}" in output
    assert (run_dir / "tls/cert.pem").exists()
    assert (run_dir / "redis/appendonlydir").is_dir()

    # the GTUBE example pastes into a shell as one argument, the GTUBE line itself
    [gtube_line] = [line for line in output.splitlines() if "--body" in line]
    assert shlex.split(gtube_line) == ["--body", GTUBE]
    assert "554 5.7.1" in output

    config = run_dir / "mailkube.yaml"
    settings = yaml.safe_load(config.read_text())
    assert settings["rspamd_url"] == f"http://127.0.0.1:{dev.rspamd_port}"
    dns = loopback_dns()
    assert settings["dns_nameservers"] == [dns.host]
    assert settings["dns_port"] == dns.port
    with urllib.request.urlopen(f"{settings['rspamd_url']}/ping", timeout=5) as response:
        assert response.read().strip() == b"pong"

    stats = _cli(config, "queue", "stats")
    assert stats.returncode == 0, stats.stderr
    assert "0 message(s)" in stats.stdout
    show = _cli(config, "routing", "show")
    assert "dev/rsa" in show.stdout, show.stdout  # the dev key signs example.test

    # learning as printed: the controller from the exported variable; Bayes data in the dev
    # Redis's database 1, Mailkube's own in 0
    controller = f"http://127.0.0.1:{dev.controller_port}"
    assert f"export MAILKUBE_RSPAMD_CONTROLLER_URL={controller}" in output
    assert "mailkube spam learn --spam" in output
    words = " ".join(f"offer{n} discount{n % 7} pharmacy{n % 5}" for n in range(40))
    spam = tmp_path / "spam.eml"
    spam.write_text(
        f"From: a@remote.test\nSubject: deal\nMessage-ID: <s1@remote.test>\n\n{words}\n"
    )
    learned = _cli(config, "spam", "learn", "--spam", str(spam),
                   MAILKUBE_RSPAMD_CONTROLLER_URL=controller)  # fmt: skip
    assert learned.returncode == 0, learned.stdout + learned.stderr
    assert "1 learned as spam" in learned.stdout
    for db, holds in ((1, 1), (0, 0)):
        client = redis.Redis(port=dev.redis_port, db=db)
        try:
            assert client.exists("BAYES_SPAM_keys") == holds
        finally:
            client.close()

    dev.process.send_signal(signal.SIGINT)
    rest = dev.rest()
    assert dev.process.returncode == 0, rest
    assert "stopped" in rest
    assert not any(_listening(port) for port in dev.ports())
    assert _left_behind(dev.sessions) == []


def test_dev_killed_leaves_no_server_behind(dev: Dev) -> None:
    """SIGKILL gives dev no chance to stop anything: its servers follow it on their own."""
    compiled = any((dev.run_dir / "rspamd" / "db").glob("*.hsmp"))
    output = dev.read_until("Ctrl-C stops everything")
    # a start that finds compiled rules says nothing of compiling them
    assert ("rspamd   compiling its rules" in output) is not compiled
    assert len(dev.started()) >= 6  # redis, rspamd (main, normal, controller), gateway, worker
    assert all(_listening(port) for port in dev.ports())

    dev.process.kill()
    wait_until(lambda: not _left_behind(dev.sessions), 30, "every process of the stack to end")
    assert not any(_listening(port) for port in dev.ports())


def test_dev_refuses_an_rspamd_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*MAILKUBE, "dev", "--run-dir", str(tmp_path / "run"),
             "--redis-port", str(free_port()), "--rspamd-port", str(free_port()),
             "--rspamd-controller-port", str(port), "--mx-port", str(free_port()),
             "--submission-port", str(free_port()), "--submissions-port", str(free_port()),
             "--gateway-telemetry-port", str(free_port()),
             "--worker-telemetry-port", str(free_port())],
            env=_clean_env(), capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in result.stderr


def test_dev_without_rspamd_says_how_to_install_it_and_stops_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(rspamd_local, "STOCK_CONFIG", tmp_path / "no-rspamd" / "rspamd.conf")
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # pytest keeps its handlers
    redis_port = free_port()
    args = build_parser().parse_args(
        ["dev", "--run-dir", str(tmp_path / "run"), "--redis-port", str(redis_port),
         "--rspamd-port", str(free_port()), "--rspamd-controller-port", str(free_port()),
         "--mx-port", str(free_port()), "--submission-port", str(free_port()),
         "--submissions-port", str(free_port()), "--gateway-telemetry-port", str(free_port()),
         "--worker-telemetry-port", str(free_port()),
         "--routing", str(REPO / "examples/dev-routing.yaml")]
    )  # fmt: skip
    assert dev_command.run(args) == 1
    output = capsys.readouterr()
    assert "mailkube dev: rspamd is not installed (`make setup`, or `make run`" in output.err
    assert f"redis    ready  redis://127.0.0.1:{redis_port}/0" in output.out
    assert "stopped" in output.out
    assert not _listening(redis_port)
