"""max_length, max_bytes and overflow of queues: nothing is dropped."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import pymq


@pytest.fixture
def broker(tmp_path: Path):
    with pymq.open(tmp_path / "data", segment_bytes=4096) as opened:
        yield opened


def test_max_length_reject_raises_queue_full(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_length=2)
    jobs.put(b"1")
    jobs.put(b"2")
    with pytest.raises(pymq.QueueFull, match="jobs is full: max_length 2"):
        jobs.put(b"3")
    assert jobs.stream.store.next_offset == 2


def test_max_length_counts_unacked_not_delivered(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_length=1)
    jobs.put(b"1")
    message = jobs.get_nowait()
    assert message is not None
    with pytest.raises(pymq.QueueFull):
        jobs.put(b"2")
    message.ack()
    assert jobs.put(b"2") == 1


def test_max_length_put_many_all_or_none(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_length=3)
    jobs.put(b"1")
    with pytest.raises(pymq.QueueFull):
        jobs.put_many([b"2", b"3", b"4"])
    assert jobs.stream.store.next_offset == 1
    assert jobs.put_many([b"2", b"3"]) == range(1, 3)


def test_max_bytes_reject_counts_record_bytes(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_bytes=8192)
    jobs.put_many([b"x" * 96] * 63)  # 128 bytes a record: 8064 bytes
    with pytest.raises(pymq.QueueFull, match="max_bytes 8192"):
        jobs.put(b"y" * 100)
    assert jobs.put(b"z" * 64) == 63


def test_max_bytes_below_two_segments_raises(broker: pymq.Broker) -> None:
    with pytest.raises(pymq.ConfigError, match="must be at least 8192"):
        broker.queue("jobs", max_bytes=8191)
    assert not (broker.path / "streams" / "jobs").exists()
    assert broker.names() == {}


def test_max_bytes_of_open_queue_checked(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_bytes=8192)
    with pytest.raises(pymq.ConfigError, match="must be at least 8192"):
        broker.queue("jobs", max_bytes=100)
    assert jobs.max_bytes == 8192


def test_failed_queue_creation_leaves_nothing(
    broker: pymq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(stream: str, group: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(broker, "_open_journal", full_disk)
    with pytest.raises(OSError, match="No space left"):
        broker.queue("jobs")
    assert not (broker.path / "streams" / "jobs").exists()
    monkeypatch.undo()
    jobs = broker.queue("jobs")
    assert jobs.put(b"after") == 0


def test_max_bytes_drained_queue_takes_puts(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_bytes=8192)
    for _ in range(500):
        jobs.put(b"x" * 96)
        message = jobs.get_nowait()
        assert message is not None
        message.ack()
    assert jobs.stats().acked == 500


def test_max_length_batch_never_fits(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_length=3, overflow="block")
    with pytest.raises(pymq.QueueFull, match="batch of 5 messages can never fit"):
        jobs.put_many([b"a"] * 5, timeout=5)


def test_blocked_put_raises_closed_on_close(tmp_path: Path) -> None:
    broker = pymq.open(tmp_path / "data")
    jobs = broker.queue("jobs", max_length=1, overflow="block")
    jobs.put(b"first")
    outcome: list[BaseException] = []

    def put_second() -> None:
        try:
            jobs.put(b"second")
        except BaseException as exc:
            outcome.append(exc)

    producer = threading.Thread(target=put_second)
    producer.start()
    time.sleep(0.2)
    broker.close()
    producer.join(timeout=5)
    assert not producer.is_alive()
    assert isinstance(outcome[0], pymq.ClosedError)


def test_full_dlq_with_block_does_not_stall_source(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_deliveries=1)
    broker.queue("jobs.dlq", max_length=1, overflow="block")
    jobs.put_many([b"1", b"2"])
    jobs.get_nowait().reject("first")
    second = jobs.get_nowait()
    assert second is not None
    started = time.monotonic()
    # The move does not wait for room: reject raises, and the delivery
    # stays in flight for a later reject, nack or ack.
    with pytest.raises(pymq.QueueFull, match=r"queue jobs\.dlq is full"):
        second.reject("second")
    assert time.monotonic() - started < 2
    assert jobs.dlq.stats().depth == 1
    assert jobs.stats().in_flight == 1
    second.nack()
    assert jobs.stats().waiting == 1


def test_block_put_waits_for_ack(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_length=1, overflow="block")
    jobs.put(b"first")

    def consume() -> None:
        time.sleep(0.2)
        message = jobs.get(timeout=5)
        assert message is not None
        message.ack()

    consumer = threading.Thread(target=consume)
    consumer.start()
    started = time.monotonic()
    offset = jobs.put(b"second", timeout=5)
    waited = time.monotonic() - started
    consumer.join(timeout=10)
    assert offset == 1
    assert waited >= 0.15
    assert waited < 4


def test_block_put_times_out_with_queue_full(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_length=1, overflow="block")
    jobs.put(b"first")
    started = time.monotonic()
    with pytest.raises(pymq.QueueFull, match=r"timed out after 0\.3 seconds"):
        jobs.put(b"second", timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert jobs.stream.store.next_offset == 1


def test_limits_stored_with_queue(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data", segment_bytes=4096) as broker:
        broker.queue("jobs", max_length=5, max_bytes=8192, overflow="block")
    with pymq.open(tmp_path / "data", segment_bytes=4096) as broker:
        jobs = broker.queue("jobs")
        assert jobs.max_length == 5
        assert jobs.max_bytes == 8192
        assert jobs.overflow == "block"


def test_limits_default_unlimited(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    assert jobs.max_length is None
    assert jobs.max_bytes is None
    assert jobs.overflow == "reject"
    assert jobs.put_many([b"x"] * 1000) == range(1000)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_length": 0}, pymq.ConfigError, "max_length is 0"),
        ({"max_bytes": -1}, pymq.ConfigError, "max_bytes is -1"),
        ({"max_length": 1.5}, TypeError, "max_length must be an int"),
        ({"max_length": True}, TypeError, "max_length must be an int"),
        ({"overflow": "drop"}, pymq.ConfigError, "overflow is 'drop'"),
    ],
)
def test_limits_invalid_values_raise(
    broker: pymq.Broker, options: dict[str, object], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        broker.queue("jobs", **options)
    assert not (broker.path / "streams" / "jobs").exists()


def test_limits_not_options_of_groups(broker: pymq.Broker) -> None:
    events = broker.stream("events")
    with pytest.raises(TypeError, match="unknown options: max_length"):
        events.group("billing", max_length=5)


def test_put_many_bounded_always_is_readable(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data", segment_bytes=4096, fsync="always") as broker:
        jobs = broker.queue("jobs", max_length=10)
        assert jobs.put_many([b"a", b"b"], headers={"k": "v"}) == range(0, 2)
        assert jobs.put_many([bytearray(b"c")]) == range(2, 3)
        bodies = [message.body for message in jobs.get_many(10, timeout=0)]
        assert bodies == [b"a", b"b", b"c"]
        with pytest.raises(pymq.QueueFull, match="batch of 11 messages"):
            jobs.put_many([b"x"] * 11)


def test_put_buffer_body_without_copy_path(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    assert jobs.put(memoryview(b"view")) == 0
    assert jobs.put(bytearray(b"array")) == 1
    assert [m.body for m in jobs.get_many(2, timeout=0)] == [b"view", b"array"]
