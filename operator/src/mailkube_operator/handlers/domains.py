"""MailDomain: kept in the store, and re-publishing on every change. The reconciler does the
rest, DKIM keys included (its DKIM-keys step, dkim_keys.DkimKeys.ensure): it sees every change
of a MailDomain and of its DKIM Secret, so a key lost with its Secret is made again."""

from __future__ import annotations

from typing import Any

import kopf

from mailkube_core.settings import OperatorSettings

from ..models import DOMAINS, GROUP, VERSION
from ..state import reconcile, state_of
from ..store import Stores


async def domain_changed(memo: Any, body: kopf.Body, **kwargs: Any) -> None:
    state = state_of(memo)
    echo = state.reconciler is not None and state.reconciler.is_echo(
        DOMAINS, body, kwargs.get("type")
    )
    Stores.object_event(state.stores.domains, kwargs.get("type"), body, echo=echo)
    if echo:
        return  # our own status write coming back: the plan would be the same
    await reconcile(memo)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.event(GROUP, VERSION, DOMAINS, registry=registry)(domain_changed)
