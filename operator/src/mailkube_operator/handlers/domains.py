"""MailDomain: the index, re-publishing on every change, and the DKIM Secret."""

from __future__ import annotations

from typing import Any

import kopf
from pydantic import ValidationError

from mailkube_core.settings import OperatorSettings

from .. import dkim
from ..kube import KubeError
from ..models import DOMAINS, GROUP, VERSION, MailDomainSpec
from ..plan import Key, ObjectRecord
from ..state import reconcile, state_of


def maildomains_idx(body: kopf.Body, **_: Any) -> dict[Key, ObjectRecord]:
    record = ObjectRecord.from_body(body)
    return {record.key: record}


async def domain_changed(memo: Any, **_: Any) -> None:
    await reconcile(memo)


async def ensure_dkim_keys(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    uid: str,
    memo: Any,
    **_: Any,
) -> None:
    """Create the DKIM Secret, or add the keys a new selector needs; never overwrite a key."""
    state = state_of(memo)
    reconciler = state.reconciler
    if reconciler is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    try:
        parsed = MailDomainSpec.model_validate(dict(spec))
    except ValidationError:
        return  # the reconcile reports Invalid
    wanted = dkim.wanted_keys(parsed.dkim.selector, parsed.dkim.algorithm)
    namespace = namespace or ""
    key = (namespace, name)
    secret = dkim.secret_name(name)
    try:
        data = await reconciler.kube.read_secret_data(namespace, secret)
        if data is None:
            secret_body = dkim.secret_body(
                namespace=namespace, domain_name=name, domain_uid=uid,
                data=dkim.missing_keys({}, wanted),
            )  # fmt: skip
            await reconciler.kube.create_secret(namespace, secret_body)
            kopf.event(body, type="Normal", reason="DKIMKeyCreated",
                       message=f"generated DKIM keys into Secret {secret}")  # fmt: skip
        else:
            new = dkim.missing_keys(dkim.decode_data(data), wanted)
            if new:
                encoded = dkim.secret_body(
                    namespace=namespace, domain_name=name, domain_uid=uid, data=new
                )["data"]
                await reconciler.kube.patch_secret_data(namespace, secret, encoded)
                message = f"added DKIM keys {', '.join(new)} to Secret {secret}"
                kopf.event(body, type="Normal", reason="DKIMKeyRotated", message=message)
    except KubeError as exc:
        reconciler.dkim_errors[key] = f"Secret {secret}: {exc}"
        await reconciler.request()
        raise kopf.TemporaryError(
            f"DKIM Secret {secret}: {exc}", delay=state.settings.retry_delay.total_seconds()
        ) from None
    if reconciler.dkim_errors.pop(key, None) is not None:
        await reconciler.request()


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.index(GROUP, VERSION, DOMAINS, registry=registry)(maildomains_idx)
    kopf.on.event(GROUP, VERSION, DOMAINS, registry=registry)(domain_changed)
    for decorator in (kopf.on.create, kopf.on.resume):
        decorator(GROUP, VERSION, DOMAINS, registry=registry, id="dkim")(ensure_dkim_keys)
    kopf.on.update(GROUP, VERSION, DOMAINS, field="spec.dkim", registry=registry, id="dkim")(
        ensure_dkim_keys
    )
