"""Rates lent to a process (rate_loans.py), against a fake account of the allowance: what is
borrowed, when, how much, and that nothing borrowed is lost or used twice. The same on a
real Redis, two processes sharing a rate: test_gateway_ratelimit.py."""

from __future__ import annotations

import asyncio

import pytest
from conditions import eventually

from mailkube_gateway import rate_loans
from mailkube_gateway.rate_loans import MAX_LOAN, RateLoans, loan_cap


class Account:
    """A rate's allowance as Redis keeps it, reduced to what matters here: messages left."""

    def __init__(self, allowance: int) -> None:
        self.allowance = allowance
        self.asked: list[int] = []
        self.returned: list[int] = []
        #: set to hold each borrowing until the test lets it go
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    async def borrow(self, key: str, per_minute: int, want: int) -> int:
        self.asked.append(want)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        granted = min(want, self.allowance)
        self.allowance -= granted
        return granted

    async def give_back(self, key: str, per_minute: int, count: int) -> None:
        self.returned.append(count)
        self.allowance += count


def test_the_cap_is_an_eighth_of_a_minute_and_small_rates_are_never_lent_ahead() -> None:
    assert [loan_cap(n) for n in (1, 15, 16, 120, 512, 10**6)] == [1, 1, 2, 15, 64, MAX_LOAN]


async def test_a_busy_rate_borrows_twice_as_much_each_time_up_to_the_cap() -> None:
    account = Account(1000)
    loans = RateLoans(account.borrow, account.give_back)
    assert all([await loans.take("k", 240) for _ in range(1 + 2 + 4 + 8 + 16 + 30 + 30)])
    assert account.asked == [1, 2, 4, 8, 16, 30, 30]  # 240 a minute: at most 30 held
    assert loans.held("k") == 0
    await loans.close()


async def test_a_rate_used_up_is_refused_and_nothing_more_is_admitted_than_granted() -> None:
    account = Account(5)
    loans = RateLoans(account.borrow, account.give_back)
    answers = [await loans.take("k", 10**6) for _ in range(8)]
    assert answers == [True] * 5 + [False] * 3
    assert account.allowance == 0
    await loans.close()
    assert account.returned == []  # nothing was left to give back


async def test_messages_arriving_while_a_borrowing_is_on_its_way_wait_for_it() -> None:
    account = Account(1000)
    loans = RateLoans(account.borrow, account.give_back)
    assert await loans.take("k", 10**6)  # asked for 1
    account.gate = asyncio.Event()
    waiting = [asyncio.create_task(loans.take("k", 10**6)) for _ in range(2)]
    await eventually(lambda: _true(len(account.asked) == 2))
    account.gate.set()
    assert await asyncio.gather(*waiting) == [True, True]
    assert account.asked == [1, 2]  # the two shared one borrowing of two
    await loans.close()


async def test_what_is_not_used_goes_back_after_the_loan_lifetime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rate_loans, "LOAN_LIFETIME", 0.2)
    account = Account(100)
    loans = RateLoans(account.borrow, account.give_back)
    for _ in range(1 + 2 + 4):
        assert await loans.take("k", 10**6)
    assert await loans.take("k", 10**6)  # borrows 8, uses 1
    assert loans.held("k") == 7
    assert await eventually(lambda: _true(account.returned == [7]))
    assert loans.held("k") == 0
    assert account.allowance == 100 - 15 + 7  # borrowed 1 + 2 + 4 + 8, 7 back
    # a key quiet for a lifetime starts again with one
    assert await loans.take("k", 10**6)
    assert account.asked[-1] == 1
    await loans.close()


async def test_a_message_put_back_is_taken_from_the_loan_again() -> None:
    account = Account(1)
    loans = RateLoans(account.borrow, account.give_back)
    assert await loans.take("k", 10**6)
    assert loans.put_back("k")
    assert await loans.take("k", 10**6)
    assert account.asked == [1]
    assert not loans.put_back("other")  # no loan: the caller gives it back to Redis
    await loans.close()


async def test_close_gives_back_every_loan() -> None:
    account = Account(100)
    loans = RateLoans(account.borrow, account.give_back)
    for key in ("a", "b"):
        for _ in range(1 + 2 + 1):  # the third borrows 4 and uses 1
            assert await loans.take(key, 10**6)
    await loans.close()
    assert sorted(account.returned) == [3, 3]
    assert account.allowance == 100 - 2 * (1 + 2 + 4) + 2 * 3


async def test_a_session_gone_while_borrowing_loses_nothing_borrowed_for_it() -> None:
    account = Account(100)
    loans = RateLoans(account.borrow, account.give_back)
    account.gate = asyncio.Event()
    taking = asyncio.create_task(loans.take("k", 10**6))
    await eventually(lambda: _true(account.asked == [1]))
    taking.cancel()
    account.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await taking
    await eventually(lambda: _true(loans.held("k") == 1))
    await loans.close()
    assert account.returned == [1]
    assert account.allowance == 100


async def test_a_redis_error_reaches_every_waiting_message_and_leaves_no_loan() -> None:
    account = Account(100)
    loans = RateLoans(account.borrow, account.give_back)
    account.gate = asyncio.Event()
    account.error = ConnectionError("redis gone")
    waiting = [asyncio.create_task(loans.take("k", 10**6)) for _ in range(3)]
    await eventually(lambda: _true(len(account.asked) == 1))
    account.gate.set()
    answers = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(a, ConnectionError) for a in answers)
    assert account.asked == [1]
    assert loans.held("k") == 0
    assert len(loans) == 0  # nothing remembered
    account.error = None
    account.gate = None
    assert await loans.take("k", 10**6)


async def test_a_changed_limit_gives_back_the_old_loan_and_starts_afresh() -> None:
    account = Account(100)
    loans = RateLoans(account.borrow, account.give_back)
    for _ in range(1 + 2 + 1):
        assert await loans.take("k", 10**6)
    assert loans.held("k") == 3
    assert await loans.take("k", 8)  # a new routing table: 8 a minute
    await eventually(lambda: _true(account.returned == [3]))
    assert account.asked[-1] == 1
    await loans.close()


async def _true(value: bool) -> bool:
    return value
