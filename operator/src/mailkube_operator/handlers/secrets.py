"""Secrets: fingerprints of every Secret (no plaintext), the DKIM Secrets' keys, and
re-publishing when a Secret a MailUser or MailDomain references changes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from mailkube_core.settings import OperatorSettings

from .. import dkim
from ..plan import Key, ObjectRecord
from ..secrets import fingerprints
from ..state import reconcile


def password_secrets_idx(body: kopf.Body, **_: Any) -> dict[Key, dict[str, str]]:
    meta = body.get("metadata") or {}
    return {(str(meta.get("namespace")), str(meta.get("name"))): fingerprints(body.get("data"))}


def dkim_secrets_idx(body: kopf.Body, **_: Any) -> dict[Key, dict[str, str]]:
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    return {key: dkim.decode_data(body.get("data"))}


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
    **kwargs: Any,
) -> None:
    users, domains = kwargs["mailusers_idx"], kwargs["maildomains_idx"]
    if dkim.DKIM_LABEL in labels or referenced(namespace or "", name, users, domains):
        await reconcile(memo)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.index("v1", "secrets", labels={dkim.DKIM_LABEL: kopf.ABSENT}, registry=registry)(
        password_secrets_idx
    )
    kopf.index("v1", "secrets", labels={dkim.DKIM_LABEL: kopf.PRESENT}, registry=registry)(
        dkim_secrets_idx
    )
    kopf.on.event("v1", "secrets", registry=registry)(secret_changed)
