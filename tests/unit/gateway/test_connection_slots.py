"""connection_slots.py: a closed connection's slot serves the next one from its address
without Redis, goes back to Redis after HOLD, and the limit over all processes holds."""

from __future__ import annotations

import asyncio

from conditions import eventually

from mailkube_gateway.connection_slots import ConnectionSlots, Slot

LEASE = 600.0


class FakeLeases:
    """Redis's lease sets, as the ACQUIRE and RELEASE scripts keep them (no expiry)."""

    def __init__(self) -> None:
        self.held: dict[str, set[str]] = {}
        self.acquired: list[tuple[str, str]] = []
        self.released: list[tuple[str, list[str]]] = []
        self.fail = False

    async def acquire(self, ip: str, slot: str, limit: int, lease: float) -> bool:
        if self.fail:
            raise ConnectionError("Redis is down")
        self.acquired.append((ip, slot))
        held = self.held.setdefault(ip, set())
        if slot not in held and len(held) >= limit:
            return False
        held.add(slot)
        return True

    async def release(self, ip: str, slots: list[str]) -> None:
        self.released.append((ip, slots))
        self.held.get(ip, set()).difference_update(slots)


class Clock:
    """The slots' clock, moved by the test (the sweep timer runs on the event loop's: with
    HOLD a minute it does not fire during a test, and the test sweeps by hand)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sweep_now(slots: ConnectionSlots) -> float | None:
    """Run the sweep the timer would run; the delay until the next one it schedules (to the
    hundredth: the event loop's clock moved on a little since)."""
    if slots._sweep is not None:
        slots._sweep.cancel()
    slots._sweep_idle()
    if slots._sweep is None:
        return None
    return round(slots._sweep.when() - asyncio.get_running_loop().time(), 2)


async def settled(slots: ConnectionSlots) -> None:
    """The releases a sweep started are done."""
    await asyncio.gather(*slots._releasing)


def two_processes(leases: FakeLeases, hold: float = 60.0) -> tuple[ConnectionSlots, ...]:
    return tuple(ConnectionSlots(leases.acquire, leases.release, hold=hold) for _ in range(2))


async def test_a_closed_connections_slot_serves_the_next_one_without_redis() -> None:
    leases = FakeLeases()
    (slots, _) = two_processes(leases)
    first = await slots.take("192.0.2.1", 2, LEASE)
    assert first is not None
    slots.give_back("192.0.2.1", first)
    assert slots.idle("192.0.2.1") == 1
    again = await slots.take("192.0.2.1", 2, LEASE)
    assert again == first
    assert len(leases.acquired) == 1  # the second connection asked nobody
    assert slots.idle("192.0.2.1") == 0
    other = await slots.take("198.51.100.7", 2, LEASE)  # another address: its own slot
    assert other is not None
    assert other.id != first.id
    assert len(leases.acquired) == 2


async def test_the_limit_holds_over_all_processes_idle_slots_included() -> None:
    leases = FakeLeases()
    one, two = two_processes(leases)
    a = await one.take("192.0.2.1", 2, LEASE)
    b = await two.take("192.0.2.1", 2, LEASE)
    assert a is not None
    assert b is not None
    assert a.id != b.id
    assert await one.take("192.0.2.1", 2, LEASE) is None  # two held: refused
    one.give_back("192.0.2.1", a)
    # idle in process one: counted until it goes back, so process two is refused...
    assert await two.take("192.0.2.1", 2, LEASE) is None
    # ...and process one's next connection takes it
    assert await one.take("192.0.2.1", 2, LEASE) == a
    assert await one.take("192.0.2.1", 2, LEASE) is None


async def test_idle_slots_go_back_to_redis_after_hold_together() -> None:
    leases = FakeLeases()
    (slots, _) = two_processes(leases, hold=0.05)
    taken = [await slots.take("192.0.2.1", 5, LEASE) for _ in range(3)]
    assert all(taken)
    for slot in taken:
        assert slot is not None
        slots.give_back("192.0.2.1", slot)

    async def released() -> bool:
        return not leases.held["192.0.2.1"]

    await eventually(released, timeout=5)
    assert slots.idle("192.0.2.1") == 0
    [(ip, ids)] = leases.released  # one command for the address
    assert ip == "192.0.2.1"
    assert sorted(ids) == sorted(slot.id for slot in taken if slot is not None)


async def test_a_slot_given_back_later_waits_its_own_hold() -> None:
    leases = FakeLeases()
    clock = Clock()
    slots = ConnectionSlots(leases.acquire, leases.release, hold=60, clock=clock)
    early = await slots.take("192.0.2.1", 5, LEASE)
    late = await slots.take("192.0.2.1", 5, LEASE)
    assert early is not None
    assert late is not None
    slots.give_back("192.0.2.1", early)
    clock.now += 40
    slots.give_back("192.0.2.1", late)
    clock.now += 20  # early idle for HOLD, late for 20 s
    next_sweep = sweep_now(slots)
    await settled(slots)
    assert early.id not in leases.held["192.0.2.1"]
    assert late.id in leases.held["192.0.2.1"], "swept before its hold"
    assert next_sweep is not None
    assert next_sweep == 40  # when late's hold ends
    clock.now += 40
    assert sweep_now(slots) is None
    await settled(slots)
    assert late.id not in leases.held["192.0.2.1"]


async def test_a_slot_whose_lease_is_half_spent_is_not_reused() -> None:
    leases = FakeLeases()
    clock = Clock()
    slots = ConnectionSlots(leases.acquire, leases.release, clock=clock)
    worn = Slot("worn", clock.now + LEASE / 2 - 1)  # less than half a lease left
    leases.held["192.0.2.1"] = {"worn"}
    slots.give_back("192.0.2.1", worn)
    fresh = await slots.take("192.0.2.1", 5, LEASE)
    assert fresh is not None
    assert fresh.id != "worn"
    assert fresh.expires == clock.now + LEASE
    await settled(slots)
    assert ("192.0.2.1", ["worn"]) in leases.released


async def test_close_gives_every_idle_slot_back() -> None:
    leases = FakeLeases()
    (slots, _) = two_processes(leases)
    for ip in ("192.0.2.1", "192.0.2.2"):
        slot = await slots.take(ip, 5, LEASE)
        assert slot is not None
        slots.give_back(ip, slot)
    await slots.close()
    assert leases.held == {"192.0.2.1": set(), "192.0.2.2": set()}
    assert slots.idle("192.0.2.1") == slots.idle("192.0.2.2") == 0


async def test_redis_errors_reach_the_caller_and_a_failed_release_is_not_raised() -> None:
    leases = FakeLeases()
    (slots, _) = two_processes(leases, hold=0.01)
    slot = await slots.take("192.0.2.1", 5, LEASE)
    assert slot is not None
    leases.fail = True
    try:
        await slots.take("192.0.2.2", 5, LEASE)
    except ConnectionError:
        pass
    else:
        raise AssertionError("a Redis error must reach the caller (policy.py fails open)")

    async def broken_release(ip: str, ids: list[str]) -> None:
        raise ConnectionError("Redis is down")

    slots._release = broken_release  # the lease expires on its own
    slots.give_back("192.0.2.1", slot)

    async def swept() -> bool:
        return slots.idle("192.0.2.1") == 0 and not slots._releasing

    await eventually(swept, timeout=5)


async def test_sweeps_stay_few_with_connections_from_many_addresses() -> None:
    """Each sweep goes over every address holding idle slots: with connections from many
    addresses ending one after another, one sweep per slot would go over all of them for each.
    Sweeps come at most every quarter HOLD."""
    leases = FakeLeases()
    clock = Clock()
    slots = ConnectionSlots(leases.acquire, leases.release, hold=60, clock=clock)
    for n in range(40):  # one connection ends a second, from 40 addresses
        ip = f"192.0.2.{n}"
        slot = await slots.take(ip, 5, LEASE)
        assert slot is not None
        slots.give_back(ip, slot)
        clock.now += 1
    clock.now += 20  # the first one's HOLD is over
    sweeps = 0
    while True:  # the sweeps as the timer would run them
        sweeps += 1
        delay = sweep_now(slots)
        if delay is None:
            break
        assert delay >= 15, "a sweep sooner than a quarter HOLD"
        clock.now += delay
    await settled(slots)
    assert not any(leases.held.values())
    assert sweeps <= 5, sweeps  # at 60, 75, 90, 105 s: not one per slot (40)
