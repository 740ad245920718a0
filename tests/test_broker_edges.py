"""Edge cases of the embedded broker: bad input, limits and shutdown."""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from pathlib import Path

import pytest

import pymq


@pytest.fixture
def broker(tmp_path: Path):
    with pymq.open(tmp_path / "data") as opened:
        yield opened


def test_close_during_dead_letter_get_finishes(tmp_path: Path) -> None:
    broker = pymq.open(tmp_path / "data")
    for number in range(50):
        broker.queue(f"other{number}")
    jobs = broker.queue("jobs", visibility_timeout=0.3, max_deliveries=1)
    jobs.put(b"expires")
    assert jobs.get_nowait() is not None
    outcome: list[object] = []

    def wait_for_message() -> None:
        try:
            outcome.append(jobs.get(timeout=5))
        except pymq.ClosedError as exc:
            outcome.append(exc)

    getter = threading.Thread(target=wait_for_message)
    getter.start()
    time.sleep(0.25)
    broker.close()
    getter.join(timeout=10)
    assert not getter.is_alive()
    assert len(outcome) == 1


def test_group_start_past_end_raises(broker: pymq.Broker) -> None:
    events = broker.stream("events")
    events.put(b"one")
    with pytest.raises(pymq.ConfigError, match="start offset 1000000 is past the end"):
        events.group("far", start=1_000_000)
    assert events.store.next_offset == 1
    assert not (broker.path / "streams" / "events" / "groups" / "far").exists()


def test_ack_many_message_of_other_queue_raises(broker: pymq.Broker) -> None:
    first = broker.queue("first")
    second = broker.queue("second")
    first.put(b"a")
    second.put(b"b")
    foreign = first.get_nowait()
    own = second.get_nowait()
    assert foreign is not None
    assert own is not None
    with pytest.raises(pymq.StaleReceiptError, match="delivered by another queue"):
        second.ack_many([foreign])
    assert second.stats().in_flight == 1
    own.ack()
    assert second.stats().in_flight == 0


def test_get_many_large_count_returns_what_fits(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data", segment_bytes=1 << 20) as broker:
        jobs = broker.queue("jobs", max_in_flight=200_000)
        jobs.put_many([b"x"] * 100_000)
        batch = jobs.get_many(100_000, timeout=0)
        assert 0 < len(batch) < 100_000
        assert jobs.stats().in_flight == len(batch)
        assert [message.offset for message in batch] == list(range(len(batch)))


def test_long_queue_name_dead_letters(broker: pymq.Broker) -> None:
    name = "q" * 128
    jobs = broker.queue(name, max_deliveries=1)
    jobs.put(b"poison")
    message = jobs.get_nowait()
    assert message is not None
    message.reject("bad")
    dead = jobs.dlq.get_nowait()
    assert dead is not None
    assert dead.headers["x-source"] == name


def test_dlq_name_taken_by_stream_raises(broker: pymq.Broker) -> None:
    # stream() rejects names ending in .dlq, but a folder written by an
    # older version may hold such a stream.
    folder = broker.path / "streams" / "jobs.dlq"
    folder.mkdir(parents=True)
    (folder / "kind").write_text("stream")
    with pytest.raises(pymq.ConfigError, match="a stream of that name exists"):
        broker.queue("jobs")
    assert not (broker.path / "streams" / "jobs").exists()


def test_put_int_body_with_headers_raises(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    with pytest.raises(TypeError):
        jobs.put(1000, headers={"kind": "x"})  # type: ignore[arg-type]
    assert jobs.stream.store.next_offset == 0


def test_header_value_not_str_named(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    with pytest.raises(TypeError, match="value of header 'kind' must be str, not int"):
        jobs.put(b"x", headers={"kind": 1})  # type: ignore[dict-item]


def test_too_many_headers_raise_value_error(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    headers = {f"h{number}": "" for number in range(70_000)}
    with pytest.raises(ValueError, match="70000 headers; the maximum is 65535"):
        jobs.put(b"x", headers=headers)


def test_memory_broker_rejects_fsync_always() -> None:
    with pytest.raises(pymq.ConfigError, match="cannot sync"):
        pymq.open(fsync="always")


def test_memory_broker_uses_small_segments() -> None:
    with pymq.open() as broker:
        jobs = broker.queue("jobs")
        assert jobs.stream.store.segment_bytes == 1024 * 1024


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"fsync": "bogus"}, "fsync is 'bogus'"),
        ({"segment_bytes": -1}, "segment_bytes is -1"),
        ({"flush_interval": math.nan}, "flush_interval is nan"),
    ],
)
def test_open_bad_option_creates_nothing(
    tmp_path: Path, options: dict[str, object], match: str
) -> None:
    with pytest.raises(pymq.ConfigError, match=match):
        pymq.open(tmp_path / "data", **options)  # type: ignore[arg-type]
    assert not (tmp_path / "data").exists()


def test_open_empty_path_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # Path("") is Path("."), so only the str can be told from the working
    # directory.
    with pytest.raises(pymq.ConfigError) as raised:
        pymq.open("")
    assert str(raised.value) == (
        "data directory path is empty (''); give a directory, or no path for a "
        "broker in memory"
    )
    assert list(tmp_path.iterdir()) == []


def test_open_file_path_raises(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("data\n")
    with pytest.raises(NotADirectoryError) as raised:
        pymq.open(afile)
    assert raised.value.errno == errno.ENOTDIR
    assert str(raised.value) == (
        f"[Errno {errno.ENOTDIR}] data directory {afile} is not a directory"
    )
    assert afile.read_text() == "data\n"


def test_dead_letter_log_counts_one_attempt(
    broker: pymq.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = broker.queue("jobs", max_deliveries=1)
    jobs.put_many([b"a", b"b"])
    first = jobs.get(timeout=0)
    assert first is not None
    with caplog.at_level(logging.WARNING, logger="pymq.broker"):
        first.nack()
    assert [record.getMessage() for record in caplog.records] == [
        "message 0 of jobs moved to jobs.dlq after 1 attempt: nack; "
        "max_deliveries reached"
    ]


def test_queue_context_manager_closes_queue(broker: pymq.Broker) -> None:
    with broker.queue("jobs") as jobs:
        jobs.put(b"kept")
    with pytest.raises(pymq.ClosedError):
        jobs.put(b"late")
    reopened = broker.queue("jobs")
    message = reopened.get_nowait()
    assert message is not None
    assert message.body == b"kept"


def test_visibility_timeout_zero_raises(broker: pymq.Broker) -> None:
    with pytest.raises(pymq.ConfigError, match="visibility_timeout is 0"):
        broker.queue("jobs", visibility_timeout=0)


@pytest.mark.parametrize("count", [0, -1])
def test_get_many_count_below_one_raises(broker: pymq.Broker, count: int) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"x")
    with pytest.raises(ValueError, match=f"count is {count}; it must be 1 or more"):
        jobs.get_many(count, timeout=0)


@pytest.mark.parametrize("timeout", [math.nan, math.inf])
def test_get_timeout_not_finite_raises(broker: pymq.Broker, timeout: float) -> None:
    jobs = broker.queue("jobs")
    with pytest.raises(ValueError, match="it must be from 0 to 1e9"):
        jobs.get(timeout=timeout)


def test_redrive_missing_dlq_raises_not_found(broker: pymq.Broker) -> None:
    with pytest.raises(pymq.QueueNotFound, match=r"queue nope\.dlq does not exist"):
        broker.redrive("nope.dlq")
