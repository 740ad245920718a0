"""A real embedded queue against QueueModel, step by step, under a fake clock.

Each example opens a broker in its own temporary folder and drives the queue
jobs with put, get, ack, nack, extend, reject, clock advances, restarts and
reads of jobs.dlq. After every step the counts, the DLQ counter and the
delivery invariants must match the model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import pymq
from pymq import StaleReceiptError
from tests.broker_host import scratch_folder
from tests.queue_model import QueueModel, seconds_to_ns

# Small segments, so puts roll segments and acks delete them.
SEGMENT_BYTES = 512
START_NS = 1_000 * 1_000_000_000
X_HEADERS = {"x-source", "x-group", "x-offset", "x-attempts", "x-reason", "x-dead-at"}

delays = st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0])
extensions = st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0])
reasons = st.sampled_from(["rejected", "bad input", "schema: v2"])


class FakeClock:
    """A clock in integer ns that moves only when a test advances it."""

    def __init__(self, start: int) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now


@dataclass(frozen=True)
class Delivery:
    """A delivery the real queue handed out, as the machine recorded it."""

    receipt: int
    offset: int
    attempt: int


@dataclass(frozen=True)
class BatchItem:
    """One delivery of a MessageBatch, with the fields a Message has."""

    receipt: int
    offset: int
    attempt: int
    body: bytes
    headers: dict[str, str]


class QueueMachine(RuleBasedStateMachine):
    """Drive pymq's queue jobs and QueueModel with the same calls."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = scratch_folder("pymq-queue-model-")
        self.clock = FakeClock(START_NS)
        self.broker: pymq.Broker | None = None
        self.queue: pymq.Queue | None = None
        self.model: QueueModel | None = None
        self.deliveries: list[Delivery] = []
        # The latest delivery of each offset the real queue handed out.
        self.holders: dict[int, Delivery] = {}
        self.puts = 0
        self.acks = 0
        self.dlq_read = 0

    # Opening --------------------------------------------------------------

    @initialize(
        visibility_timeout=st.sampled_from([1.0, 2.0]),
        max_deliveries=st.sampled_from([0, 1, 2, 3]),
        max_in_flight=st.sampled_from([1, 2, 3, 10_000]),
    )
    def open_queue(
        self, visibility_timeout: float, max_deliveries: int, max_in_flight: int
    ) -> None:
        self.model = QueueModel(
            visibility_ns=seconds_to_ns(visibility_timeout),
            max_deliveries=max_deliveries,
            max_in_flight=max_in_flight,
        )
        self.broker = pymq.open(self.folder, segment_bytes=SEGMENT_BYTES)
        self.queue = self.broker.queue(
            "jobs",
            visibility_timeout=visibility_timeout,
            max_deliveries=max_deliveries,
            max_in_flight=max_in_flight,
        )
        self._set_clocks()

    def _set_clocks(self) -> None:
        self.queue._clock = self.clock
        self.queue.dlq._clock = self.clock

    def teardown(self) -> None:
        try:
            if self.broker is not None:
                self.broker.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    # Putting --------------------------------------------------------------

    def _new_body(self, payload: bytes) -> bytes:
        body = b"m%d:" % self.puts + payload
        self.puts += 1
        return body

    @rule(payload=st.binary(max_size=12), tagged=st.booleans())
    def put(self, payload: bytes, tagged: bool) -> None:
        body = self._new_body(payload)
        headers = {"tag": body.decode("latin-1")} if tagged else {}
        offset = self.queue.put(body, headers=headers or None)
        assert offset == self.model.put(body, headers)

    @rule(payloads=st.lists(st.binary(max_size=8), min_size=1, max_size=4))
    def put_many(self, payloads: list[bytes]) -> None:
        bodies = [self._new_body(payload) for payload in payloads]
        offsets = self.queue.put_many(bodies)
        expected = [self.model.put(body, {}) for body in bodies]
        assert list(offsets) == expected

    # Delivering -----------------------------------------------------------

    def _record(self, message: pymq.Message | BatchItem) -> None:
        previous = self.holders.get(message.offset)
        if previous is not None:
            # A message has at most one holder at a time, so the previous
            # delivery of this offset must have ended.
            assert not self.model.is_live(previous.offset, previous.attempt)
        delivery = Delivery(message.receipt, message.offset, message.attempt)
        self.deliveries.append(delivery)
        self.holders[message.offset] = delivery

    def _draw_delivery(self, data: st.DataObject) -> Delivery:
        """Draw a recorded delivery, a live one three times in four."""
        live = [d for d in self.deliveries if self.model.is_live(d.offset, d.attempt)]
        if live and data.draw(st.integers(min_value=0, max_value=3)) > 0:
            return data.draw(st.sampled_from(live))
        return data.draw(st.sampled_from(self.deliveries))

    def _check_message(self, message: pymq.Message | BatchItem, expected) -> None:
        assert message.offset == expected.offset
        assert message.attempt == expected.attempt
        assert message.body == expected.body
        assert message.headers == expected.headers

    @rule()
    def get_nowait(self) -> None:
        expected = self.model.get(self.clock.now)
        message = self.queue.get_nowait()
        if expected is None:
            assert message is None
            return
        assert message is not None
        self._check_message(message, expected)
        self._record(message)

    @rule(count=st.integers(min_value=1, max_value=4))
    def get_many_nowait(self, count: int) -> None:
        expected = self.model.get_many(count, self.clock.now)
        messages = self.queue.get_many_nowait(count)
        assert len(messages) == len(expected)
        for message, expected_delivery in zip(messages, expected, strict=True):
            self._check_message(message, expected_delivery)
            self._record(message)

    @rule(count=st.integers(min_value=1, max_value=6))
    def get_batch_nowait(self, count: int) -> None:
        expected = self.model.get_many(count, self.clock.now)
        batch = self.queue.get_batch_nowait(count)
        assert len(batch) == len(expected)
        for index, expected_delivery in enumerate(expected):
            item = BatchItem(
                receipt=int(batch.receipts[index]),
                offset=int(batch.offsets[index]),
                attempt=int(batch.attempts[index]),
                body=bytes(batch.body(index)),
                headers=batch.headers[index] or {},
            )
            self._check_message(item, expected_delivery)
            self._record(item)

    # Settling -------------------------------------------------------------

    def _settle(self, call, model_call) -> bool:
        """Run a settling call on the queue and on the model.

        Returns whether it succeeded. When the model raises StaleReceiptError,
        the queue must raise it too.
        """
        try:
            model_call()
        except StaleReceiptError:
            with pytest.raises(StaleReceiptError):
                call()
            return False
        call()
        return True

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        delivery = self._draw_delivery(data)
        now = self.clock.now
        done = self._settle(
            lambda: self.queue.ack(delivery.receipt),
            lambda: self.model.ack(delivery.offset, delivery.attempt, now),
        )
        self.acks += done

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data(), with_stale=st.booleans())
    def ack_many(self, data: st.DataObject, with_stale: bool) -> None:
        live = [d for d in self.deliveries if self.model.is_live(d.offset, d.attempt)]
        stale = [d for d in self.deliveries if d not in live]
        chosen = data.draw(st.lists(st.sampled_from(live), unique=True)) if live else []
        if with_stale and stale:
            position = data.draw(st.integers(min_value=0, max_value=len(chosen)))
            chosen.insert(position, data.draw(st.sampled_from(stale)))
        now = self.clock.now
        done = self._settle(
            lambda: self.queue.ack_many([d.receipt for d in chosen]),
            lambda: self.model.ack_many([(d.offset, d.attempt) for d in chosen], now),
        )
        self.acks += len(chosen) if done else 0

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data(), delay=delays)
    def nack(self, data: st.DataObject, delay: float) -> None:
        delivery = self._draw_delivery(data)
        now = self.clock.now
        self._settle(
            lambda: self.queue.nack(delivery.receipt, delay),
            lambda: self.model.nack(delivery.offset, delivery.attempt, delay, now),
        )

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data(), seconds=extensions)
    def extend(self, data: st.DataObject, seconds: float) -> None:
        delivery = self._draw_delivery(data)
        now = self.clock.now
        self._settle(
            lambda: self.queue.extend(delivery.receipt, seconds),
            lambda: self.model.extend(delivery.offset, delivery.attempt, seconds, now),
        )

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data(), reason=reasons)
    def reject(self, data: st.DataObject, reason: str) -> None:
        delivery = self._draw_delivery(data)
        now = self.clock.now
        self._settle(
            lambda: self.queue.reject(delivery.receipt, reason),
            lambda: self.model.reject(delivery.offset, delivery.attempt, reason, now),
        )

    # Time, restarts and the DLQ -------------------------------------------

    @rule(
        fraction=st.sampled_from([0.1, 0.5, 0.99, 1.0, 1.01, 1.5, 2.0, 3.0]),
        nudge=st.sampled_from([-1, 0, 1]),
    )
    def advance_clock(self, fraction: float, nudge: int) -> None:
        step = int(self.model.visibility_ns * fraction) + nudge
        self.clock.now += max(step, 0)

    @precondition(lambda self: self.model.in_flight or self.model.waiting)
    @rule()
    def restart(self) -> None:
        self.broker.close()
        self.broker = None
        self.model.restart()
        self.broker = pymq.open(self.folder, segment_bytes=SEGMENT_BYTES)
        # No options: the queue opens as it was declared.
        self.queue = self.broker.queue("jobs")
        self._set_clocks()

    @precondition(lambda self: self.model.dlq_unread)
    @rule()
    def read_dlq(self) -> None:
        dlq_offset, dead = self.model.read_dead_letter()
        message = self.queue.dlq.get_nowait()
        assert message is not None
        headers = message.headers
        assert message.offset == dlq_offset
        assert message.body == dead.body
        assert set(headers) == X_HEADERS | set(dead.headers)
        for key, value in dead.headers.items():
            assert headers[key] == value
        assert headers["x-source"] == "jobs"
        assert headers["x-group"] == ""
        assert headers["x-offset"] == str(dead.offset)
        assert headers["x-attempts"] == str(dead.attempts)
        assert headers["x-reason"] == dead.reason
        assert headers["x-dead-at"].isdigit()
        message.ack()
        self.dlq_read += 1

    # Checks after every step ----------------------------------------------

    @invariant()
    def counts_match_model(self) -> None:
        if self.model is None:
            return
        counts = self.queue._counts()
        expected = self.model.counts(self.clock.now)
        assert counts["in_flight"] == expected["in_flight"]
        assert counts["waiting"] == expected["waiting"]
        assert counts["backlog"] == expected["backlog"]

    @invariant()
    def dead_lettered_matches_model(self) -> None:
        if self.model is None:
            return
        stats = self.queue.stats()
        assert stats.dead_lettered == self.model.dead_lettered_since_open
        assert stats.acked == self.model.acked_since_open

    @invariant()
    def no_message_lost(self) -> None:
        if self.model is None:
            return
        counts = self.queue._counts()
        unsettled = counts["in_flight"] + counts["waiting"] + counts["backlog"]
        dlq_depth = self.queue.dlq.stats().depth
        assert dlq_depth == self.model.dlq_unread
        assert unsettled + self.acks + dlq_depth + self.dlq_read == self.puts


