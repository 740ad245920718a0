"""Micro benchmarks of the embedded broker's queue and of in-process queues.

Each test times a fixed number of rounds with benchmark.pedantic. A round
moves extra_info["messages_per_round"] messages through the queue, so
messages per second are that count divided by the round time. Every pymq
test opens its broker in a scratch folder deleted when the test ends.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import time
from collections.abc import Callable, Iterator

import pytest

import pymq
from benchmarks.benchmarks.common import (
    BROKER_PAYLOAD_SIZES,
    FSYNC_POLICIES,
    Scratch,
    batches,
    call_threads,
    get_ack_batches,
    get_ack_each,
    open_broker,
    payloads,
    produce_consume,
    put_batches,
    put_each,
    put_get_ack_batches,
    put_get_ack_each,
    put_then_get,
)

MESSAGES = 2000
ALWAYS_MESSAGES = 100
ROUNDS = 20
ALWAYS_ROUNDS = 5
THREAD_MESSAGES = 400
MAX_SECONDS = 30.0


def payload_id(size: int) -> str:
    return f"{size // 1024}KiB" if size >= 1024 else f"{size}B"


payload_sizes = pytest.mark.parametrize("payload", BROKER_PAYLOAD_SIZES, ids=payload_id)
fsync_policies = pytest.mark.parametrize("fsync", FSYNC_POLICIES)
forms = pytest.mark.parametrize("form", ["put-then-get", "interleaved"])


@pytest.fixture
def make_queue(scratch: Scratch) -> Iterator[Callable[[str], pymq.Queue]]:
    """Open the test's broker and queue in scratch; the broker closes after."""
    brokers: list[pymq.Broker] = []

    def make(fsync: str) -> pymq.Queue:
        broker, jobs = open_broker(scratch, fsync)
        brokers.append(broker)
        return jobs

    yield make
    for broker in brokers:
        broker.close()


def sizes_for(fsync: str) -> tuple[int, int]:
    """Return (messages per round, rounds) for an fsync policy."""
    if fsync == "always":
        return ALWAYS_MESSAGES, ALWAYS_ROUNDS
    return MESSAGES, ROUNDS


@pytest.mark.benchmark(group="queue one at a time")
@forms
@fsync_policies
@payload_sizes
def test_queue_single(benchmark, make_queue, payload: int, fsync: str, form: str):
    jobs = make_queue(fsync)
    messages, rounds = sizes_for(fsync)
    bodies = payloads(payload, messages)

    def run() -> None:
        deadline = time.perf_counter() + MAX_SECONDS
        if form == "interleaved":
            assert put_get_ack_each(jobs, bodies, deadline) == messages
        else:
            put = put_each(jobs, bodies, deadline)
            assert get_ack_each(jobs, put, deadline + MAX_SECONDS) == messages

    benchmark.extra_info["messages_per_round"] = messages
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    assert jobs.stats().depth == 0


@pytest.mark.benchmark(group="queue batches of 100")
@forms
@fsync_policies
@payload_sizes
def test_queue_batches(benchmark, make_queue, payload: int, fsync: str, form: str):
    jobs = make_queue(fsync)
    messages, rounds = sizes_for(fsync)
    chunks = batches(payloads(payload, messages))

    def run() -> None:
        deadline = time.perf_counter() + MAX_SECONDS
        if form == "interleaved":
            assert put_get_ack_batches(jobs, chunks, deadline) == messages
        else:
            put = put_batches(jobs, chunks, deadline)
            assert get_ack_batches(jobs, put, deadline + MAX_SECONDS) == messages

    benchmark.extra_info["messages_per_round"] = messages
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    assert jobs.stats().depth == 0


@pytest.mark.benchmark(group="queue producer threads")
@pytest.mark.parametrize("threads", [1, 8])
def test_queue_put_threads(benchmark, make_queue, threads: int) -> None:
    jobs = make_queue("always")
    bodies = payloads(100, THREAD_MESSAGES)
    benchmark.extra_info["messages_per_round"] = len(bodies)
    benchmark.pedantic(
        call_threads,
        args=(jobs.put, bodies, threads, MAX_SECONDS),
        rounds=ALWAYS_ROUNDS,
        iterations=1,
    )


def standard_queue(kind: str) -> tuple[Callable[[bytes], object], Callable[[], object]]:
    if kind == "queue.Queue":
        standard: queue.Queue[bytes] = queue.Queue()
        return standard.put, standard.get
    if kind == "queue.SimpleQueue":
        simple: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        return simple.put, simple.get
    ring: collections.deque[bytes] = collections.deque()
    return ring.append, ring.popleft


@pytest.mark.benchmark(group="in-process queues")
@forms
@pytest.mark.parametrize(
    "kind", ["queue.Queue", "queue.SimpleQueue", "asyncio.Queue", "collections.deque"]
)
def test_in_process_queue(benchmark, kind: str, form: str) -> None:
    bodies = payloads(100, MESSAGES)

    def move(put: Callable[[bytes], object], get: Callable[[], object]) -> None:
        deadline = time.perf_counter() + MAX_SECONDS
        if form == "interleaved":
            put_then_get(put, get, bodies, deadline)
        else:
            produce_consume(put, get, bodies, deadline)

    async def in_loop() -> None:
        # Created inside the running loop, as asyncio.Queue expects.
        loop_queue: asyncio.Queue[bytes] = asyncio.Queue()
        move(loop_queue.put_nowait, loop_queue.get_nowait)

    def run() -> None:
        if kind == "asyncio.Queue":
            asyncio.run(in_loop())
        else:
            move(*standard_queue(kind))

    benchmark.extra_info["messages_per_round"] = MESSAGES
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
