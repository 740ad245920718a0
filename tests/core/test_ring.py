"""RingBuffer, the in-flight window of a consumer group.

The first tests pin single rules with exact values. A state machine at the
end drives the ring and tests/ring_model.py side by side and checks that
they agree after every step.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)

from pymq import PymqError, StaleReceiptError
from pymq._core import RingBuffer
from tests.ring_model import RingModel, make_receipt

# Times are monotonic ns chosen by the test. END is far past every offset
# a test delivers, so only the tests about end reach it.
END = 1 << 40
DEADLINE = 1_000
STALE = "expired or was already settled"


def take(ring: RingBuffer, now: int = 0, deadline: int = DEADLINE) -> tuple[int, ...]:
    """Deliver one offset, failing the test when the ring returns None."""
    delivery = ring.take_next(now, END, deadline)
    assert delivery is not None
    return delivery


def snapshot(ring: RingBuffer) -> dict[str, object]:
    """Return the counters, states and attempts of the ring's window."""
    offsets = range(max(0, ring.low - 2), ring.cursor + 2)
    return {
        "low": ring.low,
        "cursor": ring.cursor,
        "delivered": ring.delivered,
        "waiting": ring.waiting,
        "states": [ring.state(offset) for offset in offsets],
        "attempts": [ring.attempts(offset) for offset in offsets],
    }


# take_next order -------------------------------------------------------


def test_take_next_delivers_new_offsets_in_order() -> None:
    ring = RingBuffer()
    deliveries = [ring.take_next(0, END, DEADLINE) for _ in range(3)]
    assert deliveries == [
        (0, 1, make_receipt(0, 1)),
        (1, 1, make_receipt(1, 1)),
        (2, 1, make_receipt(2, 1)),
    ]
    assert ring.cursor == 3


def test_take_next_starts_at_given_low() -> None:
    ring = RingBuffer(low=500)
    assert ring.take_next(0, END, DEADLINE) == (500, 1, make_receipt(500, 1))
    assert ring.low == 500
    assert ring.cursor == 501


def test_take_next_redelivers_nacked_offset_first() -> None:
    ring = RingBuffer()
    receipts = [take(ring)[2] for _ in range(3)]
    assert ring.nack(receipts[1], 0) == 1
    assert ring.take_next(0, END, DEADLINE) == (1, 2, make_receipt(1, 2))
    assert ring.take_next(0, END, DEADLINE) == (3, 1, make_receipt(3, 1))


def test_take_next_redelivers_lowest_nacked_first() -> None:
    ring = RingBuffer()
    receipts = [take(ring)[2] for _ in range(3)]
    ring.nack(receipts[2], 0)
    ring.nack(receipts[0], 0)
    assert take(ring)[:2] == (0, 2)
    assert take(ring)[:2] == (2, 2)
    assert take(ring)[:2] == (3, 1)


def test_take_next_holds_nacked_offset_until_not_before() -> None:
    ring = RingBuffer()
    first = take(ring)[2]
    take(ring)
    ring.nack(first, 50)
    assert ring.take_next(49, END, DEADLINE) == (2, 1, make_receipt(2, 1))
    assert ring.take_next(50, END, DEADLINE) == (0, 2, make_receipt(0, 2))
    assert ring.take_next(50, END, DEADLINE) == (3, 1, make_receipt(3, 1))


def test_take_next_delayed_offset_beats_newer_ones() -> None:
    ring = RingBuffer()
    receipts = [take(ring)[2] for _ in range(4)]
    ring.nack(receipts[3], 20)
    ring.nack(receipts[1], 10)
    assert take(ring, now=30)[:2] == (1, 2)
    assert take(ring, now=30)[:2] == (3, 2)
    assert take(ring, now=30)[:2] == (4, 1)


def test_take_next_returns_none_at_end() -> None:
    ring = RingBuffer()
    assert ring.take_next(0, 2, DEADLINE) == (0, 1, make_receipt(0, 1))
    assert ring.take_next(0, 2, DEADLINE) == (1, 1, make_receipt(1, 1))
    assert ring.take_next(0, 2, DEADLINE) is None
    assert ring.cursor == 2
    assert ring.delivered == 2


