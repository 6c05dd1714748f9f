"""A Redis that fails over, for the tests: a primary, one replica and three `redis-sentinel`
processes (Debian's redis-sentinel), all on free loopback ports (see redis_servers.py).

The sentinels declare the primary down after DOWN_AFTER_MS without an answer, and two of three
must agree (the quorum) before one of them promotes the replica. Every wait is a condition
polled with a deadline: the sentinels see each other and the replica before the group is
ready, and a failover is over once every sentinel names the new primary and it says it is one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import redis
from redis_servers import HOST, RedisServer, wait_for

MASTER = "mailkube"
SENTINELS = 3
QUORUM = 2
DOWN_AFTER_MS = 1000
#: how long a failover may take on a busy 2-core machine: the down detection, the vote, the
#: promotion and every sentinel's news of it
FAILOVER_TIMEOUT = 60.0
READY_TIMEOUT = 60.0


class Sentinel(RedisServer):
    """One redis-sentinel process watching `primary_port` under the name MASTER. It rewrites
    its own configuration file (what it learnt), so the file lives in its data dir."""

    def __init__(self, data_dir: Path, primary_port: int) -> None:
        self.primary_port = primary_port
        super().__init__(data_dir, executable="redis-sentinel")

    def _write_config(self) -> Path:
        path = self.data_dir / "sentinel.conf"
        if path.exists():  # a restart: keep what it learnt (the current primary, its peers)
            return path
        lines = [
            f"bind {HOST}",
            f"port {self.port}",
            f"dir {self.data_dir}",
            "daemonize no",
            f"logfile {self.logfile}",
            f"sentinel monitor {MASTER} {HOST} {self.primary_port} {QUORUM}",
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER} 10000",
            f"sentinel parallel-syncs {MASTER} 1",
        ]
        path.write_text("".join(line + "\n" for line in lines))
        return path

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def master_state(self) -> dict[str, Any] | None:
        client = self.client(socket_timeout=1, decode_responses=True)
        try:
            return dict(client.sentinel_master(MASTER))
        except redis.RedisError:
            return None
        finally:
            client.close()

    def primary_address(self) -> tuple[str, int] | None:
        client = self.client(socket_timeout=1, decode_responses=True)
        try:
            found = client.sentinel_get_master_addr_by_name(MASTER)
        except redis.RedisError:
            return None
        finally:
            client.close()
        return (str(found[0]), int(found[1])) if found else None


class SentinelGroup:
    """A primary, one replica and three sentinels. `servers` keeps both Redis servers, whatever
    their role now: a failover swaps them."""

    def __init__(self, base_dir: Path | str, *, appendfsync: str = "always") -> None:
        self.base_dir = Path(base_dir)
        primary = RedisServer(self.base_dir / "redis0", appendfsync=appendfsync)
        replica = RedisServer(
            self.base_dir / "redis1",
            appendfsync=appendfsync,
            config={"replicaof": f"{HOST} {primary.port}"},
        )
        self.servers = [primary, replica]
        self.sentinels = [
            Sentinel(self.base_dir / f"sentinel{index}", primary.port) for index in range(SENTINELS)
        ]

    @property
    def addresses(self) -> list[str]:
        """The sentinels, as redis_sentinels wants them."""
        return [sentinel.address for sentinel in self.sentinels]

    def settings(self) -> dict[str, Any]:
        """Mailkube settings that reach this group's primary through its sentinels (with any
        redis_url: its host and port are not used)."""
        return {
            "redis_sentinels": self.addresses,
            "redis_sentinel_master": MASTER,
        }

    def server_at(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def primary(self) -> RedisServer:
        """The server the sentinels name as the primary now."""
        address = self.sentinels[0].primary_address() or self.sentinels[1].primary_address()
        assert address is not None, "no sentinel answers"
        return self.server_at(address[1])

    def replica(self) -> RedisServer:
        primary = self.primary()
        return next(server for server in self.servers if server is not primary)

    def _role(self, server: RedisServer) -> str | None:
        client = server.client(socket_timeout=1, decode_responses=True)
        try:
            return str(client.info("replication").get("role"))
        except redis.RedisError:
            return None
        finally:
            client.close()

    def _replica_online(self, primary: RedisServer) -> bool:
        client = primary.client(socket_timeout=1, decode_responses=True)
        try:
            info = client.info("replication")
        except redis.RedisError:
            return False
        finally:
            client.close()
        return info.get("role") == "master" and "online" in str(info.get("slave0", ""))

    def _watched(self) -> bool:
        """Every sentinel sees the other two and the replica, and the primary as up."""
        for sentinel in self.sentinels:
            state = sentinel.master_state()
            if state is None or int(state.get("num-other-sentinels", 0)) != SENTINELS - 1:
                return False
            if int(state.get("num-slaves", 0)) < 1 or "down" in str(state.get("flags", "")):
                return False
        return True

    def start(self, timeout: float = READY_TIMEOUT) -> SentinelGroup:
        try:
            for server in self.servers:
                server.start()
            wait_for(lambda: self._replica_online(self.servers[0]), timeout, "replica in sync")
            for sentinel in self.sentinels:
                sentinel.start()
            wait_for(self._watched, timeout, "sentinels that see each other and the replica")
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Back to two servers in sync: the primary has its replica online, and every
        sentinel sees both (after a restart of a killed server, which comes back as a
        replica)."""
        wait_for(lambda: self._replica_online(self.primary()), timeout, "replica in sync")
        wait_for(self._watched, timeout, "sentinels that see the replica")

    def wait_for_failover(self, old: RedisServer, timeout: float = FAILOVER_TIMEOUT) -> RedisServer:
        """Until every sentinel names another server than `old`, and it says it is the
        primary. Returns it."""

        def promoted() -> bool:
            named = {sentinel.primary_address() for sentinel in self.sentinels}
            if len(named) != 1 or None in named:
                return False
            (address,) = named
            assert address is not None
            return address[1] != old.port and self._role(self.server_at(address[1])) == "master"

        wait_for(promoted, timeout, f"a failover away from {old.url}", interval=0.05)
        return self.primary()

    def kill_primary(self) -> RedisServer:
        """SIGKILL of the primary (a crash; the sentinels will promote the replica)."""
        primary = self.primary()
        primary.kill()
        return primary

    def failover(self) -> RedisServer:
        """SENTINEL FAILOVER: the sentinels promote the replica, then demote the primary, which
        stays up (its clients see READONLY). Returns the new primary once the old one is its
        replica (between the two steps, the old one still takes writes: they are lost when
        it resyncs from the new one)."""
        old = self.primary()
        client = self.sentinels[0].client(socket_timeout=5)
        try:
            client.sentinel_failover(MASTER)
        finally:
            client.close()
        new = self.wait_for_failover(old)
        wait_for(lambda: self._role(old) == "slave", FAILOVER_TIMEOUT, f"{old.url} demoted")
        return new

    def stop(self) -> None:
        for process in (*self.sentinels, *self.servers):
            with contextlib.suppress(Exception):
                process.stop()

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