QueueMachine.TestCase.settings = settings(stateful_step_count=40)
test_queue_model_matches_real_queue = QueueMachine.TestCase


# Cases the machine found, kept as plain tests -----------------------------


def open_jobs(
    folder: Path, clock: FakeClock, **options
) -> tuple[pymq.Broker, pymq.Queue]:
    broker = pymq.open(folder)
    queue = broker.queue("jobs", **options)
    queue._clock = clock
    queue.dlq._clock = clock
    return broker, queue


def test_counts_timeout_at_limit_counted_in_dlq(tmp_path):
    clock = FakeClock(START_NS)
    broker, queue = open_jobs(
        tmp_path / "data", clock, visibility_timeout=1.0, max_deliveries=1
    )
    with broker:
        queue.put(b"poison")
        queue.get_nowait()
        clock.now += seconds_to_ns(1.0)
        counts = queue._counts()
        assert counts["in_flight"] == 0
        assert counts["dead_lettered"] == 1
        assert queue.dlq.stats().depth == 1


def test_get_timeout_at_limit_frees_in_flight_slot(tmp_path):
    clock = FakeClock(START_NS)
    broker, queue = open_jobs(
        tmp_path / "data",
        clock,
        visibility_timeout=1.0,
        max_deliveries=1,
        max_in_flight=1,
    )
    with broker:
        queue.put_many([b"poison", b"next"])
        queue.get_nowait()
        clock.now += seconds_to_ns(1.0)
        message = queue.get_nowait()
        assert message is not None
        assert message.body == b"next"


def test_get_consumer_lost_frees_in_flight_slot(tmp_path):
    clock = FakeClock(START_NS)
    options = {"visibility_timeout": 1.0, "max_deliveries": 1, "max_in_flight": 1}
    broker, queue = open_jobs(tmp_path / "data", clock, **options)
    with broker:
        queue.put_many([b"poison", b"next"])
        queue.get_nowait()
    broker, queue = open_jobs(tmp_path / "data", clock)
    with broker:
        messages = queue.get_many_nowait(2)
        assert [m.body for m in messages] == [b"next"]
        assert queue.dlq.get_nowait().body == b"poison"
