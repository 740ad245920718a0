"""Errors of the embedded broker's calls for bad arguments and closed parts.

Each message names the argument, its rule, or the part the caller opened,
and is the same whether or not a message is available.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy
import pytest

import pymq
from pymq.client import check_receipt


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[pymq.Broker]:
    with pymq.open(tmp_path / "data") as opened:
        yield opened


BAD_RECEIPTS = [
    (-1, OverflowError, "receipt -1 is out of range; a receipt is from 0 to 2**64 - 1"),
    (
        1 << 64,
        OverflowError,
        "receipt 18446744073709551616 is out of range; a receipt is from 0 to "
        "2**64 - 1",
    ),
    ("1", TypeError, "receipt must be an int, not str"),
    (True, TypeError, "receipt must be an int, not bool"),
    (1.0, TypeError, "receipt must be an int, not float"),
]


@pytest.mark.parametrize(("receipt", "error", "message"), BAD_RECEIPTS)
def test_bad_receipt_named_like_client(
    broker: pymq.Broker, receipt: object, error: type[Exception], message: str
) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"x")
    held = jobs.get(timeout=0)
    assert held is not None
    calls = [
        lambda: jobs.ack(receipt),
        lambda: jobs.nack(receipt),
        lambda: jobs.extend(receipt, 5.0),
        lambda: jobs.reject(receipt, "bad"),
    ]
    for call in calls:
        with pytest.raises(error) as raised:
            call()
        assert str(raised.value) == message
    with pytest.raises(error) as raised:
        check_receipt(receipt)
    assert str(raised.value) == message
    stats = jobs.stats()
    assert (stats.in_flight, stats.acked, stats.dead_lettered) == (1, 0, 0)


def test_receipt_from_batch_column_accepted(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"a", b"b"])
    batch = jobs.get_batch(2, timeout=0)
    assert isinstance(batch.receipts[0], numpy.uint64)
    jobs.ack(batch.receipts[0])
    jobs.ack_many([batch.receipts[1]])
    assert jobs.stats().acked == 2


def test_ack_many_names_item_of_wrong_type(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"x")
    held = jobs.get(timeout=0)
    assert held is not None
    with pytest.raises(TypeError) as raised:
        jobs.ack_many([held, "1"])
    assert str(raised.value) == (
        "ack_many takes Messages delivered by queue jobs, receipts (int) or a "
        "MessageBatch; item 1 is a str"
    )
    with pytest.raises(OverflowError, match="receipt -1 is out of range"):
        jobs.ack_many([-1])
    assert jobs.stats().in_flight == 1


@pytest.mark.parametrize("bodies", [b"abc", bytearray(b"abc"), "abc"])
def test_put_many_single_body_named(broker: pymq.Broker, bodies: object) -> None:
    jobs = broker.queue("jobs")
    events = broker.stream("events")
    for target in (jobs, events):
        with pytest.raises(TypeError) as raised:
            target.put_many(bodies)  # type: ignore[arg-type]
        assert str(raised.value) == (
            f"bodies must be an iterable of bytes-like objects (a list of bytes, "
            f"say), not {type(bodies).__name__}; use put() for one message"
        )
    assert jobs.stream.store.next_offset == 0
    assert events.store.next_offset == 0


TIMEOUTS = [
    (-1, ValueError, "timeout is -1 seconds; it must be from 0 to 1e9, or None "),
    (math.nan, ValueError, "timeout is nan seconds; it must be from 0 to 1e9"),
    ("1", TypeError, "timeout must be a number of seconds or None, not '1'"),
    (False, TypeError, "timeout must be a number of seconds or None, not False"),
]


@pytest.mark.parametrize(("timeout", "error", "start"), TIMEOUTS)
@pytest.mark.parametrize("available", [True, False])
def test_get_checks_timeout_first(
    broker: pymq.Broker,
    timeout: object,
    error: type[Exception],
    start: str,
    available: bool,
) -> None:
    jobs = broker.queue("jobs")
    if available:
        jobs.put_many([b"a", b"b", b"c"])
    calls = {
        "get": lambda: jobs.get(timeout=timeout),  # type: ignore[arg-type]
        "get_many": lambda: jobs.get_many(2, timeout=timeout),  # type: ignore[arg-type]
        "get_batch": lambda: jobs.get_batch(2, timeout=timeout),  # type: ignore[arg-type]
    }
    for method, call in calls.items():
        with pytest.raises(error) as raised:
            call()
        assert str(raised.value).startswith(f"{method}(): {start}")
    # Nothing was delivered by the calls that raised.
    stats = jobs.stats()
    assert stats.in_flight == 0
    assert stats.depth == (3 if available else 0)


def test_closed_queue_errors_name_queue(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"x")
    jobs.close()
    calls = [
        lambda: jobs.get(timeout=0),
        lambda: jobs.get_nowait(),
        lambda: jobs.get_many(2, timeout=0),
        lambda: jobs.put(b"y"),
        lambda: jobs.put(b"y", headers={"k": "v"}),
        lambda: jobs.put_many([b"y"]),
        lambda: jobs.stats(),
    ]
    for call in calls:
        with pytest.raises(pymq.ClosedError) as raised:
            call()
        assert str(raised.value) == "queue jobs is closed"


def test_closed_group_errors_name_group(broker: pymq.Broker) -> None:
    events = broker.stream("events")
    billing = events.group("billing")
    events.put(b"x")
    billing.close()
    with pytest.raises(pymq.ClosedError) as raised:
        billing.get(timeout=0)
    assert str(raised.value) == "group billing of stream events is closed"


def test_stream_put_after_broker_close_names_stream(tmp_path: Path) -> None:
    broker = pymq.open(tmp_path / "data")
    events = broker.stream("events")
    broker.close()
    with pytest.raises(pymq.ClosedError) as raised:
        events.put(b"x")
    assert str(raised.value) == "stream events is closed"


SECONDS = [
    (-1, ValueError, "is -1; it must be from 0 to 1e9 seconds"),
    (math.nan, ValueError, "is nan; it must be from 0 to 1e9 seconds"),
    (2e9, ValueError, "is 2000000000.0; it must be from 0 to 1e9 seconds"),
    (1 << 1100, ValueError, f"is {1 << 1100}; it must be from 0 to 1e9 seconds"),
    ("1", TypeError, "must be a number of seconds, not '1'"),
    (True, TypeError, "must be a number of seconds, not True"),
    (None, TypeError, "must be a number of seconds, not None"),
]


@pytest.mark.parametrize(("value", "error", "end"), SECONDS)
def test_nack_extend_name_call_and_value(
    broker: pymq.Broker, value: object, error: type[Exception], end: str
) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"x")
    held = jobs.get(timeout=0)
    assert held is not None
    calls = {
        "nack(): delay": [
            lambda: held.nack(value),  # type: ignore[arg-type]
            lambda: held.nack(delay=value),  # type: ignore[arg-type]
            lambda: jobs.nack(held.receipt, value),  # type: ignore[arg-type]
        ],
        "extend(): seconds": [
            lambda: held.extend(value),  # type: ignore[arg-type]
            lambda: jobs.extend(held.receipt, value),  # type: ignore[arg-type]
        ],
    }
    for start, group in calls.items():
        for call in group:
            with pytest.raises(error) as raised:
                call()
            assert str(raised.value) == f"{start} {end}"
    # A bad value changes nothing: the delivery is still held.
    stats = jobs.stats()
    assert stats.in_flight == 1
    assert stats.waiting == 0
    held.ack()


def test_bad_seconds_not_config_error(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"x")
    held = jobs.get(timeout=0)
    assert held is not None
    for call in (lambda: held.nack(-1), lambda: held.extend(-1)):
        with pytest.raises(ValueError) as raised:
            call()
        assert type(raised.value) is ValueError


def test_seconds_of_number_types_accepted(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"x")
    held = jobs.get(timeout=0)
    assert held is not None
    held.extend(numpy.float32(60.0))
    held.extend(numpy.int64(60))
    held.extend(60)
    held.nack(numpy.float64(0.0))
    assert jobs.stats().waiting == 1


COUNTS = [
    (0, ValueError, "count is 0; it must be 1 or more"),
    (-5, ValueError, "count is -5; it must be 1 or more"),
    (1.5, TypeError, "count must be an int, not float"),
    ("3", TypeError, "count must be an int, not str"),
    (True, TypeError, "count must be an int, not bool"),
]


@pytest.mark.parametrize(("count", "error", "end"), COUNTS)
def test_get_count_names_call(
    broker: pymq.Broker, count: object, error: type[Exception], end: str
) -> None:
    jobs = broker.queue("jobs")
    jobs.put(b"x")
    calls = {
        "get_many": lambda: jobs.get_many(count, timeout=0),  # type: ignore[arg-type]
        "get_batch": lambda: jobs.get_batch(count, timeout=0),  # type: ignore[arg-type]
        "get_many_nowait": lambda: jobs.get_many_nowait(count),  # type: ignore[arg-type]
        "get_batch_nowait": lambda: jobs.get_batch_nowait(count),  # type: ignore[arg-type]
    }
    for method, call in calls.items():
        with pytest.raises(error) as raised:
            call()
        assert str(raised.value) == f"{method}(): {end}"
    assert jobs.stats().in_flight == 0


def test_get_count_of_integer_types(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    jobs.put_many([b"a", b"b", b"c"])
    assert len(jobs.get_many(numpy.int64(2), timeout=0)) == 2
    assert len(jobs.get_batch(1 << 80, timeout=0)) == 1


@pytest.mark.parametrize("limited", [False, True])
@pytest.mark.parametrize("headers", [None, {"k": "v"}])
def test_put_many_names_bad_item(
    broker: pymq.Broker, limited: bool, headers: dict[str, str] | None
) -> None:
    jobs = broker.queue("jobs", max_length=100 if limited else None)
    events = broker.stream("events")
    for target in (jobs, events):
        with pytest.raises(TypeError) as raised:
            target.put_many([b"a", bytearray(b"b"), "c"], headers=headers)  # type: ignore[list-item]
        assert str(raised.value) == (
            "put_many(): item 2 of bodies must be a bytes-like object, not str"
        )
        with pytest.raises(TypeError) as raised:
            target.put_many(iter([b"a", None]), headers=headers)  # type: ignore[list-item]
        assert str(raised.value) == (
            "put_many(): item 1 of bodies must be a bytes-like object, not NoneType"
        )
    # All or none: nothing of either batch was written.
    assert jobs.stream.store.next_offset == 0
    assert events.store.next_offset == 0


@pytest.mark.parametrize("headers", [None, {"k": "v"}])
def test_put_names_bad_body(
    broker: pymq.Broker, headers: dict[str, str] | None
) -> None:
    jobs = broker.queue("jobs")
    for body, name in (("text", "str"), (7, "int")):
        with pytest.raises(TypeError) as raised:
            jobs.put(body, headers=headers)  # type: ignore[arg-type]
        assert str(raised.value) == (
            f"put(): body must be a bytes-like object, not {name}"
        )
    assert jobs.stream.store.next_offset == 0
