"""Groups, a queue and their DLQs against the model, across clean and crash restarts.

The broker runs in a child process (tests/broker_host.py) with the queue
jobs and the stream events, whose groups billing and audit each receive
every message. Two workers per queue or group compete for its messages.
The machine puts, gets, settles, advances a fake clock, reads and redrives
DLQs, and restarts the broker three ways: a clean close, a SIGKILL between
two calls, and a SIGKILL in the middle of a move to a DLQ. After every step
the counts, stats and DLQ depths must match the model, and every message
must be accounted for.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pymq import StaleReceiptError
from tests.broker_host import BrokerHost, Layout, scratch_folder
from tests.queue_model import (
    AVAILABLE,
    DELIVERED,
    LogModel,
    ModelDelivery,
    QueueModel,
    seconds_to_ns,
)

# Small segments, so puts roll segments and a queue's acks delete them.
SEGMENT_BYTES = 512
START_NS = 1_000 * 1_000_000_000
QUEUE = "jobs"
STREAM = "events"
GROUPS = ("billing", "audit")
CONSUMERS = (QUEUE, *(f"{STREAM}.{group}" for group in GROUPS))
# Puts stop while this many messages are unsettled, summed over the queue
# and both groups, so that consumers often reach the end of their log.
MAX_UNSETTLED = 12
X_HEADERS = {"x-source", "x-group", "x-offset", "x-attempts", "x-reason", "x-dead-at"}

consumers = st.sampled_from(CONSUMERS)
logs = st.sampled_from([QUEUE, STREAM])
workers = st.sampled_from([0, 1])
delays = st.sampled_from([0.0, 0.25, 1.0, 3.0])
extensions = st.sampled_from([0.0, 1.0, 4.0])
reasons = st.sampled_from(["rejected", "bad input"])
group_options = st.fixed_dictionaries(
    {
        "visibility_timeout": st.sampled_from([1.0, 2.0]),
        "max_deliveries": st.sampled_from([0, 1, 2, 3]),
        "max_in_flight": st.sampled_from([1, 2, 10_000]),
    }
)


@dataclass(frozen=True)
class Delivery:
    """A delivery the real broker handed out, as the machine recorded it."""

    consumer: str
    worker: int
    receipt: int
    offset: int
    attempt: int


class GroupMachine(RuleBasedStateMachine):
    """Drive a queue, a stream's two groups and the model with the same calls."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = scratch_folder("pymq-group-model-")
        self.now = START_NS
        self.host: BrokerHost | None = None
        self.logs: dict[str, LogModel] = {}
        self.models: dict[str, QueueModel] = {}
        self.deliveries: list[Delivery] = []
        # The latest delivery of each (consumer, offset) the broker handed out.
        self.holders: dict[tuple[str, int], Delivery] = {}
        self.puts = 0
        # Per consumer: acks that returned, DLQ messages read, and redriven.
        self.acked = dict.fromkeys(CONSUMERS, 0)
        self.dlq_read = dict.fromkeys(CONSUMERS, 0)
        self.redriven = dict.fromkeys(CONSUMERS, 0)
        self.redriven_offsets: dict[str, set[int]] = {name: set() for name in CONSUMERS}

    # Opening and restarting ----------------------------------------------

    @initialize(
        queue_options=group_options,
        billing_options=group_options,
        audit_options=group_options,
    )
    def open_broker(
        self,
        queue_options: dict[str, Any],
        billing_options: dict[str, Any],
        audit_options: dict[str, Any],
    ) -> None:
        declared = {
            QUEUE: queue_options,
            f"{STREAM}.billing": billing_options,
            f"{STREAM}.audit": audit_options,
        }
        for name, options in declared.items():
            self.models[name] = QueueModel(
                visibility_ns=seconds_to_ns(options["visibility_timeout"]),
                max_deliveries=options["max_deliveries"],
                max_in_flight=options["max_in_flight"],
            )
        self.logs = {
            QUEUE: LogModel({QUEUE: self.models[QUEUE]}, is_queue=True),
            STREAM: LogModel(
                {name: self.models[name] for name in CONSUMERS if name != QUEUE}
            ),
        }
        layout: Layout = {
            "queues": {QUEUE: queue_options},
            "streams": {STREAM: {"billing": billing_options, "audit": audit_options}},
        }
        self.host = BrokerHost(self.folder, layout, SEGMENT_BYTES)

    def _reopen(self) -> None:
        # No options: every queue and group opens as it was declared.
        layout: Layout = {
            "queues": {QUEUE: None},
            "streams": {STREAM: dict.fromkeys(GROUPS)},
        }
        self.host = BrokerHost(self.folder, layout, SEGMENT_BYTES)

    def teardown(self) -> None:
        try:
            if self.host is not None:
                self.host.kill()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _call(self, command: str, *args: Any) -> Any:
        return self.host.call(self.now, command, *args)

    def _any_in_flight(self) -> bool:
        return any(model.in_flight for model in self.models.values())

    def _any_timed(self) -> bool:
        """Return whether a delivery or a nack delay is waiting for the clock."""
        return any(
            message.state == DELIVERED or message.time > self.now
            for model in self.models.values()
            for message in model.messages.values()
            if message.state in (DELIVERED, AVAILABLE)
        )

    def _unsettled(self) -> int:
        return sum(
            model.in_flight + model.waiting + model.backlog
            for model in self.models.values()
        )

    @precondition(lambda self: self._any_in_flight())
    @rule()
    def restart(self) -> None:
        self.host.close()
        for log in self.logs.values():
            log.restart()
        self._reopen()

    @precondition(lambda self: self._any_in_flight())
    @rule()
    def crash(self) -> None:
        """SIGKILL the broker's process between two calls, and reopen it."""
        self.host.kill()
        for log in self.logs.values():
            log.restart()
        self._reopen()

    @precondition(lambda self: self._any_in_flight())
    @rule(data=st.data(), reason=reasons, after_put=st.booleans())
    def crash_in_move(self, data: st.DataObject, reason: str, after_put: bool) -> None:
        """Reject a delivery and SIGKILL the broker while it moves it to the DLQ.

        Killed after the DLQ's put, the reopened broker finds the message in
        the DLQ and settles the move, which counts in dead_lettered since
        open. Killed before it, the message is available again with its
        attempt counted.
        """
        live = [d for d in self.deliveries if self._is_live(d)]
        delivery = data.draw(st.sampled_from(live))
        model = self.models[delivery.consumer]
        first = len(model.dead_letters)
        model.reject(delivery.offset, delivery.attempt, reason, self.now)
        # The broker dies in the first move this call makes.
        model.undo_dead_letters(first + 1 if after_put else first)
        self.host.crash_in_move(
            self.now, delivery.consumer, delivery.receipt, reason, after_put
        )
        for log in self.logs.values():
            log.restart()
        event(f"crashed in a move, {'after' if after_put else 'before'} the put")
        if after_put:
            model.dead_lettered_since_open += 1
        self._reopen()

    # Putting --------------------------------------------------------------

    def _new_body(self, payload: bytes) -> bytes:
        body = b"m%d:" % self.puts + payload
        self.puts += 1
        return body

    @precondition(lambda self: self._unsettled() < MAX_UNSETTLED)
    @rule(
        log=logs,
        payloads=st.lists(st.binary(max_size=8), min_size=1, max_size=4),
        tagged=st.booleans(),
    )
    def put(self, log: str, payloads: list[bytes], tagged: bool) -> None:
        """Put one message with put, or several with put_many."""
        bodies = [self._new_body(payload) for payload in payloads]
        headers = {"tag": bodies[0].decode("latin-1")} if tagged else {}
        if len(bodies) == 1:
            offsets = [self._call("put", log, bodies[0], headers)]
        else:
            offsets = self._call("put_many", log, bodies, headers)
        assert offsets == [self.logs[log].put(body, headers) for body in bodies]

    # Delivering -----------------------------------------------------------

    def _is_live(self, delivery: Delivery) -> bool:
        return self.models[delivery.consumer].is_live(delivery.offset, delivery.attempt)

    def _record(self, consumer: str, worker: int, got: tuple, expected: Any) -> None:
        offset, attempt, receipt, body, headers = got
        assert isinstance(expected, ModelDelivery)
        assert offset == expected.offset
        assert attempt == expected.attempt
        assert body == expected.body
        assert headers == expected.headers
        previous = self.holders.get((consumer, offset))
        if previous is not None:
            # Within a group a message has one holder at a time, so the
            # previous delivery of this offset must have ended.
            assert not self._is_live(previous)
            assert attempt > previous.attempt
        delivery = Delivery(consumer, worker, receipt, offset, attempt)
        self.deliveries.append(delivery)
        self.holders[(consumer, offset)] = delivery

    @rule(consumer=consumers, worker=workers, count=st.integers(0, 4))
    def get(self, consumer: str, worker: int, count: int) -> None:
        """Get one message with get_nowait (count 0), or get_many_nowait(count)."""
        model = self.models[consumer]
        if count == 0:
            delivery = model.get(self.now)
            expected = [] if delivery is None else [delivery]
        else:
            expected = model.get_many(count, self.now)
        got = self._call("get", consumer, count)
        assert len(got) == len(expected)
        for message, expected_delivery in zip(got, expected, strict=True):
            self._record(consumer, worker, message, expected_delivery)
            if expected_delivery.offset in self.redriven_offsets[consumer]:
                event("delivered a redriven message")

    @rule(consumer=consumers, worker=workers)
    def catch_up(self, consumer: str, worker: int) -> None:
        """Get and ack batches until none is delivered, as a consumer catching up."""
        model = self.models[consumer]
        for _ in range(4):
            expected = model.get_many(4, self.now)
            got = self._call("get", consumer, 4)
            assert len(got) == len(expected)
            if not got:
                return
            for message, expected_delivery in zip(got, expected, strict=True):
                self._record(consumer, worker, message, expected_delivery)
            model.ack_many([(d.offset, d.attempt) for d in expected], self.now)
            self._call("ack_many", consumer, [message[2] for message in got])
            self.acked[consumer] += len(got)

    # Settling -------------------------------------------------------------

    def _draw_delivery(self, data: st.DataObject) -> Delivery:
        """Draw a recorded delivery, a live one three times in four."""
        live = [d for d in self.deliveries if self._is_live(d)]
        if live and data.draw(st.integers(min_value=0, max_value=3)) > 0:
            return data.draw(st.sampled_from(live))
        return data.draw(st.sampled_from(self.deliveries))

    def _settle(self, command: str, args: tuple, model_call: Any) -> bool:
        """Run a settling call in the child and on the model.

        Returns whether it succeeded. When the model raises StaleReceiptError,
        the broker must raise it too.
        """
        try:
            model_call()
        except StaleReceiptError:
            with pytest.raises(StaleReceiptError):
                self._call(command, *args)
            return False
        self._call(command, *args)
        return True

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        d = self._draw_delivery(data)
        model = self.models[d.consumer]
        now = self.now
        done = self._settle(
            "ack",
            (d.consumer, d.receipt),
            lambda: model.ack(d.offset, d.attempt, now),
        )
        self.acked[d.consumer] += done

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data(), consumer=consumers, with_stale=st.booleans())
    def ack_many(self, data: st.DataObject, consumer: str, with_stale: bool) -> None:
        mine = [d for d in self.deliveries if d.consumer == consumer]
        live = [d for d in mine if self._is_live(d)]
        stale = [d for d in mine if d not in live]
        chosen = data.draw(st.lists(st.sampled_from(live), unique=True)) if live else []
        if with_stale and stale:
            position = data.draw(st.integers(min_value=0, max_value=len(chosen)))
            chosen.insert(position, data.draw(st.sampled_from(stale)))
        model = self.models[consumer]
        now = self.now
        done = self._settle(
            "ack_many",
            (consumer, [d.receipt for d in chosen]),
            lambda: model.ack_many([(d.offset, d.attempt) for d in chosen], now),
        )
        self.acked[consumer] += len(chosen) if done else 0

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data(), delay=delays)
    def nack(self, data: st.DataObject, delay: float) -> None:
        d = self._draw_delivery(data)
        model = self.models[d.consumer]
        now = self.now
        self._settle(
            "nack",
            (d.consumer, d.receipt, delay),
            lambda: model.nack(d.offset, d.attempt, delay, now),
        )

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data(), seconds=extensions)
    def extend(self, data: st.DataObject, seconds: float) -> None:
        d = self._draw_delivery(data)
        model = self.models[d.consumer]
        now = self.now
        self._settle(
            "extend",
            (d.consumer, d.receipt, seconds),
            lambda: model.extend(d.offset, d.attempt, seconds, now),
        )

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data(), reason=reasons)
    def reject(self, data: st.DataObject, reason: str) -> None:
        d = self._draw_delivery(data)
        model = self.models[d.consumer]
        now = self.now
        self._settle(
            "reject",
            (d.consumer, d.receipt, reason),
            lambda: model.reject(d.offset, d.attempt, reason, now),
        )

    # Time and DLQs ----------------------------------------------------------

    @precondition(lambda self: self._any_timed())
    @rule(
        fraction=st.sampled_from([0.1, 0.5, 0.99, 1.0, 1.01, 2.0]),
        nudge=st.sampled_from([-1, 0, 1]),
    )
    def advance_clock(self, fraction: float, nudge: int) -> None:
        step = int(seconds_to_ns(1.0) * fraction) + nudge
        self.now += max(step, 0)

    @precondition(lambda self: any(m.dlq_unread for m in self.models.values()))
    @rule(data=st.data())
    def read_dlq(self, data: st.DataObject) -> None:
        names = [name for name, model in self.models.items() if model.dlq_unread]
        consumer = data.draw(st.sampled_from(names))
        dlq_offset, dead = self.models[consumer].read_dead_letter()
        got = self._call("read_dlq", consumer)
        assert got is not None
        offset, _, _, body, headers = got
        assert offset == dlq_offset
        assert body == dead.body
        assert set(headers) == X_HEADERS | set(dead.headers)
        for key, value in dead.headers.items():
            assert headers[key] == value
        source, _, group = consumer.partition(".")
        assert headers["x-source"] == source
        assert headers["x-group"] == group
        assert headers["x-offset"] == str(dead.offset)
        assert headers["x-attempts"] == str(dead.attempts)
        assert headers["x-reason"] == dead.reason
        assert headers["x-dead-at"].isdigit()
        self.dlq_read[consumer] += 1
        if self.redriven[consumer]:
            event("read a DLQ message after a redrive")

    @precondition(lambda self: any(m.dlq_unread for m in self.models.values()))
    @rule(data=st.data())
    def redrive(self, data: st.DataObject) -> None:
        names = [name for name, model in self.models.items() if model.dlq_unread]
        consumer = data.draw(st.sampled_from(names))
        log = QUEUE if consumer == QUEUE else STREAM
        expected = self.logs[log].redrive(consumer)
        assert self._call("redrive", consumer) == expected
        self.redriven[consumer] += expected
        end = self.logs[log].next_offset
        self.redriven_offsets[consumer].update(range(end - expected, end))
        if expected:
            event(f"redrove messages of {'a queue' if log == QUEUE else 'a group'}")

    # Checks after every step ----------------------------------------------

    @invariant()
    def broker_matches_model(self) -> None:
        if self.host is None:
            return
        snapshot = self._call("snapshot")
        for name, model in self.models.items():
            found = snapshot["consumers"][name]
            expected = model.counts(self.now)
            assert found["in_flight"] == expected["in_flight"], name
            assert found["waiting"] == expected["waiting"], name
            assert found["backlog"] == expected["backlog"], name
            assert found["acked"] == model.acked_since_open, name
            assert found["dead_lettered"] == model.dead_lettered_since_open, name
            assert found["dlq_depth"] == model.dlq_unread, name
        for log, model in self.logs.items():
            assert snapshot["ends"][log] == model.next_offset, log

        # Every offset of a log is, for each of its consumers, unsettled,
        # acked, passed over (a record redriven for another group), or
        # moved to the DLQ: still there, read, or redriven.
        for name, model in self.models.items():
            found = snapshot["consumers"][name]
            log = QUEUE if name == QUEUE else STREAM
            unsettled = found["in_flight"] + found["waiting"] + found["backlog"]
            passed = model.passed
            moved = found["dlq_depth"] + self.dlq_read[name] + self.redriven[name]
            total = unsettled + self.acked[name] + passed + moved
            assert total == snapshot["ends"][log], name

    @invariant()
    def one_live_delivery_per_offset(self) -> None:
        live = [(d.consumer, d.offset) for d in self.deliveries if self._is_live(d)]
        assert len(live) == len(set(live))


GroupMachine.TestCase.settings = settings(stateful_step_count=30)
test_group_model_matches_real_broker = GroupMachine.TestCase
