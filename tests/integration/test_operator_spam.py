"""The operator's side of spam defence, against kmock's Kubernetes emulator and a real Redis:
MailDomain spec.spam in the routing table and status.spam (the gateway's defaults for unset
fields), and the MailUser's SubmissionSuspended condition following the gateway's suspensions
in Redis, lifted by annotation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import kmock
import pytest
from kube_emulator import KubeEmulator
from operator_harness import Api, OperatorRun, condition, events, eventually, operator_settings
from redis_servers import RedisServer

from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import SpamPolicy
from mailkube_core.settings import OperatorSettings
from mailkube_core.suspensions import is_suspended, record_spam_rejection
from mailkube_operator.suspensions import LIFT_ANNOTATION

pytestmark = pytest.mark.kmock(cls=KubeEmulator)

THRESHOLD = 3


def settings(redis_url: str, kube_url: str) -> OperatorSettings:
    # gateway defaults other than the built-in ones, to see them in status.spam
    return operator_settings(
        redis_url, kube_url, spam_policy="quarantine", spam_reject_score=15,
        spam_unavailable="accept", suspension_check_interval="0.2s", retry_delay="0.5s",
    )  # fmt: skip


@pytest.fixture
async def operator(
    kmock: kmock.KubernetesEmulator, api: Api, redis_url: str
) -> AsyncIterator[OperatorRun]:
    run = OperatorRun(settings(redis_url, str(kmock.url)))
    await run.start()
    yield run
    await run.stop()


async def suspend(run: OperatorRun, address: str) -> None:
    """What the gateway does for each message of `address` that rspamd refused."""
    redis = connect_redis(run.settings)
    try:
        for _ in range(THRESHOLD):
            await record_spam_rejection(
                redis, run.settings.key_prefix, address, timedelta(hours=1), THRESHOLD
            )
    finally:
        await redis.aclose()


async def suspended(run: OperatorRun, address: str) -> bool:
    redis = connect_redis(run.settings)
    try:
        return await is_suspended(redis, run.settings.key_prefix, address)
    finally:
        await redis.aclose()


async def test_spec_spam_reaches_the_table_and_status_shows_the_policy_in_effect(
    api: Api, operator: OperatorRun
) -> None:
    await api.apply("maildomains", "example", {
        "domain": "example.test", "spam": {"policy": "reject", "junkScore": 6, "greylisting": True},
    })  # fmt: skip
    await api.apply("maildomains", "plain", {"domain": "plain.test"})

    async def published() -> None:
        domains = {d.name: d for d in (await operator.table()).table.domains}
        assert domains["example.test"].spam == SpamPolicy(
            policy="reject", junk_score=6.0, greylisting=True
        )
        assert domains["plain.test"].spam == SpamPolicy()  # the gateway decides
        example = await api.get("maildomains", "example")
        assert example["status"]["spam"] == {
            "policy": "reject",  # its own
            "rejectScore": 15.0,  # the gateway's spam_reject_score
            "junkScore": 6.0,
            "rewriteSubject": False,
            "whenUnavailable": "accept",  # the gateway's spam_unavailable
            "greylisting": True,
        }
        plain = await api.get("maildomains", "plain")
        assert plain["status"]["spam"] == {
            "policy": "quarantine", "rejectScore": 15.0, "rewriteSubject": False,
            "whenUnavailable": "accept", "greylisting": False,
        }  # fmt: skip

    await eventually(published)

    await api.patch("maildomains", "plain", {"spec": {"spam": {"policy": "off"}}})

    async def changed() -> None:
        domains = {d.name: d for d in (await operator.table()).table.domains}
        assert domains["plain.test"].spam == SpamPolicy(policy="off")
        plain = await api.get("maildomains", "plain")
        assert plain["status"]["spam"]["policy"] == "off"

    await eventually(changed)


async def test_junk_score_not_below_reject_score_is_refused_by_the_operator(
    api: Api, operator: OperatorRun
) -> None:
    """The CEL rule of the CRD refuses it on Kubernetes 1.25+; the emulator (like 1.20) admits
    it, and the operator says Invalid instead of publishing it."""
    await api.apply("maildomains", "example", {
        "domain": "example.test", "spam": {"rejectScore": 8, "junkScore": 9}})  # fmt: skip

    async def invalid() -> None:
        domain = await api.get("maildomains", "example")
        published = condition(domain, "Published")
        assert (published["status"], published["reason"]) == ("False", "Invalid")
        assert "junkScore must be below rejectScore" in published["message"]
        assert (await operator.table()).table.domains == []

    await eventually(invalid)


async def test_submission_suspension_appears_and_the_annotation_lifts_it(
    api: Api, operator: OperatorRun
) -> None:
    await api.apply("maildomains", "example", {"domain": "example.test"})
    await api.apply("mailusers", "alice", {"address": "alice@example.test"})
    await api.apply("mailusers", "bob", {"address": "bob@example.test"})

    async def not_suspended() -> None:
        for name in ("alice", "bob"):
            found = condition(await api.get("mailusers", name), "SubmissionSuspended")
            assert (found["status"], found["reason"]) == ("False", "NotSuspended")

    await eventually(not_suspended)

    await suspend(operator, "alice@example.test")

    async def alice_suspended() -> None:
        alice = condition(await api.get("mailusers", "alice"), "SubmissionSuspended")
        assert (alice["status"], alice["reason"]) == ("True", "SpamRejections")
        assert f"{THRESHOLD} messages refused as spam" in alice["message"]
        assert ("Warning", "SpamRejections") in await events(api, "alice")

    await eventually(alice_suspended)
    bob = condition(await api.get("mailusers", "bob"), "SubmissionSuspended")
    assert bob["status"] == "False"  # only alice
    assert ("Warning", "SpamRejections") not in await events(api, "bob")

    await api.patch("mailusers", "alice", {"metadata": {"annotations": {LIFT_ANNOTATION: "now"}}})

    async def lifted() -> None:
        assert not await suspended(operator, "alice@example.test")
        alice = await api.get("mailusers", "alice")
        assert LIFT_ANNOTATION not in (alice["metadata"].get("annotations") or {})
        found = condition(alice, "SubmissionSuspended")
        assert (found["status"], found["reason"]) == ("False", "Lifted")
        assert ("Normal", "Lifted") in await events(api, "alice")

    await eventually(lifted)
    # Ready was never touched by any of it
    assert condition(await api.get("mailusers", "alice"), "Ready")["status"] == "True"

    # suspended again later: True again, a second Warning
    await suspend(operator, "alice@example.test")

    async def again() -> None:
        found = condition(await api.get("mailusers", "alice"), "SubmissionSuspended")
        assert found["status"] == "True"
        warnings = [e for e in await events(api, "alice") if e == ("Warning", "SpamRejections")]
        assert len(warnings) == 2

    await eventually(again)


async def test_suspensions_are_read_again_after_redis_comes_back(
    kmock: KubeEmulator, api: Api, private_redis: RedisServer
) -> None:
    run = OperatorRun(settings(private_redis.url, str(kmock.url)))
    await run.start()
    try:
        await api.apply("maildomains", "example", {"domain": "example.test"})
        await api.apply("mailusers", "alice", {"address": "alice@example.test"})

        async def known() -> None:
            found = condition(await api.get("mailusers", "alice"), "SubmissionSuspended")
            assert found["reason"] == "NotSuspended"

        await eventually(known)
        await asyncio.to_thread(private_redis.kill)

        async def noticed() -> None:
            assert run.state.reconciler is not None
            assert not run.state.reconciler.healthy

        await eventually(noticed)
        # what was known stays in force meanwhile
        assert (
            condition(await api.get("mailusers", "alice"), "SubmissionSuspended")["reason"]
            == "NotSuspended"
        )
        await asyncio.to_thread(private_redis.restart)
        await suspend(run, "alice@example.test")

        async def seen() -> None:
            found = condition(await api.get("mailusers", "alice"), "SubmissionSuspended")
            assert found["status"] == "True"

        await eventually(seen)
    finally:
        await run.stop()
