"""asv benchmarks of the embedded broker's queue and of in-process queues.

The installed asv_runner calls setup before every sample and teardown after
it, so each pymq sample times a fresh broker in a fresh temporary folder.
One sample moves up to 10,000 messages through the queue. The form
"put, then get" puts all of them and then gets (and for pymq acks) all of
them. The form "interleaved" puts, gets and acks one message, or one
batch, at a time.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import time
from collections.abc import Sequence
from typing import ClassVar

from .common import (
    BROKER_PAYLOAD_SIZES,
    FSYNC_POLICIES,
    QUEUE_BATCH,
    Scratch,
    backlog_heap,
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

FORMS = ["put, then get", "interleaved"]
# Messages per sample: fewer with fsync="always", where each call syncs.
MESSAGES = {"never": 10_000, "interval": 10_000, "always": 500}
# A sample also moves at most this many body bytes, so 64 KiB stays short.
MAX_SAMPLE_BYTES = 32 << 20
THREAD_MESSAGES = 800
# A sample stops early once this many seconds pass.
MAX_SECONDS = 60.0
BACKLOG_PAYLOAD = 1024


def message_count(payload: int, fsync: str) -> int:
    return min(MESSAGES[fsync], MAX_SAMPLE_BYTES // payload)


class BrokerBenchmark:
    """A fresh broker per sample, in a temporary folder deleted after it."""

    # A sample with fsync="always" can take seconds; asv stops a benchmark
    # that runs longer than this.
    timeout = 300.0
    # At least 3 samples, at most 10, and no new one after 10 seconds.
    repeat = (3, 10, 10.0)
    warmup_time = 0.0
    rounds = 1

    scratch: Scratch | None = None
    broker = None

    def open(self, fsync: str) -> None:
        self.scratch = Scratch()
        self.broker, self.queue = open_broker(self.scratch, fsync)

    def teardown(self, *params: object) -> None:
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        if self.scratch is not None:
            self.scratch.remove()
            self.scratch = None


class PutGetAck(BrokerBenchmark):
    """pymq queue: put, get_nowait and ack, one message per call."""

    params: ClassVar[list[Sequence[object]]] = [
        list(BROKER_PAYLOAD_SIZES),
        list(FSYNC_POLICIES),
        FORMS,
    ]
    param_names: ClassVar[list[str]] = ["payload", "fsync", "form"]

    def setup(self, payload: int, fsync: str, form: str) -> None:
        self.bodies = payloads(payload, message_count(payload, fsync))
        self.open(fsync)

    def time_queue(self, payload: int, fsync: str, form: str) -> None:
        deadline = time.perf_counter() + MAX_SECONDS
        if form == "interleaved":
            put_get_ack_each(self.queue, self.bodies, deadline)
        else:
            put = put_each(self.queue, self.bodies, deadline)
            get_ack_each(self.queue, put, deadline + MAX_SECONDS)


class PutGetAckBatches(BrokerBenchmark):
    """pymq queue: put_many, get_many and ack_many of 100 messages per call."""

    params: ClassVar[list[Sequence[object]]] = [
        list(BROKER_PAYLOAD_SIZES),
        list(FSYNC_POLICIES),
        FORMS,
    ]
    param_names: ClassVar[list[str]] = ["payload", "fsync", "form"]

    def setup(self, payload: int, fsync: str, form: str) -> None:
        bodies = payloads(payload, message_count(payload, fsync))
        self.chunks = batches(bodies, QUEUE_BATCH)
        self.open(fsync)

    def time_queue(self, payload: int, fsync: str, form: str) -> None:
        deadline = time.perf_counter() + MAX_SECONDS
        if form == "interleaved":
            put_get_ack_batches(self.queue, self.chunks, deadline)
        else:
            put = put_batches(self.queue, self.chunks, deadline)
            get_ack_batches(self.queue, put, deadline + MAX_SECONDS)


class PutGetAckColumns(BrokerBenchmark):
    """pymq queue: put_many, get_batch and ack_many of 100 messages per call."""

    params: ClassVar[list[Sequence[object]]] = [
        list(BROKER_PAYLOAD_SIZES),
        list(FSYNC_POLICIES),
        FORMS,
    ]
    param_names: ClassVar[list[str]] = ["payload", "fsync", "form"]

    def setup(self, payload: int, fsync: str, form: str) -> None:
        bodies = payloads(payload, message_count(payload, fsync))
        self.chunks = batches(bodies, QUEUE_BATCH)
        self.open(fsync)

    def time_queue(self, payload: int, fsync: str, form: str) -> None:
        deadline = time.perf_counter() + MAX_SECONDS
        if form == "interleaved":
            put_get_ack_batches(self.queue, self.chunks, deadline, columns=True)
        else:
            put = put_batches(self.queue, self.chunks, deadline)
            get_ack_batches(
                self.queue, put, deadline + MAX_SECONDS, QUEUE_BATCH, columns=True
            )


class ProducerThreads(BrokerBenchmark):
    """pymq queue.put with fsync="always" from 1 or 8 threads at once."""

    params: ClassVar[list[Sequence[object]]] = [[100], [1, 8]]
    param_names: ClassVar[list[str]] = ["payload", "threads"]

    def setup(self, payload: int, threads: int) -> None:
        self.bodies = payloads(payload, THREAD_MESSAGES)
        self.open("always")

    def time_put(self, payload: int, threads: int) -> None:
        call_threads(self.queue.put, self.bodies, threads, MAX_SECONDS)


class InProcessQueue:
    """A standard library queue, put then get or interleaved, in one thread."""

    params: ClassVar[list[Sequence[object]]] = [
        ["queue.Queue", "queue.SimpleQueue", "asyncio.Queue", "collections.deque"],
        list(BROKER_PAYLOAD_SIZES),
        FORMS,
    ]
    param_names: ClassVar[list[str]] = ["kind", "payload", "form"]
    repeat = (3, 10, 10.0)
    warmup_time = 0.0
    rounds = 1

    def setup(self, kind: str, payload: int, form: str) -> None:
        self.bodies = payloads(payload, message_count(payload, "never"))

    def time_queue(self, kind: str, payload: int, form: str) -> None:
        if kind == "asyncio.Queue":
            asyncio.run(self._in_loop(form))
        else:
            self._run(kind, form)

    async def _in_loop(self, form: str) -> None:
        self._run("asyncio.Queue", form)

    def _run(self, kind: str, form: str) -> None:
        deadline = time.perf_counter() + MAX_SECONDS
        if kind == "queue.Queue":
            standard: queue.Queue[bytes] = queue.Queue()
            put, get = standard.put, standard.get
        elif kind == "queue.SimpleQueue":
            simple: queue.SimpleQueue[bytes] = queue.SimpleQueue()
            put, get = simple.put, simple.get
        elif kind == "asyncio.Queue":
            # Created inside the running loop, as asyncio.Queue expects.
            loop_queue: asyncio.Queue[bytes] = asyncio.Queue()
            put, get = loop_queue.put_nowait, loop_queue.get_nowait
        else:
            ring: collections.deque[bytes] = collections.deque()
            put, get = ring.append, ring.popleft
        if form == "interleaved":
            put_then_get(put, get, self.bodies, deadline)
        else:
            produce_consume(put, get, self.bodies, deadline)


class BacklogHeap:
    """Anonymous resident memory (RssAnon) of a broker over a queue's backlog.

    The figure is RssAnon after the broker reopens the filled queue, minus
    RssAnon before it first opened, in bytes. It leaves out the mapped
    segments and the page cache. asv runs each sample in its own process,
    but that process has run other samples before, so compare the
    parameters with each other rather than read one figure alone.
    """

    params: ClassVar[list[Sequence[object]]] = [[16 << 20, 256 << 20]]
    param_names: ClassVar[list[str]] = ["backlog_bytes"]
    unit = "bytes"
    timeout = 300.0
    repeat = (1, 3, 60.0)
    warmup_time = 0.0
    rounds = 1

    def setup(self, backlog_bytes: int) -> None:
        self.scratch = Scratch()

    def teardown(self, backlog_bytes: int) -> None:
        self.scratch.remove()

    def track_heap(self, backlog_bytes: int) -> float:
        result = backlog_heap(
            str(self.scratch.path / "broker"),
            BACKLOG_PAYLOAD,
            backlog_bytes,
            MAX_SECONDS,
        )
        return result["rss_reopened"] - result["rss_before"]
