# The wire protocol's frames, on the hot path of server and client.
#
# Every frame (little-endian), after the 8-byte preamble of a connection:
#
#   u32 length      bytes that follow (header and payload), 12 or more
#   u8  opcode
#   u8  version     of the opcode's payload layout, 1 for now
#   u16 flags       FRAME_REPLY, FRAME_ERROR, FRAME_NO_REPLY, FRAME_PUSH
#   u32 request_id  chosen by the client; a reply carries its request's
#   u32 handle      a queue or group opened on this connection, or 0
#   payload         length - 12 bytes
#
# docs/protocol.md has the payload of every opcode.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    FRAME_HEADER_BYTES = 12
    FRAME_VERSION = 1    # the only payload layout version there is
    FRAME_REPLY = 1
    FRAME_ERROR = 2
    FRAME_NO_REPLY = 4
    FRAME_PUSH = 8
    FRAME_MORE = 16      # more frames of the same reply follow
    # Batch flag: each record is a header block, then the body.
    BATCH_HEADERS = 1
    PUBLISH_HEAD_BYTES = 16
    DELIVERY_HEAD_BYTES = 36


@cython.final
cdef class FrameReader:
    cdef bytearray buffer
    cdef readonly uint32_t max_frame_bytes
    cdef readonly object ready        # frames that receive() completed, a deque
    # Busy polling before a blocking read, in monotonic ns (see receive()).
    cdef int poll_fd                  # the socket's descriptor, or -1: no polling
    cdef int64_t poll_limit_ns        # the longest poll
    cdef int64_t poll_ns              # the next poll, 0 to poll_limit_ns

    cdef list take(self, const uint8_t *data, Py_ssize_t size)
    cdef void adapt_poll(self, int64_t waited) noexcept
    cdef Py_ssize_t split(self, const uint8_t *p, Py_ssize_t available,
                          list frames) except -1


@cython.final
@cython.no_gc
cdef class RemoteMessage:
    cdef readonly bytes body
    cdef readonly uint64_t offset
    cdef readonly int64_t timestamp
    cdef readonly uint32_t attempt
    cdef readonly uint64_t receipt
    cdef object header_map
    cdef object owner                 # has ack, nack, extend and reject


@cython.final
cdef class UnackedCount:
    cdef readonly Py_ssize_t held     # receipts in the sets, plus reservations
    cdef readonly Py_ssize_t limit    # max_unacked
    cdef public Py_ssize_t waiters    # requests waiting for room
    cdef public object reclaim        # callable(): check every set
    cdef public object freed          # callable(): room was freed
    cdef int64_t expiry_ns            # a held delivery may expire from here
    cdef int64_t added_ns             # first delivery added since the check
    cdef int64_t next_check_ns        # no check starts before this
    cdef int64_t check_started_ns     # when the check under way started
    cdef bint checking                # a check is under way

    cdef Py_ssize_t take_room(self, Py_ssize_t count) except -1
    cdef int give_back(self, Py_ssize_t count) except -1
    cdef void note_expiry(self, int64_t deadline_ns) noexcept
    cdef bint check_due(self, int64_t now) noexcept
    cdef Py_ssize_t tracked(self, Py_ssize_t added, Py_ssize_t granted,
                            int64_t visibility_ns) except -1
    cdef Py_ssize_t track(self, ReceiptSet outstanding, list messages,
                          Py_ssize_t granted, int64_t visibility_ns) except -1


cdef enum:
    OP_HELLO = 0x01
    OP_PING = 0x02
    OP_OPEN = 0x10
    OP_STATS = 0x11
    OP_REDRIVE = 0x12
    OP_NAMES = 0x13
    OP_GROUPS = 0x14
    OP_PUBLISH = 0x20
    OP_FETCH = 0x21
    OP_SUBSCRIBE = 0x22
    OP_CREDIT = 0x23
    OP_UNSUBSCRIBE = 0x24
    OP_CANCEL = 0x25
    OP_DELIVER = 0x28
    OP_ACK = 0x30
    OP_NACK = 0x31
    OP_EXTEND = 0x32
    OP_REJECT = 0x33
