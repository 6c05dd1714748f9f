"""The DNS check timer: resolves each MailDomain's status.dnsRecords (DNSVerified)."""

from __future__ import annotations

from typing import Any

import kopf

from mailkube_core.settings import OperatorSettings

from .. import dnscheck
from ..models import DOMAINS, GROUP, VERSION
from ..publish import ConditionValue
from ..state import state_of


async def check_dns(status: kopf.Status, name: str, namespace: str | None, memo: Any,
                    **_: Any) -> None:  # fmt: skip
    state = state_of(memo)
    reconciler = state.reconciler
    records = list(status.get("dnsRecords") or [])
    if reconciler is None or not records:
        return
    problems = await dnscheck.check(dnscheck.resolver(state.settings), records)
    result = (
        ConditionValue("False", "RecordsMismatch", "; ".join(problems))
        if problems
        else ConditionValue("True", "Verified", f"all {len(records)} records are published")
    )
    key = (namespace or "", name)
    if reconciler.dns_results.get(key) != result:
        reconciler.dns_results[key] = result
        await reconciler.request()


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    interval = settings.dns_check_interval.total_seconds()
    kopf.timer(GROUP, VERSION, DOMAINS, interval=interval, initial_delay=1.0,
               idle=None, registry=registry)(check_dns)  # fmt: skip
