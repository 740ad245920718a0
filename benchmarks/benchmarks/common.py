"""Pieces shared by the segment store benchmarks.

Seeded payloads, scratch folders that are deleted afterwards, and the
timed loops that asv, pytest-benchmark and run_store.py all use. Every loop
here is bounded in count, and the long ones also by a deadline.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

# The benchmarks call no BLAS routine. Yet an OpenBLAS worker thread that
# numpy starts spun on a core through whole runs, taking time from the
# systems under test: about 5% of the samples of `perf record` of a server
# benchmark client on 2 cores. Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

import pymq
from pymq.storage import DEFAULT_SEGMENT_BYTES

PAYLOAD_SIZES = (16, 100, 1024, 65536)
FSYNC_POLICIES = ("never", "interval", "always")
SEED = 20240917

# Record header bytes and alignment, from the record layout in segment.pxd.
RECORD_HEADER_BYTES = 32
RECORD_ALIGN = 8

# A batch call carries about this many payload bytes.
BATCH_TARGET_BYTES = 1 << 20
MIN_BATCH = 16
MAX_BATCH = 10_000

# Distinct bodies per payload list; longer lists repeat these objects.
POOL_BYTES = 4 << 20

# Size of the block written and synced by the fsync ceiling probe.
FSYNC_PROBE_BYTES = 4096

# Environment variable naming the folder that scratch folders go under, so
# that a run can measure a chosen disk. Unset, they go in the system's
# temporary folder.
SCRATCH_ENV = "PYMQ_BENCH_DIR"


def record_bytes(payload: int) -> int:
    """Return the bytes one record of payload bytes takes in a segment."""
    padded = (payload + RECORD_ALIGN - 1) // RECORD_ALIGN * RECORD_ALIGN
    return RECORD_HEADER_BYTES + padded


def batch_size(payload: int) -> int:
    """Return the records per batch call: about 1 MiB, 16 to 10 000."""
    return max(MIN_BATCH, min(MAX_BATCH, BATCH_TARGET_BYTES // payload))


def rollover_calls(payload: int, batch: int, segments: float = 1.25) -> int:
    """Return how many calls of batch records fill this many default segments.

    With segments above 1 the calls roll over into at least one fresh
    segment.
    """
    per_call = record_bytes(payload) * batch
    return int(segments * DEFAULT_SEGMENT_BYTES) // per_call + 1


def payloads(size: int, count: int, seed: int = SEED) -> list[bytes]:
    """Return count bodies of size random bytes, the same on every run.

    Up to POOL_BYTES of the bodies are distinct objects. The rest of the
    list repeats them, so a long list costs little memory.
    """
    distinct = max(1, min(count, POOL_BYTES // size))
    blob = random.Random(seed).randbytes(distinct * size)
    pool = [blob[i * size : (i + 1) * size] for i in range(distinct)]
    repeats, rest = divmod(count, distinct)
    return pool * repeats + pool[:rest]


def packed_payloads(
    size: int, count: int, seed: int = SEED
) -> tuple[bytes, np.ndarray]:
    """Return count bodies packed in one buffer and their int64 lengths."""
    buffer = random.Random(seed).randbytes(size * count)
    return buffer, np.full(count, size, dtype=np.int64)


class Scratch:
    """A temporary folder for one benchmark; remove() deletes it and its files."""

    def __init__(self, prefix: str = "pymq-bench-") -> None:
        parent = os.environ.get(SCRATCH_ENV) or None
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def open_store(scratch: Scratch, fsync: str) -> pymq.SegmentStore:
    """Open a store in scratch with default segments and flush interval.

    It goes through pymq.open_store, so "interval" gets its background
    flush thread as in an application.
    """
    return pymq.open_store(scratch.path / "log", fsync=fsync)


def fill_store(store: pymq.SegmentStore, size: int, count: int) -> None:
    """Append count seeded records of size bytes, in batches."""
    batch = batch_size(size)
    buffer, lengths = packed_payloads(size, batch)
    for first in range(0, count, batch):
        n = min(batch, count - first)
        store.append_buffer(buffer[: n * size], lengths[:n])


def fsync_latencies(folder: Path, count: int, max_seconds: float) -> list[float]:
    """Time count 4 KiB os.write + os.fsync pairs on a new file in folder.

    Each write appends to the file, so each sync also commits the new file
    size. Stops early past max_seconds. Returns the seconds of each pair.
    """
    block = random.Random(SEED).randbytes(FSYNC_PROBE_BYTES)
    path = folder / "fsync-probe"
    latencies = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.perf_counter() + max_seconds
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            end = time.perf_counter()
            latencies.append(end - start)
            if end > deadline:
                break
    finally:
        os.close(fd)
        path.unlink()
    return latencies


def append_each(
    store: pymq.SegmentStore, bodies: Sequence[bytes], deadline: float
) -> int:
    """Append bodies one call each until done or past deadline; return count.

    The deadline is checked every 1024 appends, so the loop adds almost
    nothing to the cost of a call.
    """
    append = store.append
    done = 0
    for start in range(0, len(bodies), 1024):
        for body in bodies[start : start + 1024]:
            append(body)
        done = min(start + 1024, len(bodies))
        if time.perf_counter() > deadline:
            break
    return done


def append_threads(
    store: pymq.SegmentStore,
    bodies: Sequence[bytes],
    threads: int,
    max_seconds: float,
) -> tuple[int, float]:
    """Append bodies from threads threads at once, one append per body.

    The bodies are split evenly between the threads, which start together
    and each stop at max_seconds. Returns (appends done, seconds from the
    start to the last thread's end).
    """
    share = len(bodies) // threads
    counts = [0] * threads
    errors: list[BaseException] = []
    start_line = threading.Barrier(threads + 1)

    def produce(index: int) -> None:
        mine = bodies[index * share : (index + 1) * share]
        append = store.append
        start_line.wait()
        deadline = time.perf_counter() + max_seconds
        try:
            for done, body in enumerate(mine, 1):
                append(body)
                counts[index] = done
                if done % 64 == 0 and time.perf_counter() > deadline:
                    break
        except BaseException as exc:
            errors.append(exc)

    workers = [
        threading.Thread(target=produce, args=(i,), name=f"bench-producer-{i}")
        for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    start_line.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(counts), elapsed


def call_batches(call: Callable[[], object], calls: int, deadline: float) -> int:
    """Run call calls times or until past deadline; return the calls run."""
    for done in range(1, calls + 1):
        call()
        if time.perf_counter() > deadline:
            return done
    return calls


# Embedded broker --------------------------------------------------------

BROKER_PAYLOAD_SIZES = (100, 1024, 65536)
# Messages per put_many, get_many and ack_many call in the batch form.
QUEUE_BATCH = 100
# Deliveries in flight stay at or below QUEUE_BATCH; this only states the
# limit instead of relying on the default.
QUEUE_MAX_IN_FLIGHT = 10_000
QUEUE_NAME = "jobs"
# Loops check their deadline once per this many messages.
CHECK_EVERY = 1024


def open_broker(scratch: Scratch, fsync: str) -> tuple[pymq.Broker, pymq.Queue]:
    """Open a broker in scratch and its queue "jobs"; close the broker after."""
    broker = pymq.open(scratch.path / "broker", fsync=fsync)
    try:
        queue = broker.queue(QUEUE_NAME, max_in_flight=QUEUE_MAX_IN_FLIGHT)
    except BaseException:
        broker.close()
        raise
    return broker, queue


def batches(bodies: Sequence[bytes], size: int = QUEUE_BATCH) -> list[list[bytes]]:
    """Split bodies into lists of size bodies (the last may be shorter)."""
    return [list(bodies[i : i + size]) for i in range(0, len(bodies), size)]


def put_each(queue: pymq.Queue, bodies: Sequence[bytes], deadline: float) -> int:
    """Put bodies one call each until done or past deadline; return count."""
    put = queue.put
    done = 0
    for start in range(0, len(bodies), CHECK_EVERY):
        for body in bodies[start : start + CHECK_EVERY]:
            put(body)
        done = min(start + CHECK_EVERY, len(bodies))
        if time.perf_counter() > deadline:
            break
    return done


def get_ack_each(queue: pymq.Queue, count: int, deadline: float) -> int:
    """Get and ack count messages one at a time; return the messages acked.

    Raises RuntimeError when the queue is empty before count messages.
    """
    get = queue.get_nowait
    done = 0
    for start in range(0, count, CHECK_EVERY):
        stop = min(start + CHECK_EVERY, count)
        for _ in range(start, stop):
            message = get()
            if message is None:
                raise RuntimeError(f"queue empty after {done} of {count} messages")
            message.ack()
            done += 1
        if time.perf_counter() > deadline:
            break
    return done


def put_get_ack_each(
    queue: pymq.Queue, bodies: Sequence[bytes], deadline: float
) -> int:
    """Put, get and ack one message at a time for each body; return count."""
    put = queue.put
    get = queue.get_nowait
    done = 0
    for start in range(0, len(bodies), CHECK_EVERY):
        for body in bodies[start : start + CHECK_EVERY]:
            put(body)
            message = get()
            if message is None:
                raise RuntimeError(f"queue empty right after put {done + 1}")
            message.ack()
        done = min(start + CHECK_EVERY, len(bodies))
        if time.perf_counter() > deadline:
            break
    return done


def put_batches(
    queue: pymq.Queue, chunks: Sequence[list[bytes]], deadline: float
) -> int:
    """Call put_many once per chunk until done or past deadline; return count."""
    put_many = queue.put_many
    done = 0
    for chunk in chunks:
        put_many(chunk)
        done += len(chunk)
        if time.perf_counter() > deadline:
            break
    return done


def get_ack_batches(
    queue: pymq.Queue,
    count: int,
    deadline: float,
    size: int = QUEUE_BATCH,
    columns: bool = False,
) -> int:
    """Drain count messages with get_many(size) and ack_many; return count.

    With columns, get_batch (numpy columns, one body buffer) replaces
    get_many. Raises RuntimeError when the queue is empty before count
    messages.
    """
    get_many = queue.get_batch if columns else queue.get_many
    ack_many = queue.ack_many
    done = 0
    while done < count:
        messages = get_many(min(size, count - done), timeout=0)
        if not len(messages):
            raise RuntimeError(f"queue empty after {done} of {count} messages")
        ack_many(messages)
        done += len(messages)
        if time.perf_counter() > deadline:
            break
    return done


def put_get_ack_batches(
    queue: pymq.Queue,
    chunks: Sequence[list[bytes]],
    deadline: float,
    columns: bool = False,
) -> int:
    """For each chunk: put_many, get_many of as many, ack_many; return count.

    With columns, get_batch replaces get_many.
    """
    put_many = queue.put_many
    get_many = queue.get_batch if columns else queue.get_many
    ack_many = queue.ack_many
    done = 0
    for chunk in chunks:
        put_many(chunk)
        messages = get_many(len(chunk), timeout=0)
        if len(messages) != len(chunk):
            raise RuntimeError(
                f"get_many returned {len(messages)} of {len(chunk)} messages"
            )
        ack_many(messages)
        done += len(chunk)
        if time.perf_counter() > deadline:
            break
    return done


def call_threads(
    call: Callable[[bytes], object],
    bodies: Sequence[bytes],
    threads: int,
    max_seconds: float,
) -> tuple[int, float]:
    """Call call(body) from threads threads at once, once per body.

    The bodies are split evenly between the threads, which start together
    and each stop at max_seconds. Returns (calls done, seconds from the
    start to the last thread's end).
    """
    share = len(bodies) // threads
    counts = [0] * threads
    errors: list[BaseException] = []
    start_line = threading.Barrier(threads + 1)

    def work(index: int) -> None:
        mine = bodies[index * share : (index + 1) * share]
        start_line.wait()
        deadline = time.perf_counter() + max_seconds
        try:
            for done, body in enumerate(mine, 1):
                call(body)
                counts[index] = done
                if done % 64 == 0 and time.perf_counter() > deadline:
                    break
        except BaseException as exc:
            errors.append(exc)

    workers = [
        threading.Thread(target=work, args=(i,), name=f"bench-thread-{i}")
        for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    start_line.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(counts), elapsed


def produce_consume(
    put: Callable[[bytes], object],
    get: Callable[[], object],
    bodies: Sequence[bytes],
    deadline: float,
) -> tuple[int, float, float]:
    """Put every body, then get as many, with the callables of an in-process queue.

    Returns (messages, seconds of the puts, seconds of the gets). The
    deadline is checked once per CHECK_EVERY messages.
    """
    start = time.perf_counter()
    done = 0
    for first in range(0, len(bodies), CHECK_EVERY):
        for body in bodies[first : first + CHECK_EVERY]:
            put(body)
        done = min(first + CHECK_EVERY, len(bodies))
        if time.perf_counter() > deadline:
            break
    middle = time.perf_counter()
    for first in range(0, done, CHECK_EVERY):
        for _ in range(first, min(first + CHECK_EVERY, done)):
            get()
    end = time.perf_counter()
    return done, middle - start, end - middle


def put_then_get(
    put: Callable[[bytes], object],
    get: Callable[[], object],
    bodies: Sequence[bytes],
    deadline: float,
) -> int:
    """Put one body and get it back, for each body; return the count."""
    done = 0
    for first in range(0, len(bodies), CHECK_EVERY):
        for body in bodies[first : first + CHECK_EVERY]:
            put(body)
            get()
        done = min(first + CHECK_EVERY, len(bodies))
        if time.perf_counter() > deadline:
            break
    return done


def anonymous_rss() -> int | None:
    """Return this process's resident anonymous memory in bytes, or None.

    RssAnon in /proc/self/status leaves out pages of mapped files and the
    page cache, so the mapped segments do not count. None where the file
    or the field is missing (not Linux).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def folder_bytes(folder: Path) -> int:
    """Return the bytes of disk the files under folder take (st_blocks)."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            total += path.stat().st_blocks * 512
    return total


def backlog_heap(
    folder: str, payload: int, backlog_bytes: int, max_seconds: float
) -> dict[str, float]:
    """Fill a queue with about backlog_bytes of records and measure the heap.

    Opens a broker in folder with fsync="never", puts batches of seeded
    bodies until the records pass backlog_bytes (or max_seconds pass),
    gets and acks 100 messages, then closes the broker, reopens it and gets
    and acks 100 more. Run it in a fresh process: the figures are that
    process's RssAnon (see anonymous_rss) and tracemalloc's traced memory,
    in bytes, taken before the broker opens, after the fill and after the
    reopen. tracemalloc counts only allocations made through Python's
    allocators, not the core's own malloc calls.
    """
    tracemalloc.start()
    bodies = payloads(payload, batch_size(payload))
    calls = backlog_bytes // (record_bytes(payload) * len(bodies)) + 1
    deadline = time.perf_counter() + max_seconds
    rss_before = anonymous_rss() or 0
    traced_before = tracemalloc.get_traced_memory()[0]

    broker = pymq.open(folder, fsync="never")
    try:
        queue = broker.queue(QUEUE_NAME, max_in_flight=QUEUE_MAX_IN_FLIGHT)
        put = 0
        for _ in range(calls):
            queue.put_many(bodies)
            put += len(bodies)
            if time.perf_counter() > deadline:
                break
        get_ack_each(queue, 100, deadline)
        rss_filled = anonymous_rss() or 0
        traced_filled = tracemalloc.get_traced_memory()[0]
    finally:
        broker.close()

    start = time.perf_counter()
    broker = pymq.open(folder, fsync="never")
    try:
        queue = broker.queue(QUEUE_NAME)
        open_seconds = time.perf_counter() - start
        get_ack_each(queue, 100, deadline + max_seconds)
        depth = queue.stats().depth
        rss_reopened = anonymous_rss() or 0
        traced_reopened, traced_peak = tracemalloc.get_traced_memory()
    finally:
        broker.close()
    tracemalloc.stop()
    return {
        "messages": put,
        "depth": depth,
        "disk_bytes": folder_bytes(Path(folder)),
        "open_seconds": open_seconds,
        "rss_before": rss_before,
        "rss_filled": rss_filled,
        "rss_reopened": rss_reopened,
        "traced_before": traced_before,
        "traced_filled": traced_filled,
        "traced_reopened": traced_reopened,
        "traced_peak": traced_peak,
    }
