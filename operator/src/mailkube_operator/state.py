"""What the operator's handlers share, kept in kopf's memo (one per operator run)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from mailkube_core.redis_client import RedisClient
from mailkube_core.settings import OperatorSettings

from .reconciler import Reconciler
from .secrets import random_key
from .store import Stores


@dataclass
class OperatorState:
    settings: OperatorSettings
    redis: RedisClient | None = None
    reconciler: Reconciler | None = None
    #: the key of the Secret index's fingerprints (secrets.fingerprint_key, read at start-up)
    fingerprint_key: bytes = field(default_factory=random_key)
    stores: Stores = field(init=False)
    resync: asyncio.Task[None] | None = None
    freeze: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.stores = Stores(fingerprint_key=lambda: self.fingerprint_key)

    initial_publish: asyncio.Task[None] | None = None
    redis_check: asyncio.Task[None] | None = None
    dns_check: asyncio.Task[None] | None = None
    suspension_check: asyncio.Task[None] | None = None
    dane_check: asyncio.Task[None] | None = None


def state_of(memo: Any) -> OperatorState:
    state = memo["state"]
    assert isinstance(state, OperatorState)
    return state


async def reconcile(memo: Any) -> None:
    """Ask for a reconcile (and wait for it); a no-op before start-up is done."""
    reconciler = state_of(memo).reconciler
    if reconciler is not None:
        await reconciler.request()
