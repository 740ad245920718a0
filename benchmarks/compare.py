"""Measure pymq beside the queues and brokers users would pick instead.

Run from the repository root, with nothing else benchmarking at the time:

    .venv/bin/python -m benchmarks.compare [--quick] [--json FILE] [--docs]
                                           [--only NAME,...]

Every system runs in this one run, on this machine, with the same seeded
message bodies and the same method: produce N messages, then drain N (with
an ack where the system has one), then time single-message round trips
(put, get, ack) one after the other. N is set per case by a short probe,
so that one repeat takes about the budget's seconds, within a count and a
byte limit; the output states it.

The cases run in rounds: repeat 1 of every case, then repeat 2, then
repeat 3, so that a burst of other work on the machine spreads over the
cases. Each repeat uses a fresh queue: a fresh folder under one
tempfile.TemporaryDirectory (under $PYMQ_BENCH_DIR when set), or a stream or
queue with a name unique to the run on a server, deleted afterwards.

Ratios are pymq's total msg/s divided by the other system's, both from this
run: the ratio of the medians, and beside it the lowest and highest ratio
of two repeats made in the same round.

Each client library is imported only when its case runs. A missing client,
or a server that does not answer on 127.0.0.1 at its standard port within
a second, makes a skipped row with the reason. The pymq server cases skip
until pymq.connect and `python -m pymq serve` exist.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import queue
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pymq
from benchmarks.benchmarks.common import (
    CHECK_EVERY,
    SCRATCH_ENV,
    call_threads,
    payloads,
    produce_consume,
)
from benchmarks.run_store import (
    command_output,
    cpu_model,
    filesystem_type,
    payload_name,
    si,
    source_state,
)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
PLOT = REPO / "docs" / "images" / "comparison.png"
DOCS_HEADING = "## Comparison with other systems"
START_MARKER = "<!-- comparison:start -->"
END_MARKER = "<!-- comparison:end -->"

SIZES = (100, 1024, 65536)
GOAL_SIZE = 100
BATCH = 100
PRODUCER_THREADS = 8
REPEATS = 3

HOST = "127.0.0.1"
REDIS_PORT = 6379
RABBITMQ_PORT = 5672
NATS_PORT = 4222
# Seconds to wait for a server to accept a connection; past it, a skip.
CONNECT_TIMEOUT = 1.0
# Seconds a single call to a queue or server may wait for a message or a
# reply before the repeat fails; nothing waits longer than this.
IO_TIMEOUT = 10.0
# Seconds the pymq server gets to write its port file.
SERVER_START_TIMEOUT = 15.0
# Seconds the producer process of multiprocessing.Queue gets to start.
PROCESS_START_TIMEOUT = 30.0
NAME_PREFIX = "pymq-compare"

# Groups, in the order of the tables.
IN_PROCESS = "in-process"
EMBEDDED = "embedded durable"
SERVER = "server"
PYMQ_EMBEDDED = "pymq embedded"
PYMQ_SERVER = "pymq server"
GROUPS = (PYMQ_EMBEDDED, PYMQ_SERVER, IN_PROCESS, EMBEDDED, SERVER)

ONE_AT_A_TIME = "one at a time"
BATCHES = f"batches of {BATCH}"


@dataclass(frozen=True)
class Budget:
    """How much each repeat of a case may do."""

    sizes: tuple[int, ...]
    repeats: int
    seconds: float  # a repeat's produce + drain aims at about this long
    max_messages: int  # and moves at most this many messages
    max_bytes: int  # and at most this many body bytes
    min_messages: int  # and at least this many (rounded up to a batch)
    round_trips: int  # single-message round trips timed per repeat, at most
    round_trip_seconds: float  # and for at most this long
    timeout: float  # a repeat stops producing at its next check past this


FULL = Budget(
    sizes=SIZES,
    repeats=REPEATS,
    seconds=2.0,
    max_messages=500_000,
    max_bytes=128 << 20,
    min_messages=200,
    round_trips=2000,
    round_trip_seconds=1.0,
    timeout=60.0,
)
QUICK = Budget(
    sizes=(GOAL_SIZE,),
    repeats=REPEATS,
    seconds=0.5,
    max_messages=100_000,
    max_bytes=32 << 20,
    min_messages=100,
    round_trips=300,
    round_trip_seconds=0.25,
    timeout=20.0,
)


@dataclass(frozen=True)
class Limits:
    """What one repeat may do: a deadline and the round trips to time."""

    deadline: float  # time.perf_counter() value
    round_trips: int
    round_trip_seconds: float


@dataclass
class Sample:
    """One repeat: N produced, then drained; then the round trips.

    produce_seconds and consume_seconds are None where the two run at once
    (multiprocessing.Queue, whose producer is another process).
    """

    messages: int
    consumed: int
    total_seconds: float
    produce_seconds: float | None
    consume_seconds: float | None
    round_trips_us: list[float] = field(default_factory=list)

    @property
    def total_rate(self) -> float:
        return self.messages / self.total_seconds

    @property
    def produce_rate(self) -> float | None:
        if not self.produce_seconds:
            return None
        return self.messages / self.produce_seconds

    @property
    def consume_rate(self) -> float | None:
        if not self.consume_seconds:
            return None
        return self.consumed / self.consume_seconds


class Workspace:
    """The run's temporary folder, names unique to the run, the pymq server.

    folder() gives a fresh folder that is deleted when the block ends;
    close() stops the pymq server if one was started and deletes the rest.
    """

    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        parent = parent or os.environ.get(SCRATCH_ENV) or None
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{NAME_PREFIX}-", dir=parent)
        self.root = Path(self._tmp.name)
        self.run_id = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        self._names = 0
        self._server: PymqServer | None = None
        self._server_error: str | None = None

    def name(self, kind: str) -> str:
        """Return a queue or stream name no other run uses: letters, digits, -."""
        self._names += 1
        return f"{NAME_PREFIX}-{self.run_id}-{kind}-{self._names}"

    @contextlib.contextmanager
    def folder(self) -> Iterator[Path]:
        path = Path(tempfile.mkdtemp(dir=self.root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def pymq_server_url(self) -> str:
        """Start the pymq server on first use; a failed start is not retried."""
        if self._server_error is not None:
            raise RuntimeError(self._server_error)
        if self._server is None:
            try:
                self._server = PymqServer(self.root / "pymq-server")
            except Exception as exc:
                self._server_error = str(exc)
                raise
        return self._server.url

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._tmp.cleanup()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


RunFn = Callable[[Workspace, Sequence[bytes], Limits], Sample]


# Shared loops -----------------------------------------------------------


def put_all(
    put: Callable[[bytes], object], bodies: Sequence[bytes], deadline: float
) -> int:
    """Put each body, checking the deadline every CHECK_EVERY; return count."""
    done = 0
    for first in range(0, len(bodies), CHECK_EVERY):
        for body in bodies[first : first + CHECK_EVERY]:
            put(body)
        done = min(first + CHECK_EVERY, len(bodies))
        if time.perf_counter() > deadline:
            break
    return done


def put_chunks(
    put_many: Callable[[list[bytes]], object],
    bodies: Sequence[bytes],
    deadline: float,
    size: int = BATCH,
) -> int:
    """Put bodies size at a time, checking the deadline per call; return count."""
    done = 0
    for first in range(0, len(bodies), size):
        chunk = list(bodies[first : first + size])
        put_many(chunk)
        done += len(chunk)
        if time.perf_counter() > deadline:
            break
    return done


def get_all(get: Callable[[], Any], count: int) -> tuple[int, Any]:
    """Call get count times; return (count, the last body)."""
    last = None
    for _ in range(count):
        last = get()
    return count, last


def phases(
    produce: Callable[[], int],
    consume: Callable[[int], tuple[int, Any]],
    size: int,
) -> Sample:
    """Time produce(), then consume(produced); check what came back."""
    start = time.perf_counter()
    produced = produce()
    middle = time.perf_counter()
    consumed, last = consume(produced)
    end = time.perf_counter()
    check_drain(produced, consumed, last, size)
    return Sample(produced, consumed, end - start, middle - start, end - middle)


def check_drain(produced: int, consumed: int, last: Any, size: int) -> None:
    if consumed != produced:
        raise RuntimeError(f"drained {consumed} of {produced} messages")
    if produced and (last is None or len(last) != size):
        got = None if last is None else len(last)
        raise RuntimeError(f"the last message had {got} bytes, not {size}")


def round_trips(
    one: Callable[[bytes], int], bodies: Sequence[bytes], limits: Limits
) -> list[float]:
    """Time one(body) per round trip, in microseconds, within the limits.

    one puts a body, gets it back (and acks it) and returns its length.
    """
    times: list[float] = []
    stop = time.perf_counter() + limits.round_trip_seconds
    for index in range(limits.round_trips):
        body = bodies[index % len(bodies)]
        start = time.perf_counter()
        got = one(body)
        end = time.perf_counter()
        if got != len(body):
            raise RuntimeError(f"round trip returned {got} bytes of {len(body)}")
        times.append((end - start) * 1e6)
        if end > stop or end > limits.deadline:
            break
    return times


async def round_trips_async(
    one: Callable[[bytes], Awaitable[int]], bodies: Sequence[bytes], limits: Limits
) -> list[float]:
    """round_trips for a coroutine function."""
    times: list[float] = []
    stop = time.perf_counter() + limits.round_trip_seconds
    for index in range(limits.round_trips):
        body = bodies[index % len(bodies)]
        start = time.perf_counter()
        got = await one(body)
        end = time.perf_counter()
        if got != len(body):
            raise RuntimeError(f"round trip returned {got} bytes of {len(body)}")
        times.append((end - start) * 1e6)
        if end > stop or end > limits.deadline:
            break
    return times


def size_of(bodies: Sequence[bytes]) -> int:
    return len(bodies[0]) if bodies else 0


# In-process queues ------------------------------------------------------


def put_get_run(
    make: Callable[[], tuple[Callable[[bytes], object], Callable[[], Any]]],
) -> RunFn:
    """An in-process queue given by make() -> (put, get), in one thread."""

    def run(ws: Workspace, bodies: Sequence[bytes], limits: Limits) -> Sample:
        put, get = make()
        return put_get_sample(put, get, bodies, limits)

    return run


def put_get_sample(
    put: Callable[[bytes], object],
    get: Callable[[], Any],
    bodies: Sequence[bytes],
    limits: Limits,
) -> Sample:
    done, put_seconds, get_seconds = produce_consume(put, get, bodies, limits.deadline)
    # produce_consume gets as many as it put; check one of them.
    put(bodies[0])
    check_drain(done, done, get(), size_of(bodies))
    sample = Sample(done, done, put_seconds + get_seconds, put_seconds, get_seconds)

    def one(body: bytes) -> int:
        put(body)
        return len(get())

    sample.round_trips_us = round_trips(one, bodies, limits)
    return sample


def make_deque() -> tuple[Callable[[bytes], object], Callable[[], Any]]:
    ring: collections.deque[bytes] = collections.deque()
    return ring.append, ring.popleft


def make_queue() -> tuple[Callable[[bytes], object], Callable[[], Any]]:
    jobs: queue.Queue[bytes] = queue.Queue()
    # The queue holds every message before the gets, so get_nowait (the
    # same code as get without waiting) never raises Empty.
    return jobs.put, jobs.get_nowait


def make_simple_queue() -> tuple[Callable[[bytes], object], Callable[[], Any]]:
    jobs: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    return jobs.put, jobs.get_nowait


def asyncio_nowait_run(
    ws: Workspace, bodies: Sequence[bytes], limits: Limits
) -> Sample:
    async def in_loop() -> Sample:
        # Created inside the running loop, as asyncio.Queue expects.
        jobs: asyncio.Queue[bytes] = asyncio.Queue()
        return put_get_sample(jobs.put_nowait, jobs.get_nowait, bodies, limits)

    return asyncio.run(in_loop())


def asyncio_await_run(ws: Workspace, bodies: Sequence[bytes], limits: Limits) -> Sample:
    async def in_loop() -> Sample:
        jobs: asyncio.Queue[bytes] = asyncio.Queue()
        start = time.perf_counter()
        done = 0
        for first in range(0, len(bodies), CHECK_EVERY):
            for body in bodies[first : first + CHECK_EVERY]:
                await jobs.put(body)
            done = min(first + CHECK_EVERY, len(bodies))
            if time.perf_counter() > limits.deadline:
                break
        middle = time.perf_counter()
        last = None
        # The queue holds done messages, so no get waits.
        for _ in range(done):
            last = await jobs.get()
        end = time.perf_counter()
        check_drain(done, done, last, size_of(bodies))
        sample = Sample(done, done, end - start, middle - start, end - middle)

        async def one(body: bytes) -> int:
            await jobs.put(body)
            return len(await jobs.get())

        sample.round_trips_us = await round_trips_async(one, bodies, limits)
        return sample

    return asyncio.run(in_loop())


def multiprocessing_producer(
    jobs: Any, size: int, count: int, ready: Any, go: Any
) -> None:
    """The producer process: build the same bodies, wait for go, put them."""
    bodies = payloads(size, count)
    ready.set()
    if not go.wait(PROCESS_START_TIMEOUT):
        return
    for body in bodies:
        jobs.put(body)
    # Returning joins the queue's feeder thread, which waits for the
    # consumer to read everything.


def multiprocessing_run(
    ws: Workspace, bodies: Sequence[bytes], limits: Limits
) -> Sample:
    """multiprocessing.Queue with the producer in another process.

    The pipe between the processes holds little, so producing and draining
    run at the same time: the sample has only the total, from the start
    signal to the last get. The round trips put and get in this process,
    through the same pipe and feeder thread.
    """
    # spawn, not fork: the parent may have threads (pymq's flusher).
    context = multiprocessing.get_context("spawn")
    jobs = context.Queue()
    ready = context.Event()
    go = context.Event()
    size = size_of(bodies)
    producer = context.Process(
        target=multiprocessing_producer,
        args=(jobs, size, len(bodies), ready, go),
        name="compare-producer",
        daemon=True,
    )
    producer.start()
    try:
        if not ready.wait(PROCESS_START_TIMEOUT):
            raise RuntimeError("the producer process did not start")
        start = time.perf_counter()
        go.set()
        consumed, last = get_all(lambda: jobs.get(timeout=IO_TIMEOUT), len(bodies))
        end = time.perf_counter()
        check_drain(len(bodies), consumed, last, size)
        producer.join(IO_TIMEOUT)
        sample = Sample(len(bodies), consumed, end - start, None, None)

        def one(body: bytes) -> int:
            jobs.put(body)
            return len(jobs.get(timeout=IO_TIMEOUT))

        sample.round_trips_us = round_trips(one, bodies, limits)
        return sample
    finally:
        if producer.is_alive():
            producer.terminate()
            producer.join(IO_TIMEOUT)
        jobs.close()
        jobs.join_thread()


# Embedded durable queues ------------------------------------------------


def persistqueue_file_run(
    ws: Workspace, bodies: Sequence[bytes], limits: Limits
) -> Sample:
    """persistqueue.Queue: put, get, task_done (which persists the get)."""
    import persistqueue

    with ws.folder() as folder:
        jobs = persistqueue.Queue(str(folder / "queue"))

        def get() -> Any:
            body = jobs.get(block=False)
            jobs.task_done()
            return body

        try:
            return durable_sample(jobs.put, get, bodies, limits)
        finally:
            for handle in (jobs.headf, jobs.tailf):
                handle.close()


def persistqueue_sqlite_run(
    ws: Workspace, bodies: Sequence[bytes], limits: Limits
) -> Sample:
    """persistqueue.SQLiteAckQueue: put, get(raw=True), ack(id=)."""
    import persistqueue

    with ws.folder() as folder:
        jobs = persistqueue.SQLiteAckQueue(str(folder / "queue"))

        def get() -> Any:
            item = jobs.get(block=False, raw=True)
            jobs.ack(id=item["pqid"])
            return item["data"]

        try:
            return durable_sample(jobs.put, get, bodies, limits)
        finally:
            jobs.close()


def litequeue_run(ws: Workspace, bodies: Sequence[bytes], limits: Limits) -> Sample:
    """litequeue.LiteQueue: put, pop, done(message_id)."""
    import litequeue

    with ws.folder() as folder:
        jobs = litequeue.LiteQueue(str(folder / "queue.sqlite3"))

        def get() -> Any:
            message = jobs.pop()
            if message is None:
                raise RuntimeError("litequeue is empty")
            jobs.done(message.message_id)
            return message.data

        try:
            return durable_sample(jobs.put, get, bodies, limits)
        finally:
            jobs.close()


def diskcache_run(ws: Workspace, bodies: Sequence[bytes], limits: Limits) -> Sample:
    """diskcache.Deque: append, popleft (no ack)."""
    import diskcache

    with ws.folder() as folder:
        jobs = diskcache.Deque(directory=str(folder / "deque"))
        try:
            return durable_sample(jobs.append, jobs.popleft, bodies, limits)
        finally:
            jobs.cache.close()


def durable_sample(
    put: Callable[[bytes], object],
    get: Callable[[], Any],
    bodies: Sequence[bytes],
    limits: Limits,
) -> Sample:
    """Produce, drain and round trips for a queue whose get also settles."""
    sample = phases(
        lambda: put_all(put, bodies, limits.deadline),
        lambda count: get_all(get, count),
        size_of(bodies),
    )

    def one(body: bytes) -> int:
        put(body)
        return len(get())

    sample.round_trips_us = round_trips(one, bodies, limits)
    return sample


# pymq -------------------------------------------------------------------
#
# The case functions take a broker: pymq.open(...) or pymq.connect(...),
# which has the same queue() and queue methods.


def pymq_sample(
    broker: Any, name: str, bodies: Sequence[bytes], batch: int, limits: Limits
) -> Sample:
    """put/get/ack one at a time (batch 1), or put_many/get_many/ack_many."""
    jobs = broker.queue(name)
    if batch == 1:

        def produce() -> int:
            return put_all(jobs.put, bodies, limits.deadline)

        def consume(count: int) -> tuple[int, Any]:
            last = None
            for done in range(count):
                message = jobs.get(timeout=IO_TIMEOUT)
                if message is None:
                    raise RuntimeError(f"queue empty after {done} of {count}")
                message.ack()
                last = message.body
            return count, last

    else:

        def produce() -> int:
            return put_chunks(jobs.put_many, bodies, limits.deadline, batch)

        def consume(count: int) -> tuple[int, Any]:
            return drain_batches(jobs, count, batch)

    sample = phases(produce, consume, size_of(bodies))
    if batch == 1:

        def one(body: bytes) -> int:
            jobs.put(body)
            message = jobs.get(timeout=IO_TIMEOUT)
            message.ack()
            return len(message.body)

        sample.round_trips_us = round_trips(one, bodies, limits)
    return sample


def drain_batches(jobs: Any, count: int, batch: int = BATCH) -> tuple[int, Any]:
    done = 0
    last = None
    while done < count:
        messages = jobs.get_many(min(batch, count - done), timeout=IO_TIMEOUT)
        if not messages:
            raise RuntimeError(f"queue empty after {done} of {count}")
        jobs.ack_many(messages)
        done += len(messages)
        last = messages[-1].body
    return done, last


def pymq_threads_sample(
    broker: Any, name: str, bodies: Sequence[bytes], limits: Limits
) -> Sample:
    """PRODUCER_THREADS threads call put at once, then one thread drains."""
    jobs = broker.queue(name)
    seconds = max(0.0, limits.deadline - time.perf_counter())
    produced, put_seconds = call_threads(jobs.put, bodies, PRODUCER_THREADS, seconds)
    start = time.perf_counter()
    consumed, last = drain_batches(jobs, produced)
    get_seconds = time.perf_counter() - start
    check_drain(produced, consumed, last, size_of(bodies))
    return Sample(
        produced, consumed, put_seconds + get_seconds, put_seconds, get_seconds
    )


def pymq_embedded_run(fsync: str, batch: int, threads: bool = False) -> RunFn:
    def run(ws: Workspace, bodies: Sequence[bytes], limits: Limits) -> Sample:
        with ws.folder() as folder:
            broker = pymq.open(folder / "broker", fsync=fsync)
            try:
                name = ws.name("jobs")
                if threads:
                    return pymq_threads_sample(broker, name, bodies, limits)
                return pymq_sample(broker, name, bodies, batch, limits)
            finally:
                broker.close()

    return run


def pymq_server_run(batch: int) -> RunFn:
    def run(ws: Workspace, bodies: Sequence[bytes], limits: Limits) -> Sample:
        broker = pymq.connect(ws.pymq_server_url())  # type: ignore[attr-defined]
        try:
            return pymq_sample(broker, ws.name("jobs"), bodies, batch, limits)
        finally:
            close = getattr(broker, "close", None)
            if close is not None:
                close()

    return run


# The command that starts the pymq server; it writes its port to the file.
PYMQ_SERVE = (
    "-m",
    "pymq",
    "serve",
    "--data",
    "{data}",
    "--port",
    "0",
    "--port-file",
    "{port_file}",
    "--fsync",
    "interval",
    "--log-level",
    "WARNING",
)


class PymqServer:
    """A pymq server in a child process, on 127.0.0.1 at a free port."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "data"
        port_file = folder / "port"
        self.log_path = folder / "server.log"
        args = [a.format(data=data, port_file=port_file) for a in PYMQ_SERVE]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=folder,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            text = port_file.read_text().strip() if port_file.exists() else ""
            if text.isdigit():
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-500:]
                raise RuntimeError(f"the pymq server did not start: {tail}")
            time.sleep(0.05)
        self.url = f"pymq://{HOST}:{int(text)}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(IO_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(IO_TIMEOUT)


