"""Maildir delivery (docs/architecture.md "Maildir"): `<root>/<domain>/<localpart>/{tmp,new,cur}`,
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

import os
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from mailkube_core.mailbox import delivery_name, mailbox_dir

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
    """The maildir file name for one message in one mailbox (mailkube_core.mailbox's
    delivery_name: the recount reads the message id back from it)."""
    return delivery_name(message_id, address, arrived, host, size)


class StoredForm(NamedTuple):
    body: bytes
    newline: str


def stored_form(body: bytes, body_type: str) -> StoredForm:
    """The message as a maildir file holds it: LF line ends, as maildir readers expect; a
    BINARYMIME message (RFC 3030) byte for byte with CRLF line ends, since a CR LF in binary
    content is data (maildir readers such as Dovecot take CRLF files)."""
    if body_type == "BINARYMIME":
        return StoredForm(body, "\r\n")
    # The queue holds text messages with every CR in a CRLF (the gateway refuses a bare CR or
    # LF, docs/architecture.md "Queue"), so deleting every CR turns CRLF into LF; it is three
    # times as fast as replace(b"\r\n", b"\n") on a 100 KiB message. A stray CR from some other
    # producer would be dropped, not kept, which no maildir reader misses.
    return StoredForm(body.translate(None, b"\r"), "\n")


def render(body: bytes, return_path: str, delivered_to: str, body_type: str = "7BIT") -> bytes:
    """The file's content: Return-Path and Delivered-To (RFC 5321 §4.4; Delivered-To also
    stops forwarding loops), then the message (`stored_form`)."""
    return b"".join(render_parts(stored_form(body, body_type), return_path, delivered_to))


def render_parts(stored: StoredForm, return_path: str, delivered_to: str) -> list[bytes]:
    """`render`'s content as the head and the body (already in `stored_form`, so several
    mailboxes share one converted body), for writev."""
    nl = stored.newline
    head = f"Return-Path: <{return_path}>{nl}Delivered-To: {delivered_to}{nl}".encode()
    return [head, stored.body]


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
    stored = _place(box, name, [content], check_existing=check_existing)
    if not stored.duplicate:
        fsync_after_rename(stored.path.parent)
    return stored


@dataclass(frozen=True)
class Copy:
    """One file for `store_many`: its content is `parts` joined (written with writev)."""

    box: Path
    name: str
    parts: list[bytes]
    check_existing: bool


def store_many(copies: list[Copy], fsyncs: Executor) -> list[Stored | OSError]:
    """`store` for each copy, together (blocking: run it in a thread): every file written to
    tmp/, the files fsynced in parallel on `fsyncs`' threads (concurrent fsyncs share the
    filesystem's journal commits; one after the other, each waits for its own), renamed into
    new/, then each new/ fsynced once. A copy whose write, fsync, rename or directory fsync
    failed gets its OSError; the others are durable when this returns."""
    out: list[Stored | OSError] = []
    opened: list[tuple[int, int]] = []  # (index in out, fd)
    try:
        for copy in copies:
            try:
                placed = _write(copy.box, copy.name, copy.parts, check_existing=copy.check_existing)
            except OSError as error:
                out.append(error)
                continue
            if isinstance(placed, Stored):
                out.append(placed)  # a duplicate: already there
            else:
                opened.append((len(out), placed))
                out.append(Stored(copy.box / "new" / copy.name, _size(copy.parts), False))
        synced = [(i, fsyncs.submit(os.fsync, fd)) for i, fd in opened]
        for i, future in synced:
            failure = future.exception()
            if isinstance(failure, OSError):
                out[i] = failure
            elif failure is not None:
                raise failure
    finally:
        for _, fd in opened:
            os.close(fd)
    for i, copy in enumerate(copies):
        stored = out[i]
        if isinstance(stored, Stored) and not stored.duplicate:
            try:
                os.rename(copy.box / "tmp" / copy.name, stored.path)
            except OSError as error:
                out[i] = error
    # a duplicate's directory too: the attempt that renamed it may have died before its fsync
    for directory in {s.path.parent for s in out if isinstance(s, Stored)}:
        try:
            fsync_after_rename(directory)
        except OSError as error:
            out = [error if isinstance(s, Stored) and s.path.parent == directory else s
                   for s in out]  # fmt: skip
    return out


def _size(parts: list[bytes]) -> int:
    return sum(len(p) for p in parts)


def _write(box: Path, name: str, parts: list[bytes], *, check_existing: bool) -> Stored | int:
    """The copy already there (with `check_existing`), or the open fd of tmp/`name` holding
    `parts` (not yet fsynced)."""
    if check_existing and _exists(box, name):
        return Stored(box / "new" / name, _size(parts), duplicate=True)
    temporary = box / "tmp" / name
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        create(box)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        written = os.writev(fd, parts)
        if written < _size(parts):  # a short write (a signal, a full disk): the rest in turn
            view = memoryview(b"".join(parts))[written:]
            while view:
                view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _place(box: Path, name: str, parts: list[bytes], *, check_existing: bool) -> Stored:
    """Written to tmp/, fsynced and renamed into new/ (not yet durable: new/ needs its fsync)."""
    placed = _write(box, name, parts, check_existing=check_existing)
    if isinstance(placed, Stored):
        return placed
    try:
        os.fsync(placed)
    finally:
        os.close(placed)
    final = box / "new" / name
    os.rename(box / "tmp" / name, final)
    return Stored(final, _size(parts), duplicate=False)