def test_take_next_end_at_low_delivers_nothing() -> None:
    ring = RingBuffer(low=10)
    assert ring.take_next(0, 10, DEADLINE) is None
    assert ring.take_next(0, 5, DEADLINE) is None
    assert ring.cursor == 10


def test_take_next_end_bounds_redelivered_offsets() -> None:
    ring = RingBuffer()
    receipts = [ring.take_next(0, 3, DEADLINE)[2] for _ in range(3)]
    ring.nack(receipts[2], 0)
    assert ring.take_next(0, 2, DEADLINE) is None
    assert ring.waiting == 1
    assert ring.take_next(0, 3, DEADLINE) == (2, 2, make_receipt(2, 2))


def test_take_next_none_while_only_delayed_waits() -> None:
    ring = RingBuffer()
    ring.nack(ring.take_next(0, 1, DEADLINE)[2], 100)
    assert ring.take_next(99, 1, DEADLINE) is None
    assert ring.waiting == 1
    assert ring.take_next(100, 1, DEADLINE) == (0, 2, make_receipt(0, 2))


# attempts and receipts -------------------------------------------------


def test_attempts_count_each_redelivery() -> None:
    ring = RingBuffer()
    attempts = []
    for _ in range(5):
        offset, attempt, receipt = take(ring)
        assert offset == 0
        attempts.append(attempt)
        ring.nack(receipt, 0)
    assert attempts == [1, 2, 3, 4, 5]
    assert ring.attempts(0) == 5


def test_receipt_differs_per_attempt() -> None:
    ring = RingBuffer()
    receipts = []
    for _ in range(5):
        receipt = take(ring)[2]
        receipts.append(receipt)
        ring.nack(receipt, 0)
    assert len(set(receipts)) == 5


def test_stale_receipt_error_is_pymq_error() -> None:
    assert issubclass(StaleReceiptError, PymqError)


def test_ack_old_receipt_after_redelivery_changes_nothing() -> None:
    ring = RingBuffer()
    old = take(ring)[2]
    take(ring)
    ring.nack(old, 0)
    current = take(ring)[2]
    before = snapshot(ring)
    with pytest.raises(StaleReceiptError, match=STALE):
        ring.ack(old)
    assert snapshot(ring) == before
    assert ring.state(0) == "delivered"
    assert ring.ack(current) == 0


def test_ack_returns_offset_and_settles() -> None:
    ring = RingBuffer()
    take(ring)
    receipt = take(ring)[2]
    assert ring.ack(receipt) == 1
    assert ring.state(1) == "settled"
    assert ring.delivered == 1


def test_ack_twice_raises() -> None:
    ring = RingBuffer()
    take(ring)
    receipt = take(ring)[2]
    ring.ack(receipt)
    before = snapshot(ring)
    with pytest.raises(StaleReceiptError, match=STALE):
        ring.ack(receipt)
    assert snapshot(ring) == before


def test_nack_settled_receipt_raises() -> None:
    ring = RingBuffer()
    take(ring)
    receipt = take(ring)[2]
    ring.ack(receipt)
    before = snapshot(ring)
    with pytest.raises(StaleReceiptError, match=STALE):
        ring.nack(receipt, 0)
    assert snapshot(ring) == before


def test_extend_settled_receipt_raises() -> None:
    ring = RingBuffer()
    take(ring)
    receipt = take(ring, deadline=10)[2]
    ring.ack(receipt)
    before = snapshot(ring)
    with pytest.raises(StaleReceiptError, match=STALE):
        ring.extend(receipt, 50)
    assert snapshot(ring) == before
    assert ring.expire(50) == []


@pytest.mark.parametrize(
    ("method", "args"), [("ack", ()), ("nack", (50,)), ("extend", (50,))]
)
def test_receipt_after_expiry_raises(method: str, args: tuple[int, ...]) -> None:
    ring = RingBuffer()
    receipt = take(ring, deadline=10)[2]
    assert ring.expire(10) == [(0, 1)]
    before = snapshot(ring)
    with pytest.raises(StaleReceiptError, match=STALE):
        getattr(ring, method)(receipt, *args)
    assert snapshot(ring) == before


