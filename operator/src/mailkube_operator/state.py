"""What the operator's handlers share, kept in kopf's memo (one per operator run)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import kopf

from mailkube_core.redis_client import RedisClient
from mailkube_core.settings import OperatorSettings

from .publish import Reconciler


@dataclass
class OperatorState:
    settings: OperatorSettings
    connection: kopf.ConnectionInfo | None = None
    redis: RedisClient | None = None
    reconciler: Reconciler | None = None
    initial_publish: asyncio.Task[None] | None = None
    redis_check: asyncio.Task[None] | None = None
    dns_check: asyncio.Task[None] | None = None


def state_of(memo: Any) -> OperatorState:
    state = memo["state"]
    assert isinstance(state, OperatorState)
    return state


async def reconcile(memo: Any) -> None:
    """Ask for a reconcile (and wait for it); a no-op before start-up is done."""
    reconciler = state_of(memo).reconciler
    if reconciler is not None:
        await reconciler.request()
