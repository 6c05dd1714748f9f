"""MailUser: kept in the store, and re-publishing on every change (the reconciler does the
rest)."""

from __future__ import annotations

from typing import Any

import kopf

from mailkube_core.settings import OperatorSettings

from ..models import GROUP, USERS, VERSION
from ..state import reconcile, state_of
from ..store import Stores


async def user_changed(memo: Any, body: kopf.Body, **kwargs: Any) -> None:
    state = state_of(memo)
    echo = state.reconciler is not None and state.reconciler.is_echo(
        USERS, body, kwargs.get("type")
    )
    Stores.object_event(state.stores.users, kwargs.get("type"), body, echo=echo)
    if echo:
        return  # our own status write coming back: the plan would be the same
    await reconcile(memo)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.event(GROUP, VERSION, USERS, registry=registry)(user_changed)