def test_nack_twice_raises() -> None:
    ring = RingBuffer()
    receipt = take(ring)[2]
    ring.nack(receipt, 0)
    with pytest.raises(StaleReceiptError, match=STALE):
        ring.nack(receipt, 0)
    assert ring.waiting == 1


@pytest.mark.parametrize(
    ("offset", "case"),
    [(5, "below low"), (12, "at cursor"), (1 << 30, "far past cursor")],
)
def test_receipt_outside_window_raises(offset: int, case: str) -> None:
    ring = RingBuffer(low=10)
    take(ring)
    take(ring)
    before = snapshot(ring)
    with pytest.raises(StaleReceiptError, match=STALE):
        ring.ack(make_receipt(offset, 1))
    assert snapshot(ring) == before, case


def test_receipt_with_wrong_attempt_raises() -> None:
    ring = RingBuffer()
    take(ring)
    for attempt in (0, 2, 3):
        with pytest.raises(StaleReceiptError, match=STALE):
            ring.ack(make_receipt(0, attempt))
    assert ring.state(0) == "delivered"


@pytest.mark.xfail(
    strict=True,
    reason="receipts keep 16 bits of the attempt, so attempt 1 and 65537 match",
)
def test_receipt_stale_after_attempt_wraps() -> None:
    ring = RingBuffer()
    first = take(ring)[2]
    ring.nack(first, 0)
    for _ in range((1 << 16) - 1):
        ring.nack(take(ring)[2], 0)
    # Attempt 65537 keeps the low 16 bits of attempt 1.
    assert take(ring)[1] == (1 << 16) + 1
    with pytest.raises(StaleReceiptError):
        ring.ack(first)


# deadlines -------------------------------------------------------------


def test_expire_returns_due_in_deadline_order() -> None:
    ring = RingBuffer()
    for deadline in (30, 10, 20, 10, 100):
        take(ring, deadline=deadline)
    assert ring.expire(25) == [(1, 1), (3, 1), (2, 1)]
    assert [ring.state(offset) for offset in range(5)] == [
        "delivered",
        "available",
        "available",
        "available",
        "delivered",
    ]
    assert ring.delivered == 2
    assert ring.waiting == 3


def test_expire_includes_deadline_equal_to_now() -> None:
    ring = RingBuffer()
    take(ring, deadline=30)
    assert ring.expire(29) == []
    assert ring.expire(30) == [(0, 1)]


def test_expire_returns_each_delivery_once() -> None:
    ring = RingBuffer()
    take(ring, deadline=10)
    assert ring.expire(10) == [(0, 1)]
    assert ring.expire(20) == []
    assert ring.waiting == 1


def test_expire_reports_current_attempt() -> None:
    ring = RingBuffer()
    take(ring, deadline=10)
    assert ring.expire(10) == [(0, 1)]
    assert take(ring, now=10, deadline=40)[:2] == (0, 2)
    assert ring.expire(39) == []
    assert ring.expire(40) == [(0, 2)]


def test_expire_makes_offset_due_at_once() -> None:
    ring = RingBuffer()
    take(ring, deadline=10)
    take(ring, deadline=50)
    ring.expire(25)
    assert ring.take_next(25, END, 100) == (0, 2, make_receipt(0, 2))
    assert ring.take_next(25, END, 100) == (2, 1, make_receipt(2, 1))


def test_extend_later_skips_old_deadline() -> None:
    ring = RingBuffer()
    receipt = take(ring, deadline=10)[2]
    assert ring.extend(receipt, 50) == 0
    assert ring.expire(10) == []
    assert ring.expire(49) == []
    assert ring.expire(50) == [(0, 1)]


def test_extend_earlier_expires_at_new_deadline() -> None:
    ring = RingBuffer()
    receipt = take(ring, deadline=100)[2]
    ring.extend(receipt, 20)
    assert ring.expire(19) == []
    assert ring.expire(20) == [(0, 1)]
    assert ring.expire(100) == []


def test_extend_reorders_expiry() -> None:
    ring = RingBuffer()
    first = take(ring, deadline=10)[2]
    take(ring, deadline=20)
    ring.extend(first, 30)
    assert ring.expire(40) == [(1, 1), (0, 1)]


def test_extend_back_to_old_deadline_expires_once() -> None:
    ring = RingBuffer()
    receipt = take(ring, deadline=10)[2]
    ring.extend(receipt, 20)
    ring.extend(receipt, 10)
    assert ring.expire(30) == [(0, 1)]


