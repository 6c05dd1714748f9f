"""The memory of all sessions in DATA under one limit (data_memory.py): shares taken and given
back, the DATA reader dropping a message whose share cannot grow, the limit derived from the
container's cgroup, the setting checked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailkube_core.settings import GatewaySettings
from mailkube_gateway.data import DataStatus, read_data, wire_allowance
from mailkube_gateway.data_memory import (
    UNCONSTRAINED_LIMIT,
    DataMemory,
    container_memory_limit,
    data_memory_limit,
)


def test_shares_are_taken_up_to_the_limit_and_given_back() -> None:
    memory = DataMemory(100)
    with memory.hold() as one, memory.hold() as two:
        assert one.grow(60)
        assert not two.grow(50)  # would pass the limit: refused, the share given back
        assert two.refused
        assert not two.grow(1)  # a refused share stays refused
        assert memory.held == 60
        assert two.size == 0
        assert one.grow(40)
        assert memory.held == 100
    assert memory.held == 0
    assert memory.peak == 100
    assert memory.refusals == 1


def test_a_share_is_given_back_when_its_session_fails() -> None:
    memory = DataMemory(100)

    def session() -> None:
        with memory.hold() as hold:
            hold.grow(70)
            raise ConnectionResetError

    with pytest.raises(ConnectionResetError):
        session()
    assert memory.held == 0


async def test_a_share_is_given_back_when_its_task_is_cancelled() -> None:
    memory = DataMemory(100)
    reader = asyncio.StreamReader()
    reader.feed_data(b"x" * 50)

    async def session() -> None:
        with memory.hold() as hold:
            await read_data(reader, lambda _: None, limit=1000, hold=hold)

    task = asyncio.create_task(session())
    while memory.held != 50:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert memory.held == 0


async def read(wire: bytes, memory: DataMemory, pieces: int = 10) -> tuple[DataStatus, int]:
    """Read `wire` in a session of its own: the status, and the bytes its share held."""
    reader = asyncio.StreamReader()
    step = max(1, len(wire) // pieces)
    for start in range(0, len(wire), step):
        reader.feed_data(wire[start : start + step])
    reader.feed_eof()
    unread: list[bytes] = []
    with memory.hold() as hold:
        result = await read_data(reader, unread.append, limit=10_000, hold=hold)
        held = hold.size
    assert unread == [b"QUIT\r\n"]
    return result.status, held


async def test_the_reader_counts_what_it_holds_and_drops_what_does_not_fit() -> None:
    memory = DataMemory(2_000)
    # fits: held until the caller gives it back
    wire = b"a" * 1_000 + b"\r\n.\r\nQUIT\r\n"
    assert await read(wire, memory) == (DataStatus.OK, len(wire))
    assert memory.held == 0
    # does not fit beside another session's 1500 bytes: dropped, the end still found
    with memory.hold() as other:
        assert other.grow(1_500)
        assert await read(b"b" * 1_000 + b"\r\n.\r\nQUIT\r\n", memory) == (
            DataStatus.NO_MEMORY, 0
        )  # fmt: skip
        assert memory.held == 1_500
    assert memory.held == 0
    assert memory.peak <= memory.limit
    assert memory.refusals == 1


async def test_too_big_gives_its_share_back_at_once() -> None:
    memory = DataMemory(10**6)
    reader = asyncio.StreamReader()
    reader.feed_data(b"z" * 30_000)
    with memory.hold() as hold:
        task = asyncio.create_task(read_data(reader, lambda _: None, limit=1_000, hold=hold))
        while not task.done() and reader._buffer:  # type: ignore[attr-defined]
            await asyncio.sleep(0)
        assert memory.held == 0  # past the size limit: dropped as it comes, nothing held
        reader.feed_data(b"\r\n.\r\n")
        assert (await task).status is DataStatus.TOO_BIG


def cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    return root, tmp_path / "proc_cgroup"


@pytest.mark.parametrize(
    ("proc", "files", "limit"),
    [
        # cgroup v2 inside a container (its own namespace: the root is its cgroup)
        ("0::/\n", {"memory.max": "536870912\n"}, 536870912),
        ("0::/\n", {"memory.max": "max\n"}, None),
        # cgroup v2, the process's cgroup by path
        (
            "0::/kubepods/pod1/c1\n",
            {"kubepods/pod1/c1/memory.max": "1073741824\n", "memory.max": "max\n"},
            1073741824,
        ),
        # cgroup v1: the container's cgroup mounted as the root, or found by path
        ("4:memory:/docker/abc\n", {"memory/memory.limit_in_bytes": "268435456\n"}, 268435456),
        ("4:memory:/a\n", {"memory/a/memory.limit_in_bytes": "9223372036854771712\n"}, None),
        ("5:cpu,memory:/a\n", {"memory/a/memory.limit_in_bytes": "1048576\n"}, 1048576),
        # nothing readable
        ("", {}, None),
        ("garbage\n", {"memory.max": "lots\n"}, None),
    ],
)
def test_container_memory_limit(
    tmp_path: Path, proc: str, files: dict[str, str], limit: int | None
) -> None:
    root, proc_file = cgroup(tmp_path, proc, files)
    assert container_memory_limit(root, proc_file) == limit


def test_container_memory_limit_without_proc(tmp_path: Path) -> None:
    assert container_memory_limit(tmp_path, tmp_path / "missing") is None


def test_the_limit_is_the_setting_or_a_share_of_the_container() -> None:
    floor = wire_allowance(26214400)
    assert data_memory_limit(25 * 2**20, floor, 1, None) == floor  # the setting, floored
    assert data_memory_limit(100 * 2**20, floor, 1, 2**30) == 100 * 2**20
    assert data_memory_limit(None, floor, 1, None) == UNCONSTRAINED_LIMIT
    # an eighth of the pod's 512Mi, shared by its processes
    assert data_memory_limit(None, floor, 1, 512 * 2**20) == 64 * 2**20
    assert data_memory_limit(None, floor, 2, 1024 * 2**20) == 64 * 2**20
    # a pod too small for one message: one message at a time rather than none
    assert data_memory_limit(None, floor, 4, 512 * 2**20) == floor


def test_the_setting_must_hold_one_message() -> None:
    s = GatewaySettings(hostname="mx.test", data_memory_limit="100MiB", max_message_size="25MiB")
    assert s.data_memory_limit == 100 * 2**20
    assert GatewaySettings(hostname="mx.test").data_memory_limit is None
    with pytest.raises(ValueError, match="data_memory_limit must be at least max_message_size"):
        GatewaySettings(hostname="mx.test", data_memory_limit="10MiB", max_message_size="25MiB")
