"""The durable delivery queue (Redis Streams, consumer group, retries, failure hook)."""

from .admin import LaneStats, MessageInfo, QueueAdmin, QueueStats
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
from .queue import Claimed, FailedRecipients, FailureHook, Forward, Queue, Settlement
from .retry_schedule import RetryPolicy
from .tally import MailboxCopy, TallyRelay

__all__ = [
    "LANES",
    "Claimed",
    "Envelope",
    "FailedRecipients",
    "FailureHook",
    "Forward",
    "Lane",
    "LaneStats",
    "MailboxCopy",
    "MessageInfo",
    "Notify",
    "Queue",
    "QueueAdmin",
    "QueueConsumer",
    "QueueStats",
    "Recipient",
    "RecipientResult",
    "RecipientStatus",
    "RetryPolicy",
    "Settlement",
    "TallyRelay",
    "new_message_id",
    "partition_of",
]