def test_acked_delivery_never_expires() -> None:
    ring = RingBuffer()
    receipt = take(ring, deadline=10)[2]
    take(ring, deadline=10)
    ring.ack(receipt)
    assert ring.expire(1 << 60) == [(1, 1)]
    assert ring.state(0) == "settled"


def test_nacked_delivery_skips_old_deadline() -> None:
    ring = RingBuffer()
    receipt = take(ring, deadline=10)[2]
    ring.nack(receipt, 100)
    assert ring.expire(50) == []
    assert ring.state(0) == "available"
    assert ring.delivered == 0


def test_deadline_passed_receipt_acks_before_expire() -> None:
    ring = RingBuffer()
    receipt = take(ring, deadline=10)[2]
    assert ring.ack(receipt) == 0
    assert ring.expire(20) == []


# low, settle_offset and counters ---------------------------------------


def test_low_stays_at_lowest_unsettled() -> None:
    ring = RingBuffer()
    receipts = [take(ring)[2] for _ in range(4)]
    ring.ack(receipts[2])
    assert ring.low == 0
    ring.ack(receipts[1])
    assert ring.low == 0
    ring.ack(receipts[0])
    assert ring.low == 3
    ring.ack(receipts[3])
    assert ring.low == 4
    assert ring.cursor == 4


def test_counters_exact_after_each_step() -> None:
    ring = RingBuffer()
    steps = []
    first = take(ring, deadline=10)[2]
    steps.append((ring.low, ring.cursor, ring.delivered, ring.waiting))
    second = take(ring, deadline=20)[2]
    steps.append((ring.low, ring.cursor, ring.delivered, ring.waiting))
    ring.nack(first, 5)
    steps.append((ring.low, ring.cursor, ring.delivered, ring.waiting))
    ring.expire(20)
    steps.append((ring.low, ring.cursor, ring.delivered, ring.waiting))
    third = take(ring, now=20)[2]
    steps.append((ring.low, ring.cursor, ring.delivered, ring.waiting))
    ring.ack(third)
    steps.append((ring.low, ring.cursor, ring.delivered, ring.waiting))
    ring.settle_offset(1)
    steps.append((ring.low, ring.cursor, ring.delivered, ring.waiting))
    with pytest.raises(StaleReceiptError):
        ring.ack(second)
    steps.append((ring.low, ring.cursor, ring.delivered, ring.waiting))
    assert steps == [
        (0, 1, 1, 0),
        (0, 2, 2, 0),
        (0, 2, 1, 1),
        (0, 2, 0, 2),
        (0, 2, 1, 1),
        (1, 2, 0, 1),
        (2, 2, 0, 0),
        (2, 2, 0, 0),
    ]


def test_settle_offset_settles_available_offset() -> None:
    ring = RingBuffer()
    ring.nack(take(ring)[2], 0)
    ring.settle_offset(0)
    assert ring.waiting == 0
    assert ring.low == 1
    assert ring.take_next(0, END, DEADLINE) == (1, 1, make_receipt(1, 1))


def test_settle_offset_settles_delivered_offset() -> None:
    ring = RingBuffer()
    take(ring)
    receipt = take(ring, deadline=10)[2]
    ring.settle_offset(1)
    assert ring.delivered == 1
    assert ring.state(1) == "settled"
    assert ring.low == 0
    assert ring.expire(10) == []
    with pytest.raises(StaleReceiptError, match=STALE):
        ring.ack(receipt)


def test_settle_offset_twice_keeps_counters() -> None:
    ring = RingBuffer()
    take(ring)
    take(ring)
    ring.settle_offset(1)
    before = snapshot(ring)
    ring.settle_offset(1)
    assert snapshot(ring) == before


@pytest.mark.parametrize(("offset", "case"), [(4, "below low"), (7, "at cursor")])
def test_settle_offset_outside_window_raises(offset: int, case: str) -> None:
    ring = RingBuffer(low=5)
    take(ring)
    take(ring)
    before = snapshot(ring)
    with pytest.raises(IndexError, match=f"offset {offset} is outside the window"):
        ring.settle_offset(offset)
    assert snapshot(ring) == before, case


