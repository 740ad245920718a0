"""Dead-letter queues: moves after max_deliveries, reject, and redrive."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

import pymq
from pymq import ConfigError, InvalidNameError, PymqError, QueueNotFound

X_HEADERS = {"x-source", "x-group", "x-offset", "x-attempts", "x-reason", "x-dead-at"}


@pytest.fixture
def broker(tmp_path: Path):
    with pymq.open(tmp_path / "data") as opened:
        yield opened


def fail_until_dead(q, times: int) -> None:
    for _ in range(times):
        q.get(timeout=0).nack()


def test_dlq_name_and_property(broker):
    q = broker.queue("jobs")
    assert q.dlq_name == "jobs.dlq"
    assert q.dlq is broker.queue("jobs.dlq")


def test_dlq_nack_at_limit_moves_with_headers(broker):
    q = broker.queue("jobs", max_deliveries=3)
    q.put(b"poison", headers={"kind": "demo"})
    before = time.time_ns()
    fail_until_dead(q, 3)
    after = time.time_ns()
    dead = q.dlq.get(timeout=0)
    assert dead.body == b"poison"
    assert dead.headers["kind"] == "demo"
    assert dead.headers["x-source"] == "jobs"
    assert dead.headers["x-group"] == ""
    assert dead.headers["x-offset"] == "0"
    assert dead.headers["x-attempts"] == "3"
    assert "nack" in dead.headers["x-reason"]
    assert before <= int(dead.headers["x-dead-at"]) <= after
    assert set(dead.headers) == X_HEADERS | {"kind"}


def test_dlq_not_moved_before_limit(broker):
    q = broker.queue("jobs", max_deliveries=3)
    q.put(b"poison")
    fail_until_dead(q, 2)
    assert q.get(timeout=0).attempt == 3
    assert q.dlq.stats().depth == 0


def test_dlq_visibility_timeout_at_limit_moves(broker):
    q = broker.queue("jobs", max_deliveries=2, visibility_timeout=0.1)
    q.put(b"slow")
    assert q.get(timeout=0).attempt == 1
    assert q.get(timeout=2.0).attempt == 2
    time.sleep(0.15)
    assert q.get(timeout=0) is None
    dead = q.dlq.get(timeout=0)
    assert dead.body == b"slow"
    assert dead.headers["x-attempts"] == "2"
    assert "visibility timeout" in dead.headers["x-reason"]
    assert q.stats().dead_lettered == 1


def test_dlq_reject_moves_at_once_with_reason(broker):
    q = broker.queue("jobs", max_deliveries=5)
    q.put(b"bad")
    q.get(timeout=0).reject("schema mismatch")
    dead = q.dlq.get(timeout=0)
    assert dead.body == b"bad"
    assert dead.headers["x-reason"] == "schema mismatch"
    assert dead.headers["x-attempts"] == "1"
    stats = q.stats()
    assert stats.dead_lettered == 1
    assert stats.depth == 0


def test_dlq_messages_behind_are_delivered(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put_many([b"poison", b"next", b"last"])
    q.get(timeout=0).nack()
    assert q.get(timeout=0).body == b"next"
    assert q.get(timeout=0).body == b"last"
    assert q.dlq.stats().depth == 1


def test_dlq_keeps_failed_order(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put_many([b"a", b"b", b"c"])
    for msg in q.get_many(3, timeout=0):
        msg.reject("bad")
    dead = q.dlq.get_many(3, timeout=0)
    assert [m.body for m in dead] == [b"a", b"b", b"c"]
    assert [m.headers["x-offset"] for m in dead] == ["0", "1", "2"]


def test_dlq_message_failing_again_stays_in_dlq(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put(b"poison")
    q.get(timeout=0).reject("bad")
    dlq = broker.queue("jobs.dlq")
    dlq.get(timeout=0).nack()
    again = dlq.get(timeout=0)
    assert again.body == b"poison"
    assert again.attempt == 2
    again.reject("still bad")
    assert dlq.get(timeout=0).attempt == 3
    assert not (broker.path / "streams" / "jobs.dlq.dlq").exists()


def test_dlq_message_timed_out_stays_in_dlq(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put(b"poison")
    q.get(timeout=0).reject("bad")
    dlq = broker.queue("jobs.dlq")
    now = [10**12]
    dlq._clock = lambda: now[0]

    # Seven timeouts, more than the default max_deliveries of 5, and none moves it.
    for attempt in range(1, 8):
        message = dlq.get_nowait()
        assert message is not None
        assert message.body == b"poison"
        assert message.attempt == attempt
        now[0] += int(dlq.visibility_timeout * 1e9)

    assert dlq.stats().depth == 1
    assert dlq.stats().dead_lettered == 0
    assert not (broker.path / "streams" / "jobs.dlq.dlq").exists()


def test_dlq_rejects_max_deliveries(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put(b"poison")
    q.get(timeout=0).reject("bad")
    with pytest.raises(ConfigError) as raised:
        broker.queue("jobs.dlq", max_deliveries=1)
    assert "max_deliveries of queue jobs.dlq is 1" in str(raised.value)
    assert broker.queue("jobs.dlq", max_deliveries=0).stats().depth == 1


def test_stream_name_ending_in_dlq_is_rejected(broker):
    broker.queue("a")
    with pytest.raises(InvalidNameError) as raised:
        broker.stream("a.dlq")
    assert "'a.dlq'" in str(raised.value)
    assert not (broker.path / "streams" / "a.dlq").exists()


def test_dlq_max_deliveries_zero_never_dead_letters(broker):
    q = broker.queue("jobs", max_deliveries=0)
    q.put(b"retry forever")
    for attempt in range(1, 8):
        msg = q.get(timeout=0)
        assert msg.attempt == attempt
        msg.nack()
    assert q.stats().dead_lettered == 0
    assert not (broker.path / "streams" / "jobs.dlq").exists()


# Redrive ----------------------------------------------------------------


def test_redrive_moves_back_in_order(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put_many([b"a", b"b", b"c"])
    for msg in q.get_many(3, timeout=0):
        msg.reject("bad")
    moved = broker.redrive("jobs.dlq")
    assert moved == 3
    back = q.get_many(10, timeout=0)
    assert [m.body for m in back] == [b"a", b"b", b"c"]
    assert [m.attempt for m in back] == [1, 1, 1]
    assert q.dlq.stats().depth == 0


def test_redrive_removes_dead_letter_headers(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put(b"a", headers={"kind": "demo"})
    q.put(b"b")
    for msg in q.get_many(2, timeout=0):
        msg.reject("bad")
    broker.redrive("jobs.dlq")
    first, second = q.get_many(2, timeout=0)
    assert first.headers == {"kind": "demo"}
    assert second.headers == {}


def test_redrive_moves_each_message_once(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put_many([b"a", b"b"])
    for msg in q.get_many(2, timeout=0):
        msg.reject("bad")
    assert broker.redrive("jobs.dlq") == 2
    assert broker.redrive("jobs.dlq") == 0
    assert len(q.get_many(10, timeout=0)) == 2
    assert q.stats().depth == 2


def test_redrive_leaves_in_flight_dlq_message(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put_many([b"a", b"b"])
    for msg in q.get_many(2, timeout=0):
        msg.reject("bad")
    held = q.dlq.get(timeout=0)
    assert broker.redrive("jobs.dlq") == 1
    assert q.get(timeout=0).body == b"b"
    held.ack()
    assert q.dlq.stats().depth == 0


def test_redrive_to_another_queue(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put(b"a", headers={"kind": "demo"})
    q.get(timeout=0).reject("bad")
    broker.queue("retry")
    assert broker.redrive("jobs.dlq", to="retry") == 1
    msg = broker.queue("retry").get(timeout=0)
    assert msg.body == b"a"
    assert msg.headers == {"kind": "demo"}
    assert q.get(timeout=0) is None


def test_redrive_group_dlq_to_queue(broker):
    s = broker.stream("events")
    g = s.group("billing")
    s.put(b"e")
    g.get(timeout=0).reject("bad")
    broker.queue("retry")
    assert broker.redrive("events.billing.dlq", to="retry") == 1
    assert broker.queue("retry").get(timeout=0).body == b"e"


def test_redrive_to_missing_queue_raises_not_found(broker):
    q = broker.queue("jobs", max_deliveries=1)
    q.put(b"a")
    q.get(timeout=0).reject("bad")
    with pytest.raises(QueueNotFound) as raised:
        broker.redrive("jobs.dlq", to="retyr")
    assert str(raised.value) == (
        "queue retyr does not exist; redrive moves messages only into an existing queue"
    )
    assert broker.names() == {"jobs": "queue", "jobs.dlq": "queue"}
    assert q.dlq.stats().depth == 1


def test_redrive_missing_dlq_raises_not_found(broker):
    broker.queue("jobs")
    with pytest.raises(QueueNotFound, match="does not exist"):
        broker.redrive("jobs.dlq")


def test_redrive_non_dlq_name_raises(broker):
    broker.queue("jobs")
    with pytest.raises(ConfigError, match="is not a dead-letter queue"):
        broker.redrive("jobs")


def test_redrive_group_dlq_reaches_that_group_only(broker):
    events = broker.stream("events")
    billing = events.group("billing", max_deliveries=1)
    audit = events.group("audit")
    events.put(b"invoice", headers={"kind": "bill"})
    failed = billing.get_nowait()
    failed.reject("bad")
    audit.get_nowait().ack()

    assert broker.redrive("events.billing.dlq") == 1

    again = billing.get_nowait()
    assert again.body == b"invoice"
    assert again.headers == {"kind": "bill"}
    assert again.attempt == 1
    assert audit.get_nowait() is None
    assert audit.stats().depth == 0
    assert billing.dlq.stats().depth == 0


def test_redrive_group_dlq_twice_keeps_one_target(broker):
    events = broker.stream("events")
    billing = events.group("billing", max_deliveries=1)
    events.put(b"invoice")
    billing.get_nowait().reject("first")
    broker.redrive("events.billing.dlq")
    billing.get_nowait().reject("second")
    broker.redrive("events.billing.dlq")

    again = billing.get_nowait()
    assert again.body == b"invoice"
    assert again.headers == {}


@pytest.mark.parametrize("body_bytes", [1024, 1024 - 200])
def test_dlq_takes_message_of_max_size(tmp_path: Path, body_bytes: int) -> None:
    """A message at max_message_bytes, with headers or not, still moves."""
    with pymq.open(tmp_path, max_message_bytes=1024, segment_bytes=1 << 20) as broker:
        jobs = broker.queue("jobs", max_deliveries=1, visibility_timeout=60)
        headers = {} if body_bytes == 1024 else {"h": "v" * 190}
        jobs.put(b"x" * body_bytes, headers=headers)
        jobs.put(b"small")
        jobs.get(timeout=0).nack()
        after = jobs.get(timeout=0)
        assert after is not None
        assert after.body == b"small"
        after.ack()
        assert jobs.get(timeout=0) is None
        stats = jobs.stats()
        assert (stats.depth, stats.dead_lettered) == (0, 1)
        moved = broker.queue("jobs.dlq").get(timeout=0)
        assert moved is not None
        assert moved.body == b"x" * body_bytes
        assert moved.headers["x-reason"] == "nack; max_deliveries reached"
        assert {key: moved.headers[key] for key in headers} == headers
        moved.ack()


def test_dlq_reject_cuts_long_reason(broker):
    jobs = broker.queue("jobs")
    jobs.put(b"bad")
    jobs.get(timeout=0).reject("r" * 5000)
    assert jobs.stats().depth == 0
    moved = broker.queue("jobs.dlq").get(timeout=0)
    assert moved is not None
    assert moved.headers["x-reason"] == "r" * 1000 + "..."


def test_redriven_message_dead_again_has_own_headers(broker):
    events = broker.stream("events")
    billing = events.group("billing", max_deliveries=1)
    events.group("audit")
    events.put(b"invoice", headers={"kind": "bill"})
    events.put(b"receipt")
    billing.get_nowait().reject("first")
    billing.get_nowait().reject("first")
    assert broker.redrive("events.billing.dlq") == 2

    billing.get_nowait().reject("second")
    billing.get_nowait().nack()

    with_headers = billing.dlq.get_nowait()
    assert set(with_headers.headers) == X_HEADERS | {"kind"}
    assert with_headers.headers["kind"] == "bill"
    assert with_headers.headers["x-offset"] == "2"
    assert with_headers.headers["x-reason"] == "second"
    without_headers = billing.dlq.get_nowait()
    assert set(without_headers.headers) == X_HEADERS
    assert without_headers.headers["x-offset"] == "3"
    assert without_headers.headers["x-reason"] == "nack; max_deliveries reached"


def test_redrive_gone_group_raises_keeps_messages(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        events = broker.stream("events")
        billing = events.group("billing", max_deliveries=1)
        events.group("audit")
        events.put_many([b"a", b"b"])
        billing.get_nowait().reject("bad")
        billing.get_nowait().reject("bad")
    # The group's folder is removed while the broker is closed, and its DLQ stays.
    shutil.rmtree(data / "streams" / "events" / "groups" / "billing")

    with pymq.open(data) as broker:
        with pytest.raises(PymqError, match="names no queue or group"):
            broker.redrive("events.billing.dlq")
        assert broker.queue("events.billing.dlq").stats().depth == 2
        assert broker.stream("events").store.next_offset == 2
        assert broker.groups("events") == ["audit"]


def test_redrive_to_dlq_itself_raises(broker):
    jobs = broker.queue("jobs", max_deliveries=1)
    jobs.put(b"bad")
    jobs.get(timeout=0).reject("bad")
    with pytest.raises(ConfigError) as raised:
        broker.redrive("jobs.dlq", to="jobs.dlq")
    assert str(raised.value) == (
        "to= names the dead-letter queue jobs.dlq itself; pass another queue, "
        "or no to= to move each message back to its source"
    )
    kept = jobs.dlq.get(timeout=0)
    assert kept is not None
    assert kept.headers["x-reason"] == "bad"
    assert kept.headers["x-source"] == "jobs"


def test_redrive_long_dlq_to_itself_raises(broker):
    name = "n" * 128
    source = broker.queue(name, max_deliveries=1)
    source.put(b"bad")
    source.get(timeout=0).reject("bad")
    with pytest.raises(ConfigError, match="itself"):
        broker.redrive(f"{name}.dlq", to=f"{name}.dlq")
    assert source.dlq.stats().depth == 1


def test_dead_letter_log_shows_start_of_reason(broker, caplog):
    jobs = broker.queue("jobs", max_deliveries=1)
    jobs.put(b"bad")
    reason = "".join(chr(ord("a") + index % 26) for index in range(500))
    with caplog.at_level("WARNING", logger="pymq.broker"):
        jobs.get(timeout=0).reject(reason)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        f"message 0 of jobs moved to jobs.dlq after 1 attempt: {reason[:120]}..."
    ]
    assert jobs.dlq.get(timeout=0).headers["x-reason"] == reason


def test_queue_opens_long_derived_dlq_name(broker):
    source = broker.queue("L" * 128, max_deliveries=1)
    source.put(b"bad")
    source.get(timeout=0).reject("bad")
    dlq = broker.queue("L" * 128 + ".dlq")
    assert dlq is source.dlq
    moved = dlq.get(timeout=0)
    assert moved is not None
    assert moved.body == b"bad"


def test_queue_dlq_name_over_255_raises(broker):
    name = "L" * 252 + ".dlq"
    with pytest.raises(InvalidNameError) as raised:
        broker.queue(name)
    assert str(raised.value) == (
        f"queue name {name[:140]!r}... is 256 characters; it must be 1 to 255"
    )


def test_queue_long_name_without_dlq_suffix_raises(broker):
    with pytest.raises(InvalidNameError) as raised:
        broker.queue("L" * 129)
    assert str(raised.value) == (
        f"queue name {'L' * 129!r} is 129 characters; it must be 1 to 128"
    )
