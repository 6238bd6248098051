"""The durable queue: messages are accepted only once they are on stable storage."""

from gateway.queue.store import (
    AREAS,
    REPLY_DISK_FULL,
    REPLY_QUEUE_CLOSED,
    REPLY_QUEUE_ERROR,
    Claim,
    CorruptQueueFile,
    QueuedMessage,
    QueueStore,
)

__all__ = [
    "AREAS",
    "Claim",
    "CorruptQueueFile",
    "QueueStore",
    "QueuedMessage",
    "REPLY_DISK_FULL",
    "REPLY_QUEUE_CLOSED",
    "REPLY_QUEUE_ERROR",
]
