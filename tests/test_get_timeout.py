"""Blocking gets: waiting at max_in_flight, and never returning None early.

A get with a timeout returns a message as soon as one can be delivered, and
None no earlier than its timeout (measured here with time.monotonic), even
when it is woken for puts it cannot take or for a message another consumer
takes first. Upper bounds are generous: speed is checked by benchmarks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pymq

# Seconds a blocked get waits before it times out, in tests where it must.
SHORT = 0.5
# Seconds a get may wait in tests where it must return a message: far more
# than it needs, so that it only matters when the message never comes.
LONG = 30.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[pymq.Broker]:
    with pymq.open(tmp_path / "data") as opened:
        yield opened


class Waiter:
    """Run call() in a thread and record its result and how long it took."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.elapsed = -1.0
        self.error: BaseException | None = None
        self._call = call
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        start = time.monotonic()
        try:
            self.result = self._call()
        except BaseException as exc:
            self.error = exc
        self.elapsed = time.monotonic() - start

    def start(self) -> Waiter:
        self._thread.start()
        return self

    def join(self) -> Any:
        self._thread.join(LONG + 10.0)
        assert not self._thread.is_alive(), "the get did not return"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for_waiters(consumer: pymq.Queue | pymq.Group, count: int) -> None:
    """Return once count threads are blocked in a get of consumer's stream."""
    deadline = time.monotonic() + LONG
    while consumer.stream.waiters < count:
        assert time.monotonic() < deadline, "the getters never started waiting"
        time.sleep(0.005)


# At max_in_flight ------------------------------------------------------------


def test_get_at_max_in_flight_returns_after_ack(broker):
    q = broker.queue("jobs", max_in_flight=1, visibility_timeout=600.0)
    q.put_many([b"a", b"b"])
    held = q.get_nowait()
    waiter = Waiter(lambda: q.get(timeout=LONG)).start()
    wait_for_waiters(q, 1)

    held.ack()

    message = waiter.join()
    assert message is not None
    assert message.body == b"b"
    assert message.offset == 1
    assert message.attempt == 1
    assert waiter.elapsed < LONG


def test_get_at_max_in_flight_returns_nacked_message(broker):
    events = broker.stream("events")
    billing = events.group("billing", max_in_flight=2, visibility_timeout=600.0)
    events.put_many([b"a", b"b", b"c"])
    first, second = billing.get_many_nowait(5)
    waiter = Waiter(lambda: billing.get(timeout=LONG)).start()
    wait_for_waiters(billing, 1)

    first.nack()

    message = waiter.join()
    assert message is not None
    assert message.offset == 0
    assert message.attempt == 2
    assert waiter.elapsed < LONG
    assert second.offset == 1


def test_get_at_max_in_flight_times_out_without_ack(broker):
    q = broker.queue("jobs", max_in_flight=1, visibility_timeout=600.0)
    q.put_many([b"a", b"b"])
    held = q.get_nowait()

    start = time.monotonic()
    message = q.get(timeout=SHORT)
    elapsed = time.monotonic() - start

    assert message is None
    assert elapsed >= SHORT
    held.ack()
    assert q.get_nowait().body == b"b"


# Never early -------------------------------------------------------------------


def test_get_not_early_while_other_queue_gets_puts(broker):
    jobs = broker.queue("jobs")
    other = broker.queue("other")
    waiter = Waiter(lambda: jobs.get(timeout=SHORT)).start()
    wait_for_waiters(jobs, 1)

    # Bounded in count: at most 200 puts, 5 ms apart.
    for i in range(200):
        if waiter.elapsed >= 0:
            break
        other.put(b"%d" % i)
        time.sleep(0.005)

    assert waiter.join() is None
    assert waiter.elapsed >= SHORT


def test_get_not_early_when_woken_at_max_in_flight(broker):
    # billing is at its max_in_flight, so the puts, and audit's acks, wake
    # its getter (groups of a stream share one condition) with nothing it
    # may take.
    events = broker.stream("events")
    billing = events.group("billing", max_in_flight=1, visibility_timeout=600.0)
    audit = events.group("audit")
    events.put(b"first")
    held = billing.get_nowait()
    waiter = Waiter(lambda: billing.get(timeout=SHORT)).start()
    wait_for_waiters(billing, 1)

    for i in range(200):
        if waiter.elapsed >= 0:
            break
        events.put(b"%d" % i)
        audit.get_nowait().ack()
        time.sleep(0.005)

    assert waiter.join() is None
    assert waiter.elapsed >= SHORT
    held.ack()


def test_get_not_early_when_other_getter_takes_message(broker):
    q = broker.queue("jobs")
    waiters = [Waiter(lambda: q.get(timeout=SHORT)).start() for _ in range(3)]
    wait_for_waiters(q, 3)

    # One put wakes all three; one of them takes the message.
    q.put(b"only")

    results = [waiter.join() for waiter in waiters]
    delivered = [message for message in results if message is not None]
    assert [message.body for message in delivered] == [b"only"]
    for waiter in waiters:
        if waiter.result is None:
            assert waiter.elapsed >= SHORT


GETS = {
    "get": (lambda q: q.get(timeout=SHORT), lambda found: found is None),
    "get_many": (lambda q: q.get_many(5, timeout=SHORT), lambda found: found == []),
    "get_batch": (
        lambda q: q.get_batch(5, timeout=SHORT),
        lambda found: len(found) == 0,
    ),
}


@pytest.mark.parametrize("name", sorted(GETS))
def test_get_not_early_when_message_taken_first(broker, name):
    get, found_nothing = GETS[name]
    q = broker.queue("jobs")
    waiter = Waiter(lambda: get(q)).start()
    wait_for_waiters(q, 1)

    # Holding the stream's condition, the put's wake-up is sent before the
    # waiter can run, and get_nowait here takes the message it was woken for.
    with q._ready:
        q.put(b"taken")
        taken = q.get_nowait()

    assert taken is not None
    assert taken.body == b"taken"
    found = waiter.join()
    assert found_nothing(found)
    assert waiter.elapsed >= SHORT
