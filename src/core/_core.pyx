# cython: language_level=3
"""The compiled core of pymq: the segment store. Private: use pymq."""

cimport cython

from pymq.errors import (BrokerLockedError, ClosedError, ConfigError,
                         CorruptBatchError, CorruptSegmentError,
                         FrameTooLargeError, MessageTooLargeError,
                         OffsetNotFoundError, ProtocolError, QueueFull,
                         ServerError, StaleReceiptError)

include "segment.pyx"
include "store.pyx"
include "ring.pyx"
include "group.pyx"
include "receipts.pyx"
include "protocol.pyx"

# Picks the CRC32C implementation now, while the import holds the GIL.
CRC32C_IMPLEMENTATION = pymq_crc32c_impl().decode("ascii")


def crc32c(data, unsigned int crc=0):
    """Return the CRC32C of data, continuing from crc."""
    cdef const unsigned char[::1] view = memoryview(data).cast("B")

    if view.shape[0] == 0:
        return crc
    return pymq_crc32c(crc, &view[0], view.shape[0])


def crc32c_portable(data, unsigned int crc=0):
    """Return the CRC32C of data computed by the table path."""
    cdef const unsigned char[::1] view = memoryview(data).cast("B")

    if view.shape[0] == 0:
        return crc
    return pymq_crc32c_portable(crc, &view[0], view.shape[0])
