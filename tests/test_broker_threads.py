"""Many producer and consumer threads on one queue of one broker."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

import pymq

PRODUCERS = 16
PUTS_PER_PRODUCER = 5_000
CONSUMERS = 4
TOTAL = PRODUCERS * PUTS_PER_PRODUCER
TIME_LIMIT = 60.0


class Received:
    """Deliveries seen by all consumer threads, in each consumer's order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.by_consumer: dict[int, list[tuple[int, bytes, int]]] = defaultdict(list)
        self.errors: list[BaseException] = []

    def add(self, consumer: int, messages: list) -> None:
        with self.lock:
            self.count += len(messages)
            self.by_consumer[consumer].extend(
                (m.offset, m.body, m.attempt) for m in messages
            )

    def all(self) -> list[tuple[int, bytes, int]]:
        return [item for items in self.by_consumer.values() for item in items]


def run_threads(threads: list[threading.Thread], deadline: float) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [thread.name for thread in threads if thread.is_alive()]
    assert not alive, f"threads still running after {TIME_LIMIT} s: {alive}"


@pytest.fixture(scope="module")
def load_result(tmp_path_factory):
    """Run the producers and consumers once, and return what they recorded."""
    data = tmp_path_factory.mktemp("threads") / "data"
    broker = pymq.open(data)
    q = broker.queue("jobs", visibility_timeout=600.0)
    received = Received()
    offsets: dict[int, list[int]] = {}
    stop = threading.Event()
    deadline = time.monotonic() + TIME_LIMIT

    def produce(producer: int) -> None:
        own = []
        try:
            for seq in range(PUTS_PER_PRODUCER):
                own.append(q.put(b"%d:%d" % (producer, seq)))
        except BaseException as exc:
            received.errors.append(exc)
        offsets[producer] = own

    def consume(consumer: int) -> None:
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                messages = q.get_many(200, timeout=0.1)
                if not messages:
                    continue
                q.ack_many(messages)
                received.add(consumer, messages)
                if received.count >= TOTAL:
                    stop.set()
        except BaseException as exc:
            received.errors.append(exc)
            stop.set()

    threads = [
        threading.Thread(target=consume, args=(c,), name=f"consumer-{c}")
        for c in range(CONSUMERS)
    ] + [
        threading.Thread(target=produce, args=(p,), name=f"producer-{p}")
        for p in range(PRODUCERS)
    ]
    try:
        run_threads(threads, deadline)
    finally:
        stop.set()
        for thread in threads:
            thread.join(5.0)
        stats = q.stats()
        broker.close()
    return received, offsets, stats


def test_threads_raise_no_errors(load_result):
    received, _, _ = load_result
    assert received.errors == []


def test_threads_deliver_every_message_once(load_result):
    received, _, _ = load_result
    bodies = [body for _, body, _ in received.all()]
    assert len(bodies) == TOTAL
    assert len(set(bodies)) == TOTAL


def test_threads_no_message_redelivered(load_result):
    received, _, _ = load_result
    attempts = {attempt for _, _, attempt in received.all()}
    assert attempts == {1}


def test_threads_offsets_unique_and_dense(load_result):
    _, offsets, _ = load_result
    every = sorted(offset for own in offsets.values() for offset in own)
    assert every == list(range(TOTAL))


def test_threads_keep_each_producer_order(load_result):
    received, _, _ = load_result
    by_offset = sorted(received.all())
    sequences: dict[int, list[int]] = defaultdict(list)
    for _, body, _ in by_offset:
        producer, seq = body.split(b":")
        sequences[int(producer)].append(int(seq))
    assert sorted(sequences) == list(range(PRODUCERS))
    for producer, seqs in sequences.items():
        assert seqs == list(range(PUTS_PER_PRODUCER)), f"producer {producer}"


def test_threads_each_consumer_gets_rising_offsets(load_result):
    received, _, _ = load_result
    for consumer, items in received.by_consumer.items():
        consumer_offsets = [offset for offset, _, _ in items]
        assert consumer_offsets == sorted(consumer_offsets), f"consumer {consumer}"


def test_threads_stats_after_drain(load_result):
    _, _, stats = load_result
    assert stats.acked == TOTAL
    assert stats.depth == 0
    assert stats.in_flight == 0


def test_threads_blocked_getters_all_wake(tmp_path):
    with pymq.open(tmp_path / "data") as broker:
        q = broker.queue("jobs")
        results: list = []

        def wait_one() -> None:
            results.append(q.get(timeout=10.0))

        waiters = [threading.Thread(target=wait_one) for _ in range(4)]
        for thread in waiters:
            thread.start()
        time.sleep(0.2)
        q.put_many([b"a", b"b", b"c", b"d"])
        for thread in waiters:
            thread.join(10.0)
        assert not any(thread.is_alive() for thread in waiters)
        assert sorted(m.body for m in results) == [b"a", b"b", b"c", b"d"]
