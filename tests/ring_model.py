"""A pure-Python model of pymq._core.RingBuffer, for differential tests.

It keeps one dict entry per offset in the window and computes each result by
scanning it, so the rules stay plain to read. The lowest due available
offset is delivered first, and every delivery gets a new attempt number. A
receipt names one delivery, and low moves only past settled offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymq import StaleReceiptError

RECEIPT_ATTEMPT_BITS = 16
RECEIPT_ATTEMPT_MASK = (1 << RECEIPT_ATTEMPT_BITS) - 1

AVAILABLE = "available"
DELIVERED = "delivered"
SETTLED = "settled"


def make_receipt(offset: int, attempt: int) -> int:
    """Return the receipt of one delivery, as the ring encodes it."""
    return (offset << RECEIPT_ATTEMPT_BITS) | (attempt & RECEIPT_ATTEMPT_MASK)


@dataclass
class ModelSlot:
    """One offset of the window."""

    state: str = AVAILABLE
    attempt: int = 0
    # The deadline of a delivered slot, or the not-before time of an
    # available one, in the caller's clock units.
    time: int = 0


class RingModel:
    """The in-flight window of one consumer group, without heaps or arrays."""

    def __init__(self, low: int = 0) -> None:
        self.low = low
        self.cursor = low
        self.slots: dict[int, ModelSlot] = {}

    @property
    def delivered(self) -> int:
        return self._count(DELIVERED)

    @property
    def waiting(self) -> int:
        return self._count(AVAILABLE)

    def _count(self, state: str) -> int:
        return sum(1 for slot in self.slots.values() if slot.state == state)

    def _advance_low(self) -> None:
        while self.low < self.cursor and self.slots[self.low].state == SETTLED:
            del self.slots[self.low]
            self.low += 1

    def _lookup(self, receipt: int) -> int:
        offset = receipt >> RECEIPT_ATTEMPT_BITS
        slot = self.slots.get(offset)
        if (
            slot is None
            or slot.state != DELIVERED
            or slot.attempt & RECEIPT_ATTEMPT_MASK != receipt & RECEIPT_ATTEMPT_MASK
        ):
            raise StaleReceiptError(
                f"receipt {receipt} names a delivery that expired or was "
                f"already settled"
            )
        return offset

    def take_next(
        self, now: int, end: int, deadline: int
    ) -> tuple[int, int, int] | None:
        """Deliver the lowest due available offset below end, else a new one."""
        due = [
            offset
            for offset, slot in self.slots.items()
            if slot.state == AVAILABLE and slot.time <= now and offset < end
        ]
        if due:
            offset = min(due)
        elif self.cursor < end:
            offset = self.cursor
            self.slots[offset] = ModelSlot()
            self.cursor += 1
        else:
            return None
        slot = self.slots[offset]
        slot.state = DELIVERED
        slot.attempt += 1
        slot.time = deadline
        return offset, slot.attempt, make_receipt(offset, slot.attempt)

    def take_run(
        self, now: int, count: int, deadline: int
    ) -> list[tuple[int, int, int]] | None:
        """Deliver count new offsets, or None when an available one is due."""
        if any(
            slot.state == AVAILABLE and slot.time <= now for slot in self.slots.values()
        ):
            return None
        deliveries = []
        for _ in range(count):
            delivery = self.take_next(now, self.cursor + 1, deadline)
            assert delivery is not None
            deliveries.append(delivery)
        return deliveries

    def ack(self, receipt: int) -> int:
        offset = self._lookup(receipt)
        self._settle(offset)
        return offset

    def nack(self, receipt: int, not_before: int) -> int:
        offset = self._lookup(receipt)
        slot = self.slots[offset]
        slot.state = AVAILABLE
        slot.time = not_before
        return offset

    def extend(self, receipt: int, deadline: int) -> int:
        offset = self._lookup(receipt)
        self.slots[offset].time = deadline
        return offset

    def expire(self, now: int) -> list[tuple[int, int]]:
        """Make every delivery due by now available, returned in deadline order."""
        due = sorted(
            (slot.time, offset)
            for offset, slot in self.slots.items()
            if slot.state == DELIVERED and slot.time <= now
        )
        expired = []
        for _, offset in due:
            slot = self.slots[offset]
            expired.append((offset, slot.attempt))
            slot.state = AVAILABLE
            slot.time = now
        return expired

    def _settle(self, offset: int) -> None:
        self.slots[offset].state = SETTLED
        self._advance_low()

    def settle_offset(self, offset: int) -> None:
        if not self.low <= offset < self.cursor:
            raise IndexError(
                f"offset {offset} is outside the window {self.low} to {self.cursor}"
            )
        self._settle(offset)

    def restore_offset(self, offset: int, attempt: int, settled: bool) -> None:
        """Add the saved state of offset, filling skipped offsets as available."""
        if offset < self.cursor:
            raise ValueError(
                f"offset {offset} is below the ring's cursor {self.cursor}"
            )
        while self.cursor <= offset:
            self.slots[self.cursor] = ModelSlot()
            self.cursor += 1
        self.slots[offset].attempt = attempt
        if settled:
            self._settle(offset)

    def state(self, offset: int) -> str:
        if offset < self.low:
            return SETTLED
        if offset >= self.cursor:
            return AVAILABLE
        return self.slots[offset].state

    def attempts(self, offset: int) -> int:
        """Return the deliveries of offset so far (0 outside the window)."""
        slot = self.slots.get(offset)
        return 0 if slot is None else slot.attempt
