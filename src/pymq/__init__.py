"""pymq: a durable message broker for Python, around a compiled storage core."""

from pymq._version import __version__
from pymq.errors import (
    BrokerLockedError,
    ClosedError,
    ConfigError,
    CorruptSegmentError,
    InvalidNameError,
    MessageTooLargeError,
    OffsetNotFoundError,
    ProtocolError,
    PymqError,
    QueueEmpty,
    QueueFull,
    QueueNotFound,
    ServerError,
    StaleReceiptError,
)
from pymq.storage import SegmentStore, open_store

__all__ = [
    "BrokerLockedError",
    "ClosedError",
    "ConfigError",
    "CorruptSegmentError",
    "InvalidNameError",
    "MessageTooLargeError",
    "OffsetNotFoundError",
    "ProtocolError",
    "PymqError",
    "QueueEmpty",
    "QueueFull",
    "QueueNotFound",
    "SegmentStore",
    "ServerError",
    "StaleReceiptError",
    "__version__",
    "open_store",
]
