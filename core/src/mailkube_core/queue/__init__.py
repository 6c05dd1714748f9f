"""The durable delivery queue (Redis Streams, consumer group, retries, failure hook)."""

from .consumer import QueueConsumer
from .envelope import (
    LANES,
    Envelope,
    Lane,
    Notify,
    Recipient,
    RecipientResult,
    RecipientStatus,
)
from .keys import new_message_id, partition_of
from .queue import (
    Claimed,
    FailedRecipients,
    FailureHook,
    LaneStats,
    MessageInfo,
    Queue,
    QueueStats,
    Settlement,
)
from .schedule import RetryPolicy

__all__ = [
    "LANES",
    "Claimed",
    "Envelope",
    "FailedRecipients",
    "FailureHook",
    "Lane",
    "LaneStats",
    "MessageInfo",
    "Notify",
    "Queue",
    "QueueConsumer",
    "QueueStats",
    "Recipient",
    "RecipientResult",
    "RecipientStatus",
    "RetryPolicy",
    "Settlement",
    "new_message_id",
    "partition_of",
]
