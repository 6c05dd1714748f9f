"""The routing table in a real Redis: atomic versioned replace, change notification, and the
periodic check that catches a missed notification."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from conditions import eventually
from redis.asyncio import Redis

from mailkube_core.routing import (
    Domain,
    DomainEntry,
    RoutingReader,
    RoutingSnapshot,
    RoutingStore,
    RoutingTable,
    User,
    VersionConflict,
    split_table,
)

PREFIX = "mkt"


def make_table(*domains: str, users: tuple[str, ...] = ()) -> RoutingTable:
    return RoutingTable(
        domains=[Domain(name=d) for d in domains], users=[User(address=u) for u in users]
    )


async def wait_for(reader: RoutingReader, version: int, timeout: float) -> RoutingSnapshot:
    """The reader's snapshot once it is at `version` or newer; TimeoutError past `timeout`."""
    async with asyncio.timeout(timeout):
        return await reader.wait_for_version(version)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def store(redis: Redis) -> RoutingStore:
    return RoutingStore(redis, prefix=PREFIX)


async def stop_within(reader: RoutingReader, timeout: float = 5.0) -> bool:
    """reader.stop(), bounded: True if it returned in time. Otherwise the reader's task is
    cancelled again (so a lost cancellation cannot hang the suite) and False is returned."""
    task = reader._task
    stopping = asyncio.create_task(reader.stop())
    done, _ = await asyncio.wait({stopping}, timeout=timeout)
    if done:
        stopping.result()
        return True
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    await asyncio.wait({stopping}, timeout=1.0)
    return False


@pytest.fixture
async def readers(store: RoutingStore) -> AsyncIterator[list[RoutingReader]]:
    """Readers a test starts; all stopped at the end."""
    started: list[RoutingReader] = []
    yield started
    for reader in started:
        await stop_within(reader)


async def start_reader(
    store: RoutingStore, readers: list[RoutingReader], check_interval: timedelta | None = None
) -> RoutingReader:
    """A started reader whose subscription is in place, so a PUBLISH from now on reaches it."""
    reader = (
        RoutingReader(store)
        if check_interval is None
        else RoutingReader(store, check_interval=check_interval)
    )
    await reader.start()
    readers.append(reader)
    await eventually(lambda: _subscribed(store, len(readers)))
    return reader


async def test_empty_store_is_version_zero(store: RoutingStore) -> None:
    assert await store.version() == 0
    snapshot = await store.load()
    assert snapshot.version == 0
    assert snapshot.table == RoutingTable()


async def test_replace_bumps_the_version_and_load_sees_it(store: RoutingStore) -> None:
    v1 = await store.replace(make_table("one.test"))
    v2 = await store.replace(make_table("two.test", users=("a@two.test",)))
    assert (v1, v2) == (1, 2)
    assert await store.version() == 2
    snapshot = await store.load()
    assert snapshot.version == 2
    assert snapshot.is_local_domain("two.test")
    assert not snapshot.is_local_domain("one.test")
    assert snapshot.resolve("A@two.test") is not None


async def test_keys_share_one_hash_tag(store: RoutingStore, redis: Redis) -> None:
    await store.replace(make_table("one.test"))
    tag = f"{{{PREFIX}:routing}}"
    written = [store.version_key, store.domains_key, store.domain_versions_key, store.globals_key]
    assert all(key.startswith(tag) for key in [*written, store.table_key])
    assert sorted(await redis.keys("*")) == sorted(key.encode() for key in written)


async def test_secrets_survive_the_round_trip(store: RoutingStore) -> None:
    table = RoutingTable.model_validate(
        {
            "domains": [
                {
                    "name": "one.test",
                    "dkim": [
                        {"selector": "s1", "algorithm": "ed25519-sha256", "private_key": "seed=="}
                    ],
                }
            ]
        }
    )
    await store.replace(table)
    loaded = (await store.load()).table
    assert loaded == table
    assert loaded.domains[0].dkim[0].private_key.get_secret_value() == "seed=="


