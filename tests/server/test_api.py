"""The broker API, run against the embedded broker and a server alike.

Every test takes the `broker` fixture, so it runs once on pymq.open() and
once on pymq.connect() to a server subprocess, with the same body. Names
come from the `name` fixture, unique on the shared server.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from pymq import (
    ConfigError,
    InvalidNameError,
    MessageBatch,
    MessageTooLargeError,
    PymqError,
    QueueFull,
    QueueNotFound,
    StaleReceiptError,
)

X_HEADERS = {"x-source", "x-group", "x-offset", "x-attempts", "x-reason", "x-dead-at"}
MAX_MESSAGE_BYTES = 1 << 20  # the default of pymq.open() and of the server
WAIT = 10.0  # bounds a get that must find a message; never reached when it does


# Putting and getting ----------------------------------------------------


def test_put_get_ack_exact_fields(broker, name):
    q = broker.queue(name)
    before = time.time_ns()
    assert q.put(b"first") == 0
    assert q.put(b"second", headers={"kind": "demo", "n": "2"}) == 1
    after = time.time_ns()

    first = q.get(timeout=WAIT)
    assert first.body == b"first"
    assert first.offset == 0
    assert first.headers == {}
    assert first.attempt == 1
    assert before <= first.timestamp <= after
    first.ack()

    second = q.get(timeout=WAIT)
    assert second.body == b"second"
    assert second.offset == 1
    assert second.headers == {"kind": "demo", "n": "2"}
    assert second.attempt == 1
    q.ack(second.receipt)

    assert q.get(timeout=0) is None
    stats = q.stats()
    assert stats.depth == 0
    assert stats.acked == 2


def test_put_many_returns_offset_range(broker, name):
    q = broker.queue(name)
    assert q.put(b"first") == 0
    assert q.put_many([b"a", b"b", b"c"]) == range(1, 4)
    assert q.put_many([b"d", b"e"], headers={"batch": "7"}) == range(4, 6)

    messages = q.get_many(10, timeout=WAIT)
    assert [m.offset for m in messages] == [0, 1, 2, 3, 4, 5]
    assert [m.body for m in messages] == [b"first", b"a", b"b", b"c", b"d", b"e"]
    assert [m.headers for m in messages[4:]] == [{"batch": "7"}, {"batch": "7"}]
    assert [m.headers for m in messages[:4]] == [{}, {}, {}, {}]


def test_binary_and_empty_bodies(broker, name):
    q = broker.queue(name)
    bodies = [b"", bytes(range(256)), b"\x00" * 1000, "héllo".encode()]
    assert q.put_many(bodies) == range(4)
    assert [m.body for m in q.get_many(4, timeout=WAIT)] == bodies


def test_get_many_lowest_offset_first(broker, name):
    q = broker.queue(name, visibility_timeout=3600)
    q.put_many([b"0", b"1", b"2", b"3", b"4"])
    delivered = q.get_many(3, timeout=WAIT)
    assert [m.offset for m in delivered] == [0, 1, 2]

    delivered[1].nack()
    again = q.get_many(10, timeout=WAIT)
    assert [m.offset for m in again] == [1, 3, 4]
    assert [m.attempt for m in again] == [2, 1, 1]


def test_get_many_mixed_reply_fields(broker, name):
    # One reply contains a redelivery (with headers) before fresh messages
    # with and without headers. Each keeps its own fields.
    q = broker.queue(name, visibility_timeout=3600)
    q.put(b"again", headers={"kind": "retry"})
    q.put_many([b"plain", b""])
    q.put(b"tagged", headers={"n": "3"})
    first = q.get(timeout=WAIT)
    first.nack()

    messages = q.get_many(10, timeout=WAIT)
    assert [m.offset for m in messages] == [0, 1, 2, 3]
    assert [m.attempt for m in messages] == [2, 1, 1, 1]
    assert [m.body for m in messages] == [b"again", b"plain", b"", b"tagged"]
    assert [m.headers for m in messages] == [{"kind": "retry"}, {}, {}, {"n": "3"}]
    assert messages[0].timestamp == first.timestamp
    assert messages[0].receipt != first.receipt
    assert len({m.receipt for m in messages}) == 4
    q.ack_many(messages)
    assert q.stats().acked == 4
    assert q.stats().depth == 0


def test_get_timeout_returns_none(broker, name):
    q = broker.queue(name)
    assert q.get(timeout=0.2) is None
    assert q.get(timeout=0) is None
    assert q.get_many(5, timeout=0.1) == []


def test_get_batch_exact_columns(broker, name):
    q = broker.queue(name, visibility_timeout=3600)
    before = time.time_ns()
    assert q.put_many([b"a", b"bb", b""]) == range(3)
    assert q.put(b"dddd", headers={"kind": "demo"}) == 3
    after = time.time_ns()

    batch = q.get_batch(10, timeout=WAIT)
    assert isinstance(batch, MessageBatch)
    assert len(batch) == 4
    assert batch.offsets.dtype == np.dtype("<u8")
    assert batch.receipts.dtype == np.dtype("<u8")
    assert batch.attempts.dtype == np.dtype("<u4")
    assert batch.timestamps.dtype == np.dtype("<i8")
    assert batch.lengths.dtype == np.dtype("<u8")
    assert batch.offsets.tolist() == [0, 1, 2, 3]
    assert batch.attempts.tolist() == [1, 1, 1, 1]
    assert batch.lengths.tolist() == [1, 2, 0, 4]
    assert batch.starts.tolist() == [0, 1, 3, 3]
    assert batch.data == b"abbdddd"
    assert [bytes(batch.body(i)) for i in range(4)] == [b"a", b"bb", b"", b"dddd"]
    assert batch.headers == [None, None, None, {"kind": "demo"}]
    assert all(before <= t <= after for t in batch.timestamps.tolist())
    assert len(set(batch.receipts.tolist())) == 4
    assert q.stats().in_flight == 4

    q.ack_many(batch)
    stats = q.stats()
    assert (stats.depth, stats.in_flight, stats.acked) == (0, 0, 4)


def test_get_batch_headers_none_without_headers(broker, name):
    q = broker.queue(name)
    q.put_many([b"a", b"b", b"c"])
    batch = q.get_batch(10, timeout=5)
    assert batch.headers == [None, None, None]
    q.ack_many(batch)
    assert q.stats().acked == 3


def test_get_batch_of_nothing_is_empty(broker, name):
    q = broker.queue(name)
    for batch in (q.get_batch(5, timeout=0), q.get_batch(5, timeout=0.1)):
        assert len(batch) == 0
        assert batch.data == b""
        assert batch.headers == []
        assert batch.offsets.tolist() == []
        assert batch.starts.tolist() == []
    q.ack_many(q.get_batch(5, timeout=0))
    assert q.stats().acked == 0


def test_get_batch_takes_count_and_redelivers(broker, name):
    q = broker.queue(name, visibility_timeout=3600)
    q.put_many([b"0", b"1", b"2", b"3", b"4"])
    first = q.get_batch(2, timeout=WAIT)
    assert first.offsets.tolist() == [0, 1]
    assert first.data == b"01"

    q.nack(int(first.receipts[1]))
    second = q.get_batch(10, timeout=WAIT)
    assert second.offsets.tolist() == [1, 2, 3, 4]
    assert second.attempts.tolist() == [2, 1, 1, 1]
    assert second.data == b"1234"

    # all or none: offset 1 of the first batch is stale now.
    with pytest.raises(StaleReceiptError):
        q.ack_many(first)
    assert q.stats().in_flight == 5
    q.ack(int(first.receipts[0]))
    q.ack_many(second)
    stats = q.stats()
    assert (stats.depth, stats.in_flight, stats.acked) == (0, 0, 5)


def test_get_batch_of_other_queue_cannot_settle(broker, name):
    first = broker.queue(f"{name}-a", visibility_timeout=3600)
    second = broker.queue(f"{name}-b", visibility_timeout=3600)
    first.put(b"a")
    second.put(b"b")
    batch = first.get_batch(1, timeout=WAIT)
    second.get(timeout=WAIT)

    with pytest.raises(StaleReceiptError):
        second.ack_many(batch)
    assert second.stats().in_flight == 1
    first.ack_many(batch)
    assert first.stats().acked == 1


def test_get_batch_of_group(broker, name):
    stream = broker.stream(name)
    billing = stream.group("billing", visibility_timeout=3600)
    stream.put_many([b"x", b"yy"])
    stream.put(b"zzz", headers={"n": "3"})

    batch = billing.get_batch(10, timeout=WAIT)
    assert batch.offsets.tolist() == [0, 1, 2]
    assert batch.lengths.tolist() == [1, 2, 3]
    assert batch.data == b"xyyzzz"
    assert batch.headers == [None, None, {"n": "3"}]
    billing.ack_many(batch)
    assert billing.stats().acked == 3
    assert len(billing.get_batch(10, timeout=0)) == 0


def test_get_batch_larger_than_a_frame(broker, name):
    # 20 MiB of bodies: a server sends them in two DELIVER frames or more.
    q = broker.queue(name, visibility_timeout=3600)
    bodies = [bytes([i]) * MAX_MESSAGE_BYTES for i in range(20)]
    for body in bodies:
        q.put(body)
    batch = q.get_batch(20, timeout=WAIT)
    assert batch.offsets.tolist() == list(range(20))
    assert batch.lengths.tolist() == [MAX_MESSAGE_BYTES] * 20
    assert batch.data == b"".join(bodies)
    q.ack_many(batch)
    assert q.stats().acked == 20


@pytest.mark.parametrize(
    ("count", "error"),
    [(0, ValueError), (-1, ValueError), ("3", TypeError), (2.5, TypeError)],
)
def test_get_batch_bad_count_raises(broker, name, count, error):
    q = broker.queue(name)
    with pytest.raises(error):
        q.get_batch(count, timeout=0)


# Settling ---------------------------------------------------------------


def test_nack_redelivers_before_newer(broker, name):
    q = broker.queue(name, visibility_timeout=3600)
    q.put_many([b"a", b"b"])
    a = q.get(timeout=WAIT)
    a.nack()
    q.put(b"c")

    messages = q.get_many(3, timeout=WAIT)
    assert [(m.body, m.offset, m.attempt) for m in messages] == [
        (b"a", 0, 2),
        (b"b", 1, 1),
        (b"c", 2, 1),
    ]


def test_nack_delay_holds_message_back(broker, name):
    q = broker.queue(name, visibility_timeout=3600)
    q.put_many([b"a", b"b"])
    # The checks below run well within the 1 s delay, even on a loaded machine.
    q.get(timeout=WAIT).nack(delay=1.0)

    b = q.get(timeout=0)
    assert (b.body, b.attempt) == (b"b", 1)
    assert q.get(timeout=0) is None
    assert q.stats().waiting == 1

    a = q.get(timeout=WAIT)
    assert (a.body, a.offset, a.attempt) == (b"a", 0, 2)


def test_visibility_timeout_redelivers(broker, name):
    q = broker.queue(name, visibility_timeout=0.3)
    q.put(b"slow")
    first = q.get(timeout=WAIT)
    second = q.get(timeout=WAIT)
    assert (second.offset, second.attempt) == (0, 2)
    with pytest.raises(StaleReceiptError):
        first.ack()
    second.ack()
    assert q.stats().acked == 1


def test_extend_keeps_delivery(broker, name):
    q = broker.queue(name, visibility_timeout=0.5)
    q.put(b"long job")
    message = q.get(timeout=WAIT)
    message.extend(3600)
    # Twice the visibility timeout passes: only the extend keeps it in flight.
    time.sleep(1.0)
    assert q.get(timeout=0) is None
    assert q.stats().in_flight == 1
    message.ack()
    assert q.stats().acked == 1


def test_reject_moves_to_dlq_with_headers(broker, name):
    q = broker.queue(name)
    q.put(b"keep")
    q.put(b"poison", headers={"kind": "demo"})
    q.get(timeout=WAIT)
    message = q.get(timeout=WAIT)
    before = time.time_ns()
    message.reject("bad input")
    after = time.time_ns()

    assert q.dlq_name == f"{name}.dlq"
    dead = q.dlq.get(timeout=WAIT)
    assert dead.body == b"poison"
    assert set(dead.headers) == X_HEADERS | {"kind"}
    assert dead.headers["kind"] == "demo"
    assert dead.headers["x-source"] == name
    assert dead.headers["x-group"] == ""
    assert dead.headers["x-offset"] == "1"
    assert dead.headers["x-attempts"] == "1"
    assert dead.headers["x-reason"] == "bad input"
    assert before <= int(dead.headers["x-dead-at"]) <= after
    stats = q.stats()
    assert stats.dead_lettered == 1
    assert stats.depth == 1


def test_stale_receipt_changes_nothing(broker, name):
    q = broker.queue(name, visibility_timeout=3600)
    q.put_many([b"a", b"b"])
    a = q.get(timeout=WAIT)
    b = q.get(timeout=WAIT)
    a.ack()
    before = q.stats()

    with pytest.raises(StaleReceiptError):
        a.ack()
    with pytest.raises(StaleReceiptError):
        a.nack()
    with pytest.raises(StaleReceiptError):
        a.extend(10)
    with pytest.raises(StaleReceiptError):
        a.reject("late")

    after = q.stats()
    assert (after.depth, after.in_flight, after.acked) == (1, 1, 1)
    assert (after.depth, after.in_flight, after.acked) == (
        before.depth,
        before.in_flight,
        before.acked,
    )
    assert after.dead_lettered == 0
    assert q.dlq.stats().depth == 0
    assert q.get(timeout=0) is None
    b.ack()


def test_receipt_of_other_queue_is_stale(broker, name):
    """A receipt names one delivery of one queue: another queue rejects it."""
    first = broker.queue(f"{name}-1", visibility_timeout=3600)
    second = broker.queue(f"{name}-2", visibility_timeout=3600)
    for queue in (first, second):
        queue.put_many([b"a", b"b", b"c"])
    mine = first.get_many(3, timeout=WAIT)
    theirs = second.get_many(3, timeout=WAIT)
    assert [m.offset for m in mine] == [m.offset for m in theirs] == [0, 1, 2]

    for message in theirs:
        with pytest.raises(StaleReceiptError):
            first.ack(message.receipt)
        with pytest.raises(StaleReceiptError):
            first.nack(message.receipt)
        with pytest.raises(StaleReceiptError):
            first.extend(message.receipt, 10)
        with pytest.raises(StaleReceiptError):
            first.reject(message.receipt, "not mine")
    with pytest.raises(StaleReceiptError):
        first.ack_many([message.receipt for message in theirs])

    stats = first.stats()
    assert (stats.in_flight, stats.acked, stats.dead_lettered) == (3, 0, 0)
    first.ack_many(mine)
    second.ack_many([message.receipt for message in theirs])
    assert first.stats().acked == 3
    assert second.stats().acked == 3


def test_stale_receipt_message_names_queue(broker, name):
    q = broker.queue(name, visibility_timeout=3600)
    q.put(b"a")
    message = q.get(timeout=WAIT)
    message.ack()
    with pytest.raises(StaleReceiptError) as raised:
        q.ack(message.receipt)
    assert str(raised.value) == (
        f"receipt {message.receipt} of queue {name} names a delivery that "
        f"expired or was already settled"
    )


def test_stale_receipt_message_names_group(broker, name):
    group = broker.stream(name).group("billing", visibility_timeout=3600)
    broker.stream(name).put(b"a")
    message = group.get(timeout=WAIT)
    message.ack()
    with pytest.raises(StaleReceiptError) as raised:
        group.ack(message.receipt)
    assert str(raised.value) == (
        f"receipt {message.receipt} of group billing of stream {name} names a "
        f"delivery that expired or was already settled"
    )


@pytest.mark.parametrize("receipt", [-1, 1 << 64], ids=["negative", "2^64"])
def test_receipt_out_of_range_raises(broker, name, receipt):
    q = broker.queue(name)
    q.put(b"kept")
    message = q.get(timeout=WAIT)
    for settle in (q.ack, q.nack):
        with pytest.raises(OverflowError):
            settle(receipt)
    with pytest.raises(OverflowError):
        q.extend(receipt, 10.0)
    with pytest.raises(OverflowError):
        q.reject(receipt, "never")
    assert q.stats().in_flight == 1
    message.ack()


def test_receipt_of_wrong_type_raises(broker, name):
    q = broker.queue(name)
    with pytest.raises(TypeError):
        q.ack("1")
    with pytest.raises(TypeError):
        q.nack("1")


def test_header_of_wrong_type_raises(broker, name):
    q = broker.queue(name)
    with pytest.raises(TypeError) as raised:
        q.put(b"body", headers={"k": 1})
    assert str(raised.value) == "value of header 'k' must be str, not int"
    with pytest.raises(TypeError) as raised:
        q.put_many([b"a", b"b"], headers={"k": None})
    assert str(raised.value) == "value of header 'k' must be str, not NoneType"
    with pytest.raises(TypeError) as raised:
        q.put(b"body", headers={1: "v"})
    assert str(raised.value) == "header names must be str, not int (1)"
    assert q.stats().depth == 0


def reserved_header_error(header):
    return (
        f"header {header!r} is reserved for the headers that pymq writes when it "
        f"moves a message to a dead-letter queue and back (x-attempts, x-dead-at, "
        f"x-for-group, x-group, x-offset, x-reason, x-source); use another name"
    )


@pytest.mark.parametrize("header", sorted(X_HEADERS | {"x-for-group"}))
def test_reserved_header_raises_value_error(broker, name, header):
    q = broker.queue(name)
    stream = broker.stream(f"{name}-stream")
    for target in (q, stream):
        with pytest.raises(ValueError) as raised:
            target.put(b"body", headers={"kind": "demo", header: "mine"})
        assert str(raised.value) == reserved_header_error(header)
        with pytest.raises(ValueError) as raised:
            target.put_many([b"a", b"b"], headers={header: "mine"})
        assert str(raised.value) == reserved_header_error(header)
    # Nothing was written, so the first good put takes offset 0. Names
    # that only start like the reserved ones are the caller's.
    assert q.put(b"body", headers={f"{header}s": "mine"}) == 0
    assert stream.put(b"body", headers={f"{header}s": "mine"}) == 0


def test_unencodable_header_raises_value_error(broker, name):
    q = broker.queue(name)
    with pytest.raises(ValueError) as raised:
        q.put(b"body", headers={"trace": "x\udc80"})
    assert str(raised.value) == (
        "value of header 'trace' cannot be encoded as UTF-8: it has a lone "
        "surrogate at index 1"
    )
    with pytest.raises(ValueError) as raised:
        q.put_many([b"body"], headers={"bad\udc80": "v"})
    assert str(raised.value) == (
        "header name 'bad\\udc80' cannot be encoded as UTF-8: it has a lone "
        "surrogate at index 3"
    )
    assert q.stats().depth == 0


def test_dead_letter_queue_takes_reserved_headers(broker, name):
    dlq = broker.queue(name).dlq
    headers = {"x-source": name, "x-group": "", "x-reason": "imported"}
    assert dlq.put(b"one", headers=headers) == 0
    assert dlq.put_many([b"two"], headers=headers) == range(1, 2)
    moved = dlq.get(timeout=WAIT)
    assert moved.headers == headers
    moved.ack()


@pytest.mark.parametrize("timeout", ["1", True, [1]], ids=["str", "bool", "list"])
def test_timeout_of_wrong_type_raises(broker, name, timeout):
    q = broker.queue(name)
    expected = f"timeout must be a number of seconds or None, not {timeout!r}"
    # The embedded broker's message starts with the call ("get(): "); the
    # clients' message is the same without it.
    calls = {
        "get": lambda: q.get(timeout=timeout),
        "get_many": lambda: q.get_many(5, timeout=timeout),
        "put": lambda: q.put(b"body", timeout=timeout),
    }
    for method, call in calls.items():
        with pytest.raises(TypeError) as raised:
            call()
        assert str(raised.value) in (expected, f"{method}(): {expected}")
    assert q.stats().depth == 0


def test_ack_many_all_or_none(broker, name):
    q = broker.queue(name, visibility_timeout=3600)
    q.put_many([b"a", b"b", b"c"])
    messages = q.get_many(3, timeout=WAIT)
    messages[0].ack()

    with pytest.raises(StaleReceiptError):
        q.ack_many(messages)
    stats = q.stats()
    assert stats.acked == 1
    assert stats.in_flight == 2

    q.ack_many(messages[1:])
    stats = q.stats()
    assert stats.acked == 3
    assert stats.depth == 0


def test_max_deliveries_moves_to_dlq(broker, name):
    q = broker.queue(name, max_deliveries=2, visibility_timeout=3600)
    q.put(b"poison", headers={"kind": "demo"})
    first = q.get(timeout=WAIT)
    assert first.attempt == 1
    first.nack()
    second = q.get(timeout=WAIT)
    assert second.attempt == 2
    second.nack()

    assert q.get(timeout=0) is None
    dead = q.dlq.get(timeout=WAIT)
    assert dead.body == b"poison"
    assert dead.headers["kind"] == "demo"
    assert dead.headers["x-source"] == name
    assert dead.headers["x-offset"] == "0"
    assert dead.headers["x-attempts"] == "2"
    assert dead.headers["x-reason"] == "nack; max_deliveries reached"
    assert q.stats().dead_lettered == 1


def test_redrive_returns_to_source(broker, name):
    q = broker.queue(name)
    q.put(b"one", headers={"kind": "demo"})
    q.put(b"two")
    for message in q.get_many(2, timeout=WAIT):
        message.reject("failed")
    assert q.dlq.stats().depth == 2

    assert broker.redrive(q.dlq_name) == 2
    back = q.get_many(10, timeout=WAIT)
    assert [m.body for m in back] == [b"one", b"two"]
    assert [m.headers for m in back] == [{"kind": "demo"}, {}]
    assert [m.offset for m in back] == [2, 3]
    assert [m.attempt for m in back] == [1, 1]
    assert q.dlq.stats().depth == 0


def test_redrive_to_other_queue(broker, name):
    q = broker.queue(name)
    other = broker.queue(f"{name}-other")
    q.put(b"moved", headers={"kind": "demo"})
    q.get(timeout=WAIT).reject("failed")

    assert broker.redrive(q.dlq_name, to=other.name) == 1
    message = other.get(timeout=WAIT)
    assert (message.body, message.headers, message.offset) == (
        b"moved",
        {"kind": "demo"},
        0,
    )
    assert q.get(timeout=0) is None


def put_dead_letters(broker, name, count, *, missing_at=None):
    """Put count messages into name's DLQ, as if they had failed in name.

    The message at missing_at, if any, names a source that does not exist.
    """
    broker.queue(name)
    dlq = broker.queue(f"{name}.dlq")
    headers = {"x-source": name, "x-group": "", "x-reason": "test"}
    bodies = [b"%d" % i for i in range(count)]
    if missing_at is None:
        dlq.put_many(bodies, headers=headers)
        return
    dlq.put_many(bodies[:missing_at], headers=headers)
    dlq.put(bodies[missing_at], headers=dict(headers, **{"x-source": f"{name}-gone"}))
    dlq.put_many(bodies[missing_at + 1 :], headers=headers)


def test_redrive_reports_progress_per_batch(broker, name):
    put_dead_letters(broker, name, 2500)
    reports = []
    assert broker.redrive(f"{name}.dlq", progress=reports.append) == 2500
    assert reports == [1000, 2000, 2500]
    q = broker.queue(name)
    assert q.stats().depth == 2500
    assert [m.body for m in q.get_many(3, timeout=WAIT)] == [b"0", b"1", b"2"]

    assert broker.redrive(f"{name}.dlq", progress=reports.append) == 0
    assert reports == [1000, 2000, 2500]


def test_redrive_failure_reports_exact_count(broker, name):
    put_dead_letters(broker, name, 2000, missing_at=1500)
    reports = []
    with pytest.raises(PymqError, match="names no queue or group"):
        broker.redrive(f"{name}.dlq", progress=reports.append)
    assert reports == [1000, 1500]
    assert broker.queue(name).stats().depth == 1500
    assert broker.queue(f"{name}.dlq").stats().depth == 500


def test_redrive_missing_dlq_raises(broker, name):
    with pytest.raises(QueueNotFound):
        broker.redrive(f"{name}.dlq")


def test_redrive_to_missing_queue_creates_nothing(broker, name):
    q = broker.queue(name)
    q.put(b"kept")
    q.get(timeout=WAIT).reject("failed")
    target = f"{name}-typo"

    with pytest.raises(QueueNotFound) as raised:
        broker.redrive(q.dlq_name, to=target)
    assert str(raised.value) == (
        f"queue {target} does not exist; redrive moves messages only into an "
        f"existing queue"
    )
    assert target not in broker.names()
    assert q.dlq.stats().depth == 1
    assert q.dlq.stats().in_flight == 0


def test_redrive_to_stream_raises(broker, name):
    q = broker.queue(name)
    q.put(b"kept")
    q.get(timeout=WAIT).reject("failed")
    broker.stream(f"{name}-events")

    with pytest.raises(ConfigError) as raised:
        broker.redrive(q.dlq_name, to=f"{name}-events")
    assert str(raised.value) == f"{name}-events is a stream, not a queue"
    assert q.dlq.stats().depth == 1


# Streams and groups -------------------------------------------------------


def test_each_group_gets_every_message(broker, name):
    stream = broker.stream(name)
    billing = stream.group("billing", visibility_timeout=3600)
    audit = stream.group("audit", visibility_timeout=3600)
    assert stream.put_many([b"a", b"b", b"c"]) == range(3)
    assert stream.put(b"d", headers={"kind": "demo"}) == 3

    for group in (billing, audit):
        messages = group.get_many(10, timeout=WAIT)
        assert [m.body for m in messages] == [b"a", b"b", b"c", b"d"]
        assert [m.offset for m in messages] == [0, 1, 2, 3]
        assert messages[3].headers == {"kind": "demo"}
        group.ack_many(messages)

    assert billing.stats().acked == 4
    assert audit.stats().acked == 4
    assert billing.dlq_name == f"{name}.billing.dlq"
    assert broker.groups(name) == ["audit", "billing"]


def test_group_reject_sets_group_header(broker, name):
    stream = broker.stream(name)
    group = stream.group("workers")
    stream.put(b"bad")
    group.get(timeout=WAIT).reject("broken")

    dead = group.dlq.get(timeout=WAIT)
    assert dead.headers["x-source"] == name
    assert dead.headers["x-group"] == "workers"
    assert dead.headers["x-reason"] == "broken"


def test_group_redrive_goes_to_that_group_only(broker, name):
    stream = broker.stream(name)
    failing = stream.group("failing")
    other = stream.group("other")
    stream.put(b"job")
    failing.get(timeout=WAIT).reject("broken")
    other.get(timeout=WAIT).ack()

    assert broker.redrive(failing.dlq_name) == 1
    again = failing.get(timeout=WAIT)
    assert (again.body, again.offset) == (b"job", 1)
    assert other.get(timeout=0) is None


def test_group_start_latest_and_offset(broker, name):
    stream = broker.stream(name)
    stream.put_many([b"old0", b"old1"])
    latest = stream.group("latest", start="latest")
    from_one = stream.group("from-one", start=1)
    assert latest.get(timeout=0) is None

    stream.put(b"new")
    message = latest.get(timeout=WAIT)
    assert (message.body, message.offset) == (b"new", 2)
    assert [m.offset for m in from_one.get_many(10, timeout=WAIT)] == [1, 2]


def test_group_start_past_end_raises(broker, name):
    stream = broker.stream(name)
    stream.put(b"only")
    with pytest.raises(ConfigError):
        stream.group("ahead", start=5)
    with pytest.raises(ConfigError):
        stream.group("nowhere", start="middle")


# Stats, names and options -------------------------------------------------


def test_stats_values(broker, name):
    q = broker.queue(name, visibility_timeout=3600)
    assert q.put_many([b"1", b"2", b"3", b"4", b"5"]) == range(5)
    delivered = q.get_many(3, timeout=WAIT)
    delivered[0].nack(delay=3600)
    delivered[1].ack()
    delivered[2].reject("failed")

    stats = q.stats()
    assert stats.name == name
    assert stats.depth == 3
    assert stats.in_flight == 0
    assert stats.waiting == 1
    assert stats.acked == 1
    assert stats.dead_lettered == 1
    assert stats.damaged == 0
    assert stats.skipped == 0
    assert stats.oldest_unacked_age >= 0

    q.get(timeout=WAIT)
    assert q.stats().in_flight == 1


def test_stats_of_empty_queue(broker, name):
    stats = broker.queue(name).stats()
    assert stats.name == name
    assert stats.depth == 0
    assert stats.in_flight == 0
    assert stats.waiting == 0
    assert stats.acked == 0
    assert stats.dead_lettered == 0
    assert stats.oldest_unacked_age is None


def test_names_and_groups(broker, name):
    broker.queue(f"{name}-q")
    stream = broker.stream(f"{name}-s")
    assert broker.groups(f"{name}-s") == []
    stream.group("b")
    stream.group("a")

    names = {key: kind for key, kind in broker.names().items() if key.startswith(name)}
    assert names == {f"{name}-q": "queue", f"{name}-s": "stream"}
    assert broker.groups(f"{name}-s") == ["a", "b"]
    with pytest.raises(QueueNotFound):
        broker.groups(f"{name}-missing")


def test_queue_options_stored_and_returned(broker, name):
    q = broker.queue(
        name,
        visibility_timeout=12.5,
        max_deliveries=3,
        max_in_flight=7,
        max_length=100,
        overflow="block",
    )
    assert q.visibility_timeout == 12.5
    assert q.max_deliveries == 3
    assert q.max_in_flight == 7
    assert q.max_length == 100
    assert q.max_bytes is None
    assert q.overflow == "block"

    # An explicit different value updates that option and keeps the others.
    updated = broker.queue(name, visibility_timeout=20.0)
    assert updated.visibility_timeout == 20.0
    assert updated.max_deliveries == 3
    assert updated.max_in_flight == 7
    assert updated.max_length == 100
    assert updated.overflow == "block"


def test_queue_default_options(broker, name):
    q = broker.queue(name)
    assert q.visibility_timeout == 30.0
    assert q.max_deliveries == 5
    assert q.max_in_flight == 10_000
    assert q.max_length is None
    assert q.max_bytes is None
    assert q.overflow == "reject"


def test_group_options_stored_and_returned(broker, name):
    group = broker.stream(name).group("g", visibility_timeout=5.0, max_deliveries=0)
    assert group.visibility_timeout == 5.0
    assert group.max_deliveries == 0
    assert group.max_in_flight == 10_000


def test_max_in_flight_limits_get_many(broker, name):
    q = broker.queue(name, max_in_flight=2)
    q.put_many([b"a", b"b", b"c"])
    assert [m.offset for m in q.get_many(3, timeout=WAIT)] == [0, 1]
    assert q.get(timeout=0) is None


# Errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "bad name", ".hidden", "x" * 129, "naïve", "a/b", "tab\t"]
)
def test_invalid_names_raise(broker, name, bad):
    with pytest.raises(InvalidNameError):
        broker.queue(bad)
    with pytest.raises(InvalidNameError):
        broker.stream(bad)
    with pytest.raises(InvalidNameError):
        broker.stream(name).group(bad)


@pytest.mark.parametrize(
    "options",
    [
        {"visibility_timeout": 0},
        {"visibility_timeout": -1.0},
        {"max_deliveries": -1},
        {"max_deliveries": 70_000},
        {"max_in_flight": 0},
        {"max_length": 0},
        {"overflow": "drop"},
    ],
    ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()),
)
def test_bad_option_values_raise_config_error(broker, name, options):
    with pytest.raises(ConfigError):
        broker.queue(name, **options)
    # Nothing was stored: the queue opens with its defaults.
    q = broker.queue(name)
    assert q.visibility_timeout == 30.0
    assert q.max_deliveries == 5


@pytest.mark.parametrize(
    "options",
    [{"visibility": 10}, {"visibility_timeout": "10"}, {"max_length": 2.5}],
    ids=["unknown-name", "str-timeout", "float-length"],
)
def test_option_type_errors_raise_type_error(broker, name, options):
    with pytest.raises(TypeError):
        broker.queue(name, **options)


def test_body_over_max_message_bytes_raises(broker, name):
    q = broker.queue(name)
    with pytest.raises(MessageTooLargeError):
        q.put(b"x" * (MAX_MESSAGE_BYTES + 1))
    assert q.stats().depth == 0
    assert q.put(b"x" * MAX_MESSAGE_BYTES) == 0
    assert len(q.get(timeout=WAIT).body) == MAX_MESSAGE_BYTES


def test_queue_full_rejects(broker, name):
    q = broker.queue(name, max_length=2, overflow="reject")
    assert q.put(b"a") == 0
    with pytest.raises(QueueFull):
        q.put_many([b"b", b"c"])
    assert q.put(b"b") == 1
    with pytest.raises(QueueFull):
        q.put(b"c")
    assert q.stats().depth == 2

    q.get(timeout=WAIT).ack()
    assert q.put(b"c") == 2
    messages = q.get_many(10, timeout=WAIT)
    assert [m.body for m in messages] == [b"b", b"c"]


def test_reject_long_reason_is_cut(broker, name):
    q = broker.queue(name, visibility_timeout=3600)
    q.put_many([b"poison", b"held"])
    poison, held = q.get_many(2, timeout=WAIT)
    # Larger than the server's max_frame_bytes (16 MiB) if sent whole.
    poison.reject("x" * (20 << 20))
    dead = q.dlq.get(timeout=WAIT)
    assert dead.headers["x-reason"] == "x" * 1000 + "..."
    # The other delivery, and so the connection, is still there.
    held.ack()
    assert q.stats().acked == 1


def test_dlq_of_long_names_opens(broker, name):
    long_name = (name + "-" + "L" * 128)[:128]
    q = broker.queue(long_name, max_deliveries=1)
    q.put(b"poison")
    q.get(timeout=WAIT).reject("bad")
    assert q.dlq_name == f"{long_name}.dlq"
    assert q.dlq.stats().depth == 1
    by_name = broker.queue(f"{long_name}.dlq")
    assert by_name.get(timeout=WAIT).headers["x-reason"] == "bad"

    stream = broker.stream((name + "-s-" + "a" * 60)[:68])
    group = stream.group("billing-" + "b" * 60)
    assert len(group.dlq_name) == 68 + 1 + 68 + 4
    assert group.dlq.stats().depth == 0
    assert broker.queue(group.dlq_name).stats().depth == 0


def test_headers_as_list_raise_type_error(broker, name):
    q = broker.queue(name)
    with pytest.raises(TypeError) as raised:
        q.put(b"x", headers=[("k", "v")])
    assert str(raised.value) == (
        "Argument 'headers' has incorrect type (expected dict, got list)"
    )
    assert q.stats().depth == 0
