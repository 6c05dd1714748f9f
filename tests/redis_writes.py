"""What the gateway's shared Redis connection (mailkube_core.redis_multiplexed.MultiplexedRedis)
writes: tests count the writes of a step to show it costs one round trip."""

from __future__ import annotations

from typing import Any


class _Recorder:
    def __init__(self, transport: Any, writes: list[bytes]) -> None:
        self.transport = transport
        self.writes = writes

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        self.writes.append(b"".join(data))  # one write, as the transport makes it
        self.transport.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def record_writes(redis: Any) -> list[bytes]:
    """Each write the open shared connection of `redis` sends from now on, in order."""
    connection = redis.shared_connection
    assert connection is not None, "open the shared connection first (one command)"
    writes: list[bytes] = []
    connection.transport = _Recorder(connection.transport, writes)
    return writes
