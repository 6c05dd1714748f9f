"""Maildir delivery (ARCHITECTURE.md "Maildir"): `<root>/<domain>/<localpart>/{tmp,new,cur}`,
Maildir++ subfolders such as `.Junk/` beside them.

A message is written to `tmp/`, fsynced, renamed into `new/`, and `new/` is fsynced, so once
`deliver` returns the file survives a power cut. The rename is atomic, so readers (IMAP
servers, other workers on a shared volume) never see a partial file: the maildir format needs
no locks, which is what lets any number of workers share one ReadWriteMany volume.

File names are deterministic per (message, mailbox): `<arrival>.M<unique>.<host>,S=<size>`.
A retry after a crash between the rename and the queue's record of it finds the file (in
`new/`, or in `cur/` with flags once an IMAP client has seen it) and does not write a second
copy.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mailkube_core.mailbox import mailbox_dir

_SUBDIRS = ("new", "cur", "tmp")


@dataclass(frozen=True)
class Stored:
    path: Path
    size: int
    #: the file was already there: an earlier attempt wrote it, nothing was written now
    duplicate: bool


def mailbox_path(root: Path, address: str, folder: str | None = None) -> Path:
    """Where a (normalised) address's maildir is (mailkube_core.mailbox.mailbox_dir); a
    Maildir++ folder such as Junk is `.Junk` inside it."""
    path = root / mailbox_dir(address)
    return path / f".{folder}" if folder else path


def unique_name(message_id: str, address: str, arrived: datetime, host: str, size: int) -> str:
    """The maildir file name for one message in one mailbox (maildir(5): time.unique.host).
    `/` and `:` in the host name are escaped as the maildir convention asks."""
    digest = hashlib.blake2s(f"{message_id}\0{address}".encode(), digest_size=6).hexdigest()
    unique = message_id.replace(".", "_") + "_" + digest
    host = host.replace("/", r"\057").replace(":", r"\072")
    return f"{int(arrived.timestamp())}.M{unique}.{host},S={size}"


def render(body: bytes, return_path: str, delivered_to: str) -> bytes:
    """The file's content: Return-Path and Delivered-To (RFC 5321 §4.4; Delivered-To also
    stops forwarding loops), then the message with LF line ends, as maildir readers expect."""
    head = f"Return-Path: <{return_path}>\nDelivered-To: {delivered_to}\n".encode()
    return head + body.replace(b"\r\n", b"\n")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirSync:
    """Group commit of one directory's fsync: a directory fsync makes durable every rename
    into it that came before the fsync started, so deliveries renaming into the same new/ at
    the same time share one fsync instead of queueing for one each (the filesystem serializes
    them anyway)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards the counters
        self.syncing = threading.Lock()  # one fsync of this directory at a time
        self.requested = 0  # renames that asked for durability
        self.synced = 0  # renames known durable

    def sync(self, path: Path) -> None:
        with self.lock:
            self.requested += 1
            mine = self.requested
        with self.syncing:
            if self.synced >= mine:
                return  # an fsync that started after our rename has finished
            with self.lock:
                covered = self.requested  # every rename so far precedes this fsync
            _fsync_dir(path)
            self.synced = covered


_dir_syncs: dict[Path, _DirSync] = {}
_dir_syncs_lock = threading.Lock()


def fsync_after_rename(directory: Path) -> None:
    """`directory` fsynced after a rename into it, shared with concurrent callers."""
    with _dir_syncs_lock:
        sync = _dir_syncs.get(directory)
        if sync is None:
            if len(_dir_syncs) > 10_000:  # a bound, not a cache policy: mailboxes are many
                _dir_syncs.clear()
            sync = _dir_syncs[directory] = _DirSync()
    sync.sync(directory)


def _exists(box: Path, name: str) -> bool:
    if (box / "new" / name).exists():
        return True
    try:
        with os.scandir(box / "cur") as entries:
            # in cur/ the name gains ':2,<flags>' (maildir(5) "info")
            return any(e.name == name or e.name.startswith(name + ":") for e in entries)
    except FileNotFoundError:
        return False


def create(box: Path) -> None:
    """new/ cur/ tmp/ (and the Maildir++ marker in a subfolder), durably. tmp/ comes last:
    another worker that finds tmp/ and writes into it must find new/ for its rename."""
    created = not box.exists()
    for sub in _SUBDIRS:
        (box / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    if box.name.startswith("."):
        (box / "maildirfolder").touch()
    if created:
        _fsync_dir(box)
        _fsync_dir(box.parent)


def store(box: Path, name: str, content: bytes, *, check_existing: bool) -> Stored:
    """Write `content` as `name` into the maildir `box` (blocking: run it in a thread).
    With `check_existing` (a message handled before), a copy already there is kept as is."""
    final = box / "new" / name
    if check_existing and _exists(box, name):
        return Stored(final, len(content), duplicate=True)
    temporary = box / "tmp" / name
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        create(box)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, final)
    fsync_after_rename(final.parent)
    return Stored(final, len(content), duplicate=False)
