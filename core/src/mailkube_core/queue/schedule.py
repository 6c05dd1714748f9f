"""When a deferred message is tried again, and when it is given up."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..settings.models import DEFAULT_RETRY_INTERVALS


@dataclass(frozen=True)
class RetryPolicy:
    intervals: Sequence[timedelta] = DEFAULT_RETRY_INTERVALS
    max_retries: int = 7
    bounce_after: timedelta = timedelta(hours=48)
    #: each delay is stretched or shrunk by up to this fraction, so messages deferred together
    #: (a destination outage) do not all come back in the same second
    jitter: float = 0.1

    def delay(self, attempts: int, rng: random.Random | None = None) -> timedelta:
        """The wait after the `attempts`-th deferral (1-based); the last interval repeats."""
        base = self.intervals[min(max(attempts, 1), len(self.intervals)) - 1]
        factor = 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return base * factor

    def expired(self, attempts: int, received_at: datetime, now: datetime) -> bool:
        """Out of retries (`attempts` deferrals so far) or out of time."""
        return attempts >= self.max_retries or now - received_at >= self.bounce_after
