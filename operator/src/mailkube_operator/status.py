"""The status builder: the status a MailDomain or a MailUser should have, from values alone.

Pure: each function takes what the plan decided for the object (plan.DomainOutcome,
plan.UserOutcome), the status last written (`base`, whose conditions keep their
lastTransitionTime while their status holds), what the DKIM step, the DNS check and the
gateway's suspensions say of it, the publish error, and the time to stamp a condition that
changes with (`at`). No clock, no Kubernetes, no Redis: the reconciler (reconciler.py)
compares what comes out with the status last written and patches what moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailkube_core.settings import OperatorSettings

from . import rotation
from .conditions import ConditionValue, set_condition
from .dane import DaneKeys, tlsa_records
from .dkim import WantedKey, secret_name, wanted_keys
from .dnscheck import DnsResult, record_keys
from .dnsrecords import dns_records
from .plan import DomainOutcome, ObjectRecord, UserOutcome
from .spam import effective
from .suspensions import SUBMISSION_SUSPENDED, SuspensionState


def domain_status(
    record: ObjectRecord,
    base: Mapping[str, Any],
    outcome: DomainOutcome,
    *,
    settings: OperatorSettings,
    publish_error: str | None,
    dkim_error: str | None,
    signing_wanted: list[WantedKey] | None,
    rotation_condition: ConditionValue | None,
    dns: DnsResult | None,
    dane_keys: DaneKeys | None,
    at: str,
) -> dict[str, Any]:
    """A MailDomain's status. `dkim_error`, `signing_wanted`, `rotation_condition`: the DKIM
    step's (dkim_keys.DkimKeys); `dns`: the DNS check's last result for the domain."""
    values: dict[str, ConditionValue] = {
        "Published": published(outcome, publish_error),
        "DKIMKeyReady": dkim_key_ready(record, outcome, dkim_error, signing_wanted),
    }
    records = domain_records(outcome, settings, dane_keys)
    values["DNSVerified"] = dns_verified(
        records, dns, check_enabled=bool(settings.dns_check_interval)
    )
    if rotation_condition is not None and outcome.published:
        values[rotation.CONDITION] = rotation_condition
    failing = [v for k, v in values.items()
               if k in ("Published", "DKIMKeyReady") and v.status != "True"]  # fmt: skip
    if outcome.warning is not None:
        failing.append(ConditionValue("False", outcome.warning.reason, outcome.warning.message))
    values["Ready"] = (
        ConditionValue("False", failing[0].reason, failing[0].message)
        if failing
        else ConditionValue("True", "Ready", f"serving {outcome.domain}")
    )
    return {
        "observedGeneration": record.generation,
        "domain": outcome.domain if outcome.published else base.get("domain"),
        "conditions": conditions(record, base, values, at),
        "users": outcome.users,
        "dkimSecret": secret_name(record.name),
        "dnsRecords": records,
        "spam": effective(outcome.spec.spam, settings).dump() if outcome.spec else None,
    }


def published(outcome: DomainOutcome, publish_error: str | None) -> ConditionValue:
    if outcome.rejected is not None:
        return ConditionValue("False", outcome.rejected.reason, outcome.rejected.message)
    if publish_error is not None:
        return ConditionValue("False", "RedisUnavailable", publish_error)
    return ConditionValue("True", "Published", f"{outcome.domain} is in the routing table")


def dkim_key_ready(
    record: ObjectRecord,
    outcome: DomainOutcome,
    error: str | None,
    signing_wanted: list[WantedKey] | None,
) -> ConditionValue:
    """DKIMKeyReady: True once as many keys sign as are wanted (`signing_wanted`: the active
    rotation generation's, else those of spec.dkim)."""
    signing = [k.key.selector for k in outcome.keys if k.key.signing]
    wanted = (
        signing_wanted or wanted_keys(outcome.spec.dkim.selector, outcome.spec.dkim.algorithm)
        if outcome.spec
        else []
    )
    if error is not None:
        return ConditionValue("False", "DKIMSecretFailed", error)
    if wanted and len(signing) >= len(wanted):
        return ConditionValue("True", "KeysReady", f"signing with selector {', '.join(signing)}")
    return ConditionValue(
        "False", "KeysPending", f"waiting for the keys in Secret {secret_name(record.name)}"
    )


def domain_records(
    outcome: DomainOutcome, settings: OperatorSettings, dane_keys: DaneKeys | None
) -> list[dict[str, Any]]:
    """The DNS records a MailDomain's status lists (none while its spec is invalid)."""
    if outcome.spec is None or outcome.domain is None:
        return []
    return [r.dump() for r in dns_records(
        outcome.domain, outcome.spec, settings.mx_hostname(), outcome.keys,
        mta_sts_host_target=settings.mta_sts_host_target,
        tlsa=tlsa_records(settings.mx_hostname(), dane_keys))]  # fmt: skip


def dns_checked(records: list[dict[str, Any]], result: DnsResult | None) -> bool:
    """Whether the DNS check's result is for these records (not for ones listed before)."""
    return result is not None and result.records == record_keys(records)


def dns_verified(
    records: list[dict[str, Any]], result: DnsResult | None, *, check_enabled: bool
) -> ConditionValue:
    if not check_enabled:
        return ConditionValue(
            "Unknown", "CheckDisabled", "the DNS check is off (dns_check_interval)"
        )
    if not records:
        return ConditionValue("Unknown", "Pending", "no records to check")
    if result is None or not dns_checked(records, result):
        return ConditionValue("Unknown", "Pending", "not checked yet")
    return result.value


def user_status(
    record: ObjectRecord,
    base: Mapping[str, Any],
    outcome: UserOutcome,
    *,
    publish_error: str | None,
    suspensions: SuspensionState,
    at: str,
) -> dict[str, Any]:
    """A MailUser's status: Ready, and SubmissionSuspended once the suspensions were read."""
    if outcome.problem is not None:
        ready = ConditionValue("False", outcome.problem.reason, outcome.problem.message)
    elif publish_error is not None:
        ready = ConditionValue("False", "RedisUnavailable", publish_error)
    elif not outcome.can_login:
        ready = ConditionValue(
            "True",
            "Published",
            "in the routing table; cannot log in (no password or suspended)",
        )
    else:
        ready = ConditionValue("True", "Published", "in the routing table")
    values = {"Ready": ready}
    suspended = suspensions.condition(
        record.key, outcome.address, list(base.get("conditions") or [])
    )
    if suspended is not None:
        values[SUBMISSION_SUSPENDED] = suspended
    return {
        "observedGeneration": record.generation,
        "conditions": conditions(record, base, values, at),
        "mailbox": outcome.mailbox,
    }


def conditions(
    record: ObjectRecord,
    base: Mapping[str, Any],
    values: Mapping[str, ConditionValue],
    at: str,
) -> list[dict[str, Any]]:
    """`base`'s conditions with `values` set (a condition whose status changes is stamped
    `at`)."""
    result: list[dict[str, Any]] = list(base.get("conditions") or [])
    for type_, value in values.items():
        result = set_condition(
            result, type_, value.status, value.reason, value.message, record.generation, at=at
        )
    return result
