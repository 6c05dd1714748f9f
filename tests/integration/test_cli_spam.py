"""`mailkube spam learn|suspended|unsuspend`, run as a user would run them: learning against
the real rspamd (its controller), suspensions against the test Redis."""

from __future__ import annotations

import asyncio
import json
import os
import random
import string
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gateway_harness import free_port

from mailkube_core.cli.rspamd_local import LocalRspamd
from mailkube_core.redis_client import connect_redis
from mailkube_core.settings import CommonSettings
from mailkube_core.suspensions import list_suspensions, record_spam_rejection

MAILKUBE = [sys.executable, "-m", "mailkube_core.cli.main"]
PREFIX = "mk-spam-cli"
WORDS = [
    "invoice", "shipment", "discount", "pharmacy", "watches", "replica", "casino", "bonus",
    "lottery", "winner", "offer", "urgent", "transfer", "account", "verify", "limited",
]  # fmt: skip


def mailkube(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
    environ.update(env)
    return subprocess.run(
        [*MAILKUBE, *args], env=environ, capture_output=True, text=True, timeout=120
    )


def message(words: int = 120) -> bytes:
    """A message of its own (rspamd remembers what it learned, in the suite's Redis), with
    `words` words: the Bayes classifier wants at least 11 tokens."""
    token = uuid.uuid4().hex
    rng = random.Random(token)
    # words of their own too: rspamd knows a message it learned by its tokens
    body = " ".join(
        rng.choice(WORDS) + "".join(rng.choices(string.ascii_lowercase, k=4)) for _ in range(words)
    )
    return (
        f"From: seller-{token}@remote.test\r\nTo: alice@example.test\r\n"
        f"Subject: offer {token}\r\nMessage-ID: <{token}@remote.test>\r\n"
        f"Date: Mon, 07 Dec 2026 04:58:13 +0000\r\n\r\n{token}\r\n{body}\r\n"
    ).encode()


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_learn_spam_then_the_same_again_is_skipped_as_already_learned(
    rspamd: LocalRspamd, tmp_path: Path
) -> None:
    spam = write(tmp_path / "spam.eml", message())
    first = mailkube("spam", "learn", "--spam", str(spam), "--controller", rspamd.controller_url)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{spam}: learned as spam" in first.stdout
    assert "1 learned as spam, 0 skipped, 0 failed" in first.stdout

    again = mailkube("spam", "learn", "--spam", str(spam), "--controller", rspamd.controller_url)
    assert again.returncode == 0, again.stdout + again.stderr
    # rspamd answers 208 with the reason in the status line
    assert f"{spam}: skipped: " in again.stdout
    assert "has been already learned as spam" in again.stdout
    assert "0 learned as spam, 1 skipped, 0 failed" in again.stdout


def test_learn_ham_with_the_controller_from_the_environment(
    rspamd: LocalRspamd, tmp_path: Path
) -> None:
    ham = write(tmp_path / "ham.eml", message())
    result = mailkube(
        "spam", "learn", "--ham", str(ham), MAILKUBE_RSPAMD_CONTROLLER_URL=rspamd.controller_url
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{ham}: learned as ham" in result.stdout


def test_a_message_too_short_to_learn_is_skipped_with_rspamds_reason(
    rspamd: LocalRspamd, tmp_path: Path
) -> None:
    short = write(tmp_path / "short.eml", message(words=2))
    result = mailkube("spam", "learn", "--spam", str(short), "--controller", rspamd.controller_url)
    assert result.returncode == 0, result.stdout + result.stderr
    # 204, the reason in the status line
    assert f"{short}: skipped: " in result.stdout
    assert "less tokens than required" in result.stdout


def test_a_maildir_folder_is_learned_from_cur_and_new(rspamd: LocalRspamd, tmp_path: Path) -> None:
    junk = tmp_path / "Maildir" / ".Junk"
    read = write(junk / "cur" / "1733547493.M1P1.host:2,S", message())
    unread = write(junk / "new" / "1733547494.M2P1.host", message())
    write(junk / "tmp" / "1733547495.M3P1.host", b"being written")  # not a message yet
    write(junk / "new" / ".hidden", b"not a message")
    write(junk / ".Sub" / "new" / "1733547496.M4P1.host", message())  # a folder of its own

    result = mailkube("spam", "learn", "--spam", str(junk), "--controller", rspamd.controller_url)
    assert result.returncode == 0, result.stdout + result.stderr
    # cur/ then new/; not tmp/, dot files or subfolders
    assert result.stdout.splitlines() == [
        f"{read}: learned as spam",
        f"{unread}: learned as spam",
        "2 learned as spam, 0 skipped, 0 failed",
    ]


def test_missing_files_and_rspamd_errors_fail_the_run_but_not_the_others(
    rspamd: LocalRspamd, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.eml"
    empty = write(tmp_path / "empty.eml", b"")
    not_maildir = tmp_path / "just-a-directory"
    not_maildir.mkdir()
    good = write(tmp_path / "good.eml", message())

    result = mailkube(
        "spam", "learn", "--ham", str(missing), str(empty), str(not_maildir), str(good),
        "--controller", rspamd.controller_url,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"{missing}: failed: no such file or directory" in result.stdout
    assert f"{empty}: failed: 400 " in result.stdout  # rspamd refuses an empty body
    assert f"{not_maildir}: failed: a directory, but not a maildir folder" in result.stdout
    assert f"{good}: learned as ham" in result.stdout
    assert "1 learned as ham, 0 skipped, 3 failed" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_controller_that_is_down_is_one_clear_line(tmp_path: Path) -> None:
    spam = write(tmp_path / "spam.eml", message())
    closed = f"http://127.0.0.1:{free_port()}"
    result = mailkube("spam", "learn", "--spam", str(spam), str(spam), "--controller", closed)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mailkube spam learn: rspamd's controller at {closed} ")
    assert "Connection refused" in lines[0]


def test_a_controller_url_that_is_not_http_is_refused(tmp_path: Path) -> None:
    spam = write(tmp_path / "spam.eml", message())
    result = mailkube("spam", "learn", "--spam", str(spam), "--controller", f"file://{spam}")
    assert result.returncode == 2
    assert "not an http:// or https:// URL" in result.stderr


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None, int]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        self.seen.append((self.path, self.headers.get("Password"), length))
        if self.headers.get("Password") != "s3cret controller pw":
            self._answer(403, {"error": "Unauthorized"})
        else:
            self._answer(200, {"success": True})

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def stub_controller() -> Iterator[tuple[str, list[tuple[str, str | None, int]]]]:
    seen: list[tuple[str, str | None, int]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    finally:
        server.shutdown()
        server.server_close()


def test_password_file_is_sent_as_rspamds_password_header_and_never_shown(
    stub_controller: tuple[str, list[tuple[str, str | None, int]]], tmp_path: Path
) -> None:
    url, seen = stub_controller
    spam = write(tmp_path / "spam.eml", message())
    password = tmp_path / "controller-password"
    password.write_text("s3cret controller pw\n")

    result = mailkube(
        "spam", "learn", "--spam", str(spam), "--controller", url,
        "--password-file", str(password),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert seen == [("/learnspam", "s3cret controller pw", len(spam.read_bytes()))]
    assert "s3cret" not in result.stdout + result.stderr

    without = mailkube("spam", "learn", "--ham", str(spam), "--controller", url)
    assert without.returncode == 1
    assert seen[-1] == ("/learnham", None, len(spam.read_bytes()))
    assert f"{spam}: failed: 403 Unauthorized" in without.stdout


def test_suspended_lists_and_unsuspend_lifts(redis_url: str) -> None:
    env = {"MAILKUBE_REDIS_URL": redis_url, "MAILKUBE_KEY_PREFIX": PREFIX}
    empty = mailkube("spam", "suspended", **env)
    assert empty.returncode == 0, empty.stderr
    assert "no user is suspended for submission" in empty.stdout

    asyncio.run(_reject(redis_url, "alice@example.test", times=3))
    asyncio.run(_reject(redis_url, "bob@example.test", times=1))  # below the threshold

    listed = mailkube("spam", "suspended", **env)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["USER", "SUSPENDED", "SINCE", "AGE", "REFUSED", "AS", "SPAM"]
    assert len(rows) == 1
    assert rows[0].split()[0] == "alice@example.test"
    assert rows[0].split()[-1] == "3"

    lifted = mailkube("spam", "unsuspend", "Alice@EXAMPLE.test", **env)
    assert lifted.returncode == 0, lifted.stdout + lifted.stderr
    assert "Alice@EXAMPLE.test: may submit again" in lifted.stdout
    assert asyncio.run(_suspended(redis_url)) == []

    again = mailkube("spam", "unsuspend", "alice@example.test", "bob@example.test", **env)
    assert again.returncode == 1
    assert "alice@example.test: not suspended" in again.stdout
    assert "bob@example.test: not suspended" in again.stdout


def test_suspension_commands_report_an_unreachable_redis() -> None:
    result = mailkube("spam", "suspended", MAILKUBE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1
    assert "mailkube: Redis at redis://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


async def _reject(redis_url: str, address: str, times: int) -> None:
    redis = connect_redis(CommonSettings(redis_url=redis_url))
    try:
        for _ in range(times):
            await record_spam_rejection(redis, PREFIX, address, timedelta(hours=1), 3)
    finally:
        await redis.aclose()


async def _suspended(redis_url: str) -> list[str]:
    redis = connect_redis(CommonSettings(redis_url=redis_url))
    try:
        return [s.address for s in await list_suspensions(redis, PREFIX)]
    finally:
        await redis.aclose()