# Redis Streams ----------------------------------------------------------


def redis_client() -> Any:
    import redis

    return redis.Redis(
        host=HOST,
        port=REDIS_PORT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=IO_TIMEOUT,
    )


def stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREADGROUP reply for one stream (RESP2 or RESP3)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        value = next(iter(reply.values()))
        return list(value[0] if value and isinstance(value[0], list) else value)
    return list(reply[0][1])


def redis_run(batch: int) -> RunFn:
    """XADD, then XREADGROUP + XACK: one command each, or batches of 100."""

    def run(ws: Workspace, bodies: Sequence[bytes], limits: Limits) -> Sample:
        client = redis_client()
        key = ws.name("stream")
        group, consumer = "workers", "worker-1"
        client.xgroup_create(key, group, id="0", mkstream=True)
        try:
            return redis_sample(client, key, group, consumer, bodies, batch, limits)
        finally:
            client.delete(key)
            client.close()

    return run


def redis_sample(
    client: Any,
    key: str,
    group: str,
    consumer: str,
    bodies: Sequence[bytes],
    batch: int,
    limits: Limits,
) -> Sample:
    streams = {key: ">"}

    def read(count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries = stream_entries(client.xreadgroup(group, consumer, streams, count))
        if not entries:
            raise RuntimeError("the stream had no message to read")
        return entries

    if batch == 1:

        def produce() -> int:
            return put_all(
                lambda body: client.xadd(key, {"b": body}), bodies, limits.deadline
            )

        def consume(count: int) -> tuple[int, Any]:
            last = None
            for _ in range(count):
                message_id, fields = read(1)[0]
                client.xack(key, group, message_id)
                last = fields[b"b"]
            return count, last

    else:
        pipe = client.pipeline(transaction=False)

        def put_many(chunk: list[bytes]) -> None:
            for body in chunk:
                pipe.xadd(key, {"b": body})
            pipe.execute()

        def produce() -> int:
            return put_chunks(put_many, bodies, limits.deadline, batch)

        def consume(count: int) -> tuple[int, Any]:
            done = 0
            last = None
            while done < count:
                entries = read(min(batch, count - done))
                client.xack(key, group, *(message_id for message_id, _ in entries))
                done += len(entries)
                last = entries[-1][1][b"b"]
            return done, last

    sample = phases(produce, consume, size_of(bodies))
    if batch == 1:

        def one(body: bytes) -> int:
            client.xadd(key, {"b": body})
            message_id, fields = read(1)[0]
            client.xack(key, group, message_id)
            return len(fields[b"b"])

        sample.round_trips_us = round_trips(one, bodies, limits)
    return sample


# RabbitMQ ---------------------------------------------------------------


def rabbitmq_connection() -> Any:
    import pika

    parameters = pika.ConnectionParameters(
        host=HOST,
        port=RABBITMQ_PORT,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1,
        socket_timeout=CONNECT_TIMEOUT,
        stack_timeout=CONNECT_TIMEOUT * 5,
        blocked_connection_timeout=IO_TIMEOUT,
    )
    return pika.BlockingConnection(parameters)


def rabbitmq_run(durable: bool, confirms: bool) -> RunFn:
    """basic_publish each message; consume with prefetch 100 and basic_ack."""

    def run(ws: Workspace, bodies: Sequence[bytes], limits: Limits) -> Sample:
        import pika

        connection = rabbitmq_connection()
        try:
            channel = connection.channel()
            name = ws.name("queue")
            channel.queue_declare(queue=name, durable=durable)
            try:
                if confirms:
                    channel.confirm_delivery()
                mode = (
                    pika.DeliveryMode.Persistent
                    if durable
                    else pika.DeliveryMode.Transient
                )
                properties = pika.BasicProperties(delivery_mode=mode)
                return rabbitmq_sample(channel, name, properties, bodies, limits)
            finally:
                channel.cancel()
                channel.queue_delete(queue=name)
        finally:
            connection.close()

    return run


def rabbitmq_sample(
    channel: Any, name: str, properties: Any, bodies: Sequence[bytes], limits: Limits
) -> Sample:
    def publish(body: bytes) -> None:
        # With confirm_delivery, this waits for the broker's confirm.
        channel.basic_publish("", name, body, properties)

    channel.basic_qos(prefetch_count=BATCH)
    deliveries: Iterator[Any] | None = None

    def receive() -> Any:
        nonlocal deliveries
        if deliveries is None:
            deliveries = channel.consume(
                name, auto_ack=False, inactivity_timeout=IO_TIMEOUT
            )
        method, _, body = next(deliveries)
        if method is None:
            raise RuntimeError(f"no message from RabbitMQ in {IO_TIMEOUT} s")
        channel.basic_ack(method.delivery_tag)
        return body

    sample = phases(
        lambda: put_all(publish, bodies, limits.deadline),
        lambda count: get_all(receive, count),
        size_of(bodies),
    )

    def one(body: bytes) -> int:
        publish(body)
        return len(receive())

    sample.round_trips_us = round_trips(one, bodies, limits)
    return sample


# NATS JetStream ---------------------------------------------------------


async def nats_connect() -> Any:
    import nats

    return await nats.connect(
        f"nats://{HOST}:{NATS_PORT}",
        connect_timeout=CONNECT_TIMEOUT,
        allow_reconnect=False,
        max_reconnect_attempts=0,
    )


def nats_run(batch: int) -> RunFn:
    """Publish awaiting each ack (batch 1) or gathering acks per 100 messages.

    The consumer is a durable pull consumer: fetch up to 100, ack each.
    """

    def run(ws: Workspace, bodies: Sequence[bytes], limits: Limits) -> Sample:
        return asyncio.run(nats_session(ws.name("stream"), bodies, batch, limits))

    return run


async def nats_session(
    name: str, bodies: Sequence[bytes], batch: int, limits: Limits
) -> Sample:
    from nats.js.api import RetentionPolicy, StorageType

    connection = await nats_connect()
    try:
        js = connection.jetstream(timeout=IO_TIMEOUT)
        await js.add_stream(
            name=name,
            subjects=[name],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
        try:
            puller = await js.pull_subscribe(name, durable="workers", stream=name)
            return await nats_sample(
                connection, js, puller, name, bodies, batch, limits
            )
        finally:
            await js.delete_stream(name)
    finally:
        await connection.close()


async def nats_sample(
    connection: Any,
    js: Any,
    puller: Any,
    subject: str,
    bodies: Sequence[bytes],
    batch: int,
    limits: Limits,
) -> Sample:
    start = time.perf_counter()
    produced = 0
    if batch == 1:
        for first in range(0, len(bodies), CHECK_EVERY):
            for body in bodies[first : first + CHECK_EVERY]:
                await js.publish(subject, body)
            produced = min(first + CHECK_EVERY, len(bodies))
            if time.perf_counter() > limits.deadline:
                break
    else:
        for first in range(0, len(bodies), batch):
            chunk = bodies[first : first + batch]
            acks = [await js.publish_async(subject, body) for body in chunk]
            await asyncio.gather(*acks)
            produced += len(chunk)
            if time.perf_counter() > limits.deadline:
                break
    middle = time.perf_counter()
    consumed = 0
    last = None
    while consumed < produced:
        messages = await puller.fetch(min(BATCH, produced - consumed), IO_TIMEOUT)
        for message in messages:
            await message.ack()
        consumed += len(messages)
        last = messages[-1].data
    await connection.flush(IO_TIMEOUT)
    end = time.perf_counter()
    check_drain(produced, consumed, last, size_of(bodies))
    sample = Sample(produced, consumed, end - start, middle - start, end - middle)
    if batch == 1:

        async def one(body: bytes) -> int:
            await js.publish(subject, body)
            (message,) = await puller.fetch(1, IO_TIMEOUT)
            await message.ack()
            return len(message.data)

        sample.round_trips_us = await round_trips_async(one, bodies, limits)
    return sample


# Availability -----------------------------------------------------------


@dataclass
class Availability:
    """Whether a system can run here: None or the reason it is skipped."""

    reason: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    durability: dict[str, str] = field(default_factory=dict)


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing(module: str, dist: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f'{dist} is not installed (pip install -e ".[bench]")'
    return None


def always_available() -> Availability:
    return Availability()


def library_check(module: str, dist: str) -> Callable[[], Availability]:
    def check() -> Availability:
        reason = missing(module, dist)
        return Availability(reason, {dist: dist_version(dist) or "not installed"})

    return check


def redis_check() -> Availability:
    reason = missing("redis", "redis")
    versions = {
        "redis (redis-py)": dist_version("redis") or "not installed",
        "hiredis": dist_version("hiredis") or "not installed",
    }
    if reason:
        return Availability(reason, versions)
    try:
        client = redis_client()
        try:
            info = client.info("server")
            config = client.config_get("appendonly")
            config.update(client.config_get("appendfsync"))
            config.update(client.config_get("save"))
        finally:
            client.close()
    except Exception as exc:
        return Availability(f"no Redis at {HOST}:{REDIS_PORT} ({exc})", versions)
    versions["Redis server"] = str(info.get("redis_version", "unknown"))
    import redis.utils

    if not getattr(redis.utils, "HIREDIS_AVAILABLE", False):
        versions["hiredis"] += " (not in use: redis-py parses in Python)"
    return Availability(None, versions, {"redis": redis_persistence(config)})


def redis_persistence(config: dict[Any, Any]) -> str:
    """Say what the server's persistence settings keep, from CONFIG GET."""

    def get(name: str) -> str:
        value = config.get(name, config.get(name.encode(), "?"))
        return value.decode() if isinstance(value, bytes) else str(value)

    appendonly, appendfsync, save = get("appendonly"), get("appendfsync"), get("save")
    snapshots = f'RDB save "{save}"' if save else "no RDB snapshots"
    if appendonly == "yes":
        return f"AOF, appendfsync {appendfsync}; {snapshots}"
    if save:
        return f"memory; {snapshots} (appendonly no)"
    return 'memory only: appendonly no, save ""'


def rabbitmq_check() -> Availability:
    reason = missing("pika", "pika")
    versions = {"pika": dist_version("pika") or "not installed"}
    if reason:
        return Availability(reason, versions)
    try:
        connection = rabbitmq_connection()
    except Exception as exc:
        text = str(exc) or type(exc).__name__
        return Availability(f"no RabbitMQ at {HOST}:{RABBITMQ_PORT} ({text})", versions)
    try:
        # server_properties is the Connection.Start frame's; pika keeps it on
        # the underlying connection.
        properties = getattr(connection._impl, "server_properties", {}) or {}
        version = properties.get("version", properties.get(b"version", "unknown"))
        versions["RabbitMQ server"] = (
            version.decode() if isinstance(version, bytes) else str(version)
        )
    finally:
        connection.close()
    return Availability(None, versions)


def nats_check() -> Availability:
    reason = missing("nats", "nats-py")
    versions = {"nats-py": dist_version("nats-py") or "not installed"}
    if reason:
        return Availability(reason, versions)

    async def probe() -> tuple[str, bool]:
        connection = await nats_connect()
        try:
            info = getattr(connection, "_server_info", {}) or {}
            jetstream = bool(info.get("jetstream"))
            if jetstream:
                await connection.jetstream(timeout=CONNECT_TIMEOUT).account_info()
            return str(info.get("version", "unknown")), jetstream
        finally:
            await connection.close()

    try:
        version, jetstream = asyncio.run(asyncio.wait_for(probe(), CONNECT_TIMEOUT * 5))
    except Exception as exc:
        text = str(exc) or type(exc).__name__
        return Availability(f"no NATS at {HOST}:{NATS_PORT} ({text})", versions)
    versions["NATS server"] = version
    if not jetstream:
        return Availability(
            "the NATS server has JetStream off (start it with -js)", versions
        )
    return Availability(None, versions)


def pymq_server_check() -> Availability:
    versions = {"pymq server": pymq.__version__}
    if not hasattr(pymq, "connect"):
        return Availability(
            "pymq.connect does not exist yet (the server and client are being written)",
            versions,
        )
    if importlib.util.find_spec("pymq.__main__") is None:
        return Availability("`python -m pymq serve` does not exist yet", versions)
    return Availability(None, versions)


# Systems and cases ------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way to drive a system: a row of each size's table."""

    name: str
    batch: int
    durability: str
    make_run: Callable[[], RunFn]
    # The case's N is a multiple of this.
    multiple: int = BATCH
    # A tag that other rows' ratios name when this row is their reference.
    tag: str | None = None


@dataclass(frozen=True)
class System:
    key: str  # for --only
    label: str
    group: str
    check: Callable[[], Availability]
    variants: tuple[Variant, ...]
    # What the system keeps at its default setting, for the page's legend.
    note: str = ""


def variant(
    name: str,
    durability: str,
    make_run: Callable[[], RunFn],
    batch: int = 1,
    **options: Any,
) -> Variant:
    return Variant(name, batch, durability, make_run, **options)


def pymq_variants() -> tuple[Variant, ...]:
    synced = {
        "never": "no sync (in the mapping at once)",
        "interval": "msync every 0.1 s",
        "always": "synced in each call (put, get, ack)",
    }
    rows = [
        variant(
            f"fsync={fsync}, {form}",
            synced[fsync],
            lambda fsync=fsync, batch=batch: pymq_embedded_run(fsync, batch),
            batch,
            tag=TAGS.get((fsync, batch)),
        )
        for fsync in ("never", "interval", "always")
        for form, batch in ((ONE_AT_A_TIME, 1), (BATCHES, BATCH))
    ]
    rows.append(
        variant(
            f"fsync=always, {PRODUCER_THREADS} producer threads",
            "synced in each call; concurrent calls share a sync",
            lambda: pymq_embedded_run("always", 1, threads=True),
            multiple=BATCH * PRODUCER_THREADS,
        )
    )
    return tuple(rows)


TAGS = {("interval", 1): "E1", ("interval", BATCH): "EB"}
RABBITMQ_DURABILITY = {
    True: "on disk; a confirm waits for the write",
    False: "memory (paged out under memory pressure)",
}


def rabbitmq_variants() -> tuple[Variant, ...]:
    rows = []
    for durable in (True, False):
        for confirms in (True, False):
            queue_kind = "durable queue, persistent" if durable else "non-durable"
            durability = RABBITMQ_DURABILITY[durable]
            if durable and not confirms:
                durability = "on disk; the publisher does not wait for the write"
            rows.append(
                variant(
                    f"{queue_kind}, {'confirms' if confirms else 'no confirms'}",
                    durability,
                    lambda durable=durable, confirms=confirms: rabbitmq_run(
                        durable, confirms
                    ),
                )
            )
    return tuple(rows)


def systems() -> list[System]:
    memory = "memory"
    sqlite_normal = "SQLite WAL, synchronous=NORMAL: synced at checkpoints"
    nats = "file store, fsync every 2 min (default)"
    return [
        System(
            "pymq",
            "pymq embedded",
            PYMQ_EMBEDDED,
            always_available,
            pymq_variants(),
            'pymq.open(folder, fsync=...). "never" and "interval" keep a record '
            "once the call returns if the process crashes (it is in a shared "
            'mapping); "interval" also syncs every 0.1 s, so power loss loses at '
            'most that much; "always" syncs before each call returns, and '
            "concurrent calls share one sync.",
        ),
        System(
            "pymq-server",
            "pymq server",
            PYMQ_SERVER,
            pymq_server_check,
            (
                variant(
                    ONE_AT_A_TIME,
                    "server fsync=interval (default)",
                    lambda: pymq_server_run(1),
                    tag="S1",
                ),
                variant(
                    BATCHES,
                    "server fsync=interval (default)",
                    lambda: pymq_server_run(BATCH),
                    BATCH,
                    tag="SB",
                ),
            ),
            f"`python -m {' '.join(PYMQ_SERVE[1:3])}` with fsync=interval, its "
            "default, on 127.0.0.1 at a free port; pymq.connect() as the client.",
        ),
        System(
            "deque",
            "collections.deque",
            IN_PROCESS,
            always_available,
            (variant("append / popleft", memory, lambda: put_get_run(make_deque)),),
        ),
        System(
            "queue",
            "queue.Queue",
            IN_PROCESS,
            always_available,
            (variant("put / get_nowait", memory, lambda: put_get_run(make_queue)),),
        ),
        System(
            "simplequeue",
            "queue.SimpleQueue",
            IN_PROCESS,
            always_available,
            (
                variant(
                    "put / get_nowait", memory, lambda: put_get_run(make_simple_queue)
                ),
            ),
        ),
        System(
            "asyncio",
            "asyncio.Queue",
            IN_PROCESS,
            always_available,
            (
                variant("put_nowait / get_nowait", memory, lambda: asyncio_nowait_run),
                variant("await put / await get", memory, lambda: asyncio_await_run),
            ),
        ),
        System(
            "multiprocessing",
            "multiprocessing.Queue",
            IN_PROCESS,
            always_available,
            (
                variant(
                    "producer process, concurrent drain",
                    "memory (a pipe)",
                    lambda: multiprocessing_run,
                ),
            ),
            "The producer is a spawned process that puts the same seeded bodies; "
            "this process gets them. The pipe holds little, so the two phases "
            "overlap and only the total is given.",
        ),
        System(
            "persistqueue",
            "persist-queue Queue (file)",
            EMBEDDED,
            library_check("persistqueue", "persist-queue"),
            (
                variant(
                    "put / get / task_done",
                    "flush per put; fsync every 100th put",
                    lambda: persistqueue_file_run,
                ),
            ),
            "persistqueue.Queue(path), defaults (chunksize=100, autosave=False): "
            "each put writes and flushes the chunk file and replaces the info "
            "file, unsynced; the chunk file is fsynced when it fills (every 100th "
            "put); task_done replaces the info file, unsynced.",
        ),
        System(
            "persistqueue-sqlite",
            "persist-queue SQLiteAckQueue",
            EMBEDDED,
            library_check("persistqueue", "persist-queue"),
            (
                variant(
                    "put / get / ack",
                    "SQLite WAL, synchronous=FULL: a sync per put, get, ack",
                    lambda: persistqueue_sqlite_run,
                ),
            ),
            "persistqueue.SQLiteAckQueue(path), defaults (auto_commit=True): WAL "
            "journal with SQLite's default synchronous=FULL, one commit, so one "
            "fdatasync of the WAL, for each put, get and ack (strace counted 609 "
            "for 200 messages).",
        ),
        System(
            "litequeue",
            "litequeue",
            EMBEDDED,
            library_check("litequeue", "litequeue"),
            (variant("put / pop / done", sqlite_normal, lambda: litequeue_run),),
            "litequeue.LiteQueue(file), defaults: WAL journal with "
            "synchronous=NORMAL, so a commit is not synced; the WAL is synced at "
            "checkpoints. A process crash keeps commits; power loss may lose the "
            "last ones.",
        ),
        System(
            "diskcache",
            "diskcache Deque",
            EMBEDDED,
            library_check("diskcache", "diskcache"),
            (
                variant(
                    "append / popleft (no ack)",
                    sqlite_normal + "; bodies >= 32 KiB in unsynced files",
                    lambda: diskcache_run,
                ),
            ),
            "diskcache.Deque(directory=...), defaults: SQLite WAL with "
            "synchronous=NORMAL (as litequeue); bodies of 32 KiB or more "
            "(disk_min_file_size) go to files of their own, written but not "
            "synced. It has no ack: popleft removes the message.",
        ),
        System(
            "redis",
            "Redis Streams",
            SERVER,
            redis_check,
            (
                variant(
                    "XADD / XREADGROUP + XACK, one at a time",
                    "{redis}",
                    lambda: redis_run(1),
                ),
                variant(
                    f"pipelined, batches of {BATCH}",
                    "{redis}",
                    lambda: redis_run(BATCH),
                    BATCH,
                ),
            ),
            "redis-py with hiredis, the server as installed (its persistence "
            "settings, read with CONFIG GET, are in the durability column). "
            f"Pipelined: {BATCH} XADD per pipeline (transaction=False); "
            f"XREADGROUP COUNT {BATCH}, then one XACK of those ids.",
        ),
        System(
            "rabbitmq",
            "RabbitMQ",
            SERVER,
            rabbitmq_check,
            rabbitmq_variants(),
            "pika BlockingConnection, guest/guest, the default (classic) queue "
            "type. Persistent messages in a durable queue are written to disk; "
            "with publisher confirms each basic_publish waits for the broker's "
            "confirm, which it sends once the message is persisted (RabbitMQ "
            "batches the fsyncs). Non-durable queues with transient messages "
            f"stay in memory. Consumers use prefetch {BATCH} and basic_ack each "
            "message.",
        ),
        System(
            "nats",
            "NATS JetStream",
            SERVER,
            nats_check,
            (
                variant("publish awaiting each ack", nats, lambda: nats_run(1)),
                variant(
                    f"publish_async, acks gathered per {BATCH}",
                    nats,
                    lambda: nats_run(BATCH),
                    BATCH,
                ),
            ),
            "nats-py, a file-storage stream with work-queue retention and one "
            f"durable pull consumer (fetch up to {BATCH}, ack each). The server "
            "acks a publish once the message is written to its files; at the "
            "default sync_interval it fsyncs them every 2 minutes.",
        ),
    ]


def system_keys() -> list[str]:
    return [system.key for system in systems()]


@dataclass
class Case:
    """One row: a system's variant at one message size."""

    key: str
    system: str
    group: str
    variant: str
    size: int
    batch: int
    durability: str
    run: RunFn | None
    multiple: int = BATCH
    tag: str | None = None
    n: int = 0
    samples: list[Sample] = field(default_factory=list)
    skipped: str | None = None  # why the case did not run, or stopped

    @property
    def label(self) -> str:
        return f"{self.system}, {self.variant}"

    def totals(self) -> list[float]:
        return [sample.total_rate for sample in self.samples]

    def median(self, attribute: str = "total_rate") -> float | None:
        values = [getattr(sample, attribute) for sample in self.samples]
        if not values or None in values:
            return None
        return statistics.median(values)

    def round_trip(self, quantile: float) -> float | None:
        values = [
            percentile(sample.round_trips_us, quantile)
            for sample in self.samples
            if sample.round_trips_us
        ]
        return statistics.median(values) if values else None


def percentile(values: Sequence[float], quantile: float) -> float:
    """The nearest-rank percentile of values (quantile from 0 to 1)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(quantile * len(ordered)))
    return ordered[rank - 1]


class Unknown(dict[str, str]):
    """Settings read from a server; "not read" for those of a skipped one."""

    def __missing__(self, key: str) -> str:
        return "not read (skipped)"


def build_cases(
    budget: Budget,
    only: set[str] | None = None,
    checks: dict[str, Availability] | None = None,
) -> tuple[list[Case], dict[str, Availability]]:
    """Check each selected system once and make its cases for each size."""
    checks = {} if checks is None else checks
    cases = []
    for system in systems():
        if only is not None and system.key not in only:
            continue
        if system.key not in checks:
            checks[system.key] = system.check()
        available = checks[system.key]
        for size in budget.sizes:
            for variant in system.variants:
                durability = variant.durability.format_map(
                    Unknown(available.durability)
                )
                cases.append(
                    Case(
                        key=system.key,
                        system=system.label,
                        group=system.group,
                        variant=variant.name,
                        size=size,
                        batch=variant.batch,
                        durability=durability,
                        run=None if available.reason else variant.make_run(),
                        multiple=variant.multiple,
                        tag=variant.tag,
                        skipped=available.reason,
                    )
                )
    return cases, checks


# Running ----------------------------------------------------------------


def max_messages(budget: Budget, case: Case) -> int:
    top = min(budget.max_messages, budget.max_bytes // case.size)
    return max(case.multiple, top // case.multiple * case.multiple)


def min_messages(budget: Budget, case: Case) -> int:
    return max(
        case.multiple, math.ceil(budget.min_messages / case.multiple) * case.multiple
    )


def run_once(
    case: Case, ws: Workspace, budget: Budget, count: int, round_trips: int
) -> Sample:
    assert case.run is not None
    limits = Limits(
        deadline=time.perf_counter() + budget.timeout,
        round_trips=round_trips,
        round_trip_seconds=budget.round_trip_seconds,
    )
    return case.run(ws, payloads(case.size, count), limits)


def calibrate(case: Case, ws: Workspace, budget: Budget) -> int:
    """Return N: what one repeat moves in about budget.seconds, within limits.

    Probes with the smallest N, then ten times more, until a probe takes a
    tenth of the budget or reaches the largest N. The probes also warm the
    system up; they are not reported.
    """
    low, high = min_messages(budget, case), max_messages(budget, case)
    count = min(low, high)
    while True:
        sample = run_once(case, ws, budget, count, round_trips=0)
        if sample.total_seconds >= budget.seconds / 10 or count >= high:
            break
        count = min(high, count * 10)
    wanted = sample.messages / sample.total_seconds * budget.seconds
    wanted = int(wanted) // case.multiple * case.multiple
    return max(min(low, high), min(high, wanted))


def runnable(cases: Sequence[Case]) -> list[Case]:
    return [case for case in cases if case.skipped is None and case.run is not None]


def progress_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_cases(
    cases: Sequence[Case],
    ws: Workspace,
    budget: Budget,
    progress: Callable[[str], None] = progress_line,
) -> list[float]:
    """Calibrate every case, then run the repeats in rounds over all cases.

    A case that raises is marked skipped with the error and left out of the
    rounds after it. Returns the 1-minute load average taken before each
    repeat.
    """
    loads = []
    todo = runnable(cases)
    for index, case in enumerate(todo, 1):
        progress(
            f"probe, case {index}/{len(todo)}: {case.label}, {payload_name(case.size)}"
        )
        try:
            case.n = calibrate(case, ws, budget)
        except Exception as exc:
            case.skipped = f"failed: {type(exc).__name__}: {exc}"
            progress(f"  {case.skipped}")
    for round_number in range(1, budget.repeats + 1):
        todo = runnable(cases)
        for index, case in enumerate(todo, 1):
            progress(
                f"round {round_number}/{budget.repeats}, case {index}/{len(todo)}: "
                f"{case.label}, {payload_name(case.size)}, N={case.n}"
            )
            loads.append(os.getloadavg()[0])
            try:
                case.samples.append(
                    run_once(case, ws, budget, case.n, budget.round_trips)
                )
            except Exception as exc:
                case.skipped = f"failed: {type(exc).__name__}: {exc}"
                progress(f"  {case.skipped}")
    return loads


# Ratios and goals -------------------------------------------------------


def find_case(cases: Sequence[Case], key: str, size: int, variant: str) -> Case | None:
    for case in cases:
        if (case.key, case.size, case.variant) == (key, size, variant):
            return case
    return None


def measured(case: Case | None) -> bool:
    return case is not None and case.skipped is None and bool(case.samples)


def tagged(cases: Sequence[Case], tag: str, size: int) -> Case | None:
    for case in cases:
        if case.tag == tag and case.size == size:
            return case
    return None


def reference(cases: Sequence[Case], case: Case) -> Case | None:
    """The pymq row a row's ratio divides by.

    In-process and embedded rows: pymq embedded, fsync="interval", one at a
    time (E1). Server rows: the pymq server with the same batching (S1 or
    SB); until it is measured, pymq embedded interval with that batching (E1
    or EB).
    """
    if case.group in (PYMQ_EMBEDDED, PYMQ_SERVER):
        return None
    if case.group != SERVER:
        return tagged(cases, "E1", case.size)
    server = tagged(cases, "S1" if case.batch == 1 else "SB", case.size)
    if measured(server):
        return server
    return tagged(cases, "E1" if case.batch == 1 else "EB", case.size)


@dataclass(frozen=True)
class Ratio:
    """pymq's total msg/s over another row's, medians and per round."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, top: Case, bottom: Case) -> Ratio | None:
        if not (measured(top) and measured(bottom)):
            return None
        pairs = [
            a.total_rate / b.total_rate
            for a, b in zip(top.samples, bottom.samples, strict=False)
        ]
        median = statistics.median(top.totals()) / statistics.median(bottom.totals())
        return cls(median, min(pairs), max(pairs))

    def text(self) -> str:
        low, high = ratio_text(self.low, ""), ratio_text(self.high, "")
        return f"{ratio_text(self.median)} ({low} - {high})"


def ratio_text(value: float, unit: str = " x") -> str:
    if value >= 100:
        return f"{value:,.0f}{unit}"
    if value >= 10:
        return f"{value:.1f}{unit}"
    return f"{value:.2f}{unit}"


@dataclass(frozen=True)
class Goal:
    text: str
    target: float
    top: Case | None
    bottom: Case | None
    unmeasured: str = "not measured"

    def ratio(self) -> Ratio | None:
        if self.top is None or self.bottom is None:
            return None
        return Ratio.of(self.top, self.bottom)

    def verdict(self) -> str:
        ratio = self.ratio()
        if ratio is None:
            return self.unmeasured
        if ratio.median >= self.target:
            return "met"
        return f"not met ({ratio.median / self.target:.0%} of it)"


def goals(cases: Sequence[Case], size: int = GOAL_SIZE) -> list[Goal]:
    interval = tagged(cases, "E1", size)
    always = find_case(cases, "pymq", size, f"fsync=always, {ONE_AT_A_TIME}")
    threads = find_case(
        cases, "pymq", size, f"fsync=always, {PRODUCER_THREADS} producer threads"
    )
    sqlite = find_case(cases, "persistqueue-sqlite", size, "put / get / ack")
    result = []
    for key in ("persistqueue", "persistqueue-sqlite", "litequeue", "diskcache"):
        other = next((c for c in cases if c.key == key and c.size == size), None)
        name = other.system if other else key
        result.append(
            Goal(
                f"pymq embedded interval, one at a time >= 100 x {name}",
                100.0,
                interval,
                other,
            )
        )
    result.append(
        Goal(
            "pymq fsync=always, one at a time >= 1 x persist-queue SQLiteAckQueue",
            1.0,
            always,
            sqlite,
        )
    )
    result.append(
        Goal(
            f"pymq fsync=always, {PRODUCER_THREADS} producer threads "
            ">= 5 x persist-queue SQLiteAckQueue",
            5.0,
            threads,
            sqlite,
        )
    )
    server_one = tagged(cases, "S1", size)
    server_batch = tagged(cases, "SB", size)
    server_goals = (
        (
            "Redis Streams",
            "redis",
            "XADD / XREADGROUP + XACK, one at a time",
            f"pipelined, batches of {BATCH}",
        ),
        (
            "RabbitMQ",
            "rabbitmq",
            "durable queue, persistent, confirms",
            "durable queue, persistent, no confirms",
        ),
        (
            "NATS JetStream",
            "nats",
            "publish awaiting each ack",
            f"publish_async, acks gathered per {BATCH}",
        ),
    )
    for label, key, single, batched in server_goals:
        for form, server, variant in (
            (ONE_AT_A_TIME, server_one, single),
            (BATCHES, server_batch, batched),
        ):
            result.append(
                Goal(
                    f"pymq server, {form} > 1 x {label} ({variant})",
                    1.0,
                    server if measured(server) else None,
                    find_case(cases, key, size, variant),
                    unmeasured="not measured"
                    if not measured(server)
                    else f"not measured ({label} did not run)",
                )
            )
    return result


# Report -----------------------------------------------------------------


def cell(value: float | None) -> str:
    return "-" if value is None else si(value)


def mb(rate: float | None, size: int) -> str:
    return "-" if rate is None else si(rate * size / 1e6)


def us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


TABLE_HEADER = (
    "| system | variant | durability (default setting) | N | produce msg/s "
    "| produce MB/s | consume msg/s | consume MB/s | total msg/s | total MB/s "
    "| total min - max | RTT p50 us | RTT p99 us | pymq / this |",
    "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
    "| ---: | ---: | ---: | ---: |",
)


def ordered(cases: Sequence[Case]) -> list[Case]:
    return sorted(cases, key=lambda case: GROUPS.index(case.group))


def table(cases: Sequence[Case], size: int) -> list[str]:
    lines = list(TABLE_HEADER)
    for case in ordered([c for c in cases if c.size == size]):
        if not measured(case):
            reason = case.skipped or "no repeat finished"
            lines.append(
                f"| {case.system} | {case.variant} | skipped: {reason} "
                "| - | - | - | - | - | - | - | - | - | - | - |"
            )
            continue
        totals = case.totals()
        produce, consume = case.median("produce_rate"), case.median("consume_rate")
        total = case.median()
        ref = reference(cases, case)
        ratio = Ratio.of(ref, case) if ref is not None else None
        if case.tag:
            ratio_cell = f"reference {case.tag}"
        elif ratio is not None and ref is not None:
            ratio_cell = f"{ratio.text()} vs {ref.tag}"
        else:
            ratio_cell = "-"
        lines.append(
            f"| {case.system} | {case.variant} | {case.durability} | {case.n:,} "
            f"| {cell(produce)} | {mb(produce, size)} | {cell(consume)} "
            f"| {mb(consume, size)} | {cell(total)} | {mb(total, size)} "
            f"| {si(min(totals))} - {si(max(totals))} "
            f"| {us(case.round_trip(0.5))} | {us(case.round_trip(0.99))} "
            f"| {ratio_cell} |"
        )
    return lines


def goal_table(cases: Sequence[Case], size: int = GOAL_SIZE) -> list[str]:
    lines = [
        f"| goal ({payload_name(size)}, total msg/s) | pymq | other "
        "| ratio (per round) | met |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for goal in goals(cases, size):
        ratio = goal.ratio()
        top = goal.top.median() if measured(goal.top) and goal.top else None
        bottom = goal.bottom.median() if measured(goal.bottom) and goal.bottom else None
        lines.append(
            f"| {goal.text} | {cell(top)} | {cell(bottom)} "
            f"| {ratio.text() if ratio else '-'} | {goal.verdict()} |"
        )
    return lines


RATIO_NOTE = (
    "`pymq / this` is pymq's total msg/s divided by the row's, from this run: "
    "the ratio of the medians, then the lowest and highest ratio of two repeats "
    "made in the same round. Its reference row: E1 is pymq embedded, "
    'fsync="interval", one at a time, for the in-process and embedded rows. '
    "Server rows that send one message per call use S1 (the pymq server, one "
    f"at a time) and rows that batch (pipelined, acks gathered per {BATCH}) use "
    "SB (the pymq server, batches); until the pymq server is measured they use "
    "E1 and EB (pymq embedded interval, batches), which is no like-for-like "
    "comparison: the embedded broker has no network hop. "
    "Above 1 means pymq moved more messages per second."
)


def machine_info(folder: Path) -> dict[str, Any]:
    df = command_output(["df", "-T", str(folder)]).splitlines()
    fields = df[-1].split() if len(df) >= 2 else []
    memory = None
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/meminfo", encoding="ascii") as meminfo,
    ):
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "kernel": platform.release(),
        "architecture": platform.machine(),
        "temp_folder": str(folder.parent),
        "filesystem": filesystem_type(folder),
        "device": fields[0] if fields else "unknown",
        "mount_point": fields[-1] if fields else "unknown",
    }


CLIENTS = (
    "redis",
    "hiredis",
    "pika",
    "nats-py",
    "persist-queue",
    "litequeue",
    "diskcache",
    "matplotlib",
    "numpy",
)


def display_python() -> str:
    executable = Path(sys.executable)
    with contextlib.suppress(ValueError):
        return str(executable.relative_to(REPO))
    return sys.executable


def metadata(
    argv: Sequence[str], ws: Workspace, checks: dict[str, Availability], budget: Budget
) -> dict[str, Any]:
    servers = {}
    for available in checks.values():
        for name, version in available.versions.items():
            if "server" in name:
                servers[name] = version
    return {
        "command": " ".join(
            [display_python(), "-m", "benchmarks.compare", *map(shlex.quote, argv)]
        ),
        "argv": list(argv),
        "commit": command_output(["git", "rev-parse", "--short", "HEAD"]),
        "source_state": source_state().lstrip(", "),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "pymq": pymq.__version__,
        "clients": {name: dist_version(name) or "not installed" for name in CLIENTS},
        "servers": servers,
        "skipped_systems": {
            key: available.reason
            for key, available in checks.items()
            if available.reason
        },
        "machine": machine_info(ws.root),
        "budget": asdict(budget),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
    }


def results_json(cases: Sequence[Case], meta: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for case in cases:
        ref = reference(cases, case)
        ratio = Ratio.of(ref, case) if ref is not None else None
        rows.append(
            {
                "key": case.key,
                "system": case.system,
                "group": case.group,
                "variant": case.variant,
                "size": case.size,
                "batch": case.batch,
                "durability": case.durability,
                "n": case.n,
                "tag": case.tag,
                "skipped": case.skipped,
                "repeats": [
                    {
                        "messages": s.messages,
                        "consumed": s.consumed,
                        "produce_seconds": s.produce_seconds,
                        "consume_seconds": s.consume_seconds,
                        "total_seconds": s.total_seconds,
                        "produce_msg_per_s": s.produce_rate,
                        "consume_msg_per_s": s.consume_rate,
                        "total_msg_per_s": s.total_rate,
                        "total_mb_per_s": s.total_rate * case.size / 1e6,
                        "round_trips": len(s.round_trips_us),
                        "round_trip_p50_us": percentile(s.round_trips_us, 0.5)
                        if s.round_trips_us
                        else None,
                        "round_trip_p99_us": percentile(s.round_trips_us, 0.99)
                        if s.round_trips_us
                        else None,
                    }
                    for s in case.samples
                ],
                "median": {
                    "produce_msg_per_s": case.median("produce_rate"),
                    "consume_msg_per_s": case.median("consume_rate"),
                    "total_msg_per_s": case.median(),
                    "round_trip_p50_us": case.round_trip(0.5),
                    "round_trip_p99_us": case.round_trip(0.99),
                }
                if measured(case)
                else None,
                "ratio": None
                if ratio is None or ref is None
                else {
                    "reference": ref.tag,
                    "reference_row": ref.label,
                    "pymq_over_this": ratio.median,
                    "per_round_min": ratio.low,
                    "per_round_max": ratio.high,
                },
            }
        )
    goal_rows = []
    for goal in goals(cases, min(c.size for c in cases) if cases else GOAL_SIZE):
        ratio = goal.ratio()
        goal_rows.append(
            {
                "goal": goal.text,
                "target": goal.target,
                "pymq_row": goal.top.label if goal.top else None,
                "other_row": goal.bottom.label if goal.bottom else None,
                "ratio": ratio.median if ratio else None,
                "per_round_min": ratio.low if ratio else None,
                "per_round_max": ratio.high if ratio else None,
                "verdict": goal.verdict(),
            }
        )
    return {"metadata": meta, "cases": rows, "goals": goal_rows}


def machine_lines(meta: dict[str, Any]) -> list[str]:
    machine = meta["machine"]
    memory = machine["memory_bytes"]
    memory_text = f"{memory / 2**30:.0f} GiB" if memory else "unknown"
    return [
        f"command: `{meta['command']}`",
        f"commit: `{meta['commit']}` ({meta['source_state'] or 'state unknown'})",
        f"CPU: {machine['cpu']}, {machine['cores']} cores; memory {memory_text}; "
        f"kernel {machine['kernel']}",
        f"temporary folder: `{machine['temp_folder']}`, {machine['filesystem']} on "
        f"`{machine['device']}` (mounted at `{machine['mount_point']}`)",
        f"Python {meta['python']}, pymq {meta['pymq']}",
        "clients: " + ", ".join(f"{k} {v}" for k, v in meta["clients"].items()),
        "servers: "
        + (", ".join(f"{k} {v}" for k, v in meta["servers"].items()) or "none reached"),
        *load_lines(meta),
        "load average (1, 5, 15 min) at start: "
        + " ".join(f"{v:.2f}" for v in meta["load_average_start"])
        + (
            ", at end: " + " ".join(f"{v:.2f}" for v in meta["load_average_end"])
            if "load_average_end" in meta
            else ""
        ),
    ]


def load_lines(meta: dict[str, Any]) -> list[str]:
    during = meta.get("load_average_during")
    if not during:
        return []
    cores = meta["machine"]["cores"] or 1
    line = (
        f"1-minute load average before each repeat: {during['min']:.2f} to "
        f"{during['max']:.2f} (median {during['median']:.2f}) on {cores} cores"
    )
    if during["max"] > cores / 2:
        line += (
            "; other work was running on the machine, so a figure can move by a "
            "factor of 2 or more between runs"
        )
    return [line]


def report_lines(cases: Sequence[Case], budget: Budget) -> list[str]:
    lines = []
    for size in budget.sizes:
        lines += ["", f"Messages of {payload_name(size)}:", ""]
        lines += table(cases, size)
    lines += ["", *goal_table(cases, min(budget.sizes))]
    return lines


# --docs -----------------------------------------------------------------


def docs_section(
    cases: Sequence[Case], budget: Budget, meta: dict[str, Any], plot: str | None
) -> str:
    machine = machine_lines(meta)
    goal_size = min(budget.sizes)
    lines = [
        START_MARKER,
        "",
        "Generated by `benchmarks/compare.py` (`--docs`); edit that script, not "
        "this part of the page.",
        "",
        "### Machine and versions",
        "",
        *[f"- {line}" for line in machine],
        f"- wall time of the run: {meta.get('wall_seconds', 0):.0f} s",
        "",
        "### Method",
        "",
        f"- Every system ran in this one run on this machine, with the same "
        f"seeded bodies (`payloads` in `benchmarks/benchmarks/common.py`). A repeat "
        f"produces N messages, then drains N, with the ack where the system has "
        f"one, then times up to {budget.round_trips:,} single-message round trips "
        f"(put, get, ack; at most {budget.round_trip_seconds:g} s). Produce, consume "
        f"and total are N over the time of each phase and of both; MB/s counts body "
        f"bytes, in 10^6 bytes.",
        f"- N is set per case by a short probe, so that a repeat takes about "
        f"{budget.seconds:g} s, with at most {budget.max_messages:,} messages and "
        f"{budget.max_bytes >> 20} MiB of bodies. Each case ran {budget.repeats} "
        f"times, in rounds over all cases; a row gives the median, and the lowest "
        f"and highest total. RTT columns are the medians over the repeats of each "
        f"repeat's p50 and p99, in microseconds.",
        f"- {RATIO_NOTE}",
        "- Servers ran on 127.0.0.1 at their standard ports, as installed, with "
        "their default settings; each repeat used a stream or queue of its own, "
        "deleted afterwards. The durability column says what each system syncs "
        "at its default setting.",
        f"- multiprocessing.Queue's producer is another process; producing and "
        f"draining overlap, so only the total is given. RabbitMQ consumes with "
        f"prefetch {BATCH} and acks each message; NATS JetStream uses a durable "
        f"pull consumer (fetch up to {BATCH}, ack each) on a work-queue stream.",
        "",
    ]
    lines += ["### Systems and what they keep at their default setting", ""]
    keys = {case.key for case in cases}
    for system in systems():
        if system.key in keys and system.note:
            lines.append(f"- **{system.label}**: {system.note}")
    lines.append("")
    for size in budget.sizes:
        lines += [f"### Results, {payload_name(size)}", "", *table(cases, size), ""]
    lines += [
        "### Goals",
        "",
        f"At {payload_name(goal_size)}, with the total msg/s of each row"
        + (
            "."
            if measured(tagged(cases, "S1", goal_size))
            else "; the pymq server rows are not measured until the server exists."
        ),
        "",
        *goal_table(cases, goal_size),
        "",
    ]
    if plot:
        lines += [
            f"![Total msg/s per system and message size, log scale]({plot})",
            "",
        ]
    lines.append(END_MARKER)
    return "\n".join(wrap(line) for line in lines)


def wrap(line: str, width: int = 76) -> str:
    """Wrap a prose line or a list item of the page; leave tables and code."""
    kept = ("|", "#", "<!--", "![", "```", "- command:")
    if len(line) <= width or line.startswith(kept):
        return line
    indent = "  " if line.startswith("- ") else ""
    return textwrap.fill(
        line,
        width,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def update_docs(section: str, path: Path = DOCS) -> None:
    """Replace the text between the markers (adding them if missing)."""
    text = path.read_text(encoding="utf-8")
    if START_MARKER in text and END_MARKER in text:
        head, rest = text.split(START_MARKER, 1)
        _, tail = rest.split(END_MARKER, 1)
        text = head + section + tail
    elif DOCS_HEADING in text:
        head, tail = text.split(DOCS_HEADING, 1)
        text = f"{head}{DOCS_HEADING}\n\n{section}\n{tail}"
    else:
        raise SystemExit(f"{path} has neither the markers nor {DOCS_HEADING!r}")
    path.write_text(text, encoding="utf-8")


def plot_cases(cases: Sequence[Case], sizes: Sequence[int], path: Path) -> None:
    """A horizontal bar per row and size: total msg/s, log scale, min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    for case in ordered(cases):
        if measured(case) and case.label not in labels:
            labels.append(case.label)
    if not labels:
        return
    height = 0.8 / len(sizes)
    row_inches = 0.22 * (1 + 0.5 * (len(sizes) - 1))
    figure, axes = plt.subplots(figsize=(11, 1.5 + row_inches * len(labels)))
    colors = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
    for index, size in enumerate(sizes):
        ys, medians, lows, highs = [], [], [], []
        for row, label in enumerate(labels):
            case = next(
                (
                    c
                    for c in cases
                    if c.label == label and c.size == size and measured(c)
                ),
                None,
            )
            if case is None:
                continue
            median = case.median() or 0.0
            ys.append(row - 0.4 + height * (index + 0.5))
            medians.append(median)
            lows.append(median - min(case.totals()))
            highs.append(max(case.totals()) - median)
        axes.barh(
            ys,
            medians,
            height=height,
            xerr=[lows, highs],
            color=colors[index % len(colors)],
            label=payload_name(size),
            error_kw={"elinewidth": 0.8, "capsize": 1.5},
        )
    axes.set_xscale("log")
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    for tick in axes.get_yticklabels():
        if tick.get_text().startswith("pymq"):
            tick.set_fontweight("bold")
    groups = [next(c.group for c in cases if c.label == label) for label in labels]
    for row in range(1, len(labels)):
        if groups[row] != groups[row - 1]:
            axes.axhline(row - 0.5, color="grey", linewidth=0.6)
    axes.set_ylim(len(labels) - 0.5, -0.5)
    axes.set_xlabel(
        "messages per second: produce N, then drain N (median; bars: lowest to highest)"
    )
    axes.grid(axis="x", which="both", alpha=0.3)
    axes.legend(title="message size", loc="lower right", fontsize=8)
    axes.set_title("pymq and the alternatives on one machine, in one run")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# Main -------------------------------------------------------------------


def parse_only(text: str | None) -> set[str] | None:
    if text is None:
        return None
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(system_keys())
    if unknown:
        raise SystemExit(
            f"--only: unknown {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(system_keys())}"
        )
    return names


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Run pymq and the systems users would pick instead, side by "
        "side, and print tables with ratios against pymq.",
        epilog="Systems (for --only): " + ", ".join(system_keys()),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="100 B only, smaller N and round trips: under 3 minutes",
    )
    parser.add_argument(
        "--json", metavar="FILE", help="write every repeat and the metadata to FILE"
    )
    parser.add_argument(
        "--docs",
        action="store_true",
        help="rewrite the comparison section of docs/benchmarks.md and "
        "docs/images/comparison.png",
    )
    parser.add_argument(
        "--only",
        metavar="NAME,...",
        help="run only these systems (ratios need pymq among them)",
    )
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    only = parse_only(args.only)
    started = time.perf_counter()

    with Workspace() as ws:
        cases, checks = build_cases(budget, only)
        meta = metadata(argv, ws, checks, budget)
        print(f"# compare{' --quick' if args.quick else ''}, {budget.repeats} repeats")
        for line in machine_lines(meta):
            print(f"# {line}")
        for key, reason in meta["skipped_systems"].items():
            print(f"# skipped {key}: {reason}")
        sys.stdout.flush()
        loads = run_cases(cases, ws, budget)

    meta["load_average_end"] = os.getloadavg()
    if loads:
        meta["load_average_during"] = {
            "samples": len(loads),
            "min": min(loads),
            "median": statistics.median(loads),
            "max": max(loads),
        }
    meta["wall_seconds"] = time.perf_counter() - started
    load = " ".join(f"{value:.2f}" for value in meta["load_average_end"])
    print(f"# load average at end: {load}")
    print(f"# wall time: {meta['wall_seconds']:.0f} s")
    print("# " + RATIO_NOTE)
    print("\n".join(report_lines(cases, budget)))
    sys.stdout.flush()

    if args.json:
        Path(args.json).write_text(
            json.dumps(results_json(cases, meta), indent=2) + "\n", encoding="utf-8"
        )
        print(f"# wrote {args.json}")
    if args.docs:
        plot = None
        if importlib.util.find_spec("matplotlib") is None:
            print(
                "# matplotlib is not installed: the page gets no plot", file=sys.stderr
            )
        else:
            plot_cases(cases, budget.sizes, PLOT)
            plot = PLOT.relative_to(DOCS.parent).as_posix()
        update_docs(docs_section(cases, budget, meta, plot))
        print(f"# rewrote the comparison section of {DOCS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
