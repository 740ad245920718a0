# RingBuffer: the in-flight window of one consumer group.
#
# The window covers offsets from low (the lowest offset not yet settled) to
# cursor (the next offset never delivered). Slot i of the circular array
# holds offset low + i. Settling the offset at low advances low past every
# settled slot, so acks cost O(1) amortised.
#
# Slot states:
#   SLOT_AVAILABLE  waiting for a delivery; not before slot.time (ns)
#   SLOT_DELIVERED  handed out; redelivered once slot.time (ns) passes
#   SLOT_SETTLED    acked or dead-lettered
#
# A receipt is (offset << RECEIPT_ATTEMPT_BITS) | (attempt & mask): each
# delivery of an offset has a new attempt number, so a receipt names one
# hand-out and a stale one no longer matches its slot.
# NOTE: only 16 bits of the attempt are kept, so a receipt from 65,536
# deliveries earlier of the same offset would match again.
#
# Receipts handed out are XORed with receipt_key, which a group draws at
# random when it opens. So a receipt of another group, or of an earlier
# open, names an offset far outside this window and is stale.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef enum:
    SLOT_AVAILABLE = 0
    SLOT_DELIVERED = 1
    SLOT_SETTLED = 2

cdef enum:
    RECEIPT_ATTEMPT_BITS = 16
    RECEIPT_ATTEMPT_MASK = (1 << RECEIPT_ATTEMPT_BITS) - 1


cdef struct Slot:
    uint8_t state
    uint32_t attempt       # deliveries so far, this one included
    int64_t time           # deadline or not-before, monotonic ns


cdef struct TimedEntry:
    int64_t time           # when the entry is due, monotonic ns
    uint64_t offset
    uint32_t attempt       # the slot's attempt when the entry was pushed
    uint32_t count         # offsets from offset on that it covers, 1 or more


cdef struct TimedHeap:
    TimedEntry *entries    # binary min-heap ordered by time, then offset
    size_t size
    size_t capacity


cdef struct OffsetHeap:
    uint64_t *entries      # binary min-heap of offsets
    size_t size
    size_t capacity


cdef inline bint matches_delivery(const Slot *slot,
                                  uint64_t value) noexcept nogil:
    """Return whether slot is in flight with the attempt of value, a
    receipt already XORed with the receipt key."""
    return (slot.state == SLOT_DELIVERED and
            (slot.attempt & RECEIPT_ATTEMPT_MASK) ==
            (value & RECEIPT_ATTEMPT_MASK))


cdef inline uint64_t make_receipt(uint64_t offset,
                                  uint32_t attempt) noexcept nogil:
    return (offset << RECEIPT_ATTEMPT_BITS) | (attempt & RECEIPT_ATTEMPT_MASK)


@cython.final
cdef class RingBuffer:
    cdef Slot *slots                 # circular, capacity entries
    cdef size_t capacity             # a power of two
    cdef readonly uint64_t low       # lowest offset not settled
    cdef readonly uint64_t cursor    # next offset never delivered
    cdef readonly size_t delivered   # slots in SLOT_DELIVERED
    cdef readonly size_t waiting     # slots in SLOT_AVAILABLE
    cdef TimedHeap deadlines         # deliveries by deadline (lazy)
    cdef TimedHeap delayed           # available slots by not-before (lazy)
    cdef OffsetHeap ready            # available slots due now (lazy)
    cdef uint64_t receipt_key        # XORed into every receipt; 0 by default

    cdef inline Slot *slot(self, uint64_t offset) noexcept:
        return &self.slots[offset & (self.capacity - 1)]

    cdef inline uint64_t receipt(self, uint64_t offset,
                                 uint32_t attempt) noexcept:
        return make_receipt(offset, attempt) ^ self.receipt_key

    cdef inline bint covers(self, const TimedEntry *entry,
                            uint64_t offset) noexcept:
        """Return whether entry is the live deadline of offset's delivery.

        offset must be in the window (low to cursor). An ack, a nack, an
        extend or a redelivery leaves the entry stale for that offset.
        """
        cdef Slot *slot = self.slot(offset)

        return (slot.state == SLOT_DELIVERED and
                slot.attempt == entry.attempt and slot.time == entry.time)

    cdef int grow(self) except -1
    cdef int compact(self) except -1
    cdef int advance_low(self) except -1
    cdef int promote(self, int64_t now) except -1
    cdef int ready_due(self, int64_t now) except -1
    cdef int take(self, int64_t now, uint64_t end, int64_t deadline,
                  uint64_t *offset, uint32_t *attempt) except -1
    cdef int take_fresh(self, uint64_t count, int64_t deadline) except -1
    cdef int lookup(self, uint64_t receipt, uint64_t *offset) except -1
    cdef Py_ssize_t lookup_many(self, const uint64_t *receipts,
                                uint64_t *offsets,
                                Py_ssize_t count) except -2
    cdef int settle(self, uint64_t offset) except -1
    cdef int settle_many(self, const uint64_t *offsets,
                         Py_ssize_t count) except -1
    cdef bint lookup_run(self, const uint64_t *receipts,
                         Py_ssize_t count) noexcept
    cdef int settle_run(self, uint64_t first, uint64_t count) except -1
    cdef int make_available(self, uint64_t offset, int64_t not_before) except -1
    cdef int untake(self, uint64_t offset) except -1
    cdef int set_deadline(self, uint64_t offset, int64_t deadline) except -1
    cdef int pop_expired(self, int64_t now, uint64_t *offset) except -1
    cdef int restore(self, uint64_t offset, uint32_t attempt,
                     bint settled) except -1
    cdef uint64_t checked(self, uint64_t receipt) except? 0
    cdef int fill_settled(self, uint64_t end) except -1
    cdef int64_t next_due(self) noexcept
    cdef uint64_t skip_to(self, uint64_t offset) except? 0
