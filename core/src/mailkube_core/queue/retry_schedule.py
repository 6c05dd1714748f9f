"""The retry schedule: when a deferred message is tried again, and when it is given up.

`RetryPolicy` decides; the worker's settings give it (`retry_intervals`, `retry_jitter`,
`max_retries`, `bounce_after`: `Queue.from_settings`). Where a retry is scheduled and run:

- `Queue.settle` (queue/queue.py), after a delivery attempt: recipients still pending when
  `RetryPolicy.expired` fail with 4.4.7; otherwise the message is deferred until
  now + `RetryPolicy.delay(attempts + 1)`;
- `Queue.defer`, script `DEFER` (queue/scripts.py): out of the lane's stream into its delayed
  sorted set `{P:qN}:delayed:<lane>` (score: the due time, ms), `attempts` + 1;
- `Queue.move_due`, script `MOVE_DUE`: due messages back to the stream, each once; every worker
  runs it every `queue_poll_interval` for its own lanes (`QueueConsumer._maintenance_loop`,
  queue/consumer.py);
- `QueueAdmin.retry_now` (queue/admin.py), script `RETRY_NOW`: `mailkube queue retry ID`, at once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..settings.models import DEFAULT_RETRY_INTERVALS


@dataclass(frozen=True)
class RetryPolicy:
    """The wait before each retry, and the limits past which pending recipients fail."""

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
