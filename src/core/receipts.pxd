# The set of receipts a server connection holds on one queue or group.

from libc.stdint cimport uint64_t


cdef class ReceiptSet:
    cdef uint64_t *slots         # open addressing; 0 marks an empty slot
    cdef Py_ssize_t capacity     # a power of two, or 0 before the first add
    cdef Py_ssize_t used         # receipts held, 0 not counted
    cdef bint has_zero           # receipt 0 is kept apart from the table

    cdef int add_one(self, uint64_t receipt) except -1
    cdef bint discard_one(self, uint64_t receipt) noexcept
    cdef int grow(self) except -1
    cdef Py_ssize_t size(self) noexcept