def test_state_outside_window() -> None:
    ring = RingBuffer(low=5)
    take(ring)
    assert ring.state(4) == "settled"
    assert ring.state(6) == "available"
    assert ring.attempts(4) == 0
    assert ring.attempts(6) == 0


# growth ----------------------------------------------------------------


def test_ring_grows_with_first_offset_held() -> None:
    ring = RingBuffer()
    assert ring.slots_allocated == 1024
    deliveries = [take(ring) for _ in range(10_000)]
    assert [offset for offset, _, _ in deliveries] == list(range(10_000))
    assert ring.slots_allocated == 16_384
    assert ring.delivered == 10_000

    first, *rest = deliveries
    random.Random(7).shuffle(rest)
    acked = [ring.ack(receipt) for _, _, receipt in rest]
    assert sorted(acked) == list(range(1, 10_000))
    assert ring.low == 0
    assert ring.delivered == 1

    assert ring.ack(first[2]) == 0
    assert ring.low == 10_000
    assert ring.delivered == 0


def test_ring_grow_keeps_wrapped_slots() -> None:
    ring = RingBuffer()
    receipts = {}
    for _ in range(1024):
        offset, _, receipt = take(ring)
        receipts[offset] = receipt
    for offset in range(700):
        ring.ack(receipts.pop(offset))
    for _ in range(700):
        offset, _, receipt = take(ring)
        receipts[offset] = receipt
    # The window 700..1723 fills the 1024 slots and wraps around the array.
    assert ring.slots_allocated == 1024
    ring.nack(receipts.pop(800), 100)
    ring.nack(receipts.pop(1500), 100)
    ring.extend(receipts[1600], 50)

    offset, _, receipt = take(ring, now=10)
    receipts[offset] = receipt
    assert offset == 1724
    assert ring.slots_allocated == 2048
    assert ring.expire(50) == [(1600, 1)]
    assert take(ring, now=100)[:2] == (800, 2)
    assert take(ring, now=100)[:2] == (1500, 2)
    assert take(ring, now=100)[:2] == (1600, 2)
    assert ring.attempts(1723) == 1


def test_ring_grow_acks_each_offset_once() -> None:
    ring = RingBuffer()
    first_receipt = take(ring)[2]
    receipts = {}
    for _ in range(3_000):
        offset, _, receipt = take(ring)
        receipts[offset] = receipt
        if offset % 3 == 0:
            ring.ack(receipts.pop(offset))
    assert ring.slots_allocated == 4096
    acked = [ring.ack(receipt) for receipt in receipts.values()]
    assert acked == list(receipts)
    assert ring.ack(first_receipt) == 0
    assert ring.low == 3_001
    assert ring.waiting == 0


def test_ring_reuses_slots_when_acked() -> None:
    ring = RingBuffer()
    for offset in range(5_000):
        delivery = take(ring)
        assert delivery[0] == offset
        ring.ack(delivery[2])
    assert ring.slots_allocated == 1024
    assert ring.low == 5_000


@pytest.mark.parametrize(
    ("capacity", "slots"), [(0, 1024), (1, 1024), (1024, 1024), (3_000, 4096)]
)
def test_ring_capacity_rounds_up_to_power_of_two(capacity: int, slots: int) -> None:
    assert RingBuffer(capacity=capacity).slots_allocated == slots


@pytest.mark.parametrize("capacity", [1 << 60, (1 << 61) + 1])
def test_ring_rejects_capacity_too_large(capacity: int) -> None:
    with pytest.raises(MemoryError, match="too large"):
        RingBuffer(capacity=capacity)


# restore_offset --------------------------------------------------------


def test_untake_offset_undoes_a_delivery() -> None:
    ring = RingBuffer()
    first = take(ring)
    second = take(ring)
    before = snapshot(ring)
    ring.untake_offset(second[0])
    assert ring.state(second[0]) == "available"
    assert ring.attempts(second[0]) == 0
    assert (ring.delivered, ring.waiting) == (1, 1)
    # Delivered again at once, as the same attempt, before newer offsets.
    assert take(ring) == second
    assert snapshot(ring) == before
    with pytest.raises(StaleReceiptError):
        ring.ack(make_receipt(second[0], 2))
    ring.ack(first[2])
    ring.ack(second[2])
    assert (ring.low, ring.delivered, ring.waiting) == (2, 0, 0)


