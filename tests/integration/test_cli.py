"""The `mailkube` command line against a real Redis, run as a user would run it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from mailkube_core.queue import Envelope, Queue, Recipient, RecipientResult, RecipientStatus
from mailkube_core.routing import RoutingStore, verify_password_sync

MAILKUBE = [sys.executable, "-m", "mailkube_core.cli.main"]


def mailkube(
    *args: str, redis_url: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
    env["MAILKUBE_REDIS_URL"] = redis_url
    return subprocess.run(
        [*MAILKUBE, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
    )


ROUTING = """
domains:
  - name: Example.TEST
    catch_all: alice@example.test
  - name: corp.test
    inbound_relay: {{host: mail.corp.test}}
users:
  - address: alice@example.test
    password: s3cret-plain
    aliases: [info@example.test]
  - address: bob@example.test
    password: "{bob_hash}"
    suspended: true
"""


def test_passwd_prints_an_argon2id_hash(redis_url: str) -> None:
    result = mailkube("passwd", "--stdin", redis_url=redis_url, stdin="correct horse\n")
    assert result.returncode == 0, result.stderr
    digest = result.stdout.strip()
    assert digest.startswith("$argon2id$")
    assert verify_password_sync(digest, "correct horse")
    assert not verify_password_sync(digest, "wrong horse")


def test_routing_apply_hashes_plaintext_keeps_hashes_and_show_hides_them(
    redis_url: str, tmp_path: Path
) -> None:
    bob_hash = mailkube("passwd", "--stdin", redis_url=redis_url, stdin="bob-pw\n").stdout.strip()
    path = tmp_path / "routing.yaml"
    path.write_text(ROUTING.format(bob_hash=bob_hash))

    applied = mailkube("routing", "apply", "-f", str(path), redis_url=redis_url)
    assert applied.returncode == 0, applied.stderr
    assert "version 1: 2 domain(s), 2 user(s)" in applied.stdout

    snapshot = asyncio.run(_load(redis_url))
    alice = snapshot.user("ALICE@example.test")
    bob = snapshot.user("bob@example.test")
    assert alice is not None
    assert bob is not None
    assert verify_password_sync(alice.password_hash, "s3cret-plain")
    assert bob.password_hash == bob_hash
    assert bob.suspended

    shown = mailkube("routing", "show", redis_url=redis_url)
    assert shown.returncode == 0, shown.stderr
    assert "routing table version 1" in shown.stdout
    assert "alice@example.test" in shown.stdout
    assert "suspended" in shown.stdout
    assert "mail.corp.test:25" in shown.stdout  # a domain we relay for, and where to
    as_yaml = mailkube("routing", "show", "-o", "yaml", redis_url=redis_url)
    assert "<argon2id hash>" in as_yaml.stdout
    assert "$argon2id$" not in shown.stdout + as_yaml.stdout
    assert "s3cret-plain" not in shown.stdout + as_yaml.stdout


async def _load(redis_url: str):  # type: ignore[no-untyped-def]
    client = Redis.from_url(redis_url)
    try:
        return await RoutingStore(client).load()
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("domains: [{name: 'bad domain!'}]", "domains.0.name: not a valid domain name"),
        ("users: [{address: a@nowhere.test}]", "domain nowhere.test is not in the table"),
        ("domains: [{name: x.test, colour: red}]", "domains.0.colour: Extra inputs"),
        ("domains: [", "is not valid YAML"),
    ],
)
def test_routing_apply_rejects_a_bad_file_and_keeps_the_table(
    redis_url: str, tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = mailkube("routing", "apply", "-f", str(path), redis_url=redis_url)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert asyncio.run(_load(redis_url)).version == 0


def test_queue_commands(redis_url: str) -> None:
    ids = asyncio.run(_fill_queue(redis_url))
    deferred_id, queued_id = ids

    stats = mailkube("queue", "stats", redis_url=redis_url)
    assert stats.returncode == 0, stats.stderr
    assert stats.stdout.startswith("2 message(s) in 1 partition(s)")
    assert "remote  1      0       1" in stats.stdout

    listed = mailkube("queue", "list", redis_url=redis_url)
    assert deferred_id in listed.stdout
    assert queued_id in listed.stdout
    assert "451 4.4.1 greylisted" in listed.stdout

    shown = mailkube("queue", "show", deferred_id, redis_url=redis_url)
    assert shown.returncode == 0
    assert "state: deferred" in shown.stdout
    assert "ret=HDRS envid=ENV1" in shown.stdout
    assert "a@remote.test  deferred" in shown.stdout

    assert mailkube("queue", "retry", deferred_id, redis_url=redis_url).returncode == 0
    again = mailkube("queue", "retry", deferred_id, redis_url=redis_url)
    assert again.returncode == 1
    assert "not deferred" in again.stdout

    assert mailkube("queue", "delete", queued_id, redis_url=redis_url).returncode == 0
    assert mailkube("queue", "show", queued_id, redis_url=redis_url).returncode == 1
    bad = mailkube("queue", "show", "not-an-id", redis_url=redis_url)
    assert bad.returncode == 1
    assert "not a message id" in bad.stderr


async def _fill_queue(redis_url: str) -> list[str]:
    client = Redis.from_url(redis_url)
    queue = Queue(client)
    await queue.ensure_groups()
    ids = []
    for n in range(2):
        env = Envelope(
            mail_from="s@example.test",
            recipients=[Recipient(address=f"{'ab'[n]}@remote.test")],
            ret="HDRS",
            envid=f"ENV{n + 1}",
        )
        ids += await queue.enqueue(env, b"Subject: x\r\n\r\nbody\r\n", is_local=lambda a: False)
    (claimed,) = await queue.claim("c", "remote", 0, count=1, block=None)
    result = RecipientResult(
        status=RecipientStatus.DEFERRED, smtp_code=451, enhanced_code="4.4.1",
        diagnostic="451 4.4.1 greylisted",
    )  # fmt: skip
    await queue.record(claimed, {0: result})
    await queue.settle(claimed)
    await client.aclose()
    first = ids[0] if ids[0] == claimed.id else ids[1]
    return [first, ids[1] if first == ids[0] else ids[0]]


def test_output_into_a_closed_pipe_ends_quietly(redis_url: str) -> None:
    """`mailkube queue list | head`: the reader is gone before the CLI writes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
    env["MAILKUBE_REDIS_URL"] = redis_url
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*MAILKUBE, "queue", "stats"], env=env, stdout=write_end, stderr=subprocess.PIPE,
            text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr
    assert result.returncode == 141
