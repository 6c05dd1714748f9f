"""`processes: 2`: two gateway processes serve the same listening sockets (the extra one
inherits them), each accepts mail, a process that cannot take connections is not handed any,
and SIGTERM stops both within the grace period, the second at once (not after the first has
finished its own sessions).

Which process serves a connection is read from /proc: the server end of the TCP connection
is a socket inode, held open by exactly one of the two processes. Which one takes it is the
one that is awake: the others are held with SIGSTOP while it connects."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from conditions import eventually
from gateway_harness import (
    ALICE,
    GatewayProcess,
    RawClient,
    apply_routing,
    make_tls,
    message,
    serving_pids,
    start_gateway_process,
    stop_gateway_process,
)

from mailkube_core.queue import QueueAdmin
from mailkube_core.redis_client import connect_redis
from mailkube_core.settings import CommonSettings


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_inodes(*, local_port: int, remote_port: int | None = None, state: str) -> set[str]:
    """Inodes of IPv4 TCP sockets on 127.0.0.1 in `state` (0A listen, 01 established)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, st, inode = fields[1], fields[2], fields[3], fields[9]
        if st != state or int(local.split(":")[1], 16) != local_port:
            continue
        if remote_port is None or int(remote.split(":")[1], 16) == remote_port:
            found.add(inode)
    return found


def listening_pids(gateway: GatewayProcess) -> set[int]:
    """The processes serving the mx listener (not merely holding its inherited socket)."""
    return serving_pids(gateway.mx, [gateway.process.pid, *children(gateway.process.pid)])


def serving_pid(gateway: GatewayProcess, client: RawClient) -> int:
    client_port = client.writer.get_extra_info("sockname")[1]
    (inode,) = tcp_inodes(local_port=gateway.mx, remote_port=client_port, state="01")
    for pid in [gateway.process.pid, *children(gateway.process.pid)]:
        if inode in socket_inodes(pid):
            return pid
    raise AssertionError("no gateway process holds the connection")


async def connection_to(gateway: GatewayProcess, pid: int) -> RawClient:
    """A greeted connection served by process `pid`: the other processes are stopped
    (SIGSTOP) until it is greeted, so only `pid` can take it from the shared accept queue."""
    others = [p for p in (gateway.process.pid, *children(gateway.process.pid)) if p != pid]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        client = await RawClient.connect(gateway.mx)
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)
    assert serving_pid(gateway, client) == pid
    return client


async def queued(redis_url: str) -> int:
    client = connect_redis(CommonSettings(redis_url=redis_url))
    try:
        return (await QueueAdmin(client).stats()).messages
    finally:
        await client.aclose()


async def send(client: RawClient) -> str:
    await client.command("EHLO client.test")
    await client.command("MAIL FROM:<someone@remote.test>")
    await client.command(f"RCPT TO:<{ALICE}>")
    await client.command("DATA")
    return await client.command(message().encode() + b".")


async def both_listening(gateway: GatewayProcess) -> tuple[int, int]:
    async def probe() -> tuple[int, int] | None:
        pids = listening_pids(gateway)
        if len(pids) != 2:
            return None
        child = (pids - {gateway.process.pid}).pop()
        return gateway.process.pid, child

    found = await eventually(probe, timeout=30)
    assert found is not None
    return found


async def test_two_processes_accept_mail_and_stop_together_on_sigterm(
    redis_url: str, tmp_path: Path
) -> None:
    await apply_routing(redis_url)
    tls = make_tls(tmp_path / "tls")
    gateway = start_gateway_process(
        redis_url, tls, MAILKUBE_PROCESSES="2", MAILKUBE_SHUTDOWN_GRACE="20s"
    )
    try:
        parent, child = await both_listening(gateway)
        for pid in (parent, child):
            client = await connection_to(gateway, pid)
            reply = await send(client)
            assert reply.startswith("250 2.0.0 Ok: queued as "), reply
            assert (await client.command("QUIT")).startswith("221")
            await client.close()
        assert await queued(redis_url) == 2

        # SIGTERM while the parent receives a message: the child's idle session is told
        # 421 at once, not after the parent's message is done
        busy = await connection_to(gateway, parent)
        idle = await connection_to(gateway, child)
        await busy.command("EHLO client.test")
        await busy.command("MAIL FROM:<someone@remote.test>")
        await busy.command(f"RCPT TO:<{ALICE}>")
        assert (await busy.command("DATA")).startswith("354")
        await busy.send(b"From: a@remote.test\r\nSubject: slow\r\n\r\nfirst half\r\n")
        gateway.process.send_signal(signal.SIGTERM)
        assert (await idle.reply(timeout=10)).startswith("421 4.3.2")
        assert await idle.closed()
        await busy.send(b"second half\r\n.\r\n")
        assert (await busy.reply()).startswith("250 2.0.0 Ok: queued as ")
        assert (await busy.reply()).startswith("421 4.3.2")
        code = await asyncio.to_thread(gateway.process.wait, 30)
        assert code == 0
        assert _gone(child)  # the parent waited for it
        assert await queued(redis_url) == 3
    finally:
        _, stderr = stop_gateway_process(gateway)
    assert "Traceback" not in stderr, stderr


async def test_a_process_that_cannot_accept_is_handed_no_connection(
    redis_url: str, tmp_path: Path
) -> None:
    """The processes share one accept queue: while one is frozen (SIGSTOP: as busy as a
    process gets), every new connection is greeted by the other; with SO_REUSEPORT's hash,
    about half would wait in the frozen one's queue. Both listen on one socket (inode)."""
    await apply_routing(redis_url)
    tls = make_tls(tmp_path / "tls")
    gateway = start_gateway_process(redis_url, tls, MAILKUBE_PROCESSES="2")
    try:
        parent, child = await both_listening(gateway)
        assert len(tcp_inodes(local_port=gateway.mx, state="0A")) == 1
        for frozen, awake in ((parent, child), (child, parent)):
            os.kill(frozen, signal.SIGSTOP)
            try:
                clients = [await RawClient.connect(gateway.mx) for _ in range(4)]  # greeted
            finally:
                os.kill(frozen, signal.SIGCONT)
            assert {serving_pid(gateway, client) for client in clients} == {awake}
            for client in clients:
                assert (await client.command("NOOP")).startswith("250"), "not served"
            for client in clients:
                await client.close()
    finally:
        _, stderr = stop_gateway_process(gateway)
    assert "Traceback" not in stderr, stderr


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


async def test_the_other_processes_stop_when_the_first_is_killed(
    redis_url: str, tmp_path: Path
) -> None:
    """SIGKILL leaves the first process no chance to pass anything on: the others must not
    stay behind, orphaned, serving on the ports (they follow it by PR_SET_PDEATHSIG)."""
    await apply_routing(redis_url)
    tls = make_tls(tmp_path / "tls")
    gateway = start_gateway_process(redis_url, tls, MAILKUBE_PROCESSES="3")
    others: set[int] = set()
    try:

        async def all_three() -> set[int] | None:
            pids = listening_pids(gateway)
            return pids if len(pids) == 3 else None

        listening = await eventually(all_three, timeout=30)
        assert listening is not None
        others = listening - {gateway.process.pid}
        gateway.process.kill()
        await asyncio.to_thread(gateway.process.wait, 10)

        async def orphans_gone() -> bool:
            return all(_gone(pid) for pid in others)

        await eventually(orphans_gone, timeout=30)
    finally:
        for pid in others:  # orphans would hold the stderr pipe open: the stop would hang
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop_gateway_process(gateway)
