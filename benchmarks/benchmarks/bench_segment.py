"""asv benchmarks of the segment store, one class per operation.

The installed asv_runner calls setup before every sample and teardown after
it, so each sample times a fresh store in a fresh temporary folder. The
"batch" parameter is the number of messages a timed call handles: single
appends and reads loop over that many calls, batch appends pass that many
bodies per call. A batch append sample writes 1.25 default 64 MiB segments,
so every sample rolls over into a fresh segment.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

from .common import (
    FSYNC_POLICIES,
    FSYNC_PROBE_BYTES,
    PAYLOAD_SIZES,
    SEED,
    Scratch,
    append_threads,
    fill_store,
    open_store,
    packed_payloads,
    payloads,
    rollover_calls,
)

SINGLE_BATCHES = [1000]
BATCHES = [100, 1000]
GROUP_THREADS = [1, 8]
# Seconds a group commit sample may run before its threads stop early.
GROUP_MAX_SECONDS = 30.0


class StoreBenchmark:
    """Settings shared by the classes: fresh store per sample, bounded time."""

    # A sample of the slow cases (fsync="always", 64 KiB bodies) can take
    # seconds; asv stops a benchmark that runs longer than this.
    timeout = 300.0
    # At least 3 samples, at most 10, and no new one after 10 seconds.
    repeat = (3, 10, 10.0)
    warmup_time = 0.0
    rounds = 1

    scratch: Scratch | None = None
    store = None

    def open(self, fsync: str) -> None:
        self.scratch = Scratch()
        self.store = open_store(self.scratch, fsync)

    def teardown(self, *params: object) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.scratch is not None:
            self.scratch.remove()
            self.scratch = None


class Append(StoreBenchmark):
    """SegmentStore.append, one call per message."""

    params: ClassVar[list[Sequence[object]]] = [
        PAYLOAD_SIZES,
        SINGLE_BATCHES,
        list(FSYNC_POLICIES),
    ]
    param_names: ClassVar[list[str]] = ["payload", "batch", "fsync"]

    def setup(self, payload: int, batch: int, fsync: str) -> None:
        self.bodies = payloads(payload, batch)
        self.open(fsync)

    def time_append(self, payload: int, batch: int, fsync: str) -> None:
        for body in self.bodies:
            self.store.append(body)

    def peakmem_append(self, payload: int, batch: int, fsync: str) -> None:
        for body in self.bodies:
            self.store.append(body)


class AppendMany(StoreBenchmark):
    """SegmentStore.append_many of a list, through a segment rollover."""

    params: ClassVar[list[Sequence[object]]] = [
        PAYLOAD_SIZES,
        BATCHES,
        list(FSYNC_POLICIES),
    ]
    param_names: ClassVar[list[str]] = ["payload", "batch", "fsync"]

    def setup(self, payload: int, batch: int, fsync: str) -> None:
        self.bodies = payloads(payload, batch)
        self.calls = range(rollover_calls(payload, batch))
        self.open(fsync)

    def time_append_many(self, payload: int, batch: int, fsync: str) -> None:
        for _ in self.calls:
            self.store.append_many(self.bodies)

    def peakmem_append_many(self, payload: int, batch: int, fsync: str) -> None:
        for _ in self.calls:
            self.store.append_many(self.bodies)


class AppendBuffer(StoreBenchmark):
    """SegmentStore.append_buffer of one buffer and numpy lengths, with rollover."""

    params: ClassVar[list[Sequence[object]]] = [
        PAYLOAD_SIZES,
        BATCHES,
        list(FSYNC_POLICIES),
    ]
    param_names: ClassVar[list[str]] = ["payload", "batch", "fsync"]

    def setup(self, payload: int, batch: int, fsync: str) -> None:
        self.buffer, self.lengths = packed_payloads(payload, batch)
        self.calls = range(rollover_calls(payload, batch))
        self.open(fsync)

    def time_append_buffer(self, payload: int, batch: int, fsync: str) -> None:
        for _ in self.calls:
            self.store.append_buffer(self.buffer, self.lengths)

    def peakmem_append_buffer(self, payload: int, batch: int, fsync: str) -> None:
        for _ in self.calls:
            self.store.append_buffer(self.buffer, self.lengths)


class GroupCommit(StoreBenchmark):
    """SegmentStore.append with fsync="always" from 1 or 8 threads at once."""

    params: ClassVar[list[Sequence[object]]] = [[100], [800], GROUP_THREADS]
    param_names: ClassVar[list[str]] = ["payload", "batch", "threads"]

    def setup(self, payload: int, batch: int, threads: int) -> None:
        self.bodies = payloads(payload, batch)
        self.open("always")

    def time_append(self, payload: int, batch: int, threads: int) -> None:
        append_threads(self.store, self.bodies, threads, GROUP_MAX_SECONDS)

    def peakmem_append(self, payload: int, batch: int, threads: int) -> None:
        append_threads(self.store, self.bodies, threads, GROUP_MAX_SECONDS)


class FsyncCeiling(StoreBenchmark):
    """One 4 KiB os.write + os.fsync on a file: the disk's sync rate."""

    def setup(self) -> None:
        self.scratch = Scratch()
        self.block = payloads(FSYNC_PROBE_BYTES, 1, SEED)[0]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self.fd = os.open(self.scratch.path / "fsync-probe", flags, 0o644)

    def teardown(self) -> None:
        os.close(self.fd)
        super().teardown()

    def time_write_fsync(self) -> None:
        os.write(self.fd, self.block)
        os.fsync(self.fd)

    def peakmem_write_fsync(self) -> None:
        os.write(self.fd, self.block)
        os.fsync(self.fd)


class ReadBenchmark(StoreBenchmark):
    """A store filled with batch records of payload bytes, before timing."""

    params: ClassVar[list[Sequence[object]]] = [PAYLOAD_SIZES, BATCHES]
    param_names: ClassVar[list[str]] = ["payload", "batch"]

    def setup(self, payload: int, batch: int) -> None:
        self.open("never")
        fill_store(self.store, payload, batch)
        self.offsets = range(batch)


class Read(ReadBenchmark):
    """SegmentStore.read, one call per message, copying the body."""

    params: ClassVar[list[Sequence[object]]] = [PAYLOAD_SIZES, SINGLE_BATCHES]

    def time_read(self, payload: int, batch: int) -> None:
        for offset in self.offsets:
            self.store.read(offset)

    def peakmem_read(self, payload: int, batch: int) -> None:
        for offset in self.offsets:
            self.store.read(offset)


class ReadView(ReadBenchmark):
    """SegmentStore.read_view, one call per message, without a copy."""

    params: ClassVar[list[Sequence[object]]] = [PAYLOAD_SIZES, SINGLE_BATCHES]

    def time_read_view(self, payload: int, batch: int) -> None:
        for offset in self.offsets:
            self.store.read_view(offset)

    def peakmem_read_view(self, payload: int, batch: int) -> None:
        for offset in self.offsets:
            self.store.read_view(offset)


class ReadRange(ReadBenchmark):
    """SegmentStore.read_range of batch offsets in one call."""

    def time_read_range(self, payload: int, batch: int) -> None:
        self.store.read_range(0, batch)

    def peakmem_read_range(self, payload: int, batch: int) -> None:
        self.store.read_range(0, batch)


class ReadViews(ReadBenchmark):
    """SegmentStore.read_views of batch offsets in one call."""

    def time_read_views(self, payload: int, batch: int) -> None:
        self.store.read_views(0, batch)

    def peakmem_read_views(self, payload: int, batch: int) -> None:
        self.store.read_views(0, batch)
