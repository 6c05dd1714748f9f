"""What the operator takes from Secrets it does not own: password hashes and relay credentials.

The Secret index keeps only fingerprints (keyed HMAC-SHA256 of each value, with a key that
lives and dies with the process), never plaintext. When a referenced value's fingerprint is
new, the Secret is read once through the API and the password hashed with argon2id; the
plaintext is dropped at once. A changed Secret has a new fingerprint, so it is re-hashed.

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
from collections.abc import Mapping

from mailkube_core.routing import hash_password

from .kube import Kube, KubeError
from .models import RelayCredentials, SecretKeyRef
from .plan import Problem

log = logging.getLogger(__name__)

_KEY = _random.token_bytes(32)

#: (namespace, Secret name) -> {data key: fingerprint}
Fingerprints = Mapping[tuple[str, str], Mapping[str, str]]


def fingerprint(value_b64: str) -> str:
    return hmac.new(_KEY, value_b64.encode(), hashlib.sha256).hexdigest()


def fingerprints(data: Mapping[str, str] | None) -> dict[str, str]:
    return {key: fingerprint(str(value)) for key, value in (data or {}).items()}


def _decode(value_b64: str) -> str:
    return base64.b64decode(value_b64, validate=True).decode()


class SecretValues:
    """Password hashes and relay credentials, refreshed when a fingerprint moves."""

    def __init__(self, retry_delay: float = 30.0) -> None:
        self.retry_delay = retry_delay
        self._hashes: dict[tuple[str, str, str], tuple[str, str | Problem]] = {}
        self._relay: dict[tuple[str, str], tuple[str, tuple[str, str] | Problem]] = {}
        #: (namespace, Secret name) -> why the last read failed, and when (time.monotonic)
        self._errors: dict[tuple[str, str], tuple[KubeError, float]] = {}

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
        self._hashes[(namespace, ref.name, ref.key)] = (fingerprint(value), result)

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