async def test_expected_version_conflict(store: RoutingStore) -> None:
    v1 = await store.replace(make_table("one.test"))
    v2 = await store.replace(make_table("two.test"), expected_version=v1)
    assert v2 == v1 + 1
    with pytest.raises(VersionConflict, match=f"version {v2}"):
        await store.replace(make_table("three.test"), expected_version=v1)
    # the losing write changed nothing
    snapshot = await store.load()
    assert snapshot.version == v2
    assert snapshot.is_local_domain("two.test")
    assert not snapshot.is_local_domain("three.test")


async def test_expected_version_zero_on_an_empty_store(store: RoutingStore) -> None:
    assert await store.replace(make_table("one.test"), expected_version=0) == 1
    with pytest.raises(VersionConflict):
        await store.replace(make_table("two.test"), expected_version=0)


async def test_concurrent_writers_with_expected_version_one_wins(store: RoutingStore) -> None:
    base = await store.replace(make_table("base.test"))
    results = await asyncio.gather(
        *(store.replace(make_table(f"w{i}.test"), expected_version=base) for i in range(5)),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, int)]
    assert wins == [base + 1]
    assert sum(isinstance(r, VersionConflict) for r in results) == 4


async def test_two_readers_see_a_new_version_within_a_second(
    store: RoutingStore, readers: list[RoutingReader]
) -> None:
    await store.replace(make_table("one.test"))
    # a long periodic check, so only the notification can deliver the change in time
    a = await start_reader(store, readers, timedelta(seconds=30))
    b = await start_reader(store, readers, timedelta(seconds=30))
    assert a.snapshot.version == b.snapshot.version == 1

    version = await store.replace(make_table("two.test", users=("bob@two.test",)))
    for reader in (a, b):
        snapshot = await wait_for(reader, version, 1.0)
        assert snapshot.version == version
        assert snapshot.is_local_domain("two.test")
        assert snapshot.resolve("bob@two.test") is not None


async def test_reader_started_later_loads_the_current_table(
    store: RoutingStore, readers: list[RoutingReader]
) -> None:
    await store.replace(make_table("one.test"))
    version = await store.replace(make_table("two.test"))
    reader = RoutingReader(store)
    await reader.start()
    readers.append(reader)
    # start() returns with the table loaded, no waiting
    assert reader.snapshot.version == version
    assert reader.snapshot.is_local_domain("two.test")
    await eventually(lambda: _subscribed(store, 1))  # before the teardown stops it


async def test_reader_on_an_empty_store(store: RoutingStore, readers: list[RoutingReader]) -> None:
    reader = await start_reader(store, readers, timedelta(milliseconds=200))
    assert reader.snapshot.version == 0
    version = await store.replace(make_table("one.test"))
    assert (await wait_for(reader, version, 2.0)).is_local_domain("one.test")


async def test_missed_notification_is_caught_by_the_periodic_check(
    store: RoutingStore, readers: list[RoutingReader], redis: Redis
) -> None:
    await store.replace(make_table("one.test"))
    reader = await start_reader(store, readers, timedelta(milliseconds=200))

    # change the table behind the reader's back: no PUBLISH
    entry = DomainEntry(domain=Domain(name="sneaky.test"), users=[User(address="eve@sneaky.test")])
    version = await redis.incr(store.version_key)
    await redis.hset(store.domains_key, "sneaky.test", entry.model_dump_json())
    await redis.hset(store.domain_versions_key, "sneaky.test", version)

    snapshot = await wait_for(reader, version, 3.0)
    assert snapshot.version == version
    assert snapshot.is_local_domain("sneaky.test")
    assert snapshot.resolve("eve@sneaky.test") is not None


async def test_wait_for_version_times_out(
    store: RoutingStore, readers: list[RoutingReader]
) -> None:
    reader = await start_reader(store, readers, timedelta(milliseconds=200))
    with pytest.raises(TimeoutError):
        await wait_for(reader, 5, 0.3)


async def test_stop_ends_the_task(store: RoutingStore, readers: list[RoutingReader]) -> None:
    reader = await start_reader(store, readers, timedelta(milliseconds=200))
    task = reader._task
    assert task is not None
    assert not task.done()

    assert await stop_within(reader)
    assert task.done()
    assert reader._task is None
    # its subscription is gone too
    await eventually(lambda: _subscribed(store, 0))
    # and stopping twice is harmless
    assert await stop_within(reader)


