"""`mailkube spam learn|suspended|unsuspend`.

`learn` posts messages to rspamd's controller (/learnspam, /learnham), one HTTP request per
message: files, or maildir folders (their cur/ and new/), which is how a user's moves into and
out of .Junk are fed back. rspamd answers, as seen from Debian's rspamd 3.4:

  200 {"success":true}                  learned
  204 <reason in the status line>       too few tokens for the Bayes classifier: skipped
  208 <reason in the status line>       already learned in this class: skipped
  4xx/5xx {"error": "..."}              not learned (e.g. 400 for an empty message)

It needs no Redis; `suspended` and `unsuspend` read and lift submission suspensions
(mailkube_core.suspensions) in the CLI's Redis.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from ..addresses import normalize_address
from ..redis_client import RedisClient
from ..suspensions import lift, list_suspensions
from .tables import age, table

CONTROLLER_ENV = "MAILKUBE_RSPAMD_CONTROLLER_URL"
DEFAULT_CONTROLLER = "http://127.0.0.1:11334"
LEARN_TIMEOUT = 30.0
#: the most of an error answer read for its reason
_MAX_ERROR_BODY = 4096

Outcome = Literal["learned", "skipped", "failed"]


class ControllerUnreachable(Exception):
    """No HTTP answer from the controller at all: every other message would fail the same."""


@dataclass(frozen=True)
class LearnResult:
    outcome: Outcome
    detail: str = ""


@dataclass(frozen=True)
class Controller:
    url: str
    password: str | None = None
    timeout: float = LEARN_TIMEOUT

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {self.url!r}")

    def learn(self, message: bytes, *, spam: bool) -> LearnResult:
        endpoint = f"{self.url.rstrip('/')}/{'learnspam' if spam else 'learnham'}"
        headers = {"Password": self.password} if self.password is not None else {}
        # the scheme is http(s), checked above
        request = urllib.request.Request(endpoint, message, headers, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                status, reason = response.status, response.reason
                body = response.read() if status == 200 else b""
        except urllib.error.HTTPError as exc:
            with exc:
                return LearnResult(
                    "failed", _error_reason(exc.code, exc.reason, exc.read(_MAX_ERROR_BODY))
                )
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise ControllerUnreachable(_transport_reason(exc)) from None
        if status == 200:
            try:
                success = json.loads(body).get("success") is True
            except (ValueError, AttributeError):
                success = False
            if success:
                return LearnResult("learned")
            return LearnResult("failed", f"unexpected answer: 200 {body[:200]!r}")
        if status in (204, 208):  # the reason is in the status line only (204 has no body)
            return LearnResult("skipped", reason or f"status {status}")
        return LearnResult("failed", f"unexpected answer: {status} {reason}")


def _error_reason(code: int, reason: str, body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    return f"{code} {error if isinstance(error, str) and error else reason}"


def _transport_reason(exc: BaseException) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return "no answer in time"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def message_files(path: Path) -> Iterator[Path]:
    """The messages `path` names: itself if a file; in a maildir folder, the files in its cur/
    and new/ (not its subfolders; dot files are not messages). OSError when it is neither."""
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError("no such file or directory")
        yield path
        return
    folders = [path / "cur", path / "new"]
    if not any(folder.is_dir() for folder in folders):
        raise NotADirectoryError("a directory, but not a maildir folder (no cur/ or new/)")
    for folder in folders:
        if folder.is_dir():
            yield from sorted(
                entry for entry in folder.iterdir()
                if not entry.name.startswith(".") and entry.is_file()
            )  # fmt: skip


def learn(paths: list[Path], controller: Controller, *, spam: bool) -> int:
    """One line per message, then the counts; exit status 1 if any message failed."""
    kind = "spam" if spam else "ham"
    counts: Counter[Outcome] = Counter()

    def report(name: object, result: LearnResult) -> None:
        counts[result.outcome] += 1
        text = f"learned as {kind}" if result.outcome == "learned" else result.outcome
        print(f"{name}: {text}{f': {result.detail}' if result.detail else ''}", flush=True)

    try:
        for path in paths:
            try:
                for file in message_files(path):
                    try:
                        message = file.read_bytes()
                    except OSError as exc:
                        report(file, LearnResult("failed", exc.strerror or str(exc)))
                        continue
                    report(file, controller.learn(message, spam=spam))
            except OSError as exc:
                report(path, LearnResult("failed", exc.strerror or str(exc)))
    except ControllerUnreachable as exc:
        print(f"mailkube spam learn: rspamd's controller at {controller.url} does not answer: "
              f"{exc} (--controller or ${CONTROLLER_ENV} names it)", file=sys.stderr)  # fmt: skip
        return 1
    print(f"{counts['learned']} learned as {kind}, {counts['skipped']} skipped, "
          f"{counts['failed']} failed")  # fmt: skip
    return 1 if counts["failed"] else 0


def _header_safe(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return bool(value) and not any(c in value for c in "\r\n\0")


def run_learn(args: argparse.Namespace) -> int:
    url = args.controller or os.environ.get(CONTROLLER_ENV) or DEFAULT_CONTROLLER
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"mailkube spam learn: cannot read {args.password_file}: {exc}", file=sys.stderr)
            return 2
        if not _header_safe(password):
            print(f"mailkube spam learn: {args.password_file} must hold the password on one "
                  "line, in Latin-1 (an HTTP header carries it)", file=sys.stderr)  # fmt: skip
            return 2
    try:
        controller = Controller(url, password, args.timeout)
    except ValueError as exc:
        print(f"mailkube spam learn: controller: {exc}", file=sys.stderr)
        return 2
    return learn(args.paths, controller, spam=args.kind == "spam")


async def suspended(redis: RedisClient, prefix: str) -> int:
    suspensions = await list_suspensions(redis, prefix)
    if not suspensions:
        print("no user is suspended for submission")
        return 0
    print(table(
        ["USER", "SUSPENDED SINCE", "AGE", "REFUSED AS SPAM"],
        [
            [s.address, s.since.isoformat(timespec="seconds") if s.since.timestamp() else "-",
             age(s.since) if s.since.timestamp() else "-", s.rejections or "-"]
            for s in suspensions
        ],
    ))  # fmt: skip
    return 0


async def unsuspend(redis: RedisClient, prefix: str, addresses: list[str]) -> int:
    """Lift each suspension; exit status 1 if any address was not suspended."""
    failures = 0
    for address in addresses:
        try:
            canonical = normalize_address(address)
        except ValueError:
            canonical = address
        # the gateway records the canonical form; an entry written by hand may be verbatim
        lifted = await lift(redis, prefix, canonical) or (
            canonical != address and await lift(redis, prefix, address)
        )
        failures += not lifted
        print(f"{address}: {'may submit again' if lifted else 'not suspended'}")
    return 1 if failures else 0


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    spam = subparsers.add_parser("spam", help="rspamd learning; submission suspensions")
    sub = spam.add_subparsers(dest="action", required=True)
    learn_p = sub.add_parser(
        "learn",
        help="teach rspamd's Bayes filter: messages (files, or maildir folders) as spam or ham",
    )
    kind = learn_p.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--spam", dest="kind", action="store_const", const="spam", help="the messages are spam"
    )
    kind.add_argument(
        "--ham", dest="kind", action="store_const", const="ham", help="the messages are wanted"
    )
    learn_p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="FILE_OR_MAILDIR",
        help="a message file, or a maildir folder (its cur/ and new/, e.g. Maildir/.Junk)",
    )
    learn_p.add_argument(
        "--controller",
        metavar="URL",
        help=f"rspamd's controller (default: ${CONTROLLER_ENV}, else {DEFAULT_CONTROLLER})",
    )
    learn_p.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="the controller's password (sent as rspamd's Password header)",
    )
    learn_p.add_argument(
        "--timeout", type=_seconds, default=LEARN_TIMEOUT, metavar="SECONDS",
        help=f"longest wait for rspamd per message (default: {LEARN_TIMEOUT:g})",
    )  # fmt: skip
    sub.add_parser("suspended", help="users suspended for submission because they sent spam")
    unsuspend_p = sub.add_parser("unsuspend", help="let suspended users submit again")
    unsuspend_p.add_argument("addresses", nargs="+", metavar="ADDRESS")
