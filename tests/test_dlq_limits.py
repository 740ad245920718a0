"""Moves to the DLQ at the size limits: message size, reason length."""

from __future__ import annotations

from pathlib import Path

import pytest

import pymq

ONE_MIB = 1 << 20


def open_broker(tmp_path: Path, where: str, **options: int) -> pymq.Broker:
    """Open a broker in memory, or on disk with 1 MiB segments as in memory."""
    if where == "memory":
        return pymq.open(**options)
    return pymq.open(tmp_path / "data", segment_bytes=ONE_MIB, **options)


def largest_body(queue: pymq.Queue) -> bytes:
    return b"x" * queue.stream.store.max_message_bytes


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_largest_message_moves_with_small_segments(tmp_path: Path, where: str) -> None:
    with open_broker(tmp_path, where) as broker:
        jobs = broker.queue("jobs", max_deliveries=1)
        body = largest_body(jobs)
        assert len(body) == ONE_MIB - 32
        jobs.put(body)
        message = jobs.get(timeout=0)
        assert message is not None
        message.nack()
        assert jobs.get(timeout=0) is None
        stats = jobs.stats()
        assert (stats.depth, stats.waiting, stats.dead_lettered) == (0, 0, 1)
        moved = jobs.dlq.get(timeout=0)
        assert moved is not None
        assert moved.body == body
        assert moved.headers["x-reason"] == "nack; max_deliveries reached"
        assert jobs.dlq.stream.store.segment_bytes == ONE_MIB + 4096
        assert jobs.dlq.stream.store.max_message_bytes == ONE_MIB - 32 + 4096


def test_largest_message_moves_after_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # A DLQ made while messages were small has 1 MiB segments.
    with pymq.open(data, segment_bytes=ONE_MIB, max_message_bytes=4096) as broker:
        assert broker.queue("jobs").dlq.stream.store.segment_bytes == ONE_MIB
    with pymq.open(data, segment_bytes=ONE_MIB) as broker:
        jobs = broker.queue("jobs", max_deliveries=1)
        body = largest_body(jobs)
        jobs.put(body)
        assert jobs.get(timeout=0) is not None
        # Closed with the delivery in flight: its one attempt is used up.
    with pymq.open(data, segment_bytes=ONE_MIB) as broker:
        jobs = broker.queue("jobs")
        assert jobs.get(timeout=0) is None
        stats = jobs.stats()
        assert (stats.depth, stats.dead_lettered) == (0, 1)
        moved = jobs.dlq.get(timeout=0)
        assert moved is not None
        assert moved.body == body
        assert moved.headers["x-reason"] == "consumer lost; max_deliveries reached"


def test_open_rejects_message_too_large_for_dlq(tmp_path: Path) -> None:
    with pytest.raises(pymq.ConfigError) as raised:
        pymq.open(
            tmp_path / "data", segment_bytes=1 << 31, max_message_bytes=(1 << 31) - 32
        )
    assert str(raised.value) == (
        "max_message_bytes is 2147483616, too large for a dead-letter queue: its "
        "records take 4096 bytes more, for the headers of a move, and a segment "
        "of 2147487744 bytes for them is rejected (segment_bytes is 2147487744; "
        "it must be from 64 to 2147483648). Use a smaller max_message_bytes."
    )
    assert not (tmp_path / "data").exists()


def test_open_rejects_max_message_bytes_zero(tmp_path: Path) -> None:
    with pytest.raises(pymq.ConfigError) as raised:
        pymq.open(tmp_path / "data", max_message_bytes=0)
    assert str(raised.value) == (
        "max_message_bytes is 0; it must be from 1 to 67108832 (segment_bytes "
        "minus the 32-byte record header)"
    )
    assert not (tmp_path / "data").exists()
