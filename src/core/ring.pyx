# RingBuffer bodies; the model is described in ring.pxd.

from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memset

cdef enum:
    RING_INITIAL_SLOTS = 1024
    HEAP_INITIAL_ENTRIES = 64


cdef int timed_push(TimedHeap *heap, int64_t time, uint64_t offset,
                    uint32_t attempt) except -1:
    return timed_push_span(heap, time, offset, 1, attempt)


cdef inline int timed_push_span(TimedHeap *heap, int64_t time,
                                uint64_t offset, uint32_t count,
                                uint32_t attempt) except -1:
    """Push one entry for the count offsets from offset on."""
    cdef size_t i, parent
    cdef TimedEntry *grown
    cdef TimedEntry entry

    if heap.size == heap.capacity:
        heap.capacity = max(heap.capacity * 2, HEAP_INITIAL_ENTRIES)
        grown = <TimedEntry *>realloc(heap.entries,
                                      heap.capacity * sizeof(TimedEntry))
        if grown == NULL:
            heap.capacity = heap.size
            raise MemoryError()
        heap.entries = grown
    entry.time = time
    entry.offset = offset
    entry.attempt = attempt
    entry.count = count
    i = heap.size
    heap.size += 1
    while i > 0:
        parent = (i - 1) // 2
        if not timed_before(&entry, &heap.entries[parent]):
            break
        heap.entries[i] = heap.entries[parent]
        i = parent
    heap.entries[i] = entry
    return 0


cdef int timed_push_run(TimedHeap *heap, int64_t time, uint64_t first,
                        uint64_t count, uint32_t attempt) except -1:
    """Push entries for the offsets first to first + count, all due at time.

    One entry covers up to 2**32 - 1 of them: a run of fresh deliveries
    costs one push, not one per offset.
    """
    cdef uint32_t span

    while count:
        span = <uint32_t>min(count, 0xFFFFFFFF)
        timed_push_span(heap, time, first, span, attempt)
        first += span
        count -= span
    return 0


cdef inline bint timed_before(const TimedEntry *a,
                              const TimedEntry *b) noexcept nogil:
    return a.time < b.time or (a.time == b.time and a.offset < b.offset)


cdef void timed_sift_down(TimedHeap *heap, size_t i) noexcept nogil:
    cdef size_t child
    cdef TimedEntry item = heap.entries[i]

    while True:
        child = 2 * i + 1
        if child >= heap.size:
            break
        if (child + 1 < heap.size and
                timed_before(&heap.entries[child + 1], &heap.entries[child])):
            child += 1
        if not timed_before(&heap.entries[child], &item):
            break
        heap.entries[i] = heap.entries[child]
        i = child
    heap.entries[i] = item


cdef void timed_pop(TimedHeap *heap) noexcept nogil:
    cdef size_t i = 0, child
    cdef TimedEntry last

    heap.size -= 1
    if heap.size == 0:
        return
    last = heap.entries[heap.size]
    while True:
        child = 2 * i + 1
        if child >= heap.size:
            break
        if (child + 1 < heap.size and
                timed_before(&heap.entries[child + 1], &heap.entries[child])):
            child += 1
        if not timed_before(&heap.entries[child], &last):
            break
        heap.entries[i] = heap.entries[child]
        i = child
    heap.entries[i] = last


cdef int offset_push(OffsetHeap *heap, uint64_t offset) except -1:
    cdef size_t i, parent
    cdef uint64_t *grown

    if heap.size == heap.capacity:
        heap.capacity = max(heap.capacity * 2, HEAP_INITIAL_ENTRIES)
        grown = <uint64_t *>realloc(heap.entries,
                                    heap.capacity * sizeof(uint64_t))
        if grown == NULL:
            heap.capacity = heap.size
            raise MemoryError()
        heap.entries = grown
    i = heap.size
    heap.size += 1
    while i > 0:
        parent = (i - 1) // 2
        if heap.entries[parent] <= offset:
            break
        heap.entries[i] = heap.entries[parent]
        i = parent
    heap.entries[i] = offset
    return 0


