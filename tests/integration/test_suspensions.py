"""Submission suspensions in Redis (mailkube_core.suspensions), shared by the gateway, the CLI
and the operator."""

from __future__ import annotations

from datetime import timedelta

from mailkube_core.redis_client import connect_redis
from mailkube_core.settings import CommonSettings
from mailkube_core.suspensions import (
    is_suspended,
    lift,
    list_suspensions,
    record_spam_rejection,
    suspended_key,
)

USER = "alice@example.test"


async def test_a_user_is_suspended_at_the_threshold_and_lifted(redis_url: str) -> None:
    redis = connect_redis(CommonSettings(redis_url=redis_url))
    try:
        window = timedelta(hours=1)
        assert await record_spam_rejection(redis, "mk", USER, window, 3) == (1, False)
        assert await record_spam_rejection(redis, "mk", USER, window, 3) == (2, False)
        assert not await is_suspended(redis, "mk", USER)
        assert await record_spam_rejection(redis, "mk", USER, window, 3) == (3, True)
        assert await record_spam_rejection(redis, "mk", USER, window, 3) == (4, False)
        assert await is_suspended(redis, "mk", USER)
        [suspension] = await list_suspensions(redis, "mk")
        assert suspension.address == USER
        assert suspension.rejections == 3
        assert "3 messages refused as spam" in suspension.message
        assert await lift(redis, "mk", USER)
        assert not await is_suspended(redis, "mk", USER)
        assert not await lift(redis, "mk", USER)
        # the count started afresh
        assert await record_spam_rejection(redis, "mk", USER, window, 3) == (1, False)
    finally:
        await redis.aclose()


async def test_threshold_zero_never_suspends_and_hand_written_entries_count(
    redis_url: str,
) -> None:
    redis = connect_redis(CommonSettings(redis_url=redis_url))
    try:
        for _ in range(5):
            await record_spam_rejection(redis, "mk", USER, timedelta(hours=1), 0)
        assert not await is_suspended(redis, "mk", USER)
        await redis.hset(suspended_key("mk"), "bob@example.test", "not json")
        [suspension] = await list_suspensions(redis, "mk")
        assert suspension.address == "bob@example.test"
        assert suspension.rejections == 0
    finally:
        await redis.aclose()
