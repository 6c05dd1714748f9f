"""The DKIM-keys step (dkim_keys.DkimKeys) on its own, without a reconciler."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from test_operator_reconciler import FakeKube, record

from mailkube_core.routing import TableGlobals
from mailkube_core.settings import OperatorSettings
from mailkube_operator.dkim import decode_data
from mailkube_operator.dkim_keys import DkimKeys
from mailkube_operator.kube import Kube, KubeError
from mailkube_operator.models import MailDomainSpec
from mailkube_operator.plan import DomainOutcome, Key, ObjectRecord, Plan

SPEC = {"domain": "example.test", "dkim": {"algorithm": "ed25519"}}


def step(kube: FakeKube, index: dict[Key, dict[str, str]]) -> DkimKeys:
    settings = OperatorSettings.model_validate(
        {"hostname": "op.example.test", "retry_delay": "30s", "log_format": "text"}
    )
    events: list[tuple[str, str]] = []

    async def event(record: ObjectRecord, type_: str, reason: str, message: str) -> None:
        events.append((type_, reason))

    def written(record: ObjectRecord) -> dict[str, Any]:
        return record.status

    return DkimKeys(
        settings=settings, kube=cast(Kube, kube), event=event, indexed=index.get,
        written_status=written, dns_results={}, not_before={},
        clock=lambda: datetime(2026, 1, 1, tzinfo=UTC),
    )  # fmt: skip


def plan_of(domain: ObjectRecord, keys: DkimKeys, fresh: dict[Key, dict[str, str]]) -> Plan:
    spec = MailDomainSpec.model_validate(SPEC)
    outcome = DomainOutcome(spec=spec, domain="example.test", keys=keys.keys(domain, spec, fresh))
    return Plan(entries={}, globals=TableGlobals(), domains={domain.key: outcome}, users={})


async def test_a_missing_key_is_made_and_then_signs() -> None:
    kube = FakeKube()
    keys = step(kube, {})
    domain = record("MailDomain", "example", SPEC)
    fresh: dict[Key, dict[str, str]] = {}
    assert await keys.ensure([domain], plan_of(domain, keys, fresh), fresh)
    assert "mailkube.ed25519-sha256" in decode_data(kube.secrets["example-dkim"])
    assert domain.key in keys.watch  # looked at again until the plan shows the key
    published = keys.keys(domain, MailDomainSpec.model_validate(SPEC), fresh)
    assert [(k.key.selector, k.key.signing) for k in published] == [("mailkube", True)]
    assert [w.data_key for w in keys.signing_wanted[domain.key]] == ["mailkube.ed25519-sha256"]

    # with its key in place nothing is written, and nothing is kept for a domain gone
    assert not await keys.ensure([domain], plan_of(domain, keys, fresh), fresh)
    assert domain.key not in keys.watch
    keys.forget_gone(set())
    assert not keys.signing_wanted


async def test_a_secret_that_cannot_be_made_is_an_error_and_waits_for_retry_delay() -> None:
    kube = FakeKube()
    kube.fail_create = KubeError(403, "forbidden")
    keys = step(kube, {})
    domain = record("MailDomain", "example", SPEC)
    fresh: dict[Key, dict[str, str]] = {}
    assert not await keys.ensure([domain], plan_of(domain, keys, fresh), fresh)
    assert keys.errors[domain.key] == "Secret example-dkim: Kubernetes API 403 forbidden"
    assert ("dkim", domain.key) in keys.not_before
    kube.fail_create = None
    assert not await keys.ensure([domain], plan_of(domain, keys, fresh), fresh)
    assert kube.creates == 1  # not tried again before retry_delay
    keys.not_before.clear()  # retry_delay has passed
    assert await keys.ensure([domain], plan_of(domain, keys, fresh), fresh)
    assert domain.key not in keys.errors
    assert not keys.not_before
