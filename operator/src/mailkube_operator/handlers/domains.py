"""MailDomain: the index, and re-publishing on every change. The reconciler does the rest,
DKIM keys included (publish.Reconciler._ensure_dkim_keys): it sees every change of a
MailDomain and of its DKIM Secret, so a key lost with its Secret is made again."""

from __future__ import annotations

from typing import Any

import kopf

from mailkube_core.settings import OperatorSettings

from ..models import DOMAINS, GROUP, VERSION
from ..plan import Key, ObjectRecord
from ..state import reconcile


def maildomains_idx(body: kopf.Body, **_: Any) -> dict[Key, ObjectRecord]:
    record = ObjectRecord.from_body(body)
    return {record.key: record}


async def domain_changed(memo: Any, **_: Any) -> None:
    await reconcile(memo)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.index(GROUP, VERSION, DOMAINS, registry=registry)(maildomains_idx)
    kopf.on.event(GROUP, VERSION, DOMAINS, registry=registry)(domain_changed)