def test_untake_offset_of_a_redelivery_keeps_earlier_attempts() -> None:
    ring = RingBuffer()
    offset, _, receipt = take(ring)
    ring.nack(receipt, 0)
    again = take(ring)
    assert again[1] == 2
    ring.untake_offset(offset)
    assert ring.attempts(offset) == 1
    assert take(ring) == again
    # Nothing happens to an offset that is not delivered.
    ring.untake_offset(offset + 5)
    ring.ack(again[2])
    ring.untake_offset(offset)
    assert ring.state(offset) == "settled"


def test_restore_offset_rebuilds_window() -> None:
    ring = RingBuffer()
    saved = [(0, 1, True), (1, 2, False), (2, 1, True), (3, 0, False), (4, 5, False)]
    for offset, attempt, settled in saved:
        ring.restore_offset(offset, attempt, settled)
    assert ring.low == 1
    assert ring.cursor == 5
    assert ring.waiting == 3
    assert ring.delivered == 0
    assert ring.attempts(1) == 2
    assert ring.state(2) == "settled"


def test_restore_offset_redelivers_unsettled_first() -> None:
    ring = RingBuffer()
    saved = [(0, 1, True), (1, 2, False), (2, 1, True), (3, 0, False), (4, 5, False)]
    for offset, attempt, settled in saved:
        ring.restore_offset(offset, attempt, settled)
    deliveries = [ring.take_next(0, END, DEADLINE) for _ in range(4)]
    assert deliveries == [
        (1, 3, make_receipt(1, 3)),
        (3, 1, make_receipt(3, 1)),
        (4, 6, make_receipt(4, 6)),
        (5, 1, make_receipt(5, 1)),
    ]


def test_restore_offset_fills_gap_as_available() -> None:
    ring = RingBuffer(low=10)
    ring.restore_offset(13, 2, True)
    assert ring.waiting == 3
    assert [ring.attempts(offset) for offset in range(10, 14)] == [0, 0, 0, 2]
    offsets = [take(ring)[0] for _ in range(4)]
    assert offsets == [10, 11, 12, 14]


def test_restore_offset_after_deliveries() -> None:
    ring = RingBuffer()
    receipt = take(ring)[2]
    ring.restore_offset(1, 3, False)
    assert ring.take_next(0, END, DEADLINE) == (1, 4, make_receipt(1, 4))
    assert ring.ack(receipt) == 0


@pytest.mark.parametrize("offset", [0, 2])
def test_restore_offset_below_cursor_raises(offset: int) -> None:
    ring = RingBuffer()
    for saved in range(3):
        ring.restore_offset(saved, 1, False)
    before = snapshot(ring)
    with pytest.raises(
        ValueError, match=f"offset {offset} is below the ring's cursor 3"
    ):
        ring.restore_offset(offset, 1, False)
    assert snapshot(ring) == before


def test_restore_offset_grows_ring() -> None:
    ring = RingBuffer()
    for offset in range(3_000):
        ring.restore_offset(offset, 1, offset == 0)
    assert ring.slots_allocated == 4096
    assert ring.low == 1
    assert ring.waiting == 2_999
    offsets = [take(ring)[0] for _ in range(3_000)]
    assert offsets == list(range(1, 3_001))


# The ring against the model --------------------------------------------


def outcome(call: Callable[[], object]) -> tuple[object, ...]:
    """Return what call returned, or the type and message of what it raised."""
    try:
        return ("returned", call())
    except (PymqError, IndexError, ValueError) as error:
        return ("raised", type(error), str(error))


