"""Message rates lent to this process ahead of use, so that a busy sender or recipient costs
no Redis round trip per message.

Redis keeps the one account of every rate (ratelimit.py's GCRA). The first message of an
identity (a sender, a recipient) asks Redis for one message of its allowance, as before. An
identity whose loan is used up again within LOAN_LIFETIME asks for twice as many the next
time (up to a cap): Redis grants what its GCRA allows, advancing the identity's theoretical
arrival time by as many intervals as it grants, and the process admits the next messages
from the loan without asking. What is not used within LOAN_LIFETIME goes back (the arrival
time moves back by as many intervals).

So the messages admitted by all the gateway processes together never exceed what Redis's
GCRA allows, exactly as when every message asked. What a loan changes is who may use the
allowance in the meantime: another process may be refused for messages this one holds and
will give back within LOAN_LIFETIME. The cap keeps that small: at most an eighth of a
minute's burst is held by one process (`loan_cap`), and a rate below 16 a minute is never
lent more than one message at a time, so small limits behave exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

#: how long a loan is kept before what is left of it goes back (seconds)
LOAN_LIFETIME = 1.0
#: most messages one process borrows at once
MAX_LOAN = 64

#: borrow(key, per_minute, want) -> how many Redis granted (0: the rate is used up)
Borrow = Callable[[str, int, int], Coroutine[Any, Any, int]]
#: give_back(key, per_minute, count): the arrival time moves back by `count` intervals
GiveBack = Callable[[str, int, int], Coroutine[Any, Any, None]]


def loan_cap(per_minute: int) -> int:
    """The most messages of a rate one process holds: an eighth of its burst (a minute's
    worth), at least one, at most MAX_LOAN."""
    return max(1, min(MAX_LOAN, per_minute // 8))


@dataclass
class _Loan:
    per_minute: int
    #: messages borrowed and not used yet
    left: int = 0
    #: how many the next borrowing asks for
    size: int = 1
    #: loop time of the last borrowing; what is left goes back LOAN_LIFETIME after it
    borrowed_at: float = 0.0
    #: the borrowing on its way, which every message of this key waits for
    asking: asyncio.Task[int] | None = None
    expiry: asyncio.TimerHandle | None = None


class RateLoans:
    """The loans of one process, by rate key."""

    def __init__(self, borrow: Borrow, give_back: GiveBack) -> None:
        self._borrow = borrow
        self._give_back = give_back
        self._loans: dict[str, _Loan] = {}
        self._returns: set[asyncio.Task[None]] = set()

    async def take(self, key: str, per_minute: int) -> bool:
        """One message of `key`'s rate: from the loan, else borrowed; False when the rate is
        used up."""
        loan = self._loans.get(key)
        if loan is None or loan.per_minute != per_minute:
            if loan is not None:  # the limit changed (a new routing table): start afresh
                self._expire(key, loan)
            loan = self._loans[key] = _Loan(per_minute)
        while True:
            if loan.left > 0:
                loan.left -= 1
                return True
            if loan.asking is None:
                loan.asking = asyncio.get_running_loop().create_task(self._ask(key, loan))
                loan.asking.add_done_callback(_retrieve)
            # shielded: a session that goes away must not lose what was borrowed for it
            if await asyncio.shield(loan.asking) == 0:
                return False

    def put_back(self, key: str) -> bool:
        """Give back a message taken but not used (refused for another reason); False when
        there is no loan to give it back to (the caller gives it back to Redis)."""
        loan = self._loans.get(key)
        if loan is None:
            return False
        loan.left += 1
        return True

    async def _ask(self, key: str, loan: _Loan) -> int:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - loan.borrowed_at < LOAN_LIFETIME:  # used up quickly: a busy key
            loan.size = min(loan.size * 2, loan_cap(loan.per_minute))
        else:
            loan.size = 1
        try:
            granted = await self._borrow(key, loan.per_minute, loan.size)
        except BaseException:
            loan.asking = None
            if loan.expiry is None and self._loans.get(key) is loan:
                del self._loans[key]  # nothing held, nothing to remember
            raise
        loan.asking = None
        loan.left += granted
        loan.borrowed_at = loop.time()
        if loan.expiry is not None:
            loan.expiry.cancel()
        loan.expiry = loop.call_later(LOAN_LIFETIME, self._expire, key, loan)
        return granted

    def _expire(self, key: str, loan: _Loan) -> None:
        """LOAN_LIFETIME after the last borrowing: what is left goes back to Redis."""
        if loan.asking is not None:  # a borrowing on its way sets a new expiry
            return
        if loan.expiry is not None:
            loan.expiry.cancel()
        if self._loans.get(key) is loan:
            del self._loans[key]
        if loan.left > 0:
            task = asyncio.get_running_loop().create_task(
                self._give_back(key, loan.per_minute, loan.left)
            )
            loan.left = 0
            self._returns.add(task)
            task.add_done_callback(self._returned)

    def _returned(self, task: asyncio.Task[None]) -> None:
        self._returns.discard(task)
        _retrieve(task)  # an unreturned loan only waits out its minute

    def __len__(self) -> int:
        """Rates this process holds or has borrowed within LOAN_LIFETIME."""
        return len(self._loans)

    def held(self, key: str) -> int:
        """Messages of `key` this process holds (for tests and metrics)."""
        loan = self._loans.get(key)
        return 0 if loan is None else loan.left

    async def close(self) -> None:
        """Give back every loan (SIGTERM): the allowance is not held by a process gone."""
        for key, loan in list(self._loans.items()):
            if loan.asking is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(loan.asking)
            self._expire(key, loan)
        if self._returns:
            await asyncio.gather(*self._returns, return_exceptions=True)


def _retrieve(task: asyncio.Task[object]) -> None:
    """Mark a task's exception seen: whoever awaited it has it; nobody else needs it."""
    if not task.cancelled():
        task.exception()
