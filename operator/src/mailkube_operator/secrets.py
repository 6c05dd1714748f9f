"""What the operator takes from Secrets it does not own: password hashes and relay credentials.

The Secret index keeps only fingerprints (keyed HMAC-SHA256 of each value), never plaintext.
When a referenced value's fingerprint is new, the Secret is read once through the API and the
password hashed with argon2id; the plaintext is dropped at once. A changed Secret has a new
fingerprint, so it is re-hashed.

Hashing is slow on purpose (~0.2 s a password), so hashes outlive the process: the HMAC key is
kept in a Secret of the operator's namespace (`FINGERPRINT_SECRET`, made on first start), and
each hash is stored in Redis under its fingerprint (`hashes_key`). A restarted operator finds
every unchanged password's hash there, without reading its Secret or hashing anything. The key
is never in Redis: without it a fingerprint is of no use for guessing passwords.

A Secret that cannot be read (an API error) is remembered with the error, so the user's or
domain's condition names it, and not read again before `retry_delay` has passed, however many
reconciles ask meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets as _random
import time
from collections.abc import Iterable, Mapping

from mailkube_core.redis_client import RedisClient
from mailkube_core.routing import hash_password

from .dkim import MANAGED_BY
from .kube import Kube, KubeError
from .models import RelayCredentials, SecretKeyRef
from .plan import Problem

log = logging.getLogger(__name__)

#: the Secret (in the operator's namespace) holding the fingerprint key, and its data key
FINGERPRINT_SECRET = "mailkube-operator-fingerprint-key"  # noqa: S105
FINGERPRINT_DATA_KEY = "key"
KEY_BYTES = 32

#: (namespace, Secret name) -> {data key: fingerprint}
Fingerprints = Mapping[tuple[str, str], Mapping[str, str]]


def hashes_key(prefix: str) -> str:
    """The Redis hash of argon2id password hashes by fingerprint."""
    return f"{prefix}:operator:password-hashes"


def random_key() -> bytes:
    return _random.token_bytes(KEY_BYTES)


def fingerprint(value_b64: str, key: bytes) -> str:
    return hmac.new(key, value_b64.encode(), hashlib.sha256).hexdigest()


def fingerprints(data: Mapping[str, str] | None, key: bytes) -> dict[str, str]:
    return {name: fingerprint(str(value), key) for name, value in (data or {}).items()}


async def fingerprint_key(kube: Kube, namespace: str) -> bytes:
    """The key of the Secret FINGERPRINT_SECRET, made with a random key if there is none (by
    us or, at the same moment, by another operator: then theirs); KubeError if it cannot be
    read or made."""
    for _ in range(2):
        data = await kube.read_secret_data(namespace, FINGERPRINT_SECRET)
        if data is not None:
            try:
                key = base64.b64decode(data.get(FINGERPRINT_DATA_KEY) or "", validate=True)
            except ValueError:
                key = b""
            if len(key) < KEY_BYTES:
                unusable = f"no usable key {FINGERPRINT_DATA_KEY!r}: delete it to make a new one"
                raise KubeError(0, f"Secret {namespace}/{FINGERPRINT_SECRET} holds {unusable}")
            return key
        key = random_key()
        body = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": FINGERPRINT_SECRET, "namespace": namespace,
                         "labels": dict(MANAGED_BY)},
            "data": {FINGERPRINT_DATA_KEY: base64.b64encode(key).decode()},
        }  # fmt: skip
        try:
            await kube.create_secret(namespace, body)
        except KubeError as exc:
            if exc.status != 409:  # 409: made meanwhile; read that one
                raise
        else:
            log.info("made the password fingerprint key in Secret %s/%s", namespace,
                     FINGERPRINT_SECRET)  # fmt: skip
            return key
    raise KubeError(0, f"Secret {namespace}/{FINGERPRINT_SECRET} vanished while being made")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(value_b64: str) -> str:
    return base64.b64decode(value_b64, validate=True).decode()


class SecretValues:
    """Password hashes and relay credentials, refreshed when a fingerprint moves."""

    def __init__(self, retry_delay: float = 30.0, key: bytes | None = None) -> None:
        self.retry_delay = retry_delay
        #: the fingerprint key (the index's fingerprints must be made with the same one)
        self.key = key or random_key()
        #: where hashes are kept across restarts (None: only in memory)
        self.redis: RedisClient | None = None
        self.redis_key = ""
        #: fingerprint -> argon2id hash, as stored in Redis
        self._stored: dict[str, str] = {}
        self._hashes: dict[tuple[str, str, str], tuple[str, str | Problem]] = {}
        self._relay: dict[tuple[str, str], tuple[str, tuple[str, str] | Problem]] = {}
        #: (namespace, Secret name) -> why the last read failed, and when (time.monotonic)
        self._errors: dict[tuple[str, str], tuple[KubeError, float]] = {}

    async def load(self, redis: RedisClient, redis_key: str) -> None:
        """Take the hashes a previous run stored (a failure only costs re-hashing)."""
        self.redis, self.redis_key = redis, redis_key
        try:
            stored = await redis.hgetall(redis_key)
        except Exception as exc:
            log.warning("reading stored password hashes failed (they are made again): %r", exc)
            return
        self._stored = {_text(k): _text(v) for k, v in stored.items()}

    async def _store(self, value_fingerprint: str, password_hash: str) -> None:
        self._stored[value_fingerprint] = password_hash
        if self.redis is None:
            return
        try:
            await self.redis.hset(self.redis_key, value_fingerprint, password_hash)
        except Exception as exc:  # the hash is in memory; a restart would make it again
            log.warning("storing a password hash failed: %r", exc)

    async def prune(self, used: Iterable[str]) -> None:
        """Forget the hashes of values no MailUser refers to any more."""
        used = set(used)
        for ref in [r for r, entry in self._hashes.items() if entry[0] not in used]:
            del self._hashes[ref]
        stale = self._stored.keys() - used
        if not stale:
            return
        for gone in stale:
            del self._stored[gone]
        if self.redis is None:
            return
        try:
            await self.redis.hdel(self.redis_key, *stale)
        except Exception as exc:
            log.warning("removing stale password hashes failed: %r", exc)

    async def _read(self, kube: Kube, namespace: str, name: str) -> dict[str, str] | None:
        failed = self._errors.get((namespace, name))
        if failed is not None and time.monotonic() - failed[1] < self.retry_delay:
            raise failed[0]
        try:
            data = await kube.read_secret_data(namespace, name)
        except KubeError as exc:
            log.warning("reading Secret %s/%s failed: %s", namespace, name, exc)
            self._errors[(namespace, name)] = (exc, time.monotonic())
            raise
        self._errors.pop((namespace, name), None)
        return data

    def _not_read(self, reason: str, namespace: str, name: str) -> Problem:
        failed = self._errors.get((namespace, name))
        why = f" ({failed[0]}); retrying" if failed else " yet"
        return Problem(reason, f"Secret {name} could not be read{why}")

    async def refresh_password(
        self, kube: Kube, namespace: str, ref: SecretKeyRef, known: Fingerprints
    ) -> None:
        """Read and hash the password if its fingerprint is new; KubeError if the read fails."""
        current = (known.get((namespace, ref.name)) or {}).get(ref.key)
        cached = self._hashes.get((namespace, ref.name, ref.key))
        if current is None or (cached is not None and cached[0] == current):
            return
        if current in self._stored:  # hashed before, by this run or an earlier one
            self._hashes[(namespace, ref.name, ref.key)] = (current, self._stored[current])
            return
        data = await self._read(kube, namespace, ref.name)
        value = (data or {}).get(ref.key)
        if value is None:
            return
        result: str | Problem
        try:
            plain = _decode(value)
            result = await asyncio.to_thread(hash_password, plain)
            del plain
        except ValueError:
            result = Problem(
                "PasswordSecretMissing", f"key {ref.key} of Secret {ref.name} is empty or not text"
            )
        value_fingerprint = fingerprint(value, self.key)
        self._hashes[(namespace, ref.name, ref.key)] = (value_fingerprint, result)
        if isinstance(result, str):
            await self._store(value_fingerprint, result)

    def password(self, namespace: str, ref: SecretKeyRef, known: Fingerprints) -> str | Problem:
        entry = known.get((namespace, ref.name))
        if entry is None:
            return Problem("PasswordSecretMissing", f"Secret {ref.name} not found")
        if ref.key not in entry:
            return Problem("PasswordSecretMissing", f"Secret {ref.name} has no key {ref.key}")
        cached = self._hashes.get((namespace, ref.name, ref.key))
        if cached is None or cached[0] != entry[ref.key]:
            return self._not_read("PasswordSecretMissing", namespace, ref.name)
        return cached[1]

    async def refresh_relay(
        self, kube: Kube, namespace: str, ref: RelayCredentials, known: Fingerprints
    ) -> None:
        entry = known.get((namespace, ref.name))
        if entry is None:
            return
        marker = f"{entry.get(ref.username_key)}/{entry.get(ref.password_key)}"
        cached = self._relay.get((namespace, ref.name))
        if cached is not None and cached[0] == marker:
            return
        data = await self._read(kube, namespace, ref.name) or {}
        result: tuple[str, str] | Problem
        try:
            result = (_decode(data[ref.username_key]), _decode(data[ref.password_key]))
        except (KeyError, ValueError):
            result = Problem(
                "RelaySecretMissing",
                f"Secret {ref.name} needs keys {ref.username_key} and {ref.password_key}",
            )
        self._relay[(namespace, ref.name)] = (marker, result)

    def relay(
        self, namespace: str, ref: RelayCredentials, known: Fingerprints
    ) -> tuple[str, str] | Problem:
        entry = known.get((namespace, ref.name))
        if entry is None:
            return Problem("RelaySecretMissing", f"Secret {ref.name} not found")
        marker = f"{entry.get(ref.username_key)}/{entry.get(ref.password_key)}"
        cached = self._relay.get((namespace, ref.name))
        if cached is None or cached[0] != marker:
            return self._not_read("RelaySecretMissing", namespace, ref.name)
        return cached[1]
