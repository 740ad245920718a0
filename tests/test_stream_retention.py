"""Retention of streams: max_bytes and max_age delete whole old segments."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import pymq


@pytest.fixture
def broker(tmp_path: Path):
    with pymq.open(tmp_path / "data", segment_bytes=4096) as opened:
        yield opened


def log_files(broker: pymq.Broker, stream: str) -> list[str]:
    folder = broker.path / "streams" / stream / "log"
    return sorted(path.name for path in folder.glob("*.log"))


def test_max_bytes_deletes_oldest_segments(broker: pymq.Broker) -> None:
    events = broker.stream("events", max_bytes=10_000)
    events.put_many([b"x" * 96] * 200)  # 128 bytes a record, 32 a segment
    assert len(log_files(broker, "events")) == 7
    deleted = broker.apply_retention()
    assert deleted == 4
    assert len(log_files(broker, "events")) == 3
    assert events.store.stored_bytes <= 10_000
    assert events.store.first_offset == 128


def test_max_bytes_keeps_active_segment(broker: pymq.Broker) -> None:
    events = broker.stream("events", max_bytes=100)
    events.put_many([b"x" * 96] * 10)
    assert broker.apply_retention() == 0
    assert events.store.first_offset == 0


def test_group_behind_retention_resumes_and_counts(broker: pymq.Broker) -> None:
    events = broker.stream("events", max_bytes=10_000)
    billing = events.group("billing")
    events.put_many([b"%d" % number for number in range(200)])
    first = billing.get_nowait()
    assert first is not None
    assert first.offset == 0
    events.put_many([b"x" * 96] * 200)
    broker.apply_retention()
    kept = events.store.first_offset
    assert kept > 1
    message = billing.get_nowait()
    assert message is not None
    assert message.offset == kept
    # The delivery of offset 0 was never acked, so it counts as skipped too.
    assert billing.stats().skipped == kept
    with pytest.raises(pymq.StaleReceiptError):
        first.ack()


def test_max_age_deletes_old_segments(broker: pymq.Broker) -> None:
    events = broker.stream("events", max_age=0.2)
    events.put_many([b"x" * 96] * 100)
    time.sleep(0.3)
    events.put_many([b"y" * 96] * 40)
    deleted = broker.apply_retention()
    assert deleted == 3
    assert events.store.read(events.store.first_offset).startswith(b"x")


def test_retention_runs_in_background(broker: pymq.Broker) -> None:
    events = broker.stream("events", max_bytes=5_000)
    events.put_many([b"x" * 96] * 200)
    deadline = time.monotonic() + 5
    while len(log_files(broker, "events")) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    # Six full segments of 4096 bytes and the active one of 1024: only the
    # active one fits under 5000 bytes.
    assert log_files(broker, "events") == ["00000000000000000192.log"]


def test_retention_options_stored(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        broker.stream("events", max_age=3600.0, max_bytes=1 << 30)
    with pymq.open(tmp_path / "data") as broker:
        broker.stream("events")
        assert broker._retention["events"] == (3600.0, 1 << 30)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_age": 0}, pymq.ConfigError, "max_age is 0 seconds"),
        ({"max_age": "1d"}, TypeError, "max_age must be a number"),
        ({"max_bytes": 0}, pymq.ConfigError, "max_bytes is 0"),
    ],
)
def test_retention_invalid_values_raise(
    broker: pymq.Broker, options: dict[str, object], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        broker.stream("events", **options)
