"""get_batch: deliveries as numpy columns and one buffer of bodies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pymq


@pytest.fixture
def broker(tmp_path: Path):
    with pymq.open(tmp_path / "data") as opened:
        yield opened


def test_batch_columns_match_messages(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    bodies = [b"a", b"", b"ccc", b"dddd"]
    jobs.put_many(bodies)
    batch = jobs.get_batch(10, timeout=0)
    assert len(batch) == 4
    assert batch.offsets.tolist() == [0, 1, 2, 3]
    assert batch.attempts.tolist() == [1, 1, 1, 1]
    assert batch.lengths.tolist() == [1, 0, 3, 4]
    assert batch.starts.tolist() == [0, 1, 1, 4]
    assert batch.data == b"acccdddd"
    assert [bytes(batch.body(index)) for index in range(4)] == bodies
    assert batch.offsets.dtype == np.dtype("<u8")


def test_batch_receipts_ack_many_settles_all(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"x"] * 50)
    batch = jobs.get_batch(50, timeout=0)
    assert jobs.stats().in_flight == 50
    jobs.ack_many(batch)
    assert jobs.stats().in_flight == 0
    assert jobs.stats().acked == 50


def test_batch_of_other_queue_raises(broker: pymq.Broker) -> None:
    first = broker.queue("first")
    second = broker.queue("second")
    first.put(b"a")
    batch = first.get_batch(1, timeout=0)
    with pytest.raises(pymq.StaleReceiptError, match="another queue or group"):
        second.ack_many(batch)


def test_batch_empty_after_timeout(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    batch = jobs.get_batch(10, timeout=0.05)
    assert len(batch) == 0
    assert batch.offsets.tolist() == []


def test_batch_keeps_headers(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"with", headers={"kind": "demo"})
    jobs.put(b"without")
    batch = jobs.get_batch(2, timeout=0)
    assert batch.headers == [{"kind": "demo"}, None]
    assert batch.data == b"withwithout"


def test_batch_body_index_out_of_range_raises(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"one")
    batch = jobs.get_batch(1, timeout=0)
    with pytest.raises(IndexError, match="index 1 is outside the batch of 1"):
        batch.body(1)


def test_batch_redriven_group_message(broker: pymq.Broker) -> None:
    events = broker.stream("events")
    billing = events.group("billing")
    audit = events.group("audit")
    events.put(b"invoice 7", headers={"kind": "invoice"})
    billing.get(timeout=0).reject("bad total")
    audit.ack_many(audit.get_batch(10, timeout=0))
    assert broker.redrive("events.billing.dlq") == 1
    batch = billing.get_batch(10, timeout=0)
    assert len(batch) == 1
    assert batch.data == b"invoice 7"
    assert batch.offsets.tolist() == [1]
    assert batch.headers == [{"kind": "invoice"}]
    billing.ack_many(batch)
    # The other group passes over the redriven copy.
    assert len(audit.get_batch(10, timeout=0)) == 0
    assert audit.stats().depth == 0


def test_batch_redelivery_counts_attempts(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_deliveries=5)
    jobs.put_many([b"a", b"b", b"c"])
    first = jobs.get_batch(3, timeout=0)
    assert first.attempts.tolist() == [1, 1, 1]
    jobs.nack(int(first.receipts[1]))
    jobs.ack_many([int(first.receipts[0]), int(first.receipts[2])])
    second = jobs.get_batch(3, timeout=0)
    assert second.offsets.tolist() == [1]
    assert second.attempts.tolist() == [2]
    assert second.data == b"b"
    jobs.ack_many(second)
    assert jobs.stats().acked == 3


def test_batch_small_body_lengths(tmp_path: Path) -> None:
    """Bodies of 0 to 300 bytes come back byte for byte, from get_batch and
    get_many, after a restart too. The copies of 32 to 128 bytes take
    overlapping blocks of 32, so every length near a block edge counts."""
    bodies = [
        bytes((length * 7 + i) % 251 for i in range(length)) for length in range(301)
    ]
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        jobs.put_many(bodies)
        batch = jobs.get_batch(len(bodies), timeout=0)
        assert batch.lengths.tolist() == list(range(301))
        assert [bytes(batch.body(i)) for i in range(len(batch))] == bodies
        assert batch.data == b"".join(bodies)
    with pymq.open(data) as broker:
        messages = broker.queue("jobs").get_many(len(bodies), timeout=0)
        assert [m.body for m in messages] == bodies