class RingBufferMachine(RuleBasedStateMachine):
    """Drive RingBuffer and RingModel with the same calls and compare them."""

    receipts = Bundle("receipts")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.ring = RingBuffer()
        self.model = RingModel()

    def both(self, method: str, *args: int) -> tuple[object, ...]:
        """Call method on ring and model, assert that both agree, return the result."""
        got = outcome(lambda: getattr(self.ring, method)(*args))
        expected = outcome(lambda: getattr(self.model, method)(*args))
        assert got == expected, (method, args)
        return got

    @initialize(low=st.sampled_from([0, 7, 1 << 32]))
    def start(self, low: int) -> None:
        self.ring = RingBuffer(low=low)
        self.model = RingModel(low=low)

    @rule(elapsed=st.integers(0, 40))
    def tick(self, elapsed: int) -> None:
        self.now += elapsed

    @rule(target=receipts, end_past_cursor=st.integers(-2, 4), ttl=st.integers(0, 60))
    def take_next(self, end_past_cursor: int, ttl: int):
        end = max(0, self.model.cursor + end_past_cursor)
        window = range(self.model.low, self.model.cursor)
        states = {offset: self.ring.state(offset) for offset in window}
        _, delivery = self.both("take_next", self.now, end, self.now + ttl)
        if delivery is None:
            return multiple()
        offset, _, receipt = delivery
        # No offset is handed out while an earlier delivery of it is in flight.
        assert states.get(offset, "available") != "delivered"
        return receipt

    @rule(target=receipts, count=st.integers(0, 6), ttl=st.integers(0, 60))
    def take_run(self, count: int, ttl: int):
        _, deliveries = self.both("take_run", self.now, count, self.now + ttl)
        if not deliveries:
            return multiple()
        return multiple(*(receipt for _, _, receipt in deliveries))

    @rule(receipt=receipts)
    def ack(self, receipt: int) -> None:
        self.both("ack", receipt)

    @rule(past_low=st.integers(-2, 60), attempt=st.integers(0, 4))
    def ack_forged(self, past_low: int, attempt: int) -> None:
        offset = max(0, self.model.low + past_low)
        self.both("ack", make_receipt(offset, attempt))

    @rule(receipt=receipts, delay=st.integers(0, 50))
    def nack(self, receipt: int, delay: int) -> None:
        self.both("nack", receipt, self.now + delay)

    @rule(receipt=receipts, ttl=st.integers(-10, 60))
    def extend(self, receipt: int, ttl: int) -> None:
        self.both("extend", receipt, self.now + ttl)

    @rule()
    def expire(self) -> None:
        self.both("expire", self.now)

    @rule(past_low=st.integers(-2, 60))
    def settle_offset(self, past_low: int) -> None:
        self.both("settle_offset", max(0, self.model.low + past_low))

    @rule(
        past_cursor=st.integers(-2, 3), attempt=st.integers(0, 4), settled=st.booleans()
    )
    def restore_offset(self, past_cursor: int, attempt: int, settled: bool) -> None:
        offset = max(0, self.model.cursor + past_cursor)
        self.both("restore_offset", offset, attempt, settled)

    @invariant()
    def counters_agree(self) -> None:
        assert self.ring.low == self.model.low
        assert self.ring.cursor == self.model.cursor
        assert self.ring.delivered == self.model.delivered
        assert self.ring.waiting == self.model.waiting

    @invariant()
    def offsets_agree(self) -> None:
        for offset in range(max(0, self.model.low - 2), self.model.cursor + 2):
            assert self.ring.state(offset) == self.model.state(offset), offset
            assert self.ring.attempts(offset) == self.model.attempts(offset), offset

    @invariant()
    def window_accounts_for_every_offset(self) -> None:
        window = range(self.ring.low, self.ring.cursor)
        settled = sum(1 for offset in window if self.ring.state(offset) == "settled")
        assert self.ring.delivered + self.ring.waiting + settled == len(window)

    def teardown(self) -> None:
        """Check that every unsettled offset can still be delivered."""
        unsettled = [
            offset
            for offset in range(self.model.low, self.model.cursor)
            if self.model.state(offset) != "settled"
        ]
        # Past every deadline and not-before time the machine can set.
        self.now += 1 << 30
        self.both("expire", self.now)
        drained = []
        for _ in range(len(unsettled) + 1):
            _, delivery = self.both("take_next", self.now, self.model.cursor, self.now)
            if delivery is None:
                break
            drained.append(delivery[0])
            self.both("ack", delivery[2])
        assert drained == unsettled
        assert self.ring.low == self.ring.cursor


RingBufferMachine.TestCase.settings = settings(stateful_step_count=50)
TestRingBufferMatchesModel = RingBufferMachine.TestCase
