"""Private redis-server processes for the test suite: one standalone server or a 3-node Cluster.

Every server binds 127.0.0.1 on a free port outside the kernel's ephemeral range (so an
outgoing connection cannot take the port between a kill and a restart), never 6379, and is
killed when the process that started it dies (PR_SET_PDEATHSIG on Linux), on interpreter exit,
and by the fixtures' finalizers. Waiting is polling with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis
import redis.cluster

from mailkube_core import parent_death

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
CLUSTER_TIMEOUT = 30.0
CLUSTER_BUS_OFFSET = 10000
CLUSTER_SLOTS = 16384

_live: set[RedisServer] = set()
_live_lock = threading.Lock()


class RedisStartError(RuntimeError):
    pass


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A port that is free now; with cluster_bus, port + 10000 is free too."""
    offset = CLUSTER_BUS_OFFSET if cluster_bus else 0
    low, high = (12000 if cluster_bus else 20000), _ephemeral_low() - offset
    if high - low < 1000:  # an unusual ephemeral range: take any unprivileged port
        low, high = 1024, 65536 - offset
    for _ in range(1000):
        port = random.randrange(low, high)
        if port == 6379:
            continue
        if _bindable(port) and (not cluster_bus or _bindable(port + CLUSTER_BUS_OFFSET)):
            return port
    raise RedisStartError("no free port found")


def ping(url: str, timeout: float = 0.5) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:  # refused, timed out, or still loading the AOF
        return False
    finally:
        client.close()


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll condition until it is true; raise TimeoutError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """One redis-server process: AOF on, RDB snapshots off, logs in its data dir."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        appendfsync: str = "always",
        config: dict[str, str] | None = None,
        cluster_bus: bool = False,
        executable: str = "redis-server",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendfsync = appendfsync
        self.extra_config = dict(config or {})
        self.cluster_bus = cluster_bus
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(cluster_bus=cluster_bus)
        found = shutil.which(executable)
        if found is None:
            raise RedisStartError(f"{executable} not found on PATH (run `make setup`)")
        self.executable = found
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def logfile(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, **options)

    def _write_config(self) -> Path:
        settings = {
            "bind": HOST,
            "port": str(self.port),
            "dir": str(self.data_dir),
            "daemonize": "no",
            "logfile": str(self.logfile),
            "appendonly": "yes",
            "appendfsync": self.appendfsync,
            "save": '""',
            **self.extra_config,
        }
        path = self.data_dir / "redis.conf"
        path.write_text("".join(f"{key} {value}\n" for key, value in settings.items()))
        return path

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _spawn(self) -> None:
        conf = self._write_config()
        self.process = subprocess.Popen(
            [self.executable, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=parent_death.preexec(signal.SIGKILL),
        )
        with _live_lock:
            _live.add(self)

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start (or restart) and wait until PING answers.

        If the port is taken: a server that chose its port picks another one; one bound to a
        port (a restart, or port= given) retries the same port until the deadline.
        """
        if self.running:
            return self
        deadline = time.monotonic() + timeout
        while True:
            self._spawn()
            assert self.process is not None
            while self.process.poll() is None:
                if ping(self.url, timeout=0.2):
                    return self
                if time.monotonic() >= deadline:
                    self.kill()
                    raise RedisStartError(
                        f"redis-server on port {self.port} did not answer PING within "
                        f"{timeout:g}s; log:\n{self._log_tail()}"
                    )
                time.sleep(0.01)
            # The process exited on its own.
            with _live_lock:
                _live.discard(self)
            log = self._log_tail()
            busy = "Address already in use" in log or "Could not create server TCP" in log
            if not busy or time.monotonic() >= deadline:
                raise RedisStartError(
                    f"redis-server on port {self.port} exited with {self.process.returncode}; "
                    f"log:\n{log}"
                )
            if not self._fixed_port:
                self.port = free_port(cluster_bus=self.cluster_bus)
            else:
                time.sleep(0.05)

    def restart(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start again on the same port and data dir (after kill() or stop())."""
        if self.running:
            self.stop()
        self._fixed_port = True
        return self.start(timeout)

    def _wait(self, timeout: float) -> None:
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with _live_lock:
            _live.discard(self)

    def kill(self) -> None:
        """SIGKILL: a crash. Whatever is not in the AOF is lost."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self._wait(STOP_TIMEOUT)
        self._fixed_port = True

    def freeze(self) -> None:
        """SIGSTOP: a hung Redis. Connections stay open and connects still complete (the
        kernel accepts them), but nothing is answered until thaw()."""
        assert self.process is not None
        assert self.process.poll() is None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: Redis goes on with whatever was sent to it meanwhile."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM and wait (SIGKILL if it does not exit within timeout)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.thaw()  # a frozen server would not see the SIGTERM
        self._wait(timeout)
        self._fixed_port = True

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state} dir={self.data_dir}>"


@dataclass(frozen=True)
class ExternalRedis:
    """A Redis given by REDIS_URL: the suite uses it but does not control the process."""

    url: str


class RedisCluster:
    """Three masters, no replicas, all 16384 slots assigned, every node reporting cluster ok."""

    def __init__(
        self,
        base_dir: Path | str,
        *,
        masters: int = 3,
        appendfsync: str = "always",
        node_timeout_ms: int = 5000,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.nodes = [
            RedisServer(
                self.base_dir / f"node{index}",
                appendfsync=appendfsync,
                cluster_bus=True,
                config={
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-node-timeout": str(node_timeout_ms),
                },
            )
            for index in range(masters)
        ]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def client(self, **options: Any) -> redis.cluster.RedisCluster:
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in self.startup_nodes]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **options)

    def _healthy(self, node: RedisServer) -> bool:
        client = node.client(socket_timeout=1, decode_responses=True)
        try:
            info = client.execute_command("CLUSTER INFO")
        except redis.RedisError:
            return False
        finally:
            client.close()
        # redis-py parses the reply into a dict; older versions hand back the raw text.
        if isinstance(info, dict):
            fields = {str(key): str(value) for key, value in info.items()}
        else:
            text = info.decode() if isinstance(info, bytes) else str(info)
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_slots_assigned") == str(CLUSTER_SLOTS)
            and fields.get("cluster_known_nodes") == str(len(self.nodes))
        )

    def start(self, timeout: float = CLUSTER_TIMEOUT) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RedisStartError("redis-cli not found on PATH (run `make setup`)")
            create = subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"{HOST}:{node.port}" for node in self.nodes),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if create.returncode != 0:
                raise RedisStartError(
                    f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}"
                )
            for node in self.nodes:
                wait_for(partial(self._healthy, node), timeout, f"cluster_state:ok on {node.url}")
        except BaseException:
            self.stop()
            raise
        return self

    def flushall(self) -> None:
        for node in self.nodes:
            client = node.client()
            try:
                client.flushall()
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def kill_all() -> None:
    """Last resort at interpreter exit: nothing this module started outlives the run."""
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.kill()


atexit.register(kill_all)
