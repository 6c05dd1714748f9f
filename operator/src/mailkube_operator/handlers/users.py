"""MailUser: the index and re-publishing on every change (the reconciler does the rest)."""

from __future__ import annotations

from typing import Any

import kopf

from mailkube_core.settings import OperatorSettings

from ..models import GROUP, USERS, VERSION
from ..plan import Key, ObjectRecord
from ..state import reconcile


def mailusers_idx(body: kopf.Body, **_: Any) -> dict[Key, ObjectRecord]:
    record = ObjectRecord.from_body(body)
    return {record.key: record}


async def user_changed(memo: Any, **_: Any) -> None:
    await reconcile(memo)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.index(GROUP, VERSION, USERS, registry=registry)(mailusers_idx)
    kopf.on.event(GROUP, VERSION, USERS, registry=registry)(user_changed)
