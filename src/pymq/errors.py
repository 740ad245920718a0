"""Exceptions raised by pymq, embedded and over the network alike."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BrokerLockedError",
    "ClosedError",
    "ConfigError",
    "ConnectionLostError",
    "CorruptBatchError",
    "CorruptSegmentError",
    "FrameTooLargeError",
    "InvalidNameError",
    "MessageTooLargeError",
    "OffsetNotFoundError",
    "ProtocolError",
    "PymqError",
    "QueueEmpty",
    "QueueFull",
    "QueueNotFound",
    "ServerError",
    "ShuttingDownError",
    "StaleReceiptError",
    "UnconfirmedSettleError",
]


class PymqError(Exception):
    """Base class of every error pymq raises on purpose."""


class ConfigError(PymqError, ValueError):
    """An option has an invalid value; the message names it and its range."""


class InvalidNameError(PymqError, ValueError):
    """A stream, queue or group name breaks the naming rules."""


class MessageTooLargeError(PymqError, ValueError):
    """A message body is larger than max_message_bytes.

    Raised before anything is written. ``size`` and ``limit`` are in bytes.
    """

    def __init__(self, size: int, limit: int, message: str | None = None) -> None:
        super().__init__(
            message
            or f"message is {size} bytes; maximum is {limit} (max_message_bytes)"
        )
        self.size = size
        self.limit = limit

    def __reduce__(self) -> tuple[type, tuple[int, int, str]]:
        return (type(self), (self.size, self.limit, str(self)))


class QueueEmpty(PymqError):
    """Not raised by pymq: a get that finds no message returns None.

    Kept so that code which catches it still imports.
    """


class QueueFull(PymqError):
    """A put would pass max_length or max_bytes with overflow="reject"."""


class QueueNotFound(PymqError, LookupError):
    """A lookup that must not create named a queue that does not exist."""


class StaleReceiptError(PymqError):
    """A receipt names a delivery that expired or was already settled."""


class BrokerLockedError(PymqError):
    """Another open broker or store owns the data directory.

    ``pid`` is the owner's process id as it wrote it in the lock file, or
    None when the file contains none.
    """

    def __init__(self, path: str, pid: int | None) -> None:
        owner = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"data directory {path} is locked by {owner}; close that broker "
            f"or store first"
        )
        self.path = path
        self.pid = pid

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:
        return (type(self), (self.path, self.pid))


class ClosedError(PymqError):
    """The broker, store or connection was closed."""


class ShuttingDownError(ClosedError):
    """The server is stopping: it replied to a waiting request with error 13.

    The request took no effect: a get took no message, and a put that
    waited for room in a full queue wrote nothing. The server closes the
    connection next, so the clients raise this at once, without trying to
    reconnect first.
    """


class ProtocolError(PymqError):
    """A peer sent bytes that break the wire protocol."""


class FrameTooLargeError(ProtocolError):
    """A frame's length is over the max_frame_bytes agreed for the connection."""


class CorruptBatchError(PymqError):
    """A batch failed its CRC32C check on the wire; nothing of it was written.

    Sending the batch again may succeed.
    """


class AuthenticationError(PymqError):
    """The server refused the connection's credentials."""


class ConnectionLostError(PymqError, ConnectionError):
    """The connection to the server broke before a reply came.

    A request that changes state (put, ack, nack, reject, extend) may or
    may not have taken effect; the client does not send it again.
    """


class UnconfirmedSettleError(ConnectionLostError):
    """The connection broke before the server confirmed settles sent without waiting.

    Acks (or nacks, rejects) sent with ``wait=False`` get no reply. The
    server handles a connection's requests in order, so the reply to any
    later request confirms that it processed them. These were not
    confirmed: they may not have been applied, and their messages may be
    delivered again. ``requests`` counts the requests and ``messages`` the
    receipts they carried.
    """

    def __init__(self, message: str, *, requests: int = 0, messages: int = 0) -> None:
        super().__init__(message)
        self.requests = requests
        self.messages = messages

    def __reduce__(self) -> tuple[object, ...]:
        return (_unconfirmed_settle_error, (str(self), self.requests, self.messages))


def _unconfirmed_settle_error(
    message: str, requests: int, messages: int
) -> UnconfirmedSettleError:
    return UnconfirmedSettleError(message, requests=requests, messages=messages)


class CorruptSegmentError(PymqError):
    """A record on disk failed its checksum.

    ``path`` is the segment file and ``offset`` the record's offset. The
    record is counted as damaged and skipped by later reads.
    """

    def __init__(self, message: str, *, path: str, offset: int) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset

    def __reduce__(self) -> tuple[object, ...]:
        return (_corrupt_segment_error, (str(self), self.path, self.offset))


def _corrupt_segment_error(message: str, path: str, offset: int) -> CorruptSegmentError:
    return CorruptSegmentError(message, path=path, offset=offset)


class OffsetNotFoundError(PymqError, LookupError):
    """An offset has no record: outside the log, or lost to damage or a gap.

    ``first_offset`` and ``next_offset`` bound the log at the time of the
    lookup.
    """

    def __init__(
        self, message: str, offset: int, first_offset: int, next_offset: int
    ) -> None:
        super().__init__(message)
        self.offset = offset
        self.first_offset = first_offset
        self.next_offset = next_offset

    def __reduce__(self) -> tuple[type, tuple[str, int, int, int]]:
        return (
            type(self),
            (str(self), self.offset, self.first_offset, self.next_offset),
        )


class ServerError(PymqError):
    """An error frame from the server, with its numeric code.

    ``retriable`` is True when the same request may succeed later.
    """

    code: int = -1
    retriable: bool = False

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
