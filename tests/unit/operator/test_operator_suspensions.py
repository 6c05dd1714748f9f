"""Submission suspensions as the MailUser's SubmissionSuspended condition: the state the
operator keeps of the gateway's Redis hash, and the reconciler writing the condition, its
Events, and lifting by annotation, with a fake API and a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from test_operator_reconciler import DOMAIN, FakeKube, FakeStore, fake, record, set_index

from mailkube_core.redis_client import RedisClient, connect_redis
from mailkube_core.routing import RoutingStore
from mailkube_core.settings import OperatorSettings
from mailkube_core.suspensions import (
    Suspension,
    is_suspended,
    list_suspensions,
    record_spam_rejection,
)
from mailkube_operator.kube import Kube, KubeError
from mailkube_operator.plan import ObjectRecord
from mailkube_operator.reconciler import Reconciler
from mailkube_operator.suspensions import LIFT_ANNOTATION, SuspensionState, check_loop

PREFIX = "mailkube"
SINCE = datetime(2026, 1, 1, tzinfo=UTC)
ALICE = Suspension("alice@example.test", SINCE, 5)


def test_the_first_read_is_a_change_and_later_ones_only_when_the_set_moves() -> None:
    state = SuspensionState()
    assert state.condition(("mail", "alice"), "alice@example.test", []) is None  # not read yet
    assert state.update([], state.epoch)
    assert not state.update([], state.epoch)
    assert state.update([ALICE], state.epoch)
    assert not state.update([ALICE], state.epoch)
    assert state.update([Suspension("alice@example.test", SINCE, 6)], state.epoch)


def test_a_read_that_started_before_a_lift_is_ignored() -> None:
    state = SuspensionState()
    epoch = state.epoch
    state.epoch += 1  # a lift happened while the read was on its way
    assert not state.update([ALICE], epoch)
    assert state.known is None


def test_condition_values() -> None:
    state = SuspensionState()
    state.update([Suspension("Alice@Example.TEST", SINCE, 5)], state.epoch)  # as written
    key = ("mail", "alice")
    suspended = state.condition(key, "alice@example.test", [])
    assert suspended is not None
    assert (suspended.status, suspended.reason) == ("True", "SpamRejections")
    assert suspended.message == ALICE.message
    never = state.condition(("mail", "bob"), "bob@example.test", [])
    assert never is not None
    assert (never.status, never.reason) == ("False", "NotSuspended")

    was_true = [{"type": "SubmissionSuspended", "status": "True", "reason": "SpamRejections"}]
    gone = state.condition(("mail", "bob"), "bob@example.test", was_true)
    assert gone is not None
    assert (gone.status, gone.reason) == ("False", "Lifted")
    assert "mailkube spam unsuspend" in gone.message
    # once Lifted, it stays Lifted (with its message) until the next suspension
    lifted = [{"type": "SubmissionSuspended", "status": "False", "reason": "Lifted",
               "message": "lifted by the annotation"}]  # fmt: skip
    kept = state.condition(("mail", "bob"), "bob@example.test", lifted)
    assert kept is not None
    assert (kept.reason, kept.message) == ("Lifted", "lifted by the annotation")


# -- the reconciler --------------------------------------------------------------------------


class LiftingKube(FakeKube):
    def __init__(self) -> None:
        super().__init__()
        self.annotations_removed: list[str] = []
        self.fail_remove: Exception | None = None

    async def remove_annotation(self, plural: str, namespace: str, name: str,
                                annotation: str) -> str | None:  # fmt: skip
        assert (plural, annotation) == ("mailusers", LIFT_ANNOTATION)
        if self.fail_remove is not None:
            raise self.fail_remove
        self.annotations_removed.append(name)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    client = connect_redis(OperatorSettings(redis_url=redis_url, hostname="op.example.test"))
    yield client
    await client.aclose()


def user(rv: str = "1", *, status: dict[str, Any] | None = None,
         lift: bool = False) -> ObjectRecord:  # fmt: skip
    alice = record("MailUser", "alice", {"address": "Alice@example.test"}, rv=rv, status=status)
    if lift:
        return dataclasses.replace(alice, annotations={LIFT_ANNOTATION: "yes"})
    return alice


def make(redis: RedisClient) -> Reconciler:
    settings = OperatorSettings.model_validate(
        {"hostname": "op.example.test", "retry_delay": "30s", "log_format": "text"}
    )
    return Reconciler(settings=settings, store=cast(RoutingStore, FakeStore()),
                      kube=cast(Kube, LiftingKube()), redis=redis)  # fmt: skip


def kube_of(r: Reconciler) -> LiftingKube:
    return cast(LiftingKube, fake(r))


def last_condition(r: Reconciler) -> dict[str, Any]:
    statuses = [status for plural, name, status in fake(r).patches if name == "alice"]
    return next(c for c in statuses[-1]["conditions"] if c["type"] == "SubmissionSuspended")


async def suspend(redis: RedisClient) -> None:
    for _ in range(3):
        await record_spam_rejection(redis, PREFIX, "alice@example.test", timedelta(hours=1), 3)


async def read(r: Reconciler, redis: RedisClient) -> bool:
    """One pass of the check loop."""
    return r.suspensions.update(await list_suspensions(redis, PREFIX), r.suspensions.epoch)


async def test_suspension_then_lift_by_annotation(redis: RedisClient) -> None:
    r = make(redis)
    domain = record("MailDomain", "example", DOMAIN)
    try:
        set_index(r, [domain], [user()])
        assert await read(r, redis)
        await r.request()
        condition = last_condition(r)
        assert (condition["status"], condition["reason"]) == ("False", "NotSuspended")
        assert ("alice", "Normal", "NotSuspended") not in kube_of(r).events  # nothing to say

        await suspend(redis)
        assert await read(r, redis)
        await r.request()
        condition = last_condition(r)
        assert (condition["status"], condition["reason"]) == ("True", "SpamRejections")
        assert "3 messages refused as spam" in condition["message"]
        assert ("alice", "Warning", "SpamRejections") in kube_of(r).events
        patches = len(kube_of(r).patches)
        await r.request()  # nothing moved: nothing written
        assert len(kube_of(r).patches) == patches

        # the annotation: lifted in Redis, annotation removed, condition False/Lifted, Event
        written = kube_of(r).patches[-1][2]
        set_index(r, [domain], [user("2", status=written, lift=True)])
        await r.request()
        assert not await is_suspended(redis, PREFIX, "alice@example.test")
        assert kube_of(r).annotations_removed == ["alice"]
        condition = last_condition(r)
        assert (condition["status"], condition["reason"]) == ("False", "Lifted")
        assert LIFT_ANNOTATION in condition["message"]
        assert kube_of(r).events[-1] == ("alice", "Normal", "Lifted")
        events, patches = len(kube_of(r).events), len(kube_of(r).patches)
        await r.request()  # the index still shows the annotation: handled already
        assert kube_of(r).annotations_removed == ["alice"]
        assert (len(kube_of(r).events), len(kube_of(r).patches)) == (events, patches)

        # the next read agrees (no change); the condition stays Lifted, nothing more is written
        written = kube_of(r).patches[-1][2]
        set_index(r, [domain], [user("3", status=written)])
        assert not await read(r, redis)
        patches = len(kube_of(r).patches)
        await r.request()
        assert len(kube_of(r).patches) == patches
    finally:
        await r.close()


async def test_lift_of_a_user_not_suspended_removes_the_annotation(redis: RedisClient) -> None:
    r = make(redis)
    try:
        set_index(r, [record("MailDomain", "example", DOMAIN)], [user(lift=True)])
        await read(r, redis)
        await r.request()
        assert kube_of(r).annotations_removed == ["alice"]
        assert ("alice", "Normal", "NotSuspended") in kube_of(r).events
        assert last_condition(r)["reason"] == "NotSuspended"
    finally:
        await r.close()


async def test_lift_waits_for_retry_delay_when_the_annotation_cannot_go(
    redis: RedisClient,
) -> None:
    r = make(redis)
    try:
        await suspend(redis)
        set_index(r, [record("MailDomain", "example", DOMAIN)], [user(lift=True)])
        await read(r, redis)
        kube_of(r).fail_remove = KubeError(500, "boom")
        await r.request()
        await r.request()
        assert not await is_suspended(redis, PREFIX, "alice@example.test")  # lifted anyway
        assert kube_of(r).annotations_removed == []
        assert ("lift", ("mail", "alice")) in r.not_before  # not tried again before then
        assert r._retry is not None
        assert not r._retry.done()
        assert last_condition(r)["reason"] == "Lifted"

        kube_of(r).fail_remove = None
        r.not_before.clear()  # retry_delay has passed
        await r.request()
        assert kube_of(r).annotations_removed == ["alice"]
    finally:
        await r.close()


async def test_a_suspension_lifted_elsewhere_is_lifted_in_the_condition(
    redis: RedisClient,
) -> None:
    r = make(redis)
    domain = record("MailDomain", "example", DOMAIN)
    try:
        await suspend(redis)
        set_index(r, [domain], [user()])
        await read(r, redis)
        await r.request()
        assert last_condition(r)["status"] == "True"
        await redis.delete(f"{{{PREFIX}:spam}}:suspended")  # `mailkube spam unsuspend`
        set_index(r, [domain], [user("2", status=kube_of(r).patches[-1][2])])
        assert await read(r, redis)
        await r.request()
        condition = last_condition(r)
        assert (condition["status"], condition["reason"]) == ("False", "Lifted")
        assert kube_of(r).events[-1] == ("alice", "Normal", "Lifted")
    finally:
        await r.close()


# -- the check loop ---------------------------------------------------------------------------


class FlakyRedis:
    """HGETALL fails while `down`; otherwise answers with `entries`."""

    def __init__(self) -> None:
        self.down = True
        self.calls = 0
        self.entries: dict[bytes, bytes] = {}

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        self.calls += 1
        if self.down:
            raise ConnectionError("Redis is away")
        return self.entries


async def test_check_loop_waits_retry_delay_while_redis_is_away_and_reports_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = OperatorSettings.model_validate({
        "hostname": "op.example.test", "retry_delay": "7s",
        "suspension_check_interval": "3s"})  # fmt: skip
    redis = FlakyRedis()
    state = SuspensionState()
    sleeps: list[float] = []
    changes: list[int] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            redis.down = False
        if len(sleeps) == 5:
            redis.entries = {b"alice@example.test": b'{"since": 1767225600, "rejections": 5}'}
        if len(sleeps) == 7:
            raise asyncio.CancelledError

    async def changed() -> None:
        changes.append(len(sleeps))

    with pytest.raises(asyncio.CancelledError):
        await check_loop(state, cast(RedisClient, redis), settings, changed, sleep)
    # three failures, each followed by retry_delay (no hot loop), then the check interval
    assert sleeps == [7.0, 7.0, 7.0, 3.0, 3.0, 3.0, 3.0]
    assert redis.calls == 7
    assert caplog.text.count("reading the submission suspensions failed") == 1
    # the first read (empty: still a change, the conditions get written) and the suspension
    assert changes == [3, 5]
    assert state.known == {"alice@example.test": Suspension("alice@example.test", SINCE, 5)}
