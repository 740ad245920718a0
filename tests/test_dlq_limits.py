"""Moves to the DLQ at the size limits: message size, reason length."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import pymq
import pymq.broker

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


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_largest_message_rejected_with_longest_reason(
    tmp_path: Path, where: str
) -> None:
    with open_broker(tmp_path, where) as broker:
        jobs = broker.queue("a" * 128)
        # The header block of {"kind": "photo"} takes 17 bytes.
        body = largest_body(jobs)[17:]
        jobs.put(body, headers={"kind": "photo"})
        message = jobs.get(timeout=0)
        assert message is not None
        # 4 bytes per character in UTF-8: cut to 250 characters.
        message.reject("\U0001f600" * 1000)
        moved = jobs.dlq.get(timeout=0)
        assert moved is not None
        assert moved.body == body
        assert moved.headers["kind"] == "photo"
        assert moved.headers["x-reason"] == "\U0001f600" * 250 + "..."


@pytest.mark.parametrize(
    ("reason", "stored"),
    [
        ("r" * 1000, "r" * 1000),
        ("r" * 1001, "r" * 1000 + "..."),
        ("\u00e9" * 600, "\u00e9" * 500 + "..."),
        # The 500th "é" would take bytes 1000 and 1001: it is dropped whole.
        ("a" + "\u00e9" * 600, "a" + "\u00e9" * 499 + "..."),
    ],
)
def test_reject_reason_cut_by_utf8_bytes(
    tmp_path: Path, reason: str, stored: str
) -> None:
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs")
        jobs.put(b"bad")
        message = jobs.get(timeout=0)
        assert message is not None
        message.reject(reason)
        moved = jobs.dlq.get(timeout=0)
        assert moved is not None
        assert moved.headers["x-reason"] == stored


def test_reject_unencodable_reason_changes_nothing(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs")
        jobs.put(b"bad")
        message = jobs.get(timeout=0)
        assert message is not None
        with pytest.raises(ValueError) as raised:
            message.reject("bad \udc80 byte")
        assert str(raised.value) == (
            "reason cannot be encoded as UTF-8: character '\\udc80' at index 4 "
            "is a lone surrogate; pass valid text"
        )
        stats = jobs.stats()
        assert (stats.in_flight, stats.waiting, stats.dead_lettered) == (1, 0, 0)
        assert jobs.dlq.stats().depth == 0
        message.reject("bad byte")
        moved = jobs.dlq.get(timeout=0)
        assert moved is not None
        assert moved.headers["x-reason"] == "bad byte"


def test_reject_into_full_dlq_raises_and_keeps_delivery(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs")
        dlq = broker.queue("jobs.dlq", max_length=1)
        dlq.put(b"filler")
        jobs.put(b"bad")
        message = jobs.get(timeout=0)
        assert message is not None
        with pytest.raises(pymq.QueueFull) as raised:
            message.reject("schema mismatch")
        assert str(raised.value) == "queue jobs.dlq is full: max_length 1 messages"
        stats = jobs.stats()
        assert (stats.in_flight, stats.waiting, stats.dead_lettered) == (1, 0, 0)
        assert jobs.get(timeout=0) is None
        filler = dlq.get(timeout=0)
        assert filler is not None
        filler.ack()
        # The same delivery, with the same receipt, can be rejected again.
        message.reject("schema mismatch")
        stats = jobs.stats()
        assert (stats.depth, stats.dead_lettered) == (0, 1)
        moved = dlq.get(timeout=0)
        assert moved is not None
        assert moved.body == b"bad"
        assert moved.headers["x-reason"] == "schema mismatch"
        assert moved.headers["x-attempts"] == "1"


def test_reject_failure_leaves_receipt_usable(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs")
        broker.queue("jobs.dlq", max_length=1).put(b"filler")
        jobs.put(b"bad")
        message = jobs.get(timeout=0)
        assert message is not None
        with pytest.raises(pymq.QueueFull):
            jobs.reject(message.receipt, "schema mismatch")
        jobs.nack(message.receipt)
        again = jobs.get(timeout=0)
        assert again is not None
        assert (again.offset, again.attempt) == (0, 2)


def test_failed_moves_counted_in_next_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read when the queue opens: the first failure is logged, the next ones
    # only counted until the limit is lowered.
    monkeypatch.setattr(pymq.broker, "_ERROR_LOG_SECONDS", 1e9)
    full = "queue jobs.dlq is full: max_length 1 messages"
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs", max_deliveries=1)
        broker.queue("jobs.dlq", max_length=1).put(b"filler")
        jobs.put(b"bad")
        with caplog.at_level(logging.ERROR, logger="pymq.broker"):
            message = jobs.get(timeout=0)
            assert message is not None
            message.nack()
            # Each get tries the move again, and it fails again.
            assert jobs.get(timeout=0) is None
            assert jobs.get(timeout=0) is None
            monkeypatch.setattr(pymq.broker, "_ERROR_LOG_SECONDS", 0.0)
            assert jobs.get(timeout=0) is None
        errors = [
            record.getMessage()
            for record in caplog.records
            if record.levelno == logging.ERROR
        ]
        assert errors == [
            f"moving message 0 of jobs to jobs.dlq failed: {full}",
            f"moving message 0 of jobs to jobs.dlq failed: {full} (2 more moves "
            f"from jobs failed since the last of these errors was logged)",
        ]
        stats = jobs.stats()
        assert (stats.depth, stats.waiting, stats.dead_lettered) == (1, 1, 0)
        filler = jobs.dlq.get(timeout=0)
        assert filler is not None
        filler.ack()
        assert jobs.get(timeout=0) is None
        stats = jobs.stats()
        assert (stats.depth, stats.dead_lettered) == (0, 1)
