"""argon2id password hashes (argon2-cffi, RFC 9106 parameters) and verification off the
event loop, bounded so that a burst of AUTH attempts cannot eat every core and all memory."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile (t=3, m=64 MiB, p=4)
# Verifying against this when the user does not exist keeps the time the same, so timing does
# not reveal which addresses have mailboxes.
_DUMMY_HASH = _hasher.hash("mailkube-dummy-password")


def hash_password(plain: str) -> str:
    if not plain:
        raise ValueError("a password must not be empty")
    return _hasher.hash(plain)


def is_argon2id_hash(value: str) -> bool:
    return value.startswith("$argon2id$")


def verify_password_sync(password_hash: str | None, plain: str) -> bool:
    """Constant work whether or not there is a hash (argon2's own compare is constant-time)."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, plain) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class PasswordVerifier:
    """Runs verifications in a small thread pool (argon2-cffi releases the GIL)."""

    def __init__(self, max_concurrent: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="argon2")

    async def verify(self, password_hash: str | None, plain: str) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, verify_password_sync, password_hash, plain)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
