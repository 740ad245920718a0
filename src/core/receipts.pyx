# ReceiptSet: a hash set of unsigned 64-bit receipts in C.
#
# The server records every receipt it delivers on a connection and drops
# it when the delivery is settled, so that a closed connection gives its
# deliveries back. A Python set of ints cost a hash and an int object per
# receipt each way. Here a receipt is a key in a table with linear
# probing, removed by backward-shift deletion, so there are no tombstones.
# Receipts are XORed with a per-group key, so their low bits are nearly
# the same within a batch: the slot comes from a multiplicative hash.

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memset


cdef inline Py_ssize_t home_slot(uint64_t receipt, Py_ssize_t capacity) noexcept nogil:
    return <Py_ssize_t>((receipt * <uint64_t>0x9E3779B97F4A7C15ULL)
                        >> 32) & (capacity - 1)


cdef class ReceiptSet:
    """A set of receipts (unsigned 64-bit ints), compiled.

    Supports add, discard, update, difference_update, clear, len, in and
    iteration, like a set of ints. Iteration returns a snapshot.
    """

    def __dealloc__(self):
        PyMem_Free(self.slots)

    cdef int grow(self) except -1:
        cdef Py_ssize_t old_capacity = self.capacity, i
        cdef uint64_t *old_slots = self.slots
        cdef Py_ssize_t capacity = 64 if old_capacity == 0 else old_capacity * 2
        cdef uint64_t *slots = <uint64_t *>PyMem_Malloc(capacity * 8)

        if slots == NULL:
            raise MemoryError()
        memset(slots, 0, capacity * 8)
        self.slots = slots
        self.capacity = capacity
        self.used = 0
        for i in range(old_capacity):
            if old_slots[i] != 0:
                self.add_one(old_slots[i])
        PyMem_Free(old_slots)
        return 0

    cdef int add_one(self, uint64_t receipt) except -1:
        cdef Py_ssize_t i

        if receipt == 0:
            self.has_zero = True
            return 0
        # At most half full, so probes stay short and one slot is empty.
        if (self.used + 1) * 2 > self.capacity:
            self.grow()
        i = home_slot(receipt, self.capacity)
        while self.slots[i] != 0:
            if self.slots[i] == receipt:
                return 0
            i = (i + 1) & (self.capacity - 1)
        self.slots[i] = receipt
        self.used += 1
        return 0

    cdef bint discard_one(self, uint64_t receipt) noexcept:
        cdef Py_ssize_t mask = self.capacity - 1, i, j, home
        cdef uint64_t moved

        if receipt == 0:
            if self.has_zero:
                self.has_zero = False
                return True
            return False
        if self.used == 0:
            return False
        i = home_slot(receipt, self.capacity)
        while self.slots[i] != receipt:
            if self.slots[i] == 0:
                return False
            i = (i + 1) & mask
        # Backward-shift deletion: move each later receipt of the run into
        # the hole unless its home slot lies cyclically in (hole, j].
        j = i
        while True:
            j = (j + 1) & mask
            moved = self.slots[j]
            if moved == 0:
                break
            home = home_slot(moved, self.capacity)
            if (j > i and (home <= i or home > j)) or (
                    j < i and home <= i and home > j):
                self.slots[i] = moved
                i = j
        self.slots[i] = 0
        self.used -= 1
        return True

    cdef Py_ssize_t size(self) noexcept:
        """Return the number of receipts held, as len() does."""
        return self.used + self.has_zero

    def add(self, uint64_t receipt):
        """Add one receipt."""
        self.add_one(receipt)

    def discard(self, uint64_t receipt):
        """Remove one receipt if present; return whether it was."""
        return self.discard_one(receipt)

    def update(self, receipts):
        """Add every receipt of an iterable of ints."""
        for receipt in receipts:
            self.add_one(receipt)

    def difference_update(self, receipts):
        """Remove every receipt of an iterable of ints that is present."""
        for receipt in receipts:
            self.discard_one(receipt)

    def clear(self):
        """Remove every receipt."""
        if self.capacity:
            memset(self.slots, 0, self.capacity * 8)
        self.used = 0
        self.has_zero = False

    def __len__(self):
        return self.used + self.has_zero

    def __bool__(self):
        return self.used != 0 or self.has_zero

    def __contains__(self, receipt):
        cdef uint64_t value
        cdef Py_ssize_t i

        try:
            value = receipt
        except (OverflowError, TypeError):
            return False
        if value == 0:
            return self.has_zero
        if self.used == 0:
            return False
        i = home_slot(value, self.capacity)
        while self.slots[i] != 0:
            if self.slots[i] == value:
                return True
            i = (i + 1) & (self.capacity - 1)
        return False

    def __iter__(self):
        cdef list receipts = [0] if self.has_zero else []
        cdef Py_ssize_t i

        for i in range(self.capacity):
            if self.slots[i] != 0:
                receipts.append(self.slots[i])
        return iter(receipts)
