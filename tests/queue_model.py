"""A pure-Python model of pymq queues, consumer groups and their DLQs.

QueueModel models one queue, or one group of a stream, and its dead-letter
queue. LogModel models the records of one stream (or queue) and hands each
put to the models of its groups. The models follow the delivery rules of
docs/broker.md, one dict entry per offset, with each result computed by
scanning the entries:

- the lowest available offset whose not-before time has come is delivered
  first, and every delivery gets the next attempt number;
- a delivery expires once its deadline is at or before now. Every call
  (get, ack, ack_many, nack, extend, reject, counts) first handles the
  deliveries that expired, in deadline order, then offset order;
- a failed delivery (nack or timeout) whose attempt reached max_deliveries
  moves to the DLQ, and so does a rejected one, at once;
- a message whose attempts reached max_deliveries while its consumer was
  lost (a restart with the delivery in flight) moves to the DLQ when it
  would be delivered again;
- a restart keeps acks and attempt counts, makes deliveries in flight
  available at once and drops nack delays. A crash of the process does the
  same, because every delivery and settlement is journaled before its call
  returns;
- a message redriven from a group's DLQ is appended to the stream for that
  group only: the other groups pass over it, settling it without a delivery,
  when it is the lowest offset they would deliver.

Times are integer nanoseconds of the caller's clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pymq import StaleReceiptError

NS_PER_SECOND = 1_000_000_000

AVAILABLE = "available"
DELIVERED = "delivered"
ACKED = "acked"
DEAD = "dead"
# Settled without a delivery: a record redriven for another group.
PASSED = "passed"


def seconds_to_ns(seconds: float) -> int:
    """Convert seconds to ns, truncating as the compiled core does."""
    return int(seconds * NS_PER_SECOND)


@dataclass
class ModelMessage:
    """One offset of the queue."""

    body: bytes
    headers: dict[str, str]
    state: str = AVAILABLE
    attempt: int = 0
    # The deadline of a delivered message, or the not-before time of an
    # available one.
    time: int = 0
    # True for a record redriven for another group of the stream.
    for_other_group: bool = False


@dataclass(frozen=True)
class ModelDelivery:
    """One hand-out of a message, as get_nowait returns it."""

    offset: int
    attempt: int
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class DeadLetter:
    """One message moved to the DLQ, with what its x- headers record."""

    offset: int
    attempts: int
    reason: str
    body: bytes
    headers: dict[str, str]


@dataclass
class QueueModel:
    """The queue jobs of one broker directory, across restarts."""

    visibility_ns: int
    max_deliveries: int
    max_in_flight: int
    messages: dict[int, ModelMessage] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # The number of DLQ messages not yet read back.
    dlq_unread: int = 0
    # Counters since the broker last opened, as stats() reports them.
    acked_since_open: int = 0
    dead_lettered_since_open: int = 0

    # Putting ------------------------------------------------------------

    def put(self, body: bytes, headers: dict[str, str]) -> int:
        offset = len(self.messages)
        self.messages[offset] = ModelMessage(body, dict(headers))
        return offset

    def add(
        self,
        offset: int,
        body: bytes,
        headers: dict[str, str],
        for_other_group: bool = False,
    ) -> None:
        """Add the record at offset of the stream this group reads."""
        message = ModelMessage(body, dict(headers), for_other_group=for_other_group)
        self.messages[offset] = message

    # Delivering ---------------------------------------------------------

    def get(self, now: int) -> ModelDelivery | None:
        self.expire(now)
        return self._take(now)

    def get_many(self, count: int, now: int) -> list[ModelDelivery]:
        self.expire(now)
        deliveries = []
        while len(deliveries) < count:
            delivery = self._take(now)
            if delivery is None:
                break
            deliveries.append(delivery)
        return deliveries

    def _take(self, now: int) -> ModelDelivery | None:
        while self.in_flight < self.max_in_flight:
            due = [
                offset
                for offset, message in self.messages.items()
                if message.state == AVAILABLE and message.time <= now
            ]
            if not due:
                return None
            offset = min(due)
            message = self.messages[offset]
            if message.for_other_group:
                message.state = PASSED
                continue
            if self.max_deliveries and message.attempt >= self.max_deliveries:
                self._dead_letter(offset, "consumer lost; max_deliveries reached")
                continue
            message.state = DELIVERED
            message.attempt += 1
            message.time = now + self.visibility_ns
            return ModelDelivery(offset, message.attempt, message.body, message.headers)
        return None

    def expire(self, now: int) -> None:
        """Fail every delivery whose deadline is at or before now."""
        expired = sorted(
            (message.time, offset)
            for offset, message in self.messages.items()
            if message.state == DELIVERED and message.time <= now
        )
        for _, offset in expired:
            self._fail(offset, now, "visibility timeout")

    def _fail(self, offset: int, not_before: int, reason: str) -> None:
        message = self.messages[offset]
        if self.max_deliveries and message.attempt >= self.max_deliveries:
            self._dead_letter(offset, f"{reason}; max_deliveries reached")
            return
        message.state = AVAILABLE
        message.time = not_before

    def _dead_letter(self, offset: int, reason: str) -> None:
        message = self.messages[offset]
        message.state = DEAD
        self.dead_letters.append(
            DeadLetter(offset, message.attempt, reason, message.body, message.headers)
        )
        self.dlq_unread += 1
        self.dead_lettered_since_open += 1

    # Settling -----------------------------------------------------------

    def is_live(self, offset: int, attempt: int) -> bool:
        """Return whether the delivery (offset, attempt) is still in flight."""
        message = self.messages.get(offset)
        return (
            message is not None
            and message.state == DELIVERED
            and message.attempt == attempt
        )

    def _check_live(self, offset: int, attempt: int) -> None:
        if not self.is_live(offset, attempt):
            raise StaleReceiptError(
                f"delivery {attempt} of offset {offset} expired or was settled"
            )

    def ack(self, offset: int, attempt: int, now: int) -> None:
        self.expire(now)
        self._check_live(offset, attempt)
        self.messages[offset].state = ACKED
        self.acked_since_open += 1

    def ack_many(self, deliveries: list[tuple[int, int]], now: int) -> None:
        """Ack every (offset, attempt), or none if one is stale or repeated."""
        if not deliveries:
            return
        if len(set(deliveries)) != len(deliveries):
            raise StaleReceiptError("the same delivery appears twice")
        self.expire(now)
        for offset, attempt in deliveries:
            self._check_live(offset, attempt)
        for offset, _ in deliveries:
            self.messages[offset].state = ACKED
        self.acked_since_open += len(deliveries)

    def nack(self, offset: int, attempt: int, delay: float, now: int) -> None:
        self.expire(now)
        self._check_live(offset, attempt)
        self._fail(offset, now + seconds_to_ns(delay), "nack")

    def extend(self, offset: int, attempt: int, seconds: float, now: int) -> None:
        self.expire(now)
        self._check_live(offset, attempt)
        self.messages[offset].time = now + seconds_to_ns(seconds)

    def reject(self, offset: int, attempt: int, reason: str, now: int) -> None:
        self.expire(now)
        self._check_live(offset, attempt)
        self._dead_letter(offset, reason)

    # Restart and reading the DLQ ------------------------------------------

    def restart(self) -> None:
        """Model a close and reopen: in-flight and delayed messages are due at once.

        Acks and attempt counts are kept, and the counters since open restart.
        """
        for message in self.messages.values():
            if message.state in (AVAILABLE, DELIVERED):
                message.state = AVAILABLE
                message.time = 0
        self.acked_since_open = 0
        self.dead_lettered_since_open = 0

    def undo_dead_letters(self, first: int) -> None:
        """Make dead_letters[first:] available again, as if never moved.

        A crash while the first of them was being moved leaves the others
        available in the queue or group, with their attempts counted.
        """
        for dead in self.dead_letters[first:]:
            message = self.messages[dead.offset]
            message.state = AVAILABLE
            message.time = 0
        undone = len(self.dead_letters) - first
        del self.dead_letters[first:]
        self.dlq_unread -= undone
        self.dead_lettered_since_open -= undone

    def take_dead_letters(self) -> list[DeadLetter]:
        """Read every unread DLQ message at once, as a redrive does."""
        unread = self.dead_letters[len(self.dead_letters) - self.dlq_unread :]
        self.dlq_unread = 0
        return unread

    def read_dead_letter(self) -> tuple[int, DeadLetter] | None:
        """Return the oldest unread DLQ message and its offset in the DLQ."""
        if self.dlq_unread == 0:
            return None
        dlq_offset = len(self.dead_letters) - self.dlq_unread
        self.dlq_unread -= 1
        return dlq_offset, self.dead_letters[dlq_offset]

    # Counts -------------------------------------------------------------

    def _count(self, state: str) -> int:
        return sum(1 for message in self.messages.values() if message.state == state)

    @property
    def in_flight(self) -> int:
        return self._count(DELIVERED)

    @property
    def waiting(self) -> int:
        """Available messages that were delivered before (nacked, timed out or lost)."""
        return sum(
            1
            for message in self.messages.values()
            if message.state == AVAILABLE and message.attempt > 0
        )

    @property
    def passed(self) -> int:
        """Records redriven for another group, which this group passed over."""
        return self._count(PASSED)

    @property
    def backlog(self) -> int:
        """Messages never delivered, records for other groups included until passed."""
        return sum(
            1
            for message in self.messages.values()
            if message.state == AVAILABLE and message.attempt == 0
        )

    def counts(self, now: int) -> dict[str, int]:
        """Return in_flight, waiting and backlog as GroupBase._counts() does."""
        self.expire(now)
        return {
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "backlog": self.backlog,
        }

    def state(self, offset: int) -> str:
        return self.messages[offset].state


@dataclass
class LogModel:
    """The records of one stream or queue, and the groups that read them.

    A queue is a log with one group. put hands each record to every group,
    and put_for_group hands it to the others as a record to pass over.
    """

    groups: dict[str, QueueModel]
    is_queue: bool = False
    next_offset: int = 0

    def put(self, body: bytes, headers: dict[str, str]) -> int:
        return self.put_for_group(body, headers, None)

    def put_for_group(
        self, body: bytes, headers: dict[str, str], target: str | None
    ) -> int:
        offset = self.next_offset
        self.next_offset += 1
        for name, group in self.groups.items():
            skip = target is not None and name != target
            group.add(offset, body, headers, for_other_group=skip)
        return offset

    def redrive(self, name: str) -> int:
        """Move the unread DLQ messages of group name back to that group only."""
        moved = self.groups[name].take_dead_letters()
        for dead in moved:
            if self.is_queue:
                self.put(dead.body, dead.headers)
            else:
                self.put_for_group(dead.body, dead.headers, name)
        return len(moved)

    def restart(self) -> None:
        for group in self.groups.values():
            group.restart()
