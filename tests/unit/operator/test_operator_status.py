"""The status builder (status.py): statuses and conditions from values, no reconciler."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import SecretStr

from mailkube_core.routing import DkimKey
from mailkube_core.settings import OperatorSettings
from mailkube_core.suspensions import Suspension
from mailkube_operator import status
from mailkube_operator.conditions import ConditionValue, find
from mailkube_operator.dkim import PublishedKey
from mailkube_operator.dnscheck import DnsResult, record_keys
from mailkube_operator.models import MailDomainSpec
from mailkube_operator.plan import DomainOutcome, ObjectRecord, Problem, UserOutcome
from mailkube_operator.suspensions import SUBMISSION_SUSPENDED, SuspensionState

AT = "2026-01-02T03:04:05Z"
SETTINGS = OperatorSettings.model_validate({"hostname": "mx.example.test", "log_format": "text"})


def record(kind: str, name: str, status_: dict[str, Any] | None = None) -> ObjectRecord:
    return ObjectRecord.from_body({
        "apiVersion": "mailkube.io/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": "mail", "uid": f"uid-{name}", "generation": 3,
                     "creationTimestamp": "2025-01-01T00:00:00Z", "resourceVersion": "1"},
        "spec": {}, "status": status_ or {}})  # fmt: skip


def served(*, signing: bool = True) -> DomainOutcome:
    spec = MailDomainSpec.model_validate({"domain": "example.test",
                                          "dkim": {"algorithm": "ed25519"}})  # fmt: skip
    key = DkimKey(selector="mailkube", algorithm="ed25519-sha256", private_key=SecretStr("seed"),
                  signing=signing)  # fmt: skip
    published = PublishedKey(key, "v=DKIM1; k=ed25519; p=abc")
    return DomainOutcome(spec=spec, domain="example.test", keys=[published], users=2)


def domain(outcome: DomainOutcome, base: dict[str, Any] | None = None,
           **given: Any) -> dict[str, Any]:  # fmt: skip
    inputs: dict[str, Any] = {
        "settings": SETTINGS, "publish_error": None, "dkim_error": None, "signing_wanted": None,
        "rotation_condition": None, "dns": None, "dane_keys": None, "at": AT, **given,
    }  # fmt: skip
    return status.domain_status(record("MailDomain", "example"), base or {}, outcome, **inputs)


def condition(result: dict[str, Any], type_: str) -> tuple[str, str]:
    found = find(result["conditions"], type_)
    assert found is not None, type_
    return found["status"], found["reason"]


def test_a_served_domain_with_its_key_signing_is_ready() -> None:
    result = domain(served())
    assert condition(result, "Published") == ("True", "Published")
    assert condition(result, "DKIMKeyReady") == ("True", "KeysReady")
    assert condition(result, "Ready") == ("True", "Ready")
    assert [c["type"] for c in result["conditions"]] == [
        "Published", "DKIMKeyReady", "DNSVerified", "Ready"]  # fmt: skip
    assert all(c["lastTransitionTime"] == AT and c["observedGeneration"] == 3
               for c in result["conditions"])  # fmt: skip
    assert result["domain"] == "example.test"
    assert (result["users"], result["dkimSecret"]) == (2, "example-dkim")
    assert {r["purpose"] for r in result["dnsRecords"]} >= {"mx", "spf", "dkim", "dmarc"}


def test_ready_is_false_with_the_first_failure() -> None:
    result = domain(served(), publish_error="Redis: ConnectionError: refused")
    assert condition(result, "Published") == ("False", "RedisUnavailable")
    assert condition(result, "Ready") == ("False", "RedisUnavailable")

    rejected = served()
    rejected.rejected = Problem("DomainConflict", "example.test is served by mail/other")
    result = domain(rejected, {"domain": "before.test"})
    assert condition(result, "Ready") == ("False", "DomainConflict")
    assert result["domain"] == "before.test"  # not published: the status keeps the old one


def test_dkim_key_ready_follows_the_dkim_step() -> None:
    failed = domain(served(), dkim_error="Secret example-dkim: forbidden")
    assert condition(failed, "DKIMKeyReady") == ("False", "DKIMSecretFailed")
    assert condition(failed, "Ready") == ("False", "DKIMSecretFailed")
    pending = domain(served(signing=False))
    assert condition(pending, "DKIMKeyReady") == ("False", "KeysPending")
    rotating = ConditionValue("True", "Overlap", "mk-2 signs")
    assert condition(domain(served(), rotation_condition=rotating), "DKIMRotation") == (
        "True", "Overlap")  # fmt: skip


def test_dns_verified_from_the_dns_check() -> None:
    assert condition(domain(served()), "DNSVerified") == ("Unknown", "CheckDisabled")
    checking = SETTINGS.model_copy(update={"dns_check_interval": timedelta(minutes=5)})
    assert condition(domain(served(), settings=checking), "DNSVerified") == (
        "Unknown", "Pending")  # fmt: skip
    records = domain(served())["dnsRecords"]
    found = DnsResult(record_keys(records), ConditionValue("True", "Verified", "all found"))
    assert condition(domain(served(), settings=checking, dns=found), "DNSVerified") == (
        "True", "Verified")  # fmt: skip
    stale = DnsResult(record_keys(records[1:]), ConditionValue("True", "Verified", "all found"))
    assert not status.dns_checked(records, stale)
    assert condition(domain(served(), settings=checking, dns=stale), "DNSVerified") == (
        "Unknown", "Pending")  # fmt: skip


def test_an_unchanged_condition_keeps_its_transition_time() -> None:
    first = domain(served())
    later = domain(served(), first, at="2027-01-01T00:00:00Z")
    assert later["conditions"] == first["conditions"]


def test_a_users_ready_and_submission_suspended() -> None:
    user = record("MailUser", "alice")
    outcome = UserOutcome(
        address="alice@example.test", published=True, mailbox="example.test/alice", can_login=True
    )
    unread = SuspensionState()
    result = status.user_status(user, {}, outcome, publish_error=None, suspensions=unread, at=AT)
    assert [c["type"] for c in result["conditions"]] == ["Ready"]  # not read: left as it is
    assert condition(result, "Ready") == ("True", "Published")
    assert result["mailbox"] == "example.test/alice"

    since = datetime(2026, 1, 2, tzinfo=UTC)
    suspended = SuspensionState(known={"alice@example.test": Suspension(
        address="alice@example.test", since=since, rejections=5)})  # fmt: skip
    result = status.user_status(user, {}, outcome, publish_error="Redis: down",
                                suspensions=suspended, at=AT)  # fmt: skip
    assert condition(result, "Ready") == ("False", "RedisUnavailable")
    assert condition(result, SUBMISSION_SUSPENDED) == ("True", "SpamRejections")

    missing = UserOutcome(problem=Problem("DomainNotFound", "no MailDomain serves example.test"))
    result = status.user_status(user, {}, missing, publish_error=None, suspensions=unread, at=AT)
    assert condition(result, "Ready") == ("False", "DomainNotFound")
