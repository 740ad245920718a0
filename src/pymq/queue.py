"""Queues, streams and consumer groups of the embedded broker.

The per-message calls (put, get_nowait, ack, nack, extend, reject) are
methods of the compiled core; this module adds blocking waits, statistics
and dead-letter queues.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pymq._core import (
    GroupBase,
    Message,
    MessageBatch,
    SegmentStore,
    StreamBase,
)
from pymq.errors import ClosedError
from pymq.types import QueueStats

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from pymq.broker import Broker

__all__ = ["Group", "Message", "MessageBatch", "Queue", "Stream"]


class _Publisher:
    """The put and put_many methods of queues and streams, run by the core.

    Each instance binds the core's methods in its own __dict__, which a
    lookup finds before these, so a put is one call into compiled code.
    These methods document that call, and run it when called on the class.
    """

    def _bind_core_put(self, core: StreamBase) -> None:
        self.__dict__["put"] = core.put
        self.__dict__["put_many"] = core.put_many

    def put(
        self,
        body: Buffer,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Append one message and return its offset.

        headers maps str names to str values. Raises ValueError, writing
        nothing, for a reserved name (pymq._core.RESERVED_HEADERS: those of
        a dead-letter move) or text that UTF-8 cannot encode, and
        MessageTooLargeError when the body with its header block is larger
        than max_message_bytes. At a queue's max_length or max_bytes, raises
        QueueFull with overflow="reject" (timeout is then not used), or waits
        for room with overflow="block", up to timeout seconds (None: no
        limit) before it raises QueueFull.
        """
        put: Any = self.__dict__["put"]
        offset: int = put(body, headers=headers, timeout=timeout)
        return offset

    def put_many(
        self,
        bodies: Iterable[Buffer],
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> range:
        """Append messages in order, each with headers; return their offsets.

        Either every message is written or none: a limit raises or waits
        for room for all of them, as put does for one.
        """
        put_many: Any = self.__dict__["put_many"]
        offsets: range = put_many(bodies, headers=headers, timeout=timeout)
        return offsets


class _Consumer(GroupBase):
    """The wait of the blocking gets, which the core calls when it must wait."""

    name: str
    _broker: Broker
    _ready: threading.Condition

    # get(), get_many() and get_batch() are compiled (GroupBase); they call
    # _wait only when they must wait.

    def _wait(self, timeout: float | None, attempt: Any) -> Any:
        """Call attempt() until it returns a result, or timeout passes.

        The caller has checked timeout with check_timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self.stream
        with self._ready:
            stream.waiters += 1
            try:
                while True:
                    found = attempt()
                    if found is not None:
                        return found
                    wait = self._next_due()
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return None
                        wait = remaining if wait is None else min(wait, remaining)
                    # A message that appears between the attempt and the wait
                    # is not missed: put's wake-up needs this lock first.
                    self._ready.wait(wait)
            finally:
                stream.waiters -= 1

    def __iter__(self) -> Iterator[Message]:
        """Yield messages as they arrive, forever; settle each one."""
        while True:
            message = self.get()
            if message is not None:
                yield message

    def stats(self) -> QueueStats:
        """Return the counts of this queue or group; see QueueStats."""
        counts = self._counts()
        store: SegmentStore = self.stream.store
        low = counts["low"]
        age = None
        if low < store.next_offset:
            try:
                timestamp = store.read_timestamp(low)
            except LookupError:
                age = None
            else:
                age = max(0.0, (time.time_ns() - timestamp) / 1e9)
        depth = counts["in_flight"] + counts["waiting"] + counts["backlog"]
        return QueueStats(
            name=self.name,
            depth=depth,
            in_flight=counts["in_flight"],
            waiting=counts["waiting"],
            acked=counts["acked"],
            dead_lettered=counts["dead_lettered"],
            oldest_unacked_age=age,
            damaged=store.damaged,
            skipped=counts["skipped"],
        )

    @property
    def dlq(self) -> Queue:
        """The dead-letter queue of this queue or group (created on first use).

        A dead-letter queue's is the DLQ itself; see dlq_name.
        """
        return self._broker._open_queue(self.dlq_name, {})

    @property
    def dlq_name(self) -> str:
        """The name of the dead-letter queue."""
        raise NotImplementedError


class Queue(_Publisher, _Consumer):
    """A stream with one group, whose segments are deleted once acked.

    put and put_many append to the queue; get, get_many, ack, ack_many, nack,
    extend and reject consume it. Thread-safe.
    """

    def __init__(
        self,
        broker: Broker,
        name: str,
        stream: StreamBase,
        journal: SegmentStore,
        ready: threading.Condition,
        *,
        max_length: int | None = None,
        max_bytes: int | None = None,
        overflow: str = "reject",
        **options: Any,
    ) -> None:
        super().__init__(stream, journal, start=stream.store.first_offset, **options)
        self.name = name
        self._broker = broker
        self._ready = ready
        self._deletes_acked = True
        stream.queue_group = self
        stream.wait_room = self._wait_room
        self.max_length = max_length
        self.max_bytes = max_bytes
        self.overflow = overflow
        self._bind_core_put(stream)

    @property
    def max_length(self) -> int | None:
        """The maximum number of messages not yet acked, or None for no limit."""
        value = self.stream.max_length
        return None if value < 0 else value

    @max_length.setter
    def max_length(self, value: int | None) -> None:
        self.stream.max_length = -1 if value is None else value

    @property
    def max_bytes(self) -> int | None:
        """The maximum bytes of records on disk, or None for no limit.

        Acked records count until their segment is deleted.
        """
        value = self.stream.max_bytes
        return None if value < 0 else value

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        self._broker._check_queue_bytes(self.name, value)
        self.stream.max_bytes = -1 if value is None else value

    @property
    def overflow(self) -> str:
        """At a limit, "reject" raises QueueFull and "block" waits for room."""
        return "block" if self.stream.overflow_block else "reject"

    @overflow.setter
    def overflow(self, value: str) -> None:
        self.stream.overflow_block = value == "block"

    def _wait_room(self, timeout: float | None) -> bool:
        """Wait for an ack or a timeout; return False once timeout passed.

        Raises ClosedError once the broker's _stop_waits() ran.
        """
        stopped = self._broker._waits_stopped
        if stopped is not None:
            raise ClosedError(f"queue {self.name} is full and {stopped}")
        if timeout is not None and timeout <= 0:
            return False
        with self._ready:
            self.stream.waiters += 1
            try:
                # Short waits: an ack between the put's check and this wait
                # would otherwise be missed until the timeout.
                self._ready.wait(0.05 if timeout is None else min(timeout, 0.05))
            finally:
                self.stream.waiters -= 1
        return True

    @property
    def dlq_name(self) -> str:
        """The name of the dead-letter queue: ``<queue>.dlq``.

        A dead-letter queue's is its own name: a message that fails in a
        DLQ stays there, so the DLQ of ``jobs.dlq`` is ``jobs.dlq`` itself.
        """
        if self.stream.dead_letter:
            return self.name
        return f"{self.name}.dlq"

    def close(self) -> None:
        """Close this queue: its journal and its records' store.

        Deliveries in flight are available again when the queue is opened
        next, with their attempt counted; broker.queue(name) reopens it.
        """
        self._broker._close_queue(self)

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Queue {self.name!r}>"


class Group(_Consumer):
    """A consumer group of a stream: its own cursor and deliveries.

    Every group receives every message of its stream; consumers of one group
    compete for them. Thread-safe.
    """

    def __init__(
        self,
        broker: Broker,
        stream_name: str,
        name: str,
        stream: StreamBase,
        journal: SegmentStore,
        ready: threading.Condition,
        start: int,
        **options: Any,
    ) -> None:
        super().__init__(stream, journal, start=start, **options)
        self.name = name
        self._group_name = name
        self.stream_name = stream_name
        self._broker = broker
        self._ready = ready

    @property
    def dlq_name(self) -> str:
        """The name of the dead-letter queue: ``<stream>.<group>.dlq``."""
        return f"{self.stream_name}.{self.name}.dlq"

    def close(self) -> None:
        """Close this group's journal; the stream stays open.

        Deliveries in flight are available again when the group is opened
        next, with their attempt counted; stream.group(name) reopens it.
        """
        self._broker._close_group(self)

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Group {self.name!r} of stream {self.stream_name!r}>"


class Stream(_Publisher):
    """An append-only log with any number of consumer groups. Thread-safe."""

    def __init__(
        self, broker: Broker, name: str, core: StreamBase, ready: threading.Condition
    ) -> None:
        self.name = name
        self._broker = broker
        self._core = core
        self._ready = ready
        self._bind_core_put(core)

    def group(
        self,
        name: str,
        *,
        start: str | int = "earliest",
        **options: Any,
    ) -> Group:
        """Open the group name, creating it if it is missing.

        start is where a new group begins: "earliest" (the oldest message
        kept), "latest" (only messages put from now on) or an offset.
        """
        return self._broker._open_group(self, name, start, options)

    @property
    def store(self) -> SegmentStore:
        """The segment store that contains this stream's records."""
        return self._core.store

    def __repr__(self) -> str:
        return f"<Stream {self.name!r}>"