async def test_stopped_reader_no_longer_follows(
    store: RoutingStore, readers: list[RoutingReader]
) -> None:
    reader = await start_reader(store, readers, timedelta(milliseconds=200))
    assert await stop_within(reader)
    await store.replace(make_table("one.test"))
    with pytest.raises(TimeoutError):
        await wait_for(reader, 1, 0.5)
    assert reader.snapshot.version == 0


async def test_stop_right_after_start_ends_the_task(store: RoutingStore) -> None:
    # stop() must not cancel only once: on Python 3.11,
    # asyncio.wait_for (which redis-py 8 wraps around every command write, socket_timeout
    # defaulting to 5 s) swallows a cancellation that arrives as the write completes; this
    # happens reliably when stop() follows start() at once (the task is in SUBSCRIBE), and
    # _follow() would loop for ever and a SIGTERM right after start would hang the process.
    reader = RoutingReader(store, check_interval=timedelta(milliseconds=200))
    await reader.start()
    assert await stop_within(reader), "stop() did not return within 5 s"


async def _subscribed(store: RoutingStore, count: int) -> bool:
    """The readers' pub/sub subscriptions are in place (so a PUBLISH now reaches them)."""
    numsub = await store.redis.pubsub_numsub(store.channel)
    return int(numsub[0][1]) == count