cdef void offset_pop(OffsetHeap *heap) noexcept nogil:
    cdef size_t i = 0, child
    cdef uint64_t last

    heap.size -= 1
    if heap.size == 0:
        return
    last = heap.entries[heap.size]
    while True:
        child = 2 * i + 1
        if child >= heap.size:
            break
        if (child + 1 < heap.size and
                heap.entries[child + 1] < heap.entries[child]):
            child += 1
        if heap.entries[child] >= last:
            break
        heap.entries[i] = heap.entries[child]
        i = child
    heap.entries[i] = last


@cython.final
cdef class RingBuffer:
    """The in-flight window of a consumer group: slot states, attempts and
    deadlines, with the lowest available offset delivered first.

    Not thread-safe: the group that owns it serialises calls. Times are
    monotonic nanoseconds, passed in by the caller, so tests can move the
    clock.
    """

    def __cinit__(self, uint64_t low=0, size_t capacity=RING_INITIAL_SLOTS):
        cdef size_t size = RING_INITIAL_SLOTS

        while size < capacity:
            # A larger array would overflow size * sizeof(Slot).
            if size > <size_t>-1 // (2 * sizeof(Slot)):
                raise MemoryError(
                    f"a ring of {capacity} slots is too large to allocate")
            size *= 2
        self.slots = <Slot *>malloc(size * sizeof(Slot))
        if self.slots == NULL:
            raise MemoryError()
        self.capacity = size
        self.low = self.cursor = low

    def __dealloc__(self):
        free(self.slots)
        free(self.deadlines.entries)
        free(self.delayed.entries)
        free(self.ready.entries)

    cdef int grow(self) except -1:
        """Double the slots, keeping each offset at its new index."""
        cdef size_t capacity = self.capacity * 2
        cdef Slot *slots = <Slot *>malloc(capacity * sizeof(Slot))
        cdef uint64_t offset

        if slots == NULL:
            raise MemoryError()
        for offset in range(self.low, self.cursor):
            slots[offset & (capacity - 1)] = self.slot(offset)[0]
        free(self.slots)
        self.slots = slots
        self.capacity = capacity
        return 0

    cdef int compact(self) except -1:
        """Drop stale deadline entries once they outnumber live ones.

        Acked deliveries leave their entries behind; rebuilding the heap
        when it is twice the live count keeps it O(in flight) in size, at
        O(1) amortised cost per delivery.
        """
        cdef TimedHeap *heap = &self.deadlines
        cdef size_t kept = 0, i
        cdef TimedEntry *entry
        cdef uint64_t candidate, first, end, live_first, live_end

        for i in range(heap.size):
            entry = &heap.entries[i]
            if entry.count == 1:
                if (self.low <= entry.offset < self.cursor and
                        self.covers(entry, entry.offset)):
                    heap.entries[kept] = entry[0]
                    kept += 1
                continue
            # An entry shrinks to the span from its first live offset to
            # its last; offsets in between that are not live are skipped
            # when it comes due.
            first = max(entry.offset, self.low)
            end = min(entry.offset + entry.count, self.cursor)
            live_first = live_end = 0
            for candidate in range(first, end):
                if self.covers(entry, candidate):
                    if live_end == 0:
                        live_first = candidate
                    live_end = candidate + 1
            if live_end:
                heap.entries[kept] = entry[0]
                heap.entries[kept].offset = live_first
                heap.entries[kept].count = <uint32_t>(live_end - live_first)
                kept += 1
        heap.size = kept
        i = kept // 2
        while i > 0:
            i -= 1
            timed_sift_down(heap, i)
        return 0

    cdef int advance_low(self) except -1:
        while self.low < self.cursor and (
                self.slot(self.low).state == SLOT_SETTLED):
            self.low += 1
        return 0

    cdef int promote(self, int64_t now) except -1:
        """Move delayed slots whose not-before time has come to ready."""
        cdef TimedEntry *top
        cdef Slot *slot

        while self.delayed.size and self.delayed.entries[0].time <= now:
            top = &self.delayed.entries[0]
            if top.offset >= self.low:
                slot = self.slot(top.offset)
                if (slot.state == SLOT_AVAILABLE and
                        slot.attempt == top.attempt and slot.time == top.time):
                    offset_push(&self.ready, top.offset)
            timed_pop(&self.delayed)
        return 0

    cdef int ready_due(self, int64_t now) except -1:
        """Return 1 when a due offset is at the top of ready, else 0.

        Delayed slots that are due are promoted first, and stale entries on
        top are dropped. The entry left at the top, if any, is the lowest
        available offset below cursor.
        """
        cdef Slot *slot
        cdef uint64_t candidate

        self.promote(now)
        while self.ready.size:
            candidate = self.ready.entries[0]
            if candidate >= self.low:
                slot = self.slot(candidate)
                if slot.state == SLOT_AVAILABLE:
                    if slot.time <= now:
                        return 1
                    # Not due yet (the clock passed in went back): wait in
                    # the delayed heap rather than be dropped.
                    timed_push(&self.delayed, slot.time, candidate,
                               slot.attempt)
            offset_pop(&self.ready)
        return 0

    cdef int take(self, int64_t now, uint64_t end, int64_t deadline,
                  uint64_t *offset, uint32_t *attempt) except -1:
        """Deliver the lowest available offset below end; 1 if one was.

        Sets offset and attempt; the slot's deadline becomes deadline.
        """
        cdef Slot *slot
        cdef uint64_t candidate

        if self.ready_due(now):
            candidate = self.ready.entries[0]
            if candidate >= end:
                # The lowest ready offset is past end, so every other is too.
                return 0
            offset_pop(&self.ready)
            slot = self.slot(candidate)
            self.waiting -= 1
        else:
            if self.cursor >= end:
                return 0
            if self.cursor - self.low == self.capacity:
                self.grow()
            candidate = self.cursor
            slot = self.slot(candidate)
            slot.attempt = 0
            self.cursor += 1

        slot.state = SLOT_DELIVERED
        slot.attempt += 1
        slot.time = deadline
        self.delivered += 1
        if self.deadlines.size >= 2 * self.delivered + HEAP_INITIAL_ENTRIES:
            self.compact()
        timed_push(&self.deadlines, deadline, candidate, slot.attempt)
        offset[0] = candidate
        attempt[0] = slot.attempt
        return 1

    cdef int take_fresh(self, uint64_t count, int64_t deadline) except -1:
        """Deliver the count offsets from cursor on, all first attempts.

        The caller found nothing due in ready (ready_due returned 0), so
        take() would hand out these offsets one by one, in this order. Each
        slot's deadline becomes deadline.
        """
        cdef uint64_t offset, mask
        cdef Slot *slots
        cdef Slot fresh

        while self.cursor + count - self.low > self.capacity:
            self.grow()
        memset(&fresh, 0, sizeof(Slot))
        fresh.state = SLOT_DELIVERED
        fresh.attempt = 1
        fresh.time = deadline
        slots = self.slots
        mask = self.capacity - 1
        for offset in range(self.cursor, self.cursor + count):
            slots[offset & mask] = fresh
        if self.deadlines.size >= 2 * self.delivered + HEAP_INITIAL_ENTRIES:
            self.compact()
        if count <= 0xFFFFFFFF:
            # One entry, without timed_push_run's loop: for a get of one
            # message that loop cost about 35 instructions.
            timed_push_span(&self.deadlines, deadline, self.cursor,
                            <uint32_t>count, 1)
        else:
            timed_push_run(&self.deadlines, deadline, self.cursor, count, 1)
        self.cursor += count
        self.delivered += count
        return 0

    cdef int lookup(self, uint64_t receipt, uint64_t *offset) except -1:
        """Set offset for a receipt of a delivery in flight; else return 1."""
        cdef uint64_t candidate

        receipt ^= self.receipt_key
        candidate = receipt >> RECEIPT_ATTEMPT_BITS

        if candidate < self.low or candidate >= self.cursor:
            return 1
        if not matches_delivery(self.slot(candidate), receipt):
            return 1
        offset[0] = candidate
        return 0

    cdef int settle(self, uint64_t offset) except -1:
        """Mark a delivered or available offset acked or dead-lettered.

        An offset outside the window (settled already, by skip_to say) is
        left alone: its slot may hold another offset by now.
        """
        cdef Slot *slot

        if offset < self.low or offset >= self.cursor:
            return 0
        slot = self.slot(offset)
        if slot.state == SLOT_DELIVERED:
            self.delivered -= 1
        elif slot.state == SLOT_AVAILABLE:
            self.waiting -= 1
        slot.state = SLOT_SETTLED
        if offset == self.low:
            self.advance_low()
        return 0

    cdef Py_ssize_t lookup_many(self, const uint64_t *receipts,
                                uint64_t *offsets,
                                Py_ssize_t count) except -2:
        """Set offsets[i] for each receipt in flight, and return -1 when all
        are in flight.

        Otherwise returns the index of the first receipt that is not, with
        the offsets before it set.
        """
        cdef Py_ssize_t i

        for i in range(count):
            if self.lookup(receipts[i], &offsets[i]):
                return i
        return -1

    cdef int settle_many(self, const uint64_t *offsets,
                         Py_ssize_t count) except -1:
        """Run settle() on each of count distinct offsets; low moves once."""
        cdef Py_ssize_t i
        cdef uint64_t offset
        cdef Slot *slot

        for i in range(count):
            offset = offsets[i]
            if offset < self.low or offset >= self.cursor:
                continue
            slot = self.slot(offset)
            if slot.state == SLOT_DELIVERED:
                self.delivered -= 1
            elif slot.state == SLOT_AVAILABLE:
                self.waiting -= 1
            slot.state = SLOT_SETTLED
        self.advance_low()
        return 0

    cdef bint lookup_run(self, const uint64_t *receipts,
                         Py_ssize_t count) noexcept:
        """Return whether the receipts are of deliveries in flight of the
        consecutive offsets from the first one's on, in that order.

        That is what the receipts of a batch taken in one run look like.
        False says nothing about them: lookup_many() tells which is stale.
        """
        cdef uint64_t key = self.receipt_key
        cdef uint64_t value = receipts[0] ^ key
        cdef uint64_t first = value >> RECEIPT_ATTEMPT_BITS
        cdef uint64_t offset, mask = self.capacity - 1
        cdef Py_ssize_t i
        cdef Slot *slots = self.slots

        if (first < self.low or first > self.cursor or
                <uint64_t>count > self.cursor - first):
            return False
        for i in range(count):
            value = receipts[i] ^ key
            offset = first + <uint64_t>i
            if (value >> RECEIPT_ATTEMPT_BITS != offset or
                    not matches_delivery(&slots[offset & mask], value)):
                return False
        return True

    cdef int settle_run(self, uint64_t first, uint64_t count) except -1:
        """Settle the count offsets from first on, all of them delivered.

        The caller found every one in flight (lookup_run), so this is
        settle_many() without its checks of the window and the state.
        """
        cdef uint64_t offset

        for offset in range(first, first + count):
            self.slot(offset).state = SLOT_SETTLED
        self.delivered -= count
        if first == self.low:
            self.low = first + count
        self.advance_low()
        return 0

    cdef int make_available(self, uint64_t offset,
                            int64_t not_before) except -1:
        """Return a delivered offset to the window, due at not_before.

        An offset outside the window is left alone, as in settle().
        """
        cdef Slot *slot

        if offset < self.low or offset >= self.cursor:
            return 0
        slot = self.slot(offset)
        if slot.state == SLOT_AVAILABLE:
            return 0
        if slot.state == SLOT_DELIVERED:
            self.delivered -= 1
        slot.state = SLOT_AVAILABLE
        slot.time = not_before
        self.waiting += 1
        timed_push(&self.delayed, not_before, offset, slot.attempt)
        return 0

    cdef int untake(self, uint64_t offset) except -1:
        """Undo take() of offset: available at once, its attempt not counted.

        For a delivery that was never handed out because its journal record
        could not be written.
        """
        cdef Slot *slot

        if offset < self.low or offset >= self.cursor:
            return 0
        slot = self.slot(offset)
        if slot.state != SLOT_DELIVERED:
            return 0
        # Before make_available, whose heap entry carries the attempt.
        slot.attempt -= 1
        self.make_available(offset, 0)
        return 0

    cdef int set_deadline(self, uint64_t offset, int64_t deadline) except -1:
        cdef Slot *slot = self.slot(offset)

        slot.time = deadline
        timed_push(&self.deadlines, deadline, offset, slot.attempt)
        return 0

    cdef int pop_expired(self, int64_t now, uint64_t *offset) except -1:
        """Find a delivery whose deadline passed; 1 if one was found.

        The slot stays delivered: the caller makes it available or
        settles it (after a move to the dead-letter queue).
        """
        cdef TimedEntry entry
        cdef uint64_t candidate, end

        while self.deadlines.size and self.deadlines.entries[0].time <= now:
            entry = self.deadlines.entries[0]
            timed_pop(&self.deadlines)
            end = entry.offset + entry.count
            for candidate in range(max(entry.offset, self.low),
                                   min(end, self.cursor)):
                if self.covers(&entry, candidate):
                    if candidate + 1 < end:
                        # The rest of the span, due at the same time.
                        timed_push_span(&self.deadlines, entry.time,
                                        candidate + 1,
                                        <uint32_t>(end - candidate - 1),
                                        entry.attempt)
                    offset[0] = candidate
                    return 1
        return 0

    cdef int restore(self, uint64_t offset, uint32_t attempt,
                     bint settled) except -1:
        """Rebuild the window from saved state, one offset at a time.

        Offsets arrive in increasing order from cursor on; an unsettled one
        is available at once, with its attempts counted.
        """
        cdef Slot *slot

        if offset < self.cursor:
            raise ValueError(
                f"offset {offset} is below the ring's cursor {self.cursor}")
        while self.cursor <= offset:
            while self.cursor - self.low >= self.capacity:
                self.grow()
            slot = self.slot(self.cursor)
            slot.state = SLOT_AVAILABLE
            slot.attempt = 0
            slot.time = 0
            self.waiting += 1
            offset_push(&self.ready, self.cursor)
            self.cursor += 1
        slot = self.slot(offset)
        slot.attempt = attempt
        if settled:
            self.settle(offset)
        return 0

    cdef int fill_settled(self, uint64_t end) except -1:
        """Move the cursor up to end, with every offset passed settled."""
        cdef Slot *slot

        if self.cursor >= end:
            return 0
        if self.low == self.cursor:
            self.low = self.cursor = end
            return 0
        while self.cursor < end:
            while self.cursor - self.low >= self.capacity:
                self.grow()
            slot = self.slot(self.cursor)
            slot.state = SLOT_SETTLED
            slot.attempt = 0
            slot.time = 0
            self.cursor += 1
        return 0

    cdef int64_t next_due(self) noexcept:
        """Return the earliest deadline or not-before time queued, or -1.

        Entries made stale by an ack or extend still count, so a waiter
        may wake early and find nothing due.
        """
        cdef int64_t due = -1

        if self.deadlines.size:
            due = self.deadlines.entries[0].time
        if self.delayed.size and (
                due < 0 or self.delayed.entries[0].time < due):
            due = self.delayed.entries[0].time
        return due

    cdef uint64_t skip_to(self, uint64_t offset) except? 0:
        """Settle every offset below offset; return how many were not settled.

        For a group that fell behind retention: deliveries in flight below
        offset are dropped, so their receipts become stale.
        """
        cdef uint64_t skipped = 0, end = min(self.cursor, offset), current
        cdef Slot *slot

        for current in range(self.low, end):
            slot = self.slot(current)
            if slot.state == SLOT_SETTLED:
                continue
            if slot.state == SLOT_DELIVERED:
                self.delivered -= 1
            else:
                self.waiting -= 1
            slot.state = SLOT_SETTLED
            skipped += 1
        if self.cursor < offset:
            skipped += offset - self.cursor
            self.low = self.cursor = offset
        else:
            self.low = max(self.low, end)
            self.advance_low()
        return skipped

    # Python access, for the broker's Python layer and for tests ----------

    def take_next(self, int64_t now, uint64_t end, int64_t deadline):
        """Deliver the lowest available offset below end.

        Returns (offset, attempt, receipt), or None when nothing is due.
        """
        cdef uint64_t offset
        cdef uint32_t attempt

        if not self.take(now, end, deadline, &offset, &attempt):
            return None
        return offset, attempt, self.receipt(offset, attempt)

    def take_run(self, int64_t now, uint64_t count, int64_t deadline):
        """Deliver the count offsets from cursor on as one run.

        Returns a list of (offset, attempt, receipt), or None, taking
        nothing, when an available offset is due: that one goes first, and
        take_next hands it out.
        """
        cdef uint64_t first = self.cursor

        if self.ready_due(now):
            return None
        if count:
            self.take_fresh(count, deadline)
        return [(offset, 1, self.receipt(offset, 1))
                for offset in range(first, first + count)]

    cdef uint64_t checked(self, uint64_t receipt) except? 0:
        cdef uint64_t offset

        if self.lookup(receipt, &offset):
            raise StaleReceiptError(
                f"receipt {receipt} names a delivery that expired or was "
                f"already settled")
        return offset

    def ack(self, uint64_t receipt):
        """Settle the delivery named by receipt; return its offset."""
        cdef uint64_t offset = self.checked(receipt)

        self.settle(offset)
        return offset

    def untake_offset(self, uint64_t offset):
        """Undo the delivery of offset; see untake()."""
        self.untake(offset)

    def nack(self, uint64_t receipt, int64_t not_before):
        """Make the delivery's offset available again from not_before."""
        cdef uint64_t offset = self.checked(receipt)

        self.make_available(offset, not_before)
        return offset

    def extend(self, uint64_t receipt, int64_t deadline):
        """Move the deadline of the delivery named by receipt."""
        cdef uint64_t offset = self.checked(receipt)

        self.set_deadline(offset, deadline)
        return offset

    def expire(self, int64_t now):
        """Make every delivery past its deadline available; return them.

        Returns a list of (offset, attempt).
        """
        cdef uint64_t offset
        cdef list expired = []

        while self.pop_expired(now, &offset):
            expired.append((offset, self.slot(offset).attempt))
            self.make_available(offset, now)
        return expired

    def settle_offset(self, uint64_t offset):
        """Settle an offset in the window, whatever its state."""
        if offset < self.low or offset >= self.cursor:
            raise IndexError(
                f"offset {offset} is outside the window {self.low} to "
                f"{self.cursor}")
        self.settle(offset)

    def skip_below(self, uint64_t offset):
        """Settle every offset below offset; see skip_to()."""
        return self.skip_to(offset)

    def restore_offset(self, uint64_t offset, uint32_t attempt, bint settled):
        """Add saved state of offset; see restore()."""
        self.restore(offset, attempt, settled)

    def state(self, uint64_t offset):
        """Return "available", "delivered" or "settled" for offset."""
        if offset < self.low:
            return "settled"
        if offset >= self.cursor:
            return "available"
        return ("available", "delivered", "settled")[
            self.slot(offset).state]

    def attempts(self, uint64_t offset):
        """Return the deliveries of offset so far (0 outside the window)."""
        if offset < self.low or offset >= self.cursor:
            return 0
        return self.slot(offset).attempt

    @property
    def slots_allocated(self):
        """The number of slots in the circular array."""
        return self.capacity
