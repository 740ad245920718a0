"""UnackedCount, a server connection's count of unsettled deliveries.

The server keeps one per connection: room is reserved before a fetch,
receipts are committed to the connection's ReceiptSet, settlements give the
room back, and drop_settled() finds the deliveries that expired or were
settled elsewhere. Here it runs against an embedded queue with a fake clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import pymq
from pymq import ConfigError, ServerError
from pymq._core import ReceiptSet, UnackedCount

VISIBILITY = 10.0
SECOND = 1_000_000_000


class FakeClock:
    """A clock in integer ns that moves only when a test advances it."""

    def __init__(self) -> None:
        self.now = 1_000 * SECOND

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * SECOND)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def jobs(tmp_path: Path, clock: FakeClock) -> Iterator[pymq.Queue]:
    with pymq.open(tmp_path / "data") as broker:
        queue = broker.queue("jobs", visibility_timeout=VISIBILITY)
        queue._clock = clock
        queue.put_many([b"m%d" % index for index in range(20)])
        yield queue


def deliver(
    unacked: UnackedCount, receipts: ReceiptSet, jobs: pymq.Queue, count: int
) -> list[pymq.Message]:
    """Fetch up to count messages as the server does; return them."""
    granted = unacked.reserve(count)
    messages = jobs.get_many_nowait(granted) if granted else []
    unacked.commit(receipts, messages, granted, jobs)
    return messages


def test_reserve_cuts_to_room() -> None:
    unacked = UnackedCount(5)
    assert unacked.reserve(3) == 3
    assert unacked.reserve(10) == 2
    assert unacked.held == 5
    assert unacked.reserve(1) == 0
    unacked.unreserve(2)
    assert unacked.held == 3


def test_commit_frees_room_not_used(jobs: pymq.Queue) -> None:
    unacked = UnackedCount(50)
    receipts = ReceiptSet()
    messages = deliver(unacked, receipts, jobs, 30)
    assert len(messages) == 20
    assert unacked.held == 20
    assert len(receipts) == 20


def test_settle_counts_only_receipts_held(jobs: pymq.Queue) -> None:
    unacked = UnackedCount(5)
    receipts = ReceiptSet()
    messages = deliver(unacked, receipts, jobs, 5)
    unacked.settle(receipts, [messages[0].receipt, messages[1].receipt, 12345])
    assert unacked.held == 3
    assert len(receipts) == 3


def test_drop_settled_finds_expired(jobs: pymq.Queue, clock: FakeClock) -> None:
    unacked = UnackedCount(5)
    receipts = ReceiptSet()
    deliver(unacked, receipts, jobs, 5)
    assert unacked.drop_settled(jobs, receipts) == 0
    assert unacked.held == 5
    clock.advance(VISIBILITY + 1)
    assert unacked.drop_settled(jobs, receipts) == 5
    assert unacked.held == 0
    assert len(receipts) == 0
    again = deliver(unacked, receipts, jobs, 5)
    assert [(m.offset, m.attempt) for m in again] == [
        (0, 2),
        (1, 2),
        (2, 2),
        (3, 2),
        (4, 2),
    ]


def test_drop_settled_finds_acks_elsewhere(jobs: pymq.Queue) -> None:
    unacked = UnackedCount(5)
    receipts = ReceiptSet()
    messages = deliver(unacked, receipts, jobs, 3)
    # Settled without the count, as by another connection.
    jobs.ack(messages[0].receipt)
    jobs.nack(messages[1].receipt)
    assert unacked.drop_settled(jobs, receipts) == 2
    assert unacked.held == 1
    assert list(receipts) == [messages[2].receipt]


def test_drop_settled_of_listed_receipts(jobs: pymq.Queue) -> None:
    unacked = UnackedCount(5)
    receipts = ReceiptSet()
    messages = deliver(unacked, receipts, jobs, 3)
    jobs.ack(messages[0].receipt)
    jobs.ack(messages[1].receipt)
    listed = [messages[0].receipt, messages[2].receipt]
    assert unacked.drop_settled(jobs, receipts, listed) == 1
    assert unacked.held == 2
    assert sorted(receipts) == sorted([messages[1].receipt, messages[2].receipt])


def test_check_runs_when_short_of_room(jobs: pymq.Queue, clock: FakeClock) -> None:
    checks: list[int] = []
    receipts = ReceiptSet()

    def reclaim() -> None:
        if unacked.begin_check():
            checks.append(unacked.drop_settled(jobs, receipts))
            unacked.end_check()

    unacked = UnackedCount(3, reclaim)
    deliver(unacked, receipts, jobs, 3)
    # Short of room: the first check finds nothing expired.
    assert unacked.reserve(1) == 0
    assert checks == [0]
    # The next is due a second later at most, the visibility timeout being
    # longer, so an immediate retry does not check again.
    assert 0 < unacked.seconds_to_check() <= 1.0
    assert unacked.reserve(1) == 0
    assert checks == [0]
    clock.advance(VISIBILITY + 1)
    assert unacked.drop_settled(jobs, receipts) == 3
    assert unacked.reserve(5) == 3


def test_freed_runs_only_for_waiters(jobs: pymq.Queue) -> None:
    calls: list[int] = []
    unacked = UnackedCount(5, None, lambda: calls.append(unacked.held))
    receipts = ReceiptSet()
    messages = deliver(unacked, receipts, jobs, 5)
    unacked.settle(receipts, [messages[0].receipt])
    assert calls == []
    unacked.waiters = 1
    unacked.settle(receipts, [messages[1].receipt])
    assert calls == [3]


def test_full_error_names_count_and_limit() -> None:
    unacked = UnackedCount(2)
    assert unacked.reserve(2) == 2
    error = unacked.full_error()
    assert isinstance(error, ServerError)
    assert error.code == 19
    assert str(error) == (
        "this connection holds 2 unsettled deliveries, max_unacked (2); ack, "
        "nack or reject some of them before fetching more"
    )


def test_limit_below_one_rejected() -> None:
    with pytest.raises(ConfigError) as raised:
        UnackedCount(0)
    assert str(raised.value) == "max_unacked is 0; it must be 1 or more"
