"""The embedded broker's queues: put, get, settling, options and stats."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pymq
from pymq import (
    BrokerLockedError,
    ConfigError,
    InvalidNameError,
    QueueStats,
    StaleReceiptError,
)


@pytest.fixture
def broker(tmp_path: Path):
    with pymq.open(tmp_path / "data") as opened:
        yield opened


def stored_options(data: Path, name: str) -> dict:
    path = data / "streams" / name / "groups" / ".queue" / "options.json"
    return json.loads(path.read_text())["options"]


# Putting and getting ----------------------------------------------------


def test_put_returns_offsets_in_order(broker):
    q = broker.queue("jobs")
    assert q.put(b"first") == 0
    assert q.put(b"second", headers={"kind": "demo"}) == 1


def test_put_many_returns_offset_range(broker):
    q = broker.queue("jobs")
    q.put(b"first")
    assert q.put_many([b"a", b"b", b"c"]) == range(1, 4)


def test_get_returns_message_fields(broker):
    q = broker.queue("jobs")
    before = time.time_ns()
    offset = q.put(b"payload", headers={"kind": "demo"})
    after = time.time_ns()
    msg = q.get(timeout=1.0)
    assert msg is not None
    assert msg.body == b"payload"
    assert msg.offset == offset
    assert msg.headers == {"kind": "demo"}
    assert before <= msg.timestamp <= after
    assert msg.attempt == 1
    assert isinstance(msg.receipt, int)


def test_get_without_headers_returns_empty_dict(broker):
    q = broker.queue("jobs")
    q.put(b"plain")
    msg = q.get(timeout=0)
    assert msg.headers == {}


def test_put_many_headers_apply_to_each(broker):
    q = broker.queue("jobs")
    q.put_many([b"a", b"b"], headers={"batch": "7"})
    messages = q.get_many(2, timeout=0)
    assert [m.headers for m in messages] == [{"batch": "7"}, {"batch": "7"}]
    assert [m.body for m in messages] == [b"a", b"b"]


def test_get_empty_waits_full_timeout(broker):
    q = broker.queue("jobs")
    start = time.monotonic()
    msg = q.get(timeout=0.3)
    waited = time.monotonic() - start
    assert msg is None
    assert waited >= 0.3
    assert waited < 2.0


def test_get_many_empty_waits_full_timeout(broker):
    q = broker.queue("jobs")
    start = time.monotonic()
    messages = q.get_many(5, timeout=0.3)
    waited = time.monotonic() - start
    assert messages == []
    assert waited >= 0.3


def test_get_wakes_when_another_thread_puts(broker):
    q = broker.queue("jobs")
    timer = threading.Timer(0.2, q.put, args=(b"late",))
    timer.start()
    try:
        start = time.monotonic()
        msg = q.get(timeout=5.0)
        waited = time.monotonic() - start
    finally:
        timer.join(5.0)
    assert msg is not None
    assert msg.body == b"late"
    assert waited < 2.0


def test_get_blocked_on_in_flight_does_not_spin(broker):
    q = broker.queue("jobs", visibility_timeout=0.8)
    q.put(b"a")
    held = q.get(timeout=0)
    cpu_start = time.thread_time()
    assert q.get(timeout=0.5) is None
    cpu_used = time.thread_time() - cpu_start
    assert cpu_used < 0.2
    held.ack()


def test_next_due_reports_fractional_seconds(broker):
    q = broker.queue("jobs", visibility_timeout=0.5)
    q.put(b"a")
    q.get(timeout=0)
    due = q._next_due()
    assert 0.3 < due <= 0.5


def test_visibility_timeout_reads_back_fraction(broker):
    q = broker.queue("jobs", visibility_timeout=0.25)
    assert q.visibility_timeout == 0.25


def test_get_negative_timeout_raises(broker):
    q = broker.queue("jobs")
    with pytest.raises(ValueError, match=r"timeout is -1\.0 seconds; it must be"):
        q.get(timeout=-1.0)


def test_get_many_returns_lowest_offsets_first(broker):
    q = broker.queue("jobs")
    q.put_many([b"%d" % i for i in range(10)])
    messages = q.get_many(4, timeout=1.0)
    assert [m.offset for m in messages] == [0, 1, 2, 3]
    assert [m.body for m in messages] == [b"0", b"1", b"2", b"3"]


def test_get_many_stops_at_max_in_flight(broker):
    q = broker.queue("jobs", max_in_flight=3)
    q.put_many([b"x"] * 5)
    first = q.get_many(5, timeout=0)
    assert len(first) == 3
    assert q.get(timeout=0) is None
    first[0].ack()
    assert q.get(timeout=0).offset == 3


# Redelivery -------------------------------------------------------------


def test_nack_redelivers_before_newer_messages(broker):
    q = broker.queue("jobs")
    q.put_many([b"a", b"b", b"c"])
    a, b = q.get_many(2, timeout=0)
    b.nack()
    again = q.get(timeout=0)
    assert again.offset == b.offset
    assert again.attempt == 2
    a.nack()
    assert q.get(timeout=0).offset == a.offset
    assert q.get(timeout=0).offset == 2


def test_nack_delay_holds_message_back(broker):
    q = broker.queue("jobs")
    q.put_many([b"a", b"b"])
    q.get(timeout=0).nack(delay=0.3)
    start = time.monotonic()
    assert q.get(timeout=0).body == b"b"
    assert q.get(timeout=0) is None
    again = q.get(timeout=2.0)
    waited = time.monotonic() - start
    assert again.body == b"a"
    assert again.attempt == 2
    assert waited >= 0.3


def test_visibility_timeout_redelivers_at_own_position(broker):
    q = broker.queue("jobs", visibility_timeout=0.2)
    q.put_many([b"a", b"b"])
    start = time.monotonic()
    first = q.get(timeout=0)
    q.get(timeout=0).ack()
    q.put(b"c")
    time.sleep(0.25)
    again = q.get(timeout=0)
    waited = time.monotonic() - start
    assert again.offset == first.offset
    assert again.attempt == 2
    assert waited >= 0.2
    assert q.get(timeout=0).body == b"c"


def test_visibility_timeout_wakes_blocked_get(broker):
    q = broker.queue("jobs", visibility_timeout=0.2)
    q.put(b"a")
    start = time.monotonic()
    q.get(timeout=0)
    again = q.get(timeout=2.0)
    waited = time.monotonic() - start
    assert again.body == b"a"
    assert waited >= 0.2
    assert waited < 1.5


def test_extend_sets_deadline_from_now(broker):
    q = broker.queue("jobs", visibility_timeout=30.0)
    q.put(b"a")
    msg = q.get(timeout=0)
    msg.extend(0.2)
    assert q.get(timeout=0) is None
    again = q.get(timeout=2.0)
    assert again.offset == msg.offset
    assert again.attempt == 2


def test_extend_keeps_delivery_past_old_deadline(broker):
    q = broker.queue("jobs", visibility_timeout=0.2)
    q.put(b"a")
    msg = q.get(timeout=0)
    msg.extend(5.0)
    time.sleep(0.3)
    assert q.get(timeout=0) is None
    msg.ack()
    assert q.stats().acked == 1


def test_ack_twice_raises_stale_receipt(broker):
    q = broker.queue("jobs")
    q.put(b"a")
    msg = q.get(timeout=0)
    msg.ack()
    with pytest.raises(StaleReceiptError, match="expired or was already settled"):
        msg.ack()
    assert q.stats().acked == 1


@pytest.mark.parametrize("action", ["ack", "nack", "extend", "reject"])
def test_settle_after_expiry_raises_stale_receipt(broker, action):
    q = broker.queue("jobs", visibility_timeout=0.1)
    q.put(b"a")
    msg = q.get(timeout=0)
    time.sleep(0.2)
    call = {
        "ack": lambda: msg.ack(),
        "nack": lambda: msg.nack(),
        "extend": lambda: msg.extend(10.0),
        "reject": lambda: msg.reject("late"),
    }[action]
    with pytest.raises(StaleReceiptError, match="expired or was already settled"):
        call()
    stats = q.stats()
    assert stats.acked == 0
    assert stats.dead_lettered == 0
    assert stats.in_flight == 0
    assert stats.waiting == 1


@pytest.mark.parametrize("action", ["nack", "extend", "reject"])
def test_settle_after_ack_raises_stale_receipt(broker, action):
    q = broker.queue("jobs")
    q.put(b"a")
    msg = q.get(timeout=0)
    msg.ack()
    call = {
        "nack": lambda: msg.nack(),
        "extend": lambda: msg.extend(10.0),
        "reject": lambda: msg.reject("late"),
    }[action]
    with pytest.raises(StaleReceiptError, match="expired or was already settled"):
        call()
    assert q.stats().depth == 0
    assert q.stats().dead_lettered == 0


def test_old_receipt_after_redelivery_is_stale(broker):
    q = broker.queue("jobs")
    q.put(b"a")
    first = q.get(timeout=0)
    first.nack()
    second = q.get(timeout=0)
    with pytest.raises(StaleReceiptError, match="expired or was already settled"):
        first.ack()
    second.ack()
    assert q.stats().acked == 1


def test_nack_negative_delay_raises_value_error(broker):
    q = broker.queue("jobs")
    q.put(b"a")
    msg = q.get(timeout=0)
    with pytest.raises(ValueError) as raised:
        msg.nack(delay=-1.0)
    assert (
        str(raised.value) == "nack(): delay is -1.0; it must be from 0 to 1e9 seconds"
    )
    msg.ack()


# ack_many ---------------------------------------------------------------


def test_ack_many_settles_every_message(broker):
    q = broker.queue("jobs")
    q.put_many([b"a", b"b", b"c"])
    q.ack_many(q.get_many(3, timeout=0))
    stats = q.stats()
    assert stats.acked == 3
    assert stats.depth == 0


def test_ack_many_accepts_receipts(broker):
    q = broker.queue("jobs")
    q.put_many([b"a", b"b"])
    q.ack_many([m.receipt for m in q.get_many(2, timeout=0)])
    assert q.stats().acked == 2


def test_ack_many_stale_receipt_settles_none(broker):
    q = broker.queue("jobs")
    q.put_many([b"a", b"b", b"c"])
    messages = q.get_many(3, timeout=0)
    messages[1].ack()
    with pytest.raises(StaleReceiptError, match="expired or was already settled"):
        q.ack_many(messages)
    stats = q.stats()
    assert stats.acked == 1
    assert stats.in_flight == 2
    messages[0].ack()
    messages[2].ack()
    assert q.stats().acked == 3


def test_ack_many_duplicate_receipt_settles_none(broker):
    q = broker.queue("jobs")
    q.put(b"a")
    msg = q.get(timeout=0)
    with pytest.raises(StaleReceiptError, match=f"receipt {msg.receipt} appears twice"):
        q.ack_many([msg, msg.receipt])
    assert q.stats().in_flight == 1


def test_ack_many_expired_delivery_settles_none(broker):
    q = broker.queue("jobs", visibility_timeout=0.1)
    q.put(b"a")
    early = q.get(timeout=0)
    time.sleep(0.2)
    q.put(b"b")
    with pytest.raises(StaleReceiptError, match="expired or was already settled"):
        q.ack_many([early])
    assert q.stats().acked == 0


# Stats ------------------------------------------------------------------


def test_stats_empty_queue(broker):
    stats = broker.queue("jobs").stats()
    assert stats == QueueStats(
        name="jobs",
        depth=0,
        in_flight=0,
        waiting=0,
        acked=0,
        dead_lettered=0,
        oldest_unacked_age=None,
        damaged=0,
        skipped=0,
    )


def test_stats_counts_each_state(broker):
    q = broker.queue("jobs", max_deliveries=5)
    q.put_many([b"m%d" % i for i in range(6)])
    acked, nacked, held, rejected = q.get_many(4, timeout=0)
    acked.ack()
    nacked.nack(delay=60.0)
    rejected.reject("bad")
    stats = q.stats()
    assert stats.depth == 4
    assert stats.in_flight == 1
    assert stats.waiting == 1
    assert stats.acked == 1
    assert stats.dead_lettered == 1
    assert stats.damaged == 0
    assert stats.skipped == 0
    held.ack()


def test_stats_oldest_unacked_age_tracks_lowest(broker):
    q = broker.queue("jobs")
    q.put(b"old")
    time.sleep(0.2)
    q.put(b"new")
    age = q.stats().oldest_unacked_age
    assert age is not None
    assert 0.2 <= age < 5.0
    q.get(timeout=0).ack()
    assert q.stats().oldest_unacked_age < 0.2
    q.get(timeout=0).ack()
    assert q.stats().oldest_unacked_age is None


# Names and options ------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "a" * 129, ".hidden", "a/b", "..", "two words", "caf\u00e9"],
    ids=["empty", "129-chars", "leading-dot", "slash", "dotdot", "space", "ascii"],
)
def test_queue_invalid_name_creates_nothing(tmp_path, name):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        with pytest.raises(InvalidNameError, match="queue name"):
            broker.queue(name)
        assert not (data / "streams").exists()


def test_invalid_name_error_is_value_error():
    assert issubclass(InvalidNameError, ValueError)


def test_queue_name_128_chars_accepted(broker):
    name = "a" * 128
    q = broker.queue(name)
    assert q.name == name


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"visibility_timeout": -1.0}, ConfigError, "visibility_timeout"),
        ({"visibility_timeout": "30"}, TypeError, "visibility_timeout"),
        ({"visibility_timeout": True}, TypeError, "visibility_timeout"),
        ({"max_deliveries": -1}, ConfigError, "max_deliveries"),
        ({"max_deliveries": 70_000}, ConfigError, "max_deliveries"),
        ({"max_deliveries": 2.5}, TypeError, "max_deliveries"),
        ({"max_in_flight": 0}, ConfigError, "max_in_flight"),
        ({"max_in_flight": None}, TypeError, "max_in_flight"),
        ({"retention": 5}, TypeError, "unknown options: retention"),
    ],
)
def test_queue_invalid_option_raises(tmp_path, options, error, pattern):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        with pytest.raises(error, match=pattern):
            broker.queue("jobs", **options)
        assert not (data / "streams" / "jobs").exists()


def test_queue_options_reopen_from_store(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        broker.queue("jobs", visibility_timeout=7.5, max_deliveries=2, max_in_flight=9)
    with pymq.open(data) as broker:
        q = broker.queue("jobs")
        assert q.visibility_timeout == 7.5
        assert q.max_deliveries == 2
        assert q.max_in_flight == 9


def test_queue_explicit_option_updates_store(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        broker.queue("jobs", visibility_timeout=7.5, max_deliveries=2)
    with pymq.open(data) as broker:
        q = broker.queue("jobs", max_deliveries=4)
        assert q.max_deliveries == 4
        assert q.visibility_timeout == 7.5
    assert stored_options(data, "jobs")["max_deliveries"] == 4
    with pymq.open(data) as broker:
        assert broker.queue("jobs").max_deliveries == 4


def test_queue_option_change_while_open_is_stored(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        first = broker.queue("jobs", max_deliveries=3)
        again = broker.queue("jobs", max_deliveries=7)
        assert again is first
        assert first.max_deliveries == 7
    assert stored_options(data, "jobs")["max_deliveries"] == 7
    with pymq.open(data) as broker:
        assert broker.queue("jobs").max_deliveries == 7


def test_queue_defaults_are_stored(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        q = broker.queue("jobs")
        assert q.visibility_timeout == 30.0
        assert q.max_deliveries == 5
        assert q.max_in_flight == 10_000
    assert stored_options(data, "jobs") == {
        "visibility_timeout": 30.0,
        "max_deliveries": 5,
        "max_in_flight": 10_000,
        "max_length": None,
        "max_bytes": None,
        "overflow": "reject",
    }


def test_queue_name_of_stream_raises_config_error(broker):
    broker.stream("events")
    with pytest.raises(ConfigError, match="events is a stream, not a queue"):
        broker.queue("events")


# Opening and closing ----------------------------------------------------


def test_open_without_path_leaves_nothing(tmp_path):
    broker = pymq.open()
    path = broker.path
    q = broker.queue("jobs")
    q.put(b"a")
    assert q.get(timeout=0).body == b"a"
    assert path.exists()
    broker.close()
    assert not path.exists()


def test_open_without_path_removed_at_exit():
    script = "import pymq; b = pymq.open(); b.queue('jobs').put(b'x'); print(b.path)"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    try:
        assert path.name.startswith("pymq-memory-")
        # The process ended without closing its broker.
        assert not path.exists()
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_open_locked_by_other_process_raises_with_pid(tmp_path):
    data = tmp_path / "data"
    # The holder sleeps until it is killed; the bound only ends an orphan.
    script = (
        "import sys, time, pymq; broker = pymq.open(sys.argv[1]); "
        "print('ready', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(data)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(BrokerLockedError, match="is locked by process") as info:
            pymq.open(data)
        assert info.value.pid == holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
        holder.stdout.close()
    with pymq.open(data) as reopened:
        assert reopened.path == data


def test_open_locked_path_raises_with_pid(tmp_path):
    import os

    data = tmp_path / "data"
    with pymq.open(data):
        with pytest.raises(BrokerLockedError, match="is locked by process") as info:
            pymq.open(data)
        assert info.value.pid == os.getpid()
    with pymq.open(data) as reopened:
        assert reopened.path == data


def test_closed_broker_raises_closed_error(tmp_path):
    broker = pymq.open(tmp_path / "data")
    broker.close()
    broker.close()
    with pytest.raises(pymq.ClosedError, match="is closed"):
        broker.queue("jobs")


def segment_logs(log: Path) -> list[Path]:
    return sorted(log.glob("*.log"))


def test_queue_segments_deleted_once_acked(tmp_path):
    data = tmp_path / "data"
    log = data / "streams" / "jobs" / "log"
    with pymq.open(data, segment_bytes=4096) as broker:
        q = broker.queue("jobs")
        q.put_many([b"x" * 200] * 200)
        before = segment_logs(log)
        assert len(before) > 5
        q.ack_many(q.get_many(100, timeout=0))
        middle = segment_logs(log)
        assert len(middle) < len(before)
        assert before[0] not in middle
        assert before[-1] in middle
        q.ack_many(q.get_many(100, timeout=0))
        after = segment_logs(log)
        assert after == [before[-1]]
        assert q.stats().depth == 0


def test_queue_segment_kept_while_one_unacked(tmp_path):
    data = tmp_path / "data"
    log = data / "streams" / "jobs" / "log"
    with pymq.open(data, segment_bytes=4096) as broker:
        q = broker.queue("jobs")
        q.put_many([b"x" * 200] * 100)
        before = segment_logs(log)
        held = q.get(timeout=0)
        q.ack_many(q.get_many(99, timeout=0))
        assert segment_logs(log)[0] == before[0]
        held.ack()
        assert before[0] not in segment_logs(log)


def test_close_wakes_blocked_get_with_closed_error(tmp_path):
    broker = pymq.open(tmp_path / "data")
    q = broker.queue("jobs")
    outcome: list = []

    def wait_forever() -> None:
        try:
            outcome.append(q.get(timeout=None))
        except pymq.ClosedError as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_forever, daemon=True)
    waiter.start()
    time.sleep(0.2)
    broker.close()
    waiter.join(5.0)
    assert not waiter.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], pymq.ClosedError)


def option_changes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "pymq.broker" and "changed from" in record.getMessage()
    ]


def test_option_change_logged_once_at_info(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pymq.broker")
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        broker.queue("jobs")
        broker.queue("jobs", visibility_timeout=5.0)
        events = broker.stream("events")
        events.group("billing")
        events.group("billing", max_in_flight=7)
        assert option_changes(caplog) == [
            "queue jobs: visibility_timeout changed from 30.0 to 5.0",
            "group billing of events: max_in_flight changed from 10000 to 7",
        ]
    caplog.clear()

    with pymq.open(data) as broker:
        broker.queue("jobs", visibility_timeout=6.0)
        broker.queue("jobs", visibility_timeout=6.0)
    assert option_changes(caplog) == [
        "queue jobs: visibility_timeout changed from 5.0 to 6.0"
    ]
    records = [r for r in caplog.records if "changed from" in r.getMessage()]
    assert [record.levelno for record in records] == [logging.INFO]
