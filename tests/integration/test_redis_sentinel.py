"""Redis through Sentinel (redis_sentinels): a real primary, a replica and three sentinels on
loopback (redis_sentinels.py). When the primary fails over, killed (SIGKILL) or demoted
(SENTINEL FAILOVER: it stays up and answers writes with READONLY), the gateway, the worker and
the operator follow the new primary by themselves, without a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from conditions import eventually
from gateway_harness import ALICE, Running, message, running_gateway
from kube_emulator import KubeEmulator
from operator_harness import Api, OperatorRun, condition, operator_settings
from operator_harness import eventually as operator_eventually
from redis.exceptions import RedisError
from redis_sentinels import SentinelGroup
from worker_harness import maildir_files, running_worker, worker_settings

from mailkube_core.redis_client import connect_redis
from mailkube_core.settings import CommonSettings
from mailkube_core.telemetry import Telemetry

BOB = "bob@example.test"
#: redis_timeout in these tests: a dead primary is given up on quickly
DEADLINE = "2s"
#: a failover, the sentinels' news of it and the components' reconnects, on a busy machine
FOLLOW = 60.0


async def fail_over(group: SentinelGroup, how: str) -> None:
    if how == "kill":
        old = group.kill_primary()
        await asyncio.to_thread(group.wait_for_failover, old)
    else:
        await asyncio.to_thread(group.failover)


#: the last refusal each address got (shown when a test fails)
REFUSALS: dict[str, str] = {}


async def accepted(gw: Running, to: str) -> bool:
    """One try at sending a message to `to`: True on 250, False on a temporary failure (or
    550 for an address the gateway's table does not have yet)."""
    refusal: aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused
    try:
        async with gw.client(gw.mx) as client:
            errors, _ = await client.sendmail("x@remote.test", [to], message(to=to))
            return not errors
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as exc:
        refusal = exc
    REFUSALS[to] = repr(refusal)
    if isinstance(refusal, aiosmtplib.SMTPRecipientsRefused):
        codes = [recipient.code for recipient in refusal.recipients]
    else:
        codes = [refusal.code]
    assert all(400 <= code < 500 or code == 550 for code in codes), refusal
    return False


async def sent(gw: Running, to: str) -> None:
    """Until a message to `to` gets 250, within FOLLOW; else fail with its last refusal."""
    try:
        await eventually(lambda: accepted(gw, to), timeout=FOLLOW)
    except AssertionError:
        raise AssertionError(f"no 250 for {to} within {FOLLOW}s: {REFUSALS.get(to)}") from None


@pytest.mark.parametrize("how", ["kill", "demote"])
async def test_client_follows_a_failover(sentinel_group: SentinelGroup, how: str) -> None:
    """connect_redis through the sentinels: the same client writes to the new primary."""
    settings = CommonSettings(
        redis_url="redis://unused.invalid/0", redis_timeout="2s", **sentinel_group.settings()
    )
    wrong = connect_redis(settings.model_copy(update={"redis_sentinel_master": "nope"}))
    try:
        with pytest.raises(RedisError, match=r"No master found for 'nope'.*redis_sentinel_master"):
            await wrong.ping()
    finally:
        await wrong.aclose()
    client = connect_redis(settings)
    try:
        await client.set("before", b"1")
        await fail_over(sentinel_group, how)

        async def written() -> bool:
            try:
                await client.set("after", b"2")
            except RedisError:
                return False
            return True

        await eventually(written, timeout=FOLLOW)
        primary = sentinel_group.primary().client()
        try:
            assert primary.get("after") == b"2"
            assert primary.get("before") == b"1"  # replicated before the failover
        finally:
            primary.close()
    finally:
        await client.aclose()


@pytest.mark.kmock(cls=KubeEmulator)
@pytest.mark.parametrize("how", ["kill", "demote"])
async def test_gateway_worker_and_operator_follow_a_failover_without_restart(
    sentinel_group: SentinelGroup,
    kmock: KubeEmulator,
    api: Api,
    telemetry: Telemetry,
    tmp_path: Path,
    how: str,
) -> None:
    group = sentinel_group
    sentinels: dict[str, Any] = {**group.settings(), "redis_timeout": DEADLINE}
    url = group.primary().url  # only its scheme and database are used
    await api.apply("maildomains", "example", {"domain": "example.test"})
    await api.apply("mailusers", "alice", {"address": ALICE})
    operator = OperatorRun(operator_settings(url, str(kmock.url), **sentinels))
    await operator.start()
    mail_root = tmp_path / "mail"
    worker = worker_settings(url, mail_root, key_prefix="mailkube", **sentinels)
    try:

        async def ready(name: str) -> None:
            assert condition(await api.get("mailusers", name), "Ready")["status"] == "True"
            assert (await operator.table()).user(f"{name}@example.test") is not None

        await operator_eventually(lambda: ready("alice"), timeout=FOLLOW)
        async with (
            running_worker(worker, telemetry),
            running_gateway(url, tmp_path, **sentinels) as gw,
        ):
            assert await accepted(gw, ALICE)
            await eventually(lambda: _true(len(maildir_files(mail_root, ALICE)) == 1))

            await fail_over(group, how)

            # the gateway: a 250 again, from the same process (a 451 meanwhile is allowed)
            await sent(gw, ALICE)
            # the operator: a new user is published to the new primary
            await api.apply("mailusers", "bob", {"address": BOB})
            await operator_eventually(lambda: ready("bob"), timeout=FOLLOW)
            # ... and the gateway reads it there
            await sent(gw, BOB)
            # the worker: delivers what the new primary holds
            await eventually(
                lambda: _true(
                    len(maildir_files(mail_root, ALICE)) >= 2
                    and len(maildir_files(mail_root, BOB)) >= 1
                ),
                timeout=FOLLOW,
            )
    finally:
        await operator.stop()


async def _true(value: bool) -> bool:
    return value