async def test_a_table_lost_from_redis_is_not_replaced_by_an_empty_one(
    store: RoutingStore, readers: list[RoutingReader], redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Redis lost its data: the reader keeps serving the last table (an empty one would refuse
    every local address with 550) and takes the next one published, even at version 1."""
    await store.replace(make_table("kept.test", users=("ann@kept.test",)))
    reader = await start_reader(store, readers, timedelta(milliseconds=100))
    await redis.flushdb()
    await eventually(lambda: _logged(caplog, "routing table missing in Redis"))
    assert reader.snapshot.resolve("ann@kept.test") is not None
    version = await store.replace(make_table("new.test"))
    assert version == 1  # the version counter started again
    await eventually(lambda: _is_local(reader, "new.test"))
    assert not reader.snapshot.is_local_domain("kept.test")


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def _is_local(reader: RoutingReader, domain: str) -> bool:
    return reader.snapshot.is_local_domain(domain)


async def test_a_version_taken_again_after_a_failover_is_reloaded_on_reconnect(
    store: RoutingStore, readers: list[RoutingReader], redis: Redis
) -> None:
    """A write lost in a failover frees its version, and the next write takes it with other
    content: a reader whose connection broke (as in the failover) compares the content."""
    await store.replace(make_table("one.test"))
    reader = await start_reader(store, readers, timedelta(milliseconds=200))
    version = reader.snapshot.version

    # the promoted replica's table: same version, other content (no PUBLISH reached us)
    entry = DomainEntry(domain=Domain(name="two.test"))
    await redis.hset(store.domains_key, "two.test", entry.model_dump_json())
    await redis.hset(store.domain_versions_key, "two.test", version)
    await redis.client_kill_filter(_type="pubsub")  # the reader's connection breaks

    async def reloaded() -> bool:
        return reader.snapshot.is_local_domain("two.test")

    await eventually(reloaded, timeout=10)
    assert reader.snapshot.version == version


# -- per-domain deltas -------------------------------------------------------------------------


def domain_versions(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


async def test_a_change_to_one_domain_writes_and_fetches_only_that_domain(
    store: RoutingStore, readers: list[RoutingReader], redis: Redis
) -> None:
    users = ("a@one.test", "b@two.test", "c@three.test")
    v1 = await store.replace(make_table("one.test", "two.test", "three.test", users=users))
    reader = await start_reader(store, readers, timedelta(seconds=30))
    assert reader.fetched == 3
    before = {k: await redis.hget(store.domains_key, k) for k in ("one.test", "three.test")}

    v2 = await store.replace(
        make_table("one.test", "two.test", "three.test", users=(*users, "d@two.test"))
    )
    assert domain_versions(await redis.hgetall(store.domain_versions_key)) == {
        "one.test": v1, "two.test": v2, "three.test": v1}  # fmt: skip
    assert {k: await redis.hget(store.domains_key, k) for k in before} == before
    snapshot = await wait_for(reader, v2, 2.0)
    assert reader.fetched == 1
    assert snapshot.resolve("d@two.test") is not None
    assert snapshot.resolve("c@three.test") is not None
    # the table's order is kept (the first domain is the postmaster's fallback)
    assert [d.name for d in snapshot.table.domains] == ["one.test", "two.test", "three.test"]


async def test_a_deleted_domain_disappears(
    store: RoutingStore, readers: list[RoutingReader], redis: Redis
) -> None:
    await store.replace(make_table("one.test", "two.test", users=("a@one.test", "b@two.test")))
    reader = await start_reader(store, readers, timedelta(seconds=30))
    version = await store.replace(make_table("one.test", users=("a@one.test",)))
    assert await redis.hkeys(store.domains_key) == [b"one.test"]
    assert await redis.hkeys(store.domain_versions_key) == [b"one.test"]
    snapshot = await wait_for(reader, version, 2.0)
    assert reader.fetched == 0
    assert not snapshot.is_local_domain("two.test")
    assert snapshot.resolve("b@two.test") is None
    assert snapshot.resolve("a@one.test") is not None


async def test_missed_deltas_are_caught_up_by_the_periodic_check(
    store: RoutingStore, readers: list[RoutingReader], redis: Redis
) -> None:
    await store.replace(make_table("one.test", "two.test", "three.test"))
    reader = await start_reader(store, readers, timedelta(milliseconds=200))
    quiet = RoutingStore(redis, prefix=PREFIX)
    quiet.channel = "nobody-listens"  # the deltas' notifications are lost
    entry = DomainEntry(domain=Domain(name="two.test"), users=[User(address="x@two.test")])
    globals_json = (await redis.get(store.globals_key)).decode()
    await quiet.apply({"two.test": entry.model_dump_json()}, [], globals_json)
    version = await quiet.apply({}, ["three.test"], globals_json)

    snapshot = await wait_for(reader, version, 3.0)
    assert reader.fetched == 1
    assert snapshot.resolve("x@two.test") is not None
    assert not snapshot.is_local_domain("three.test")
    assert snapshot.is_local_domain("one.test")


async def test_apply_with_an_expected_version_refuses_a_newer_table(
    store: RoutingStore, redis: Redis
) -> None:
    v1 = await store.replace(make_table("one.test"))
    await store.replace(make_table("one.test", "two.test"))
    with pytest.raises(VersionConflict):
        await store.apply({}, ["one.test"], "{}", expected_version=v1)
    assert sorted(await redis.hkeys(store.domains_key)) == [b"one.test", b"two.test"]


async def test_replace_entries_writes_only_what_differs(store: RoutingStore) -> None:
    entries, globals_ = split_table(make_table("one.test", "two.test", users=("a@one.test",)))
    documents = {name: entry.model_dump_json() for name, entry in entries.items()}
    assert (await store.replace_entries(documents, globals_.model_dump_json()))[1] == 2
    version, written = await store.replace_entries(documents, globals_.model_dump_json())
    assert written == 0
    assert (await store.load()).version == version
    del documents["two.test"]
    assert (await store.replace_entries(documents, globals_.model_dump_json()))[1] == 1
    assert not (await store.load()).is_local_domain("two.test")


async def test_the_table_of_the_layout_before_is_read_until_a_new_write(
    store: RoutingStore, readers: list[RoutingReader], redis: Redis
) -> None:
    """An operator of the version before wrote the whole table in one key: readers take it,
    and the first write in per-domain entries replaces it (the old key is left alone for
    readers of that version)."""
    old = make_table("old.test", users=("ann@old.test",))
    await redis.set(store.table_key, old.model_dump_json())
    await redis.set(store.version_key, 7)
    reader = await start_reader(store, readers, timedelta(milliseconds=200))
    assert reader.snapshot.version == 7
    assert reader.snapshot.resolve("ann@old.test") is not None
    assert (await store.load()).resolve("ann@old.test") is not None

    version = await store.replace(make_table("new.test"))
    assert version == 8
    snapshot = await wait_for(reader, version, 2.0)
    assert snapshot.is_local_domain("new.test")
    assert not snapshot.is_local_domain("old.test")
    assert await redis.get(store.table_key) == old.model_dump_json().encode()
