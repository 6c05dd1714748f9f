"""Processes that must not outlive the one that started them (a gateway's extra processes,
`mailkube dev`'s servers, the tests' servers), through Linux's PR_SET_PDEATHSIG: the kernel
signals the child when its parent dies, however it dies (SIGKILL included), so nothing is
left orphaned on its ports.

The signal follows the *thread* that forked, so `preexec` gives a hook only in the main
thread; a parent that died before the child asked is caught by comparing the parent's pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def follow_parent(parent: int, signum: int = signal.SIGTERM) -> bool:
    """In the child itself: get `signum` when the parent dies; at once if `parent` is gone
    already. False where the kernel cannot be asked."""
    libc = _libc()
    if libc is None or libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)
    return True


def preexec(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A Popen preexec_fn that makes the child follow this process (None off Linux and
    outside the main thread)."""
    if _libc() is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def hook() -> None:
        follow_parent(parent, signum)

    return hook
