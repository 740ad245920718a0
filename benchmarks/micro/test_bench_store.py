"""Micro benchmarks of SegmentStore appends, reads and the disk's fsync rate.

Each test times a fixed number of rounds with benchmark.pedantic. A round
handles extra_info["messages_per_round"] messages, so messages per second
are that count divided by the round time. Batch appends run enough rounds
to roll over from the first 64 MiB segment into a fresh one, and check it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest

from benchmarks.benchmarks.common import (
    FSYNC_POLICIES,
    FSYNC_PROBE_BYTES,
    PAYLOAD_SIZES,
    Scratch,
    append_threads,
    batch_size,
    fill_store,
    packed_payloads,
    payloads,
    record_bytes,
    rollover_calls,
)

# Record bytes a single-append test writes over all its rounds, at most.
SINGLE_VOLUME = 64 << 20
MIN_ROUNDS = 5
MAX_ROUNDS = 200
# With fsync="always" every append waits for the disk.
ALWAYS_MESSAGES = 50
ALWAYS_ROUNDS = 20
GROUP_MESSAGES_PER_THREAD = 100
GROUP_ROUNDS = 5
GROUP_MAX_SECONDS = 30.0
READ_ROUNDS = 50
PROBE_ROUNDS = 200


def payload_id(size: int) -> str:
    return f"{size // 1024}KiB" if size >= 1024 else f"{size}B"


payload_sizes = pytest.mark.parametrize("payload", PAYLOAD_SIZES, ids=payload_id)
fsync_policies = pytest.mark.parametrize("fsync", FSYNC_POLICIES)


def append_each(append: Callable[[bytes], int], bodies: Sequence[bytes]) -> None:
    for body in bodies:
        append(body)


def read_each(read: Callable[[int], object], count: int) -> None:
    for offset in range(count):
        read(offset)


def single_rounds(payload: int, messages: int) -> int:
    rounds = SINGLE_VOLUME // (record_bytes(payload) * messages)
    return max(MIN_ROUNDS, min(MAX_ROUNDS, rounds))


@pytest.mark.benchmark(group="append")
@fsync_policies
@payload_sizes
def test_append(benchmark, make_store, payload: int, fsync: str) -> None:
    store = make_store(fsync)
    if fsync == "always":
        bodies = payloads(payload, ALWAYS_MESSAGES)
        rounds = ALWAYS_ROUNDS
    else:
        bodies = payloads(payload, batch_size(payload))
        rounds = single_rounds(payload, len(bodies))
    benchmark.extra_info["messages_per_round"] = len(bodies)
    benchmark.pedantic(
        append_each, args=(store.append, bodies), rounds=rounds, iterations=1
    )
    assert store.next_offset == rounds * len(bodies)


@pytest.mark.benchmark(group="group commit")
@pytest.mark.parametrize("threads", [1, 8])
def test_append_always_threads(benchmark, make_store, threads: int) -> None:
    store = make_store("always")
    bodies = payloads(100, threads * GROUP_MESSAGES_PER_THREAD)
    benchmark.extra_info["messages_per_round"] = len(bodies)
    benchmark.pedantic(
        append_threads,
        args=(store, bodies, threads, GROUP_MAX_SECONDS),
        rounds=GROUP_ROUNDS,
        iterations=1,
    )


@pytest.mark.benchmark(group="append_many")
@fsync_policies
@payload_sizes
def test_append_many(benchmark, make_store, payload: int, fsync: str) -> None:
    store = make_store(fsync)
    bodies = payloads(payload, batch_size(payload))
    benchmark.extra_info["messages_per_round"] = len(bodies)
    benchmark.pedantic(
        store.append_many,
        args=(bodies,),
        rounds=rollover_calls(payload, len(bodies)),
        iterations=1,
    )
    assert store.stats()["segments"] >= 2


@pytest.mark.benchmark(group="append_buffer")
@fsync_policies
@payload_sizes
def test_append_buffer(benchmark, make_store, payload: int, fsync: str) -> None:
    store = make_store(fsync)
    batch = batch_size(payload)
    buffer, lengths = packed_payloads(payload, batch)
    benchmark.extra_info["messages_per_round"] = batch
    benchmark.pedantic(
        store.append_buffer,
        args=(buffer, lengths),
        rounds=rollover_calls(payload, batch),
        iterations=1,
    )
    assert store.stats()["segments"] >= 2


@pytest.mark.benchmark(group="read")
@pytest.mark.parametrize("operation", ["read", "read_view"])
@payload_sizes
def test_read_single(benchmark, make_store, payload: int, operation: str) -> None:
    store = make_store("never")
    count = batch_size(payload)
    fill_store(store, payload, count)
    benchmark.extra_info["messages_per_round"] = count
    benchmark.pedantic(
        read_each,
        args=(getattr(store, operation), count),
        rounds=READ_ROUNDS,
        iterations=1,
    )


@pytest.mark.benchmark(group="read batch")
@pytest.mark.parametrize("operation", ["read_range", "read_views"])
@payload_sizes
def test_read_batch(benchmark, make_store, payload: int, operation: str) -> None:
    store = make_store("never")
    count = batch_size(payload)
    fill_store(store, payload, count)
    benchmark.extra_info["messages_per_round"] = count
    result = benchmark.pedantic(
        getattr(store, operation), args=(0, count), rounds=READ_ROUNDS, iterations=1
    )
    assert len(result) == count


@pytest.mark.benchmark(group="fsync ceiling")
def test_fsync_ceiling(benchmark, scratch: Scratch) -> None:
    block = payloads(FSYNC_PROBE_BYTES, 1)[0]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(scratch.path / "fsync-probe", flags, 0o644)

    def write_fsync() -> None:
        os.write(fd, block)
        os.fsync(fd)

    try:
        benchmark.extra_info["messages_per_round"] = 1
        benchmark.pedantic(write_fsync, rounds=PROBE_ROUNDS, iterations=1)
    finally:
        os.close(fd)
