"""The password fingerprint key: made once into its Secret, then read back by every start; a
start that cannot read it retries, then hashes with a key of its own rather than not start."""

from __future__ import annotations

import base64
import logging
from typing import Any, cast

from mailkube_core.settings import OperatorSettings
from mailkube_operator.handlers.lifecycle import FINGERPRINT_KEY_TRIES, _fingerprint_key
from mailkube_operator.kube import Kube, KubeError
from mailkube_operator.secrets import FINGERPRINT_SECRET, fingerprint_key

log = logging.getLogger(__name__)


class SecretsKube:
    def __init__(self, failures: int = 0) -> None:
        self.data: dict[str, dict[str, str]] = {}
        self.failures = failures
        self.reads = 0

    async def read_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        self.reads += 1
        if self.failures:
            self.failures -= 1
            raise KubeError(403, "Forbidden: RBAC cache not loaded yet")
        return self.data.get(name)

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> None:
        if body["metadata"]["name"] in self.data:
            raise KubeError(409, "AlreadyExists")
        self.data[body["metadata"]["name"]] = dict(body["data"])


def settings() -> OperatorSettings:
    return OperatorSettings.model_validate({"hostname": "op.example.test", "retry_delay": "0.01s"})


async def test_made_once_then_read_back() -> None:
    kube = SecretsKube()
    first = await fingerprint_key(cast(Kube, kube), "mail")
    assert len(first) == 32
    assert base64.b64decode(kube.data[FINGERPRINT_SECRET]["key"]) == first
    assert await fingerprint_key(cast(Kube, kube), "mail") == first


async def test_a_refusal_is_retried_then_a_key_of_its_own() -> None:
    kube = SecretsKube()
    stored = await fingerprint_key(cast(Kube, kube), "mail")
    kube.failures = FINGERPRINT_KEY_TRIES - 1
    assert await _fingerprint_key(cast(Kube, kube), settings(), log) == stored

    kube.failures, kube.reads = FINGERPRINT_KEY_TRIES, 0
    own = await _fingerprint_key(cast(Kube, kube), settings(), log)
    assert own != stored
    assert len(own) == 32
    assert kube.reads == FINGERPRINT_KEY_TRIES
