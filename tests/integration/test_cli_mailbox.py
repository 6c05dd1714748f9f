"""`mailkube mailbox recount` as an operator runs it: a real maildir in a temp dir, the test
Redis, the process's settings from MAILKUBE_* (mail_root included)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import redis

from mailkube_core.mailbox import mailbox_key
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import Domain, RoutingStore, RoutingTable, User
from mailkube_core.settings import CommonSettings

MAILKUBE = [sys.executable, "-m", "mailkube_core.cli.main"]
ALICE = "alice@example.test"


def mailkube(*args: str, redis_url: str, prefix: str, mail_root: Path
             ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
    env.update(MAILKUBE_REDIS_URL=redis_url, MAILKUBE_KEY_PREFIX=prefix,
               MAILKUBE_MAIL_ROOT=str(mail_root))  # fmt: skip
    return subprocess.run([*MAILKUBE, *args], env=env, capture_output=True, text=True, timeout=60)


def write(box: Path, name: str, content: bytes) -> None:
    (box / name).parent.mkdir(parents=True, exist_ok=True)
    (box / name).write_bytes(content)


def counters(redis_url: str, prefix: str, address: str) -> dict[bytes, bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        values: Any = client.hgetall(mailbox_key(prefix, address))
        return dict(values)
    finally:
        client.close()


async def apply_routing(redis_url: str, prefix: str, *users: str) -> None:
    table = RoutingTable(domains=[Domain(name="example.test")],
                         users=[User(address=u) for u in users])  # fmt: skip
    client = connect_redis(CommonSettings(redis_url=redis_url))
    try:
        await RoutingStore(client, prefix).replace(table)
    finally:
        await client.aclose()


def test_recount_sets_a_mailbox_from_its_maildir(redis_url: str, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    box = tmp_path / "mail" / "example.test" / "alice"
    write(box, "new/1.M01M97M9QCE6WBFA8R2BAG2_0_0123456789ab.mx,S=10", b"0123456789")
    write(box, "cur/2.Mimap.host,S=5:2,S", b"01234")
    write(box, ".Junk/new/3.Mx.mx,S=4", b"0123")
    write(box, "tmp/4.Mx.mx", b"being written")
    client = redis.Redis.from_url(redis_url)
    client.hset(mailbox_key(prefix, ALICE), mapping={"messages": 4139, "bytes": 7})
    client.close()
    asyncio.run(apply_routing(redis_url, prefix, ALICE))

    done = mailkube("mailbox", "recount", "Alice@Example.test", redis_url=redis_url,
                    prefix=prefix, mail_root=tmp_path / "mail")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"{ALICE}  3 messages, 19B (19 bytes); was 4139 messages, 7B\n")
    assert counters(redis_url, prefix, ALICE) == {b"messages": b"3", b"bytes": b"19"}

    again = mailkube("mailbox", "recount", ALICE, redis_url=redis_url, prefix=prefix,
                     mail_root=tmp_path / "mail")  # fmt: skip
    assert again.stdout.endswith("; unchanged\n")


def test_recount_all_covers_users_and_maildirs(redis_url: str, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    mail = tmp_path / "mail"
    write(mail / "example.test" / "alice", "new/1.Mx.mx,S=3", b"abc")
    write(mail / "example.test" / "gone", "cur/1.Mx.mx,S=2:2,S", b"ab")  # a removed user's
    asyncio.run(apply_routing(redis_url, prefix, ALICE, "carol@example.test"))
    client = redis.Redis.from_url(redis_url)
    client.hset(mailbox_key(prefix, "carol@example.test"), mapping={"messages": 2, "bytes": 9})
    client.close()

    done = mailkube("mailbox", "recount", "--all", redis_url=redis_url, prefix=prefix,
                    mail_root=mail)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [ALICE, "carol@example.test", "gone@example.test"]
    assert counters(redis_url, prefix, "carol@example.test") == {b"messages": b"0", b"bytes": b"0"}
    assert counters(redis_url, prefix, "gone@example.test") == {b"messages": b"1", b"bytes": b"2"}

    unknown = mailkube("mailbox", "recount", "nobody@example.test", redis_url=redis_url,
                       prefix=prefix, mail_root=mail)  # fmt: skip
    assert unknown.returncode == 1
    assert "nobody@example.test  not a user, and no maildir at" in unknown.stdout
    assert counters(redis_url, prefix, "nobody@example.test") == {}
    neither = mailkube("mailbox", "recount", redis_url=redis_url, prefix=prefix, mail_root=mail)
    assert neither.returncode == 2
    assert "name addresses, or --all" in neither.stderr
