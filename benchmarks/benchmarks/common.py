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
from collections.abc import Callable, Sequence
from pathlib import Path

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
