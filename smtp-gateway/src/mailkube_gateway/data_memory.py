"""The memory all sessions of a process hold in DATA, together, under one limit.

A message is held in memory from its first byte until it is queued (or refused): up to
max_message_size per session, whatever SIZE= said. Without a limit on all of them together,
enough clients sending big messages at once get the pod OOM-killed, and with it every session
and every message in flight. So each session in DATA holds a share (`DataHold`) of the
process's `DataMemory`, grown as its bytes arrive; a session whose next bytes would pass the
limit gets 452 4.3.1 (RFC 3463: mail system full) and its data is dropped, while the others go
on. A share is given back when the session's message is done, however it ends.

Counted: the bytes of the message as received, once. The process needs more than that while
a message is checked and queued (the unstuffed copy, the body with its Received field, the
Redis command, socket buffers): measured, a process peaked at about 3.5 times its limit above
its own ~80 MB when every session finished at once; docs/gateway.md says how to size it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

#: the limit when the container has no memory limit (and the setting is unset)
UNCONSTRAINED_LIMIT = 256 * 1024 * 1024
#: the share (1/N) of the container's memory limit that messages in DATA may hold, together,
#: in all of its gateway processes (the rest: the processes themselves and the copies made
#: while a message is checked and queued)
CONTAINER_SHARE = 8
#: cgroup memory limits at or above this mean "none" (cgroup v1 writes 2^63 rounded to a page)
_NO_LIMIT = 1 << 60


class DataMemory:
    """Bytes held by the sessions of this process in DATA, against `limit`. One event loop
    uses it, so no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        #: the most ever held at once (for tests and a metric)
        self.peak = 0
        #: sessions refused for want of memory
        self.refusals = 0

    def hold(self) -> DataHold:
        return DataHold(self)

    def _take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        self.peak = max(self.peak, self.held)
        return True

    def _give(self, size: int) -> None:
        self.held -= size


class DataHold:
    """One session's share of the process's DataMemory; a context manager that gives it back
    on the way out, however the session leaves."""

    def __init__(self, memory: DataMemory) -> None:
        self.memory = memory
        self.size = 0
        self.refused = False

    def grow(self, size: int) -> bool:
        """Take `size` more bytes; False, with the whole share given back, when they would
        pass the limit (the session's data is to be dropped)."""
        if self.refused:
            return False
        if self.memory._take(size):
            self.size += size
            return True
        self.refused = True
        self.memory.refusals += 1
        self.release()
        return False

    def release(self) -> None:
        """Give the whole share back (idempotent)."""
        if self.size:
            self.memory._give(self.size)
            self.size = 0

    def __enter__(self) -> DataHold:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def container_memory_limit(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The memory limit of this process's container (cgroup v2 memory.max, or v1
    memory.limit_in_bytes), in bytes; None when there is none or it cannot be read."""
    paths: list[str] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "":  # v2: "0::/path"
            paths.append(f"{path.lstrip('/')}/memory.max")
        elif "memory" in controllers.split(","):  # v1: "4:memory:/path"
            paths.append(f"memory/{path.lstrip('/')}/memory.limit_in_bytes")
    # the process's own cgroup first; inside a container, its cgroup is usually the root
    paths += ["memory.max", "memory/memory.limit_in_bytes"]
    for relative in paths:
        try:
            text = (cgroup_root / relative).read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        if text.isdigit():
            value = int(text)
            return value if value < _NO_LIMIT else None
    return None


def data_memory_limit(
    configured: int | None, floor: int, processes: int, container: int | None
) -> int:
    """The limit of one process: `configured` (data_memory_limit) when set; otherwise a
    CONTAINER_SHARE-th of the container's memory limit shared by its processes, or
    UNCONSTRAINED_LIMIT without one. Never below `floor`, what the biggest message the gateway
    accepts may hold while it is read: it must fit in an otherwise idle process."""
    if configured is not None:
        return max(configured, floor)
    if container is None:
        derived = UNCONSTRAINED_LIMIT
    else:
        derived = container // CONTAINER_SHARE // processes
    if derived < floor:
        log.warning(
            "the container's memory limit leaves less than max_message_size for messages in "
            "DATA; set data_memory_limit or give the pod more memory",
            extra={"container_limit": container, "processes": processes, "floor": floor},
        )
        return floor
    return derived
