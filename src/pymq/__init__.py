"""pymq: a durable message broker for Python, around a compiled storage core."""

import importlib
from types import ModuleType

from pymq._core import Message, MessageBatch
from pymq._version import __version__
from pymq.broker import Broker

# Not in __all__: a star import would hide the built-in open().
from pymq.broker import open as open
from pymq.client import RemoteBroker, connect
from pymq.errors import (
    AuthenticationError,
    BrokerLockedError,
    ClosedError,
    ConfigError,
    ConnectionLostError,
    CorruptBatchError,
    CorruptSegmentError,
    FrameTooLargeError,
    InvalidNameError,
    MessageTooLargeError,
    OffsetNotFoundError,
    ProtocolError,
    PymqError,
    QueueEmpty,
    QueueFull,
    QueueNotFound,
    ServerError,
    ShuttingDownError,
    StaleReceiptError,
    UnconfirmedSettleError,
)
from pymq.queue import Group, Queue, Stream
from pymq.storage import SegmentStore, open_store
from pymq.types import QueueStats

__all__ = [
    "AuthenticationError",
    "Broker",
    "BrokerLockedError",
    "ClosedError",
    "ConfigError",
    "ConnectionLostError",
    "CorruptBatchError",
    "CorruptSegmentError",
    "FrameTooLargeError",
    "Group",
    "InvalidNameError",
    "Message",
    "MessageBatch",
    "MessageTooLargeError",
    "OffsetNotFoundError",
    "ProtocolError",
    "PymqError",
    "Queue",
    "QueueEmpty",
    "QueueFull",
    "QueueNotFound",
    "QueueStats",
    "RemoteBroker",
    "SegmentStore",
    "ServerError",
    "ShuttingDownError",
    "StaleReceiptError",
    "Stream",
    "UnconfirmedSettleError",
    "__version__",
    "connect",
    "open_store",
]

# Submodules that `import pymq` does not load, so that the embedded broker
# starts without asyncio's client and server; pymq.aio loads on first use.
_LAZY_SUBMODULES = frozenset({"aio", "server"})


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"pymq.{name}")
    raise AttributeError(f"module 'pymq' has no attribute {name!r}")
