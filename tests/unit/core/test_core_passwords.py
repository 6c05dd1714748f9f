"""argon2id password hashes, and verification that keeps the event loop running."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from argon2 import extract_parameters
from argon2.low_level import Type

from mailkube_core.routing import (
    PasswordVerifier,
    hash_password,
    is_argon2id_hash,
    verify_password_sync,
)


@pytest.fixture(scope="module")
def stored_hash() -> str:
    return hash_password("correct horse battery staple")


@pytest.fixture
def verifier() -> Iterator[PasswordVerifier]:
    v = PasswordVerifier()
    yield v
    v.close()


def test_hash_is_argon2id(stored_hash: str) -> None:
    assert stored_hash.startswith("$argon2id$")
    assert is_argon2id_hash(stored_hash)
    params = extract_parameters(stored_hash)
    assert params.type is Type.ID
    assert params.memory_cost >= 64 * 1024  # KiB: RFC 9106 low-memory profile or stronger
    assert params.time_cost >= 3


def test_hashes_are_salted(stored_hash: str) -> None:
    assert hash_password("correct horse battery staple") != stored_hash


def test_empty_password_cannot_be_hashed() -> None:
    with pytest.raises(ValueError, match="empty"):
        hash_password("")


def test_is_argon2id_hash_rejects_others() -> None:
    assert not is_argon2id_hash("$argon2i$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA")
    assert not is_argon2id_hash("$2b$12$abcdefghijklmnopqrstuv")
    assert not is_argon2id_hash("plain")


def test_verify_sync(stored_hash: str) -> None:
    assert verify_password_sync(stored_hash, "correct horse battery staple") is True
    assert verify_password_sync(stored_hash, "wrong") is False
    assert verify_password_sync(stored_hash, "") is False


def test_verify_sync_without_hash_is_false() -> None:
    assert verify_password_sync(None, "mailkube-dummy-password") is False
    assert verify_password_sync(None, "anything") is False


def test_verify_sync_with_garbage_hash_is_false() -> None:
    assert verify_password_sync("not-a-hash", "x") is False
    assert verify_password_sync("$argon2id$v=19$m=65536,t=3,p=4$bad", "x") is False


async def test_async_verify(verifier: PasswordVerifier, stored_hash: str) -> None:
    assert await verifier.verify(stored_hash, "correct horse battery staple") is True
    assert await verifier.verify(stored_hash, "wrong") is False
    assert await verifier.verify(None, "anything") is False


async def test_verify_runs_off_the_event_loop(verifier: PasswordVerifier, stored_hash: str) -> None:
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # let the ticker start
    before = ticks
    try:
        assert await verifier.verify(stored_hash, "correct horse battery staple") is True
    finally:
        during = ticks - before
        done = True
        await task
    # argon2id with 64 MiB takes tens of milliseconds: a blocking call would allow ~1 tick
    assert during > 100, f"the loop ran only {during} times during a verification"


async def test_concurrent_verifications(verifier: PasswordVerifier, stored_hash: str) -> None:
    results = await asyncio.gather(
        *(verifier.verify(stored_hash, pw) for pw in ["correct horse battery staple", "x"] * 3)
    )
    assert results == [True, False] * 3
