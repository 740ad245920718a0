"""Deliveries of never-delivered offsets, taken in runs, mixed with the rest.

get_many, get_batch and get_nowait hand out offsets past the group's cursor
in runs, with one pass over their records. These tests mix such runs with
what must come first or be passed over: nacked and expired deliveries,
damaged records, gaps, segment boundaries, max_in_flight, headers, records
routed to one group, and restarts after a SIGKILL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import pymq
from pymq import StaleReceiptError
from tests.model import record_size
from tests.test_broker_restart import kill_when_ready, start_consumer

FORMS = ["get_nowait", "get_many", "get_batch"]
REC_FLAG_HEADERS = 1  # group.pxd: the record starts with a header block
# A header block that declares 5 headers and holds none.
TRUNCATED_BLOCK = b"\x05\x00"
# Bytes of a record header (segment.pxd), before the body.
RECORD_HEADER_BYTES = 32


@dataclass(frozen=True)
class Delivered:
    offset: int
    attempt: int
    receipt: int
    body: bytes
    headers: dict[str, str]


class FakeClock:
    """A clock in integer ns that moves only when a test advances it."""

    def __init__(self) -> None:
        self.now = 1_000 * 1_000_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1_000_000_000)


def deliver(
    consumer: pymq.Queue | pymq.Group, form: str, count: int
) -> list[Delivered]:
    """Take up to count deliveries with form, calling get_nowait count times."""
    if form == "get_batch":
        batch = consumer.get_batch(count, timeout=0)
        return [
            Delivered(
                int(batch.offsets[i]),
                int(batch.attempts[i]),
                int(batch.receipts[i]),
                bytes(batch.body(i)),
                batch.headers[i] or {},
            )
            for i in range(len(batch))
        ]
    if form == "get_many":
        messages = consumer.get_many(count, timeout=0)
    else:
        messages = []
        for _ in range(count):
            message = consumer.get_nowait()
            if message is None:
                break
            messages.append(message)
    return [
        Delivered(m.offset, m.attempt, m.receipt, m.body, m.headers) for m in messages
    ]


def pairs(delivered: list[Delivered]) -> list[tuple[int, int]]:
    return [(d.offset, d.attempt) for d in delivered]


@pytest.fixture
def broker(tmp_path: Path):
    with pymq.open(tmp_path / "data") as opened:
        yield opened


forms = pytest.mark.parametrize("form", FORMS)


# Redeliveries before fresh offsets ----------------------------------------


@forms
def test_nacked_offset_comes_before_fresh_ones(broker: pymq.Broker, form: str) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"m%d" % i for i in range(6)])
    first = deliver(jobs, form, 3)
    assert pairs(first) == [(0, 1), (1, 1), (2, 1)]
    jobs.nack(first[1].receipt)
    second = deliver(jobs, form, 10)
    assert pairs(second) == [(1, 2), (3, 1), (4, 1), (5, 1)]
    assert [d.body for d in second] == [b"m1", b"m3", b"m4", b"m5"]
    jobs.ack_many([first[0].receipt, first[2].receipt])
    jobs.ack_many([d.receipt for d in second])
    assert jobs.stats().depth == 0
    assert jobs.stats().acked == 6


@forms
def test_several_nacked_offsets_in_order(broker: pymq.Broker, form: str) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"m%d" % i for i in range(5)])
    first = deliver(jobs, form, 4)
    jobs.nack(first[3].receipt)
    jobs.nack(first[0].receipt)
    jobs.nack(first[2].receipt)
    second = deliver(jobs, form, 2)
    assert pairs(second) == [(0, 2), (2, 2)]
    third = deliver(jobs, form, 10)
    assert pairs(third) == [(3, 2), (4, 1)]


@forms
def test_delayed_nack_lets_fresh_go_first(broker: pymq.Broker, form: str) -> None:
    clock = FakeClock()
    jobs = broker.queue("jobs")
    jobs._clock = clock
    jobs.put_many([b"m%d" % i for i in range(4)])
    first = deliver(jobs, form, 2)
    jobs.nack(first[0].receipt, delay=5.0)
    assert pairs(deliver(jobs, form, 10)) == [(2, 1), (3, 1)]
    assert deliver(jobs, form, 10) == []
    clock.advance(5.0)
    assert pairs(deliver(jobs, form, 10)) == [(0, 2)]


@forms
def test_expired_deliveries_before_fresh_ones(broker: pymq.Broker, form: str) -> None:
    clock = FakeClock()
    jobs = broker.queue("jobs", visibility_timeout=1.0)
    jobs._clock = clock
    jobs.put_many([b"m%d" % i for i in range(4)])
    first = deliver(jobs, form, 2)
    assert pairs(first) == [(0, 1), (1, 1)]
    clock.advance(1.5)
    second = deliver(jobs, form, 10)
    assert pairs(second) == [(0, 2), (1, 2), (2, 1), (3, 1)]
    with pytest.raises(StaleReceiptError):
        jobs.ack(first[0].receipt)


# Records that are not delivered --------------------------------------------


def corrupt_body(data: Path, offset: int, body_length: int) -> None:
    """Flip a body byte of the record at offset in the first segment of jobs.

    Every record of the segment must have a body of body_length bytes.
    """
    log = data / "streams" / "jobs" / "log" / f"{0:020d}.log"
    position = offset * record_size(body_length) + RECORD_HEADER_BYTES + 3
    with log.open("r+b") as file:
        file.seek(position)
        byte = file.read(1)
        file.seek(position)
        file.write(bytes([byte[0] ^ 0xFF]))


@forms
@pytest.mark.parametrize("damaged", [0, 3, 5])
def test_damaged_record_is_skipped(tmp_path: Path, form: str, damaged: int) -> None:
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        bodies = [b"%04d" % i + bytes(96) for i in range(6)]
        jobs.put_many(bodies)
        corrupt_body(data, damaged, 100)
        delivered = deliver(jobs, form, 10)
        expected = [offset for offset in range(6) if offset != damaged]
        assert pairs(delivered) == [(offset, 1) for offset in expected]
        assert [d.body for d in delivered] == [bodies[offset] for offset in expected]
        assert jobs.stream.store.damaged == 1
        assert jobs.stats().skipped == 1
        jobs.ack_many([d.receipt for d in delivered])
        assert jobs.stats().depth == 0


@forms
def test_damaged_records_in_a_long_run_are_skipped(tmp_path: Path, form: str) -> None:
    # Damage at the start, side by side, in the middle and at the end of
    # one run of 200 records: each damaged record is passed over alone.
    data = tmp_path / "data"
    damaged = {0, 2, 3, 63, 64, 65, 128, 199}
    bodies = [b"%04d" % i + bytes(96) for i in range(200)]
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        jobs.put_many(bodies)
        for offset in sorted(damaged):
            corrupt_body(data, offset, 100)
        delivered = deliver(jobs, form, 300)
        expected = [offset for offset in range(200) if offset not in damaged]
        assert pairs(delivered) == [(offset, 1) for offset in expected]
        assert [d.body for d in delivered] == [bodies[offset] for offset in expected]
        assert jobs.stream.store.damaged == len(damaged)
        assert jobs.stats().skipped == len(damaged)


@forms
def test_unreadable_header_block_is_skipped(broker: pymq.Broker, form: str) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"good0")
    assert jobs.stream.store.append(TRUNCATED_BLOCK, flags=REC_FLAG_HEADERS) == 1
    jobs.put(b"good2", headers={"k": "v"})
    jobs.put(b"good3")
    delivered = deliver(jobs, form, 10)
    assert pairs(delivered) == [(0, 1), (2, 1), (3, 1)]
    assert [d.headers for d in delivered] == [{}, {"k": "v"}, {}]
    assert jobs.stream.store.damaged == 1
    assert jobs.stats().skipped == 1


@forms
def test_gap_between_segments_is_skipped(broker: pymq.Broker, form: str) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"a", b"b", b"c"])
    assert jobs.stream.store.ensure_next_offset(10) == 7
    jobs.put_many([b"d", b"e"])
    delivered = deliver(jobs, form, 20)
    assert pairs(delivered) == [(0, 1), (1, 1), (2, 1), (10, 1), (11, 1)]
    assert [d.body for d in delivered] == [b"a", b"b", b"c", b"d", b"e"]
    assert jobs.stats().skipped == 7
    jobs.ack_many([d.receipt for d in delivered])
    assert jobs.stats().depth == 0


@forms
def test_other_groups_record_passed_over(broker: pymq.Broker, form: str) -> None:
    events = broker.stream("events")
    billing = events.group("billing")
    audit = events.group("audit")
    events.put(b"e0", headers={"kind": "invoice"})
    billing.get(timeout=0).reject("bad total")
    audit.ack_many(audit.get_many(10, timeout=0))
    # Offset 1 is the redriven copy, for billing only.
    assert broker.redrive("events.billing.dlq") == 1
    events.put_many([b"e2", b"e3"])
    seen_by_audit = deliver(audit, form, 10)
    assert pairs(seen_by_audit) == [(2, 1), (3, 1)]
    seen_by_billing = deliver(billing, form, 10)
    assert pairs(seen_by_billing) == [(1, 1), (2, 1), (3, 1)]
    assert [d.headers for d in seen_by_billing] == [{"kind": "invoice"}, {}, {}]
    assert audit.stats().skipped == 0


# Where a run stops ----------------------------------------------------------


@forms
def test_runs_cross_segment_boundaries(tmp_path: Path, form: str) -> None:
    # 1,024-byte segments hold 7 records of 100-byte bodies.
    with pymq.open(tmp_path / "data", segment_bytes=1024) as broker:
        jobs = broker.queue("jobs")
        bodies = [b"%04d" % i + bytes(96) for i in range(40)]
        jobs.put_many(bodies)
        assert jobs.stream.store.stats()["segments"] == 6
        first = deliver(jobs, form, 3)
        rest = deliver(jobs, form, 40)
        delivered = first + rest
        assert pairs(delivered) == [(offset, 1) for offset in range(40)]
        assert [d.body for d in delivered] == bodies
        jobs.ack_many([d.receipt for d in delivered])
        assert jobs.stats().depth == 0
        assert jobs.stream.store.stats()["segments"] == 1


@forms
def test_max_in_flight_bounds_runs(broker: pymq.Broker, form: str) -> None:
    jobs = broker.queue("jobs", max_in_flight=4)
    jobs.put_many([b"m%d" % i for i in range(10)])
    first = deliver(jobs, form, 10)
    assert pairs(first) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert deliver(jobs, form, 10) == []
    jobs.ack_many([first[0].receipt, first[1].receipt])
    second = deliver(jobs, form, 10)
    assert pairs(second) == [(4, 1), (5, 1)]
    jobs.nack(first[2].receipt)
    third = deliver(jobs, form, 10)
    assert pairs(third) == [(2, 2)]
    assert jobs.stats().in_flight == 4


@forms
def test_run_keeps_headers_of_each_record(broker: pymq.Broker, form: str) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"plain0")
    jobs.put(b"tagged1", headers={"k": "v1"})
    jobs.put(b"plain2")
    jobs.put(b"tagged3", headers={"k": "v3", "empty": ""})
    delivered = deliver(jobs, form, 10)
    assert [(d.offset, d.body, d.headers) for d in delivered] == [
        (0, b"plain0", {}),
        (1, b"tagged1", {"k": "v1"}),
        (2, b"plain2", {}),
        (3, b"tagged3", {"k": "v3", "empty": ""}),
    ]


def test_batch_headers_none_for_plain_records(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"a", b"b", b"c"])
    batch = jobs.get_batch(10, timeout=0)
    assert batch.headers == [None, None, None]
    jobs.ack_many(batch)


def test_batch_headers_line_up_with_messages(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"a", b"b"])
    jobs.put(b"c", headers={"k": "c"})
    jobs.put(b"d")
    batch = jobs.get_batch(10, timeout=0)
    assert batch.headers == [None, None, {"k": "c"}, None]


def test_batch_headers_of_redelivery_then_run(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"a", headers={"k": "a"})
    jobs.put_many([b"b", b"c"])
    first = jobs.get_nowait()
    assert first is not None
    first.nack()
    batch = jobs.get_batch(10, timeout=0)
    assert [int(offset) for offset in batch.offsets] == [0, 1, 2]
    assert [int(attempt) for attempt in batch.attempts] == [2, 1, 1]
    assert batch.headers == [{"k": "a"}, None, None]


def test_batch_headers_of_plain_redelivery_then_tagged(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"a")
    jobs.put(b"b", headers={"k": "b"})
    first = jobs.get_nowait()
    assert first is not None
    first.nack()
    batch = jobs.get_batch(10, timeout=0)
    assert [int(offset) for offset in batch.offsets] == [0, 1]
    assert batch.headers == [None, {"k": "b"}]


@pytest.mark.parametrize("form", ["get_many", "get_batch"])
def test_headers_in_second_run_of_a_call(broker: pymq.Broker, form: str) -> None:
    # A run ends after 1,024 records, so the tagged record starts the second.
    jobs = broker.queue("jobs")
    jobs.put_many([b"plain"] * 1024)
    jobs.put(b"tagged", headers={"k": "v"})
    jobs.put(b"plain")
    if form == "get_batch":
        headers = jobs.get_batch(2000, timeout=0).headers
    else:
        headers = [m.headers or None for m in jobs.get_many(2000, timeout=0)]
    assert len(headers) == 1026
    assert headers[:1024] == [None] * 1024
    assert headers[1024:] == [{"k": "v"}, None]


@forms
def test_run_stops_at_end_of_log(broker: pymq.Broker, form: str) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"a", b"b"])
    assert pairs(deliver(jobs, form, 10)) == [(0, 1), (1, 1)]
    assert deliver(jobs, form, 10) == []
    jobs.put(b"c")
    assert pairs(deliver(jobs, form, 10)) == [(2, 1)]


@pytest.mark.parametrize("form", ["get_many", "get_batch"])
@pytest.mark.parametrize(("count", "size"), [(3000, 10), (12, 200_000)])
def test_call_spans_several_runs(
    broker: pymq.Broker, form: str, count: int, size: int
) -> None:
    # A run ends after 1,024 records or 1 MiB of records, and one call goes
    # on with the next run.
    jobs = broker.queue("jobs")
    bodies = [b"%06d" % i + bytes(size - 6) for i in range(count)]
    for start in range(0, count, 1000):
        jobs.put_many(bodies[start : start + 1000])
    delivered = deliver(jobs, form, count)
    assert pairs(delivered) == [(offset, 1) for offset in range(count)]
    assert [d.body for d in delivered] == bodies


def test_get_batch_of_empty_bodies(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"", b"", b"x", b""])
    batch = jobs.get_batch(10, timeout=0)
    assert batch.offsets.tolist() == [0, 1, 2, 3]
    assert batch.lengths.tolist() == [0, 0, 1, 0]
    assert batch.data == b"x"


# Settling and restarts --------------------------------------------------------


def test_ack_many_stale_receipt_settles_none(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"m%d" % i for i in range(5)])
    batch = jobs.get_batch(5, timeout=0)
    receipts = batch.receipts.tolist()
    jobs.ack_many(receipts[:1])
    with pytest.raises(StaleReceiptError, match=f"receipt {receipts[0]} of queue jobs"):
        jobs.ack_many(batch)
    assert jobs.stats().in_flight == 4
    assert jobs.stats().acked == 1
    jobs.ack_many(receipts[1:])
    assert jobs.stats().in_flight == 0
    assert jobs.stats().acked == 5


def test_ack_many_old_attempt_in_run(broker: pymq.Broker) -> None:
    """Receipts of consecutive offsets, one of them from an earlier attempt."""
    jobs = broker.queue("jobs")
    jobs.put_many([b"m%d" % i for i in range(5)])
    receipts = jobs.get_batch(5, timeout=0).receipts.tolist()
    jobs.nack(receipts[2])
    again = jobs.get_batch(5, timeout=0)
    assert again.offsets.tolist() == [2]
    assert again.attempts.tolist() == [2]
    with pytest.raises(StaleReceiptError, match=f"receipt {receipts[2]} of queue jobs"):
        jobs.ack_many(receipts)
    assert jobs.stats().in_flight == 5
    assert jobs.stats().acked == 0

    receipts[2] = int(again.receipts[0])
    jobs.ack_many(receipts)
    assert jobs.stats().in_flight == 0
    assert jobs.stats().acked == 5


def test_ack_many_repeated_receipt_settles_none(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"m%d" % i for i in range(3)])
    receipts = jobs.get_batch(3, timeout=0).receipts.tolist()
    with pytest.raises(StaleReceiptError, match="appears twice"):
        jobs.ack_many([receipts[0], receipts[1], receipts[1]])
    assert jobs.stats().acked == 0
    assert jobs.stats().in_flight == 3


def test_ack_many_run_inside_window(tmp_path: Path) -> None:
    """A run of acks above the lowest unsettled offset, then one below it."""
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        jobs.put_many([b"m%d" % i for i in range(10)])
        receipts = jobs.get_batch(10, timeout=0).receipts.tolist()
        jobs.ack_many(receipts[3:7])
        assert jobs.stats().in_flight == 6
        jobs.ack_many(receipts[:2])
        assert jobs.stats().in_flight == 4
        assert jobs.stats().acked == 6
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        batch = jobs.get_batch(10, timeout=0)
        assert batch.offsets.tolist() == [2, 7, 8, 9]
        assert batch.attempts.tolist() == [2, 2, 2, 2]
        jobs.ack_many(batch)
        assert jobs.stats().in_flight == 0
        assert jobs.get_batch(10, timeout=0).offsets.tolist() == []


@forms
def test_close_and_reopen_counts_run_attempts(tmp_path: Path, form: str) -> None:
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        jobs.put_many([b"m%d" % i for i in range(6)])
        first = deliver(jobs, form, 4)
        jobs.ack_many([first[1].receipt])
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        delivered = deliver(jobs, form, 10)
        assert pairs(delivered) == [(0, 2), (2, 2), (3, 2), (4, 1), (5, 1)]


def test_sigkill_after_get_batch_keeps_attempts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        broker.queue("jobs", visibility_timeout=600.0).put_many(
            [b"m%d" % i for i in range(8)]
        )
    first = kill_when_ready(start_consumer(data, "hold-batch"))
    assert first["acked"] == [[0, 1], [1, 1], [2, 1]]
    assert first["held"] == [[3, 1], [4, 1]]
    second = kill_when_ready(start_consumer(data, "hold-batch"))
    assert second["acked"] == [[3, 2], [4, 2], [5, 1]]
    assert second["held"] == [[6, 1], [7, 1]]
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        batch = jobs.get_batch(10, timeout=0)
        assert batch.offsets.tolist() == [6, 7]
        assert batch.attempts.tolist() == [2, 2]
        assert batch.data == b"m6m7"
