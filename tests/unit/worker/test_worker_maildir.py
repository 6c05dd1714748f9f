"""Maildir writes: layout, names, durability steps and idempotence, on a real file system."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailkube_worker import maildir

ARRIVED = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


def test_store_writes_new_and_leaves_tmp_empty(tmp_path: Path) -> None:
    box = maildir.mailbox_path(tmp_path, "alice@example.test")
    stored = maildir.store(box, "1.Mx.host,S=5", b"hello", check_existing=False)
    assert stored.path == box / "new" / "1.Mx.host,S=5"
    assert stored.path.read_bytes() == b"hello"
    assert not stored.duplicate
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
    assert list((box / "tmp").iterdir()) == []


def test_existing_copy_in_new_or_cur_is_not_written_again(tmp_path: Path) -> None:
    box = maildir.mailbox_path(tmp_path, "alice@example.test")
    first = maildir.store(box, "n1", b"one", check_existing=True)
    again = maildir.store(box, "n1", b"one", check_existing=True)
    assert again.duplicate
    first.path.rename(box / "cur" / "n1:2,RS")
    after_imap = maildir.store(box, "n1", b"one", check_existing=True)
    assert after_imap.duplicate
    assert list((box / "new").iterdir()) == []
    # a different message with a name sharing the prefix is not a duplicate
    assert not maildir.store(box, "n", b"two", check_existing=True).duplicate


def test_unique_name_is_deterministic_per_message_and_mailbox() -> None:
    a = maildir.unique_name("01ABC.0", "alice@example.test", ARRIVED, "mx1", 10)
    assert a == maildir.unique_name("01ABC.0", "alice@example.test", ARRIVED, "mx1", 10)
    assert a != maildir.unique_name("01ABC.0", "carol@example.test", ARRIVED, "mx1", 10)
    assert a != maildir.unique_name("01ABD.0", "alice@example.test", ARRIVED, "mx1", 10)
    assert a.startswith(f"{int(ARRIVED.timestamp())}.M01ABC_0_")
    assert a.endswith(".mx1,S=10")
    odd = maildir.unique_name("01ABC.0", "a@b", ARRIVED, "h/o:st", 1)
    assert "/" not in odd
    assert ":" not in odd


def test_local_parts_cannot_climb_out_of_the_domain(tmp_path: Path) -> None:
    for local in ("..", "../../etc", ".hidden", "a/b"):
        path = maildir.mailbox_path(tmp_path, f"{local}@example.test")
        assert path.parent == tmp_path / "example.test"
        assert not path.name.startswith(".")
    assert maildir.mailbox_path(tmp_path, "a@example.test", "Junk").name == ".Junk"


def test_render_prepends_trace_headers_and_uses_lf() -> None:
    content = maildir.render(b"Subject: x\r\n\r\nbody\r\n", "", "alice@example.test")
    assert content == b"Return-Path: <>\nDelivered-To: alice@example.test\nSubject: x\n\nbody\n"


def test_stored_form_turns_every_crlf_into_lf_and_keeps_binarymime_as_queued() -> None:
    body = b"Subject: x\r\n\r\n" + b"a line of text\r\n" * 5000 + b".dot\r\n\r\n\r\n"
    assert maildir.stored_form(body, "8BITMIME") == (body.replace(b"\r\n", b"\n"), "\n")
    binary = b"Subject: x\r\n\r\n\x00\r\x01\n\r\n"
    assert maildir.stored_form(binary, "BINARYMIME") == (binary, "\r\n")


def test_concurrent_first_deliveries_to_a_new_mailbox_all_land(tmp_path: Path) -> None:
    """Workers racing to create one mailbox: whoever finds tmp/ must also find new/."""
    for round_ in range(50):
        box = maildir.mailbox_path(tmp_path, f"user{round_}@example.test")
        barrier = threading.Barrier(8)

        def deliver(n: int, box: Path = box, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return not maildir.store(box, f"m{n}", b"x", check_existing=False).duplicate

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(deliver, range(8)))
        assert len(list((box / "new").iterdir())) == 8


def test_concurrent_renames_share_directory_fsyncs_and_each_is_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: a caller returns only after an fsync that began after its rename."""
    renamed: list[int] = []
    covered: set[int] = set()
    fsyncs = 0
    guard = threading.Lock()

    def slow_fsync(path: Path) -> None:
        nonlocal fsyncs
        with guard:
            before = set(renamed)  # what this fsync makes durable
            fsyncs += 1
        time.sleep(0.01)  # the disk's latency
        with guard:
            covered.update(before)

    monkeypatch.setattr(maildir, "_fsync_dir", slow_fsync)
    sync = maildir._DirSync()
    problems: list[int] = []

    def deliver(number: int) -> None:
        with guard:
            renamed.append(number)
        sync.sync(tmp_path)
        with guard:
            if number not in covered:
                problems.append(number)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    assert fsyncs < 32  # shared


def test_store_many_writes_every_copy_and_fsyncs_each_new_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch: each file written whole into new/ (head and body parts), a copy already there
    is not written again, and each mailbox's new/ is fsynced once after its renames."""
    alice = maildir.mailbox_path(tmp_path, "alice@example.test")
    carol = maildir.mailbox_path(tmp_path, "carol@example.test")
    maildir.store(alice, "old", b"x", check_existing=False)
    synced: list[Path] = []
    real = maildir.fsync_after_rename

    def fsync_after_rename(directory: Path) -> None:
        names = sorted(p.name for p in directory.iterdir())
        synced.append(directory)
        assert names == sorted({"old", "a1", "a2"} if directory.parent == alice else {"c1"})
        real(directory)

    monkeypatch.setattr(maildir, "fsync_after_rename", fsync_after_rename)
    copies = [
        maildir.Copy(alice, "a1", [b"head\n", b"body one\n"], False),
        maildir.Copy(carol, "c1", [b"head\n", b"body two\n"], False),
        maildir.Copy(alice, "a2", [b"h\n", b"b\n"], False),
        maildir.Copy(alice, "old", [b"x"], True),
    ]
    with ThreadPoolExecutor(4) as fsyncs:
        stored = maildir.store_many(copies, fsyncs)
    assert [s.duplicate for s in stored if isinstance(s, maildir.Stored)] == [
        False, False, False, True,
    ]  # fmt: skip
    assert (alice / "new" / "a1").read_bytes() == b"head\nbody one\n"
    assert (carol / "new" / "c1").read_bytes() == b"head\nbody two\n"
    assert [s.size for s in stored if isinstance(s, maildir.Stored)] == [14, 14, 4, 1]
    assert sorted(synced) == sorted([alice / "new", carol / "new"])
    assert list((alice / "tmp").iterdir()) == list((carol / "tmp").iterdir()) == []


def test_store_many_reports_a_failed_copy_and_stores_the_others(tmp_path: Path) -> None:
    good = maildir.mailbox_path(tmp_path, "alice@example.test")
    blocked = tmp_path / "example.test" / "blocked"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"a file where the maildir should be")
    with ThreadPoolExecutor(2) as fsyncs:
        stored = maildir.store_many(
            [maildir.Copy(blocked, "b1", [b"x"], False), maildir.Copy(good, "g1", [b"y"], False)],
            fsyncs,
        )
    assert isinstance(stored[0], OSError)
    assert isinstance(stored[1], maildir.Stored)
    assert (good / "new" / "g1").read_bytes() == b"y"
