"""Queue key layout (one Redis Cluster slot per partition), message ids, and the retry policy."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from redis.crc import key_slot

from mailkube_core.queue import LANES, RetryPolicy, new_message_id, partition_of
from mailkube_core.queue.keys import PartitionKeys

_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{22}\.(\d+)")


# --- message ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("partition", [0, 1, 7, 1023])
def test_new_message_id_shape(partition: int) -> None:
    message_id = new_message_id(partition)
    match = _ID.fullmatch(message_id)
    assert match, message_id
    assert int(match.group(1)) == partition
    assert len(message_id.split(".")[0]) == 22


def test_new_message_ids_are_unique() -> None:
    ids = [new_message_id(0) for _ in range(10_000)]
    assert len(set(ids)) == len(ids)


def test_new_message_ids_are_time_ordered_across_milliseconds() -> None:
    first = new_message_id(0)
    # ids from a later millisecond sort after; wait on the clock, not a sleep
    later = new_message_id(0)
    while later[:10] == first[:10]:
        later = new_message_id(0)
    assert later > first


@pytest.mark.parametrize("partition", [0, 3, 1023])
def test_partition_of_round_trips(partition: int) -> None:
    assert partition_of(new_message_id(partition)) == partition


@pytest.mark.parametrize(
    "message_id",
    [
        "",
        "0",
        ".0",
        "01HZY3J5N8Q2W4E6R8T0Y2U4I6",  # no partition
        "0123456789ABCDEFGHJKMN.",  # empty partition
        "0123456789ABCDEFGHJKMN.x",
        "0123456789ABCDEFGHJKMN.-1",
        "0123456789ABCDEFGHJKM.0",  # 21 characters
        "0123456789ABCDEFGHJKMNP.0",  # 23 characters
    ],
)
def test_partition_of_rejects_malformed(message_id: str) -> None:
    with pytest.raises(ValueError, match="not a message id"):
        partition_of(message_id)


@given(st.text())
@example("0123456789ABCDEFGHJKMN.12")
@example("0123456789ABCDEFGHJKMN.²")
def test_partition_of_fuzz(text: str) -> None:
    """Fuzz target: ValueError or a non-negative int, nothing else."""
    try:
        result = partition_of(text)
    except ValueError:
        return
    assert type(result) is int
    assert result >= 0


# --- key layout -------------------------------------------------------------------------------


def all_keys(keys: PartitionKeys) -> list[str]:
    message_id = new_message_id(keys.partition)
    return [
        *(keys.stream(lane) for lane in LANES),
        *(keys.delayed(lane) for lane in LANES),
        keys.messages,
        keys.message(message_id),
    ]


@pytest.mark.parametrize("prefix", ["mailkube", "prod:mail", "a-b_c.d"])
@pytest.mark.parametrize("partition", [0, 1, 15])
def test_every_key_of_a_partition_is_in_one_slot(prefix: str, partition: int) -> None:
    keys = PartitionKeys(prefix, partition)
    names = all_keys(keys)
    assert len(set(names)) == len(names)
    assert all(name.startswith(keys.tag + ":") for name in names)
    slots = {key_slot(name.encode()) for name in names}
    assert slots == {key_slot(keys.tag.encode())}


def test_partitions_have_different_tags() -> None:
    tags = {PartitionKeys("mailkube", p).tag for p in range(64)}
    assert len(tags) == 64
    # and with enough partitions, they spread over several slots (Cluster scale-out)
    slots = {key_slot(PartitionKeys("mailkube", p).tag.encode()) for p in range(64)}
    assert len(slots) > 32


def test_prefixes_keep_deployments_apart() -> None:
    a, b = PartitionKeys("one", 0), PartitionKeys("two", 0)
    assert not set(all_keys(a)) & set(all_keys(b))


def test_tag_format() -> None:
    assert PartitionKeys("mailkube", 3).tag == "{mailkube:q3}"
    assert PartitionKeys("mailkube", 3).stream("local") == "{mailkube:q3}:stream:local"


# --- retry policy -----------------------------------------------------------------------------

SEED = [
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(minutes=30),
    timedelta(hours=1),
    timedelta(hours=4),
    timedelta(hours=8),
    timedelta(hours=24),
]


def test_default_policy_is_the_seed_design() -> None:
    policy = RetryPolicy()
    assert list(policy.intervals) == SEED
    assert policy.max_retries == 7
    assert policy.bounce_after == timedelta(hours=48)


@pytest.mark.parametrize("attempts", range(1, 8))
def test_delay_follows_intervals_within_jitter(attempts: int) -> None:
    policy = RetryPolicy(jitter=0.1)
    base = SEED[attempts - 1]
    rng = random.Random(attempts)
    delays = [policy.delay(attempts, rng) for _ in range(200)]
    assert all(base * 0.9 <= d <= base * 1.1 for d in delays)
    # jitter actually spreads the delays
    assert len(set(delays)) > 100
    assert min(delays) < base < max(delays)


def test_delay_without_jitter_is_exact() -> None:
    policy = RetryPolicy(jitter=0)
    assert [policy.delay(n) for n in range(1, 8)] == SEED


def test_delay_repeats_the_last_interval() -> None:
    policy = RetryPolicy(jitter=0)
    assert policy.delay(8) == timedelta(hours=24)
    assert policy.delay(100) == timedelta(hours=24)


def test_delay_before_the_first_deferral_is_the_first_interval() -> None:
    policy = RetryPolicy(jitter=0)
    assert policy.delay(0) == timedelta(minutes=5)
    assert policy.delay(-3) == timedelta(minutes=5)


def test_delay_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy()
    assert policy.delay(2, random.Random(42)) == policy.delay(2, random.Random(42))


def test_custom_intervals() -> None:
    policy = RetryPolicy(intervals=[timedelta(seconds=1), timedelta(seconds=2)], jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3)] == [timedelta(seconds=s) for s in (1, 2, 2)]


def test_expired_on_max_retries() -> None:
    policy = RetryPolicy(max_retries=7)
    now = datetime(2024, 1, 1, tzinfo=UTC)
    assert not policy.expired(6, now, now)
    assert policy.expired(7, now, now)
    assert policy.expired(8, now, now)


def test_expired_on_bounce_after() -> None:
    policy = RetryPolicy(bounce_after=timedelta(hours=48))
    received = datetime(2024, 1, 1, tzinfo=UTC)
    assert not policy.expired(1, received, received + timedelta(hours=47, minutes=59))
    assert policy.expired(1, received, received + timedelta(hours=48))
    assert policy.expired(1, received, received + timedelta(days=5))


def test_zero_max_retries_gives_up_at_once() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    assert RetryPolicy(max_retries=0).expired(0, now, now)
