"""Secrets: kept in the store (fingerprints of every Secret, no plaintext; the DKIM Secrets'
keys), and re-publishing when a DKIM Secret or a Secret a MailUser or MailDomain references
changes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from mailkube_core.settings import OperatorSettings

from .. import dkim
from ..plan import ObjectRecord
from ..state import reconcile, state_of


def referenced(
    namespace: str,
    name: str,
    users: Mapping[Any, Iterable[ObjectRecord]],
    domains: Mapping[Any, Iterable[ObjectRecord]],
) -> bool:
    """Whether a MailUser's passwordSecretRef or a MailDomain's relay names this Secret."""
    for key in list(users):
        for user in users[key]:
            ref = user.spec.get("passwordSecretRef")
            if user.namespace == namespace and isinstance(ref, dict) and ref.get("name") == name:
                return True
    for key in list(domains):
        for domain in domains[key]:
            relay = domain.spec.get("relay")
            ref = relay.get("credentialsSecretRef") if isinstance(relay, dict) else None
            if domain.namespace == namespace and isinstance(ref, dict) and ref.get("name") == name:
                return True
    return False


async def secret_changed(
    name: str,
    namespace: str | None,
    labels: Mapping[str, str],
    memo: Any,
    body: kopf.Body,
    **kwargs: Any,
) -> None:
    state = state_of(memo)
    state.stores.secret_event(kwargs.get("type"), body)
    reconciler = state.reconciler
    if reconciler is None or reconciler.reconciles == 0:
        return  # the first reconcile, still to come, reads the store as it is then
    users, domains = state.stores.users.index, state.stores.domains.index
    if dkim.DKIM_LABEL in labels or referenced(namespace or "", name, users, domains):
        await reconcile(memo)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.event("v1", "secrets", registry=registry)(secret_changed)
