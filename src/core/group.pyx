# Message, StreamBase and GroupBase bodies; layouts are in group.pxd.

from cpython.bytes cimport _PyBytes_Resize
from cpython.dict cimport PyDict_New, PyDict_SetItem
from cpython.buffer cimport PyObject_CheckBuffer
from cpython.object cimport PyObject
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdlib cimport qsort
from libc.math cimport INFINITY
from libc.string cimport memcpy

import logging
import os
import time

cdef object broker_logger = logging.getLogger("pymq.broker")
cdef int64_t NS_PER_SECOND = 1000000000
# Journal errors that a call does not raise are logged at most this often.
cdef int64_t ERROR_LOG_NS = 10 * NS_PER_SECOND
cdef int64_t FOREVER = 0x7FFFFFFFFFFFFFFF
cdef enum:
    MAX_HEADER_KEY_BYTES = 0xFFFF
    DELIVER_ENTRY_BYTES = 12
    CHECKPOINT_ENTRY_BYTES = 13
    # A run of take_fresh() holds the stream store's lock, which puts wait
    # for, so it ends after this many records or bytes of records.
    FRESH_RUN_RECORDS = 1024
    FRESH_RUN_BYTES = 1024 * 1024
    # Journal segments kept while a checkpoint waits for the background
    # flush; past this many it is synced by the call, so that a journal
    # whose store no flush thread syncs stays bounded.
    DROP_WAIT_SEGMENTS = 32


# Headers that a move to a dead-letter queue writes (and x-for-group, which
# routes a redriven record to its group). A put with one of them raises,
# except into a DLQ, so that a move or a redrive never overwrites or drops
# a value of the caller's.
RESERVED_HEADERS = frozenset((
    "x-source", "x-group", "x-offset", "x-attempts", "x-reason", "x-dead-at",
    "x-for-group"))
cdef str RESERVED_LIST = ", ".join(sorted(RESERVED_HEADERS))


cdef str consumer_label(GroupBase group):
    """Return "queue Q" or "group G of stream S", for messages."""
    if group._group_name is None:
        return f"queue {group.stream.name}"
    return f"group {group._group_name} of stream {group.stream.name}"


cdef inline bint takes_reserved_headers(str name):
    """Return whether puts into the queue or stream name may use RESERVED_HEADERS.

    Only a dead-letter queue does, and its name ends in ".dlq".
    """
    return name.endswith(".dlq")


cdef int check_user_header(str key) except -1:
    if key in RESERVED_HEADERS:
        raise ValueError(
            f"header {key!r} is reserved for the headers that pymq writes "
            f"when it moves a message to a dead-letter queue and back "
            f"({RESERVED_LIST}); use another name")
    return 0


cdef bytes encode_headers(dict headers, bint reserved_allowed=False):
    """Return the header block for headers (str keys and values).

    Raises ValueError for a reserved name (see RESERVED_HEADERS) unless
    reserved_allowed, which the broker's own writes set.
    """
    cdef list parts

    if len(headers) > 0xFFFF:
        raise ValueError(f"{len(headers)} headers; the maximum is 65535")
    parts = [len(headers).to_bytes(2, "little")]
    for key, value in headers.items():
        if type(key) is not str:
            raise TypeError(
                f"header names must be str, not {type(key).__name__} "
                f"({key!r})")
        if type(value) is not str:
            raise TypeError(
                f"value of header {key!r} must be str, not "
                f"{type(value).__name__}")
        if not reserved_allowed:
            check_user_header(key)
        # Only a lone surrogate has no UTF-8 form.
        try:
            raw_key = (<str>key).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"header name {key!r} cannot be encoded as UTF-8: it has a "
                f"lone surrogate at index {exc.start}") from None
        try:
            raw_value = (<str>value).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"value of header {key!r} cannot be encoded as UTF-8: it has "
                f"a lone surrogate at index {exc.start}") from None
        if len(raw_key) > MAX_HEADER_KEY_BYTES:
            raise ValueError(
                f"header name is {len(raw_key)} bytes; the maximum is "
                f"{MAX_HEADER_KEY_BYTES}")
        parts.append(len(raw_key).to_bytes(2, "little"))
        parts.append(raw_key)
        parts.append(len(raw_value).to_bytes(4, "little"))
        parts.append(raw_value)
    return b"".join(parts)


def put_header_bytes(dict headers, str target not None):
    """Return the bytes that headers add to each message of a put into target.

    Checks headers as that put on the broker does, with the same TypeError
    and ValueError, so that a remote client rejects before sending what
    the embedded broker rejects. Reserved names (RESERVED_HEADERS) raise
    unless target is a dead-letter queue.
    """
    if not headers:
        return 0
    return len(encode_headers(headers, takes_reserved_headers(target)))


cdef dict decode_headers(const uint8_t *data, size_t length, size_t *used):
    """Parse a header block; set used to its size in bytes."""
    cdef size_t pos = 2, key_length, value_length
    cdef Py_ssize_t count, i
    cdef dict headers = {}

    if length < 2:
        raise ValueError("header block is truncated")
    count = data[0] | (<size_t>data[1] << 8)
    for i in range(count):
        if length - pos < 2:
            raise ValueError("header block is truncated")
        key_length = data[pos] | (<size_t>data[pos + 1] << 8)
        pos += 2
        if length - pos < key_length + 4:
            raise ValueError("header block is truncated")
        key = PyUnicode_DecodeUTF8(<const char *>data + pos, key_length,
                                   NULL)
        pos += key_length
        value_length = load_u32(data + pos)
        pos += 4
        if length - pos < value_length:
            raise ValueError("header block is truncated")
        headers[key] = PyUnicode_DecodeUTF8(<const char *>data + pos,
                                            value_length, NULL)
        pos += value_length
    used[0] = pos
    return headers


@cython.final
@cython.no_gc
@cython.freelist(64)
cdef class Message:
    """One delivery of a message: its body, headers and position.

    Settle it once with ack(), nack(), reject(), or keep it longer with
    extend(). Settling a delivery that expired raises StaleReceiptError.
    """

    @staticmethod
    cdef Message new(GroupBase group, const uint8_t *header, uint64_t offset,
                     uint32_t attempt, object headers, size_t used):
        """Return the delivery of the record at header.

        headers and used are the record's decoded header block (None and 0
        without one), as take_record found them.
        """
        cdef Message message = Message.__new__(Message)
        cdef size_t length = load_u32(header + REC_OFF_LENGTH)
        cdef const uint8_t *body = header + REC_HEADER_SIZE

        message.header_map = headers
        message.body = PyBytes_FromStringAndSize(<const char *>body + used,
                                                 length - used)
        message.offset = offset
        message.timestamp = <int64_t>load_u64(header + REC_OFF_TIMESTAMP)
        message.attempt = attempt
        message.receipt = group.ring.receipt(offset, attempt)
        message.group = group
        return message

    @property
    def headers(self):
        """The message's headers, a dict of str to str."""
        if self.header_map is None:
            self.header_map = {}
        return self.header_map

    def ack(self):
        """Settle this delivery: the message is done."""
        self.group.ack_receipt(self.receipt)

    def nack(self, delay=0.0):
        """Give the message back, for redelivery after delay seconds."""
        self.group.nack(self.receipt, delay)

    def extend(self, seconds):
        """Set this delivery's deadline to now plus seconds."""
        self.group.extend(self.receipt, seconds)

    def reject(self, str reason not None="rejected"):
        """Move the message to the dead-letter queue now, with reason.

        The reason is stored as x-reason, cut to 1,000 bytes of UTF-8.
        Raises ValueError for a reason that UTF-8 cannot encode. If the
        move fails, raises its error (QueueFull for a full DLQ, say) and
        leaves this delivery in flight, with its receipt and deadline, so
        it can be rejected again, nacked or acked.
        """
        self.group.reject(self.receipt, reason)

    def __repr__(self):
        return (f"<Message offset={self.offset} attempt={self.attempt} "
                f"{len(self.body)} bytes>")


@cython.final
cdef class MessageBatch:
    """Deliveries of get_batch: columns as numpy arrays, bodies in one buffer.

    offsets, receipts, attempts, timestamps and lengths are numpy arrays;
    data is one bytes object with the bodies back to back, so body i is
    data[starts[i]:starts[i] + lengths[i]]. Pass the batch to ack_many to
    settle all of it. headers is a list with a dict (or None) per message.
    The clients' get_batch returns one too, built from the server's reply;
    only the queue or group that delivered a batch can settle it.
    """

    def __len__(self):
        return self.count

    @property
    def headers(self):
        """Headers, a list with a dict (or None) per message."""
        if self.header_list is None:
            return [None] * self.count
        return self.header_list

    cdef object column(self, Py_ssize_t index, str dtype):
        import numpy

        return numpy.frombuffer(self.columns, dtype=dtype, count=self.count,
                                offset=index * 8 * self.capacity)

    @property
    def offsets(self):
        """Offsets, a numpy uint64 array."""
        return self.column(BATCH_OFFSETS, "<u8")

    @property
    def receipts(self):
        """Receipts, a numpy uint64 array."""
        return self.column(BATCH_RECEIPTS, "<u8")

    @property
    def attempts(self):
        """Attempt numbers, a numpy uint32 array."""
        return self.column(BATCH_ATTEMPTS, "<u4")

    @property
    def timestamps(self):
        """Timestamps in ns since the epoch, a numpy int64 array."""
        return self.column(BATCH_TIMESTAMPS, "<i8")

    @property
    def lengths(self):
        """Body lengths in bytes, a numpy uint64 array."""
        return self.column(BATCH_LENGTHS, "<u8")

    @property
    def starts(self):
        """Where each body starts in data, a numpy uint64 array."""
        import numpy

        lengths = self.lengths
        starts = numpy.zeros(len(lengths), dtype="<u8")
        numpy.cumsum(lengths[:len(lengths) - 1], out=starts[1:])
        return starts

    def body(self, Py_ssize_t index):
        """Return body index as a memoryview of data, without a copy."""
        starts = self.starts
        if not 0 <= index < len(starts):
            raise IndexError(f"index {index} is outside the batch of "
                             f"{len(starts)}")
        start = int(starts[index])
        return memoryview(self.data)[start:start + int(self.lengths[index])]


cdef enum:
    # Column indices of MessageBatch.columns; the attempts come last, at
    # 4 * 8 * capacity bytes, after the four 8-byte columns.
    BATCH_OFFSETS = 0
    BATCH_RECEIPTS = 1
    BATCH_TIMESTAMPS = 2
    BATCH_LENGTHS = 3
    BATCH_ATTEMPTS = 4


cdef MessageBatch new_batch(Py_ssize_t capacity):
    """Return an empty MessageBatch whose columns hold capacity entries."""
    cdef MessageBatch batch = MessageBatch.__new__(MessageBatch)

    batch.columns = PyBytes_FromStringAndSize(NULL, capacity * 36)
    batch.capacity = capacity
    batch.count = 0
    return batch


cdef inline void *batch_column(MessageBatch batch, Py_ssize_t index) noexcept:
    """Return where column index of batch starts (see BATCH_OFFSETS)."""
    return PyBytes_AS_STRING(batch.columns) + index * 8 * batch.capacity


cdef struct BodyBuffer:
    PyObject *bytes        # a new bytes object being filled (owned), or NULL
    size_t size            # bytes filled so far
    size_t capacity        # the size of bytes


cdef int reserve_body_bytes(BodyBuffer *buffer, size_t extra,
                            Py_ssize_t more) except -1:
    """Make room for extra more bytes, and then for more 256-byte bodies.

    The bodies are copied straight into the bytes object that becomes the
    batch's data. _PyBytes_Resize grows it in place, and take_body_bytes
    cuts it to size, so no second copy is made. A batch taken in one run
    (more is 0) gets its exact size at once, and needs no resize.
    """
    cdef size_t capacity
    cdef object created

    if buffer.bytes != NULL and buffer.size + extra <= buffer.capacity:
        return 0
    capacity = buffer.size + extra + <size_t>more * 256
    if buffer.bytes != NULL:
        capacity = max(2 * buffer.capacity, capacity)
    if buffer.bytes == NULL:
        created = PyBytes_FromStringAndSize(NULL, capacity)
        Py_INCREF(created)
        buffer.bytes = <PyObject *>created
    else:
        _PyBytes_Resize(&buffer.bytes, capacity)
    buffer.capacity = capacity
    return 0


cdef bytes take_body_bytes(BodyBuffer *buffer):
    """Return the bodies copied so far as bytes, which buffer no longer owns."""
    cdef object result

    if buffer.bytes == NULL:
        return b""
    _PyBytes_Resize(&buffer.bytes, buffer.size)
    result = <object>buffer.bytes
    Py_DECREF(result)
    buffer.bytes = NULL
    return result


cdef class TakeSink:
    """What a get does with the deliveries GroupBase.take_into takes.

    take_run gets count never-delivered records, of offsets first onward:
    records[i] is the record of offset first + i, used[i] the size of its
    header block and headers[i] its headers (a dict or None); headers is
    empty when none of the records has headers. take_one gets
    any other delivery. index is the position of the first one in the get.
    Both run with the group lock and the stream store's lock held; what
    they raise hands every delivery of the get back.
    """

    cdef int take_run(self, GroupBase group, const uint8_t **records,
                      const size_t *used, list headers, uint64_t first,
                      Py_ssize_t index, Py_ssize_t count) except -1:
        raise NotImplementedError

    cdef int take_one(self, GroupBase group, const uint8_t *record,
                      uint64_t offset, uint32_t attempt, object headers,
                      size_t used, Py_ssize_t index) except -1:
        raise NotImplementedError


@cython.final
cdef class MessageSink(TakeSink):
    """Makes a Message of each delivery, for get_many."""

    cdef list messages

    cdef int take_run(self, GroupBase group, const uint8_t **records,
                      const size_t *used, list headers, uint64_t first,
                      Py_ssize_t index, Py_ssize_t count) except -1:
        cdef Py_ssize_t i

        for i in range(count):
            self.messages.append(Message.new(group, records[i], first + i, 1,
                                             headers[i] if headers else None,
                                             used[i]))
        return 0

    cdef int take_one(self, GroupBase group, const uint8_t *record,
                      uint64_t offset, uint32_t attempt, object headers,
                      size_t used, Py_ssize_t index) except -1:
        self.messages.append(Message.new(group, record, offset, attempt,
                                         headers, used))
        return 0


@cython.final
cdef class BatchSink(TakeSink):
    """Fills the columns of a MessageBatch and copies its bodies, for get_batch."""

    cdef uint64_t *offsets
    cdef uint64_t *receipts
    cdef uint32_t *attempts
    cdef int64_t *timestamps
    cdef uint64_t *lengths
    cdef list headers
    cdef BodyBuffer data
    cdef Py_ssize_t count

    def __dealloc__(self):
        Py_XDECREF(self.data.bytes)

    cdef int take_run(self, GroupBase group, const uint8_t **records,
                      const size_t *used, list headers, uint64_t first,
                      Py_ssize_t index, Py_ssize_t count) except -1:
        cdef Py_ssize_t i
        cdef size_t needed = 0, length
        cdef const uint8_t *record
        cdef uint8_t *target
        cdef uint64_t key = group.ring.receipt_key
        # Columns and pointers in locals: the stores below could alias the
        # fields of self, so the compiler would load them for every record.
        cdef uint64_t *offsets = self.offsets + index
        cdef uint64_t *receipts = self.receipts + index
        cdef uint32_t *attempts = self.attempts + index
        cdef uint64_t *lengths = self.lengths + index
        cdef int64_t *timestamps = self.timestamps + index

        for i in range(count):
            offsets[i] = first + i
            attempts[i] = 1
            receipts[i] = make_receipt(first + i, 1) ^ key
            needed += load_u32(records[i] + REC_OFF_LENGTH) - used[i]
        if headers:
            self.pad_headers(index)
            self.headers.extend(headers)
        reserve_body_bytes(&self.data, needed, self.count - index - count)
        target = <uint8_t *>bytes_pointer(self.data.bytes) + self.data.size
        for i in range(count):
            record = records[i]
            length = load_u32(record + REC_OFF_LENGTH) - used[i]
            pymq_copy_body(target, record + REC_HEADER_SIZE + used[i], length)
            target += length
            lengths[i] = length
            timestamps[i] = <int64_t>load_u64(record + REC_OFF_TIMESTAMP)
        self.data.size += needed
        return 0

    cdef int take_one(self, GroupBase group, const uint8_t *record,
                      uint64_t offset, uint32_t attempt, object headers,
                      size_t used, Py_ssize_t index) except -1:
        cdef size_t length = load_u32(record + REC_OFF_LENGTH) - used

        self.offsets[index] = offset
        self.attempts[index] = attempt
        self.receipts[index] = group.ring.receipt(offset, attempt)
        if headers is not None:
            self.pad_headers(index)
            self.headers.append(headers)
        reserve_body_bytes(&self.data, length, self.count - index - 1)
        memcpy(bytes_pointer(self.data.bytes) + self.data.size,
               record + REC_HEADER_SIZE + used, length)
        self.data.size += length
        self.lengths[index] = length
        self.timestamps[index] = <int64_t>load_u64(record + REC_OFF_TIMESTAMP)
        return 0

    cdef int pad_headers(self, Py_ssize_t count) except -1:
        """Give the deliveries before delivery count their None headers.

        headers stays empty while no delivery has headers, so a batch
        without any builds no list entry per message.
        """
        cdef Py_ssize_t missing = count - len(self.headers)

        if missing > 0:
            self.headers.extend([None] * missing)
        return 0


@cython.final
cdef class Retake:
    """What a blocking get_many or get_batch calls to try again as it waits."""

    cdef GroupBase group
    cdef Py_ssize_t limit
    cdef bint columns

    def __call__(self):
        """Return what a take found, or None when it found nothing."""
        if self.columns:
            found = self.group.take_batch(self.limit)
        else:
            found = self.group.take_messages(self.limit)
        return found if len(found) else None


cdef int compare_u64(const void *left, const void *right) noexcept nogil:
    cdef uint64_t a = (<const uint64_t *>left)[0]
    cdef uint64_t b = (<const uint64_t *>right)[0]

    return (a > b) - (a < b)


cpdef int check_timeout(object timeout, str method) except -1:
    """Raise for a timeout of put or get that is not None or 0 to 1e9 s.

    method is the name of the call, which the error message starts with.
    """
    if type(timeout) is bool or not isinstance(timeout, (int, float)):
        raise TypeError(f"{method}(): timeout must be a number of seconds or "
                        f"None, not {timeout!r}")
    if not 0 <= timeout < 1e9:
        raise ValueError(f"{method}(): timeout is {timeout} seconds; it must "
                         f"be from 0 to 1e9, or None to wait without a limit")
    return 0


cdef double seconds_argument(object value, str method,
                             str name) except? -1.0:
    """Return value, the argument name of method, as seconds in a double.

    Raises TypeError for a value that is not a number, and ValueError for
    one outside 0 to 1e9, each naming method and name. An int or a float
    costs two type checks only, so nack and extend stay cheap.
    """
    cdef double seconds

    if type(value) is not float and type(value) is not int:
        if type(value) is bool or not hasattr(type(value), "__float__"):
            raise TypeError(f"{method}(): {name} must be a number of "
                            f"seconds, not {value!r}")
    try:
        seconds = value
    except OverflowError:
        # An int too large for a double.
        seconds = INFINITY
    # Written so that NaN fails the check too.
    if not 0 <= seconds <= 1e9:
        raise ValueError(f"{method}(): {name} is {value!r}; it must be from "
                         f"0 to 1e9 seconds")
    return seconds


cpdef Py_ssize_t check_count(object count, str method,
                             Py_ssize_t limit=PY_SSIZE_T_MAX) except -1:
    """Return count, the number of messages a get of method asks for.

    A count over limit returns limit. Raises TypeError for a count that
    is not an int, and ValueError for one below 1, each naming method.
    """
    if type(count) is not int:
        if type(count) is bool or not hasattr(type(count), "__index__"):
            raise TypeError(f"{method}(): count must be an int, not "
                            f"{type(count).__name__}")
        # An integer type such as numpy.int64.
        count = count.__index__()
    if count < 1:
        raise ValueError(f"{method}(): count is {count}; it must be 1 or more")
    if count > limit:
        return limit
    return count


cdef int raise_bad_body(list bodies, str method) except -1:
    """Raise TypeError naming the first of bodies that is not bytes-like.

    Returns 0 when every one is, so that the caller raises its own error.
    Called only after a put failed, to say which body was wrong.
    """
    cdef Py_ssize_t index

    for index in range(len(bodies)):
        if not PyObject_CheckBuffer(bodies[index]):
            raise TypeError(
                f"{method}(): item {index} of bodies must be a bytes-like "
                f"object, not {type(bodies[index]).__name__}")
    return 0


cdef uint64_t as_receipt(object receipt) except? 0:
    """Return receipt as a u64; raise TypeError or OverflowError naming it
    (as the clients do) for a value that cannot be one."""
    if type(receipt) is not int:
        if type(receipt) is bool or not hasattr(type(receipt), "__index__"):
            raise TypeError(
                f"receipt must be an int, not {type(receipt).__name__}")
        # An integer type such as numpy.uint64, from a MessageBatch.
        receipt = receipt.__index__()
    if not 0 <= receipt <= 0xFFFFFFFFFFFFFFFF:
        raise OverflowError(f"receipt {receipt} is out of range; a receipt "
                            f"is from 0 to 2**64 - 1")
    return <uint64_t>receipt


cdef int check_reason(str reason) except -1:
    """Raise ValueError for a reject reason that UTF-8 cannot encode."""
    try:
        reason.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Only a lone surrogate has no UTF-8 form.
        raise ValueError(
            f"reason cannot be encoded as UTF-8: character "
            f"{reason[exc.start]!r} at index {exc.start} is a lone "
            f"surrogate; pass valid text") from None
    return 0


cdef int check_delay(str name, double seconds) except -1:
    if not seconds >= 0 or seconds > 1e9:
        raise ConfigError(f"{name} is {seconds} seconds; it must be from 0 "
                          f"to 1e9")
    return 0


cdef class StreamBase:
    """The publishing side of a stream: compiled put and put_many.

    With max_length or max_bytes set, a put that would pass the limit
    raises QueueFull, or with overflow_block waits for room (calling
    wait_room) until its timeout. Nothing is dropped.
    """

    def __cinit__(self, SegmentStore store not None, str name not None):
        self.store = store
        self.name = name
        self.dead_letter = takes_reserved_headers(name)
        self.max_length = -1
        self.max_bytes = -1
        self.put_lock = pymq_mutex_new()
        if self.put_lock == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.put_lock != NULL:
            pymq_mutex_free(self.put_lock)

    cdef int raise_closed(self) except -1:
        """Raise ClosedError naming the queue or stream, not its store."""
        raise ClosedError(
            f"{'stream' if self.queue_group is None else 'queue'} {self.name} "
            f"is closed")

    cdef int published(self) except -1:
        if self.waiters > 0 and self.wake is not None:
            self.wake()
        return 0

    cdef bint has_room(self, Py_ssize_t count, size_t size) except -1:
        cdef GroupBase group = self.queue_group
        cdef RingBuffer ring
        cdef uint64_t end, depth

        if self.max_length >= 0 and group is not None:
            ring = group.ring
            end = self.store.active.base + self.store.active.count
            depth = ring.delivered + ring.waiting + (
                end - ring.cursor if end > ring.cursor else 0)
            if depth + count > <uint64_t>self.max_length:
                return False
        if self.max_bytes >= 0 and (
                self.store.stored_bytes + size > <uint64_t>self.max_bytes):
            return False
        return True

    cdef int reserve_room(self, Py_ssize_t count, size_t size,
                          object timeout) except -1:
        """Return once count records of size bytes in all fit the limits.

        The caller holds put_lock, which is released while it waits.
        """
        cdef str what
        cdef object deadline = None

        if self.max_bytes >= 0 and size > <uint64_t>self.max_bytes:
            raise QueueFull(
                f"queue {self.name}: {size} bytes of records can never fit "
                f"max_bytes {self.max_bytes}")
        if self.max_length >= 0 and count > self.max_length:
            raise QueueFull(
                f"queue {self.name}: a batch of {count} messages can never "
                f"fit max_length {self.max_length}")
        while True:
            if self.store.closed or (
                    self.queue_group is not None and self.queue_group.closed):
                raise ClosedError(f"queue {self.name} is closed")
            if self.has_room(count, size):
                break
            if self.max_length >= 0 and not self.has_room(count, 0):
                what = f"max_length {self.max_length} messages"
            else:
                what = f"max_bytes {self.max_bytes}"
            if not self.overflow_block or self.wait_room is None:
                raise QueueFull(f"queue {self.name} is full: {what}")
            if timeout is not None and deadline is None:
                deadline = time.monotonic() + timeout
            pymq_mutex_unlock(self.put_lock)
            try:
                room = self.wait_room(
                    None if deadline is None else deadline - time.monotonic())
            finally:
                lock_without_gil(self.put_lock)
            if not room:
                raise QueueFull(
                    f"queue {self.name} is full ({what}) and put timed out "
                    f"after {timeout} seconds")
        return 0

    def put(self, body, *, dict headers=None, timeout=None):
        """Append one message and return its offset.

        Raises ValueError for a reserved header name (RESERVED_HEADERS),
        unless this is a dead-letter queue, and MessageTooLargeError,
        before writing, for a body (with its headers) larger than
        max_message_bytes. At a limit, raises QueueFull with overflow
        "reject" (timeout is then not used), or with "block" once timeout
        seconds pass without room.
        """
        cdef BodyRef ref
        cdef uint64_t first, written
        cdef uint32_t flags = 0
        cdef bint limited = self.max_length >= 0 or self.max_bytes >= 0

        if timeout is not None:
            check_timeout(timeout, "put")
        if type(body) is not bytes and not PyObject_CheckBuffer(body):
            raise TypeError(f"put(): body must be a bytes-like object, not "
                            f"{type(body).__name__}")
        if self.store.closed:
            self.raise_closed()
        if headers:
            body = (encode_headers(headers, self.dead_letter) +
                    memoryview(body).tobytes())
            flags = REC_FLAG_HEADERS
        elif type(body) is not bytes:
            if not limited:
                # Any buffer is appended straight from its memory.
                first = self.store.append(body)
                self.published()
                return first
            body = memoryview(body).tobytes()
        ref.data = <const uint8_t *>PyBytes_AS_STRING(body)
        ref.length = PyBytes_GET_SIZE(body)
        if not limited:
            self.store.append_refs(&ref, 1, 0, flags, &first)
            self.published()
            return first

        lock_without_gil(self.put_lock)
        try:
            self.reserve_room(1, record_size(ref.length), timeout)
            self.store.append_unsynced(&ref, 1, 0, flags, &first, &written)
        finally:
            pymq_mutex_unlock(self.put_lock)
        # Synced after put_lock is released, so bounded puts share syncs.
        if self.store.policy == FSYNC_ALWAYS:
            self.store.sync_to(written)
        self.published()
        return first

    def put_many(self, bodies, *, dict headers=None, timeout=None):
        """Append messages in order; return their offsets as a range.

        With a limit, the batch waits for (or raises without) room for all
        of it: either every message is written or none.
        """
        cdef uint64_t first, written
        cdef list items
        cdef bint limited = self.max_length >= 0 or self.max_bytes >= 0
        cdef size_t size = 0
        cdef uint32_t flags = 0

        if type(bodies) is list:
            items = bodies
        elif isinstance(bodies, (bytes, bytearray, memoryview, str)):
            raise TypeError(
                f"bodies must be an iterable of bytes-like objects (a list of "
                f"bytes, say), not {type(bodies).__name__}; use put() for one "
                f"message")
        else:
            items = list(bodies)
        if timeout is not None:
            check_timeout(timeout, "put_many")
        if self.store.closed:
            self.raise_closed()
        # The bodies as given, for the error below: items becomes records.
        bodies = items
        try:
            if headers:
                block = encode_headers(headers, self.dead_letter)
                items = [block + memoryview(body).tobytes() for body in items]
                flags = REC_FLAG_HEADERS
            if not limited:
                if not items:
                    return range(self.store.next_offset,
                                 self.store.next_offset)
                self.store.append_list(items, 0, flags, &first)
                self.published()
                return range(first, first + len(items))

            for item in items:
                size += record_size(len(item))
            lock_without_gil(self.put_lock)
            try:
                self.reserve_room(len(items), size, timeout)
                first = self.append_batch_unsynced(items, flags, &written)
            finally:
                pymq_mutex_unlock(self.put_lock)
        except TypeError:
            # Off the fast path: find the body that is not bytes-like.
            raise_bad_body(bodies, "put_many")
            raise
        if self.store.policy == FSYNC_ALWAYS:
            self.store.sync_to(written)
        self.published()
        return range(first, first + len(items))

    cdef uint64_t put_refs(self, const BodyRef *refs, Py_ssize_t count,
                           uint32_t flags, object timeout) except? 0:
        """Append count stored bodies (header blocks included) in order.

        The server's publish path: the bodies point into a received frame.
        Limits apply as in put_many. Returns the first offset.
        """
        cdef uint64_t first = 0, written
        cdef size_t size = 0
        cdef Py_ssize_t i

        if self.max_length < 0 and self.max_bytes < 0:
            self.store.append_refs(refs, count, 0, flags, &first)
            self.published()
            return first
        for i in range(count):
            size += record_size(refs[i].length)
        lock_without_gil(self.put_lock)
        try:
            self.reserve_room(count, size, timeout)
            self.store.append_unsynced(refs, count, 0, flags, &first, &written)
        finally:
            pymq_mutex_unlock(self.put_lock)
        if self.store.policy == FSYNC_ALWAYS:
            self.store.sync_to(written)
        self.published()
        return first

    cdef uint64_t append_batch_unsynced(self, list items, uint32_t flags,
                                        uint64_t *written) except? 0:
        cdef Py_ssize_t count = len(items), i
        cdef BodyRef *refs = <BodyRef *>PyMem_Malloc(count * sizeof(BodyRef))
        cdef list kept = []
        cdef uint64_t first = 0

        if refs == NULL:
            raise MemoryError()
        try:
            for i in range(count):
                item = items[i]
                if type(item) is not bytes:
                    item = memoryview(item).tobytes()
                kept.append(item)
                refs[i].data = <const uint8_t *>PyBytes_AS_STRING(item)
                refs[i].length = PyBytes_GET_SIZE(item)
            self.store.append_unsynced(refs, count, 0, flags, &first, written)
        finally:
            PyMem_Free(refs)
        return first

    def put_for_group(self, body, dict headers not None, str group not None):
        """Append a message that only the named group of this stream gets.

        The other groups pass over it. Returns its offset.
        """
        cdef uint64_t first

        headers = dict(headers)
        headers["x-for-group"] = group
        body = encode_headers(headers, True) + memoryview(body).tobytes()
        first = self.store.append(body, flags=REC_FLAG_HEADERS | REC_FLAG_TARGETED)
        self.published()
        return first


cdef Py_ssize_t scan_plain(const uint8_t *data, size_t length,
                           size_t *position, uint64_t offset,
                           uint64_t limit, size_t *run_bytes,
                           const uint8_t **records, size_t *used) noexcept:
    """Take up to limit sound records from position on, of the offsets
    from offset on, while they have neither headers nor a target group.

    Stops before the first record that is not such, and once run_bytes
    reaches FRESH_RUN_BYTES. Fills records and used (0) for each record
    taken, moves position and run_bytes past them, and returns how many.
    GroupBase.take_fresh() does the rest; this is its loop for the common
    case, with every value in a local.
    """
    cdef uint64_t count = 0
    cdef size_t at = position[0], total = run_bytes[0], size
    cdef const uint8_t *record

    while count < limit and total < FRESH_RUN_BYTES:
        if not valid_record(data, length, at, offset + count,
                            offset + count + 1, &size):
            break
        record = data + at
        if load_u32(record + REC_OFF_FLAGS) & (REC_FLAG_HEADERS |
                                               REC_FLAG_TARGETED):
            break
        # Records lie one after the other: ask for the cache lines about
        # 1 KiB ahead now, so they arrive before the CRC of that record
        # reads them (see PREFETCH_AHEAD).
        pymq_prefetch(record + PREFETCH_AHEAD)
        pymq_prefetch(record + PREFETCH_AHEAD + 64)
        records[count] = record
        used[count] = 0
        total += size
        at += size
        count += 1
    position[0] = at
    run_bytes[0] = total
    return <Py_ssize_t>count


cdef inline bint is_run(const uint64_t *offsets, const uint32_t *attempts,
                        Py_ssize_t count) noexcept:
    """Return whether offsets are consecutive and attempts (unless NULL)
    all equal."""
    cdef Py_ssize_t i
    cdef uint64_t first = offsets[0]

    if offsets[count - 1] - first != <uint64_t>(count - 1):
        return False
    for i in range(1, count):
        if offsets[i] != first + <uint64_t>i:
            return False
    if attempts != NULL:
        for i in range(1, count):
            if attempts[i] != attempts[0]:
                return False
    return True


cdef class GroupBase:
    """A consumer group's deliveries: get, ack, nack, extend, reject.

    Thread-safe. Every delivery and settlement is written to the group's
    journal before the call returns (synced first under fsync="always").
    """

    def __cinit__(self):
        self.lock = pymq_lock_new()
        if self.lock == NULL:
            raise MemoryError()
        self.dead_due = []
        self.moving = set()
        self.unrecorded_dead = set()
        self.error_logged_ns = -ERROR_LOG_NS

    def __init__(self, StreamBase stream not None,
                 SegmentStore journal not None, *, uint64_t start=0,
                 double visibility_timeout=30.0, uint32_t max_deliveries=5,
                 size_t max_in_flight=10000):
        check_delay("visibility_timeout", visibility_timeout)
        self.stream = stream
        self.journal = journal
        self.visibility_ns = <int64_t>(visibility_timeout * NS_PER_SECOND)
        self.max_deliveries = max_deliveries
        self.max_in_flight = max_in_flight
        self.replay(start)

    def __dealloc__(self):
        if self.lock != NULL:
            pymq_lock_free(self.lock)

    @cython.final
    cdef int acquire(self) except -1:
        take_lock(self.lock)
        if self.closed:
            pymq_lock_unlock(self.lock)
            raise ClosedError(f"{consumer_label(self)} is closed")
        return 0

    @cython.final
    cdef void release(self) noexcept:
        pymq_lock_unlock(self.lock)

    cdef inline int64_t now(self) except? -1:
        """Return the group's clock: monotonic ns, or clock() when it is set."""
        if self._clock is None:
            return coarse_monotonic_ns()
        return self._clock()

    @property
    def visibility_timeout(self):
        """Seconds a delivery may stay unsettled before it is redelivered."""
        return self.visibility_ns / <double>NS_PER_SECOND

    @visibility_timeout.setter
    def visibility_timeout(self, double seconds):
        check_delay("visibility_timeout", seconds)
        self.visibility_ns = <int64_t>(seconds * NS_PER_SECOND)

    # Journal -------------------------------------------------------------

    @cython.final
    cdef int write_journal(self, uint8_t op, const uint64_t *offsets,
                           const uint32_t *attempts,
                           Py_ssize_t count) except -1:
        """Append one journal record; the caller holds the group lock.

        A JOURNAL_DELIVER or JOURNAL_ACK of consecutive offsets (and, for a
        delivery, one attempt) is written as a run: its first offset and
        its count, 17 or 13 bytes instead of 12 or 8 per offset.
        """
        cdef size_t entry = DELIVER_ENTRY_BYTES if attempts != NULL else 8
        cdef size_t size = 5 + count * entry
        cdef uint8_t small[64]
        cdef bytes record = None
        cdef uint8_t *out = small
        cdef Py_ssize_t i
        cdef BodyRef ref
        cdef uint32_t entries = <uint32_t>count

        if (count > 1 and (op == JOURNAL_DELIVER or op == JOURNAL_ACK) and
                is_run(offsets, attempts, count)):
            if op == JOURNAL_DELIVER:
                return self.write_journal_run(JOURNAL_DELIVER_RUN, offsets[0],
                                              count, attempts[0])
            return self.write_journal_run(JOURNAL_ACK_RUN, offsets[0], count,
                                          0)
        if size > sizeof(small):
            record = PyBytes_FromStringAndSize(NULL, size)
            out = <uint8_t *>PyBytes_AS_STRING(record)
        ref.data = out
        ref.length = size
        out[0] = op
        memcpy(out + 1, &entries, 4)
        out += 5
        for i in range(count):
            memcpy(out, &offsets[i], 8)
            if attempts != NULL:
                memcpy(out + 8, &attempts[i], 4)
            out += entry
        self.journal.check_size(ref.length)
        return self.append_journal(&ref)

    cdef int append_journal(self, const BodyRef *ref) except -1:
        """Append one journal record, under the journal's lock."""
        cdef uint64_t first

        self.journal.acquire()
        try:
            self.journal.append_locked(ref, 1, 0, 0, &first)
            self.journal_written = self.journal.written_bytes
        finally:
            self.journal.release()
        return 0

    cdef int write_journal_run(self, uint8_t op, uint64_t first,
                               Py_ssize_t count, uint32_t attempt) except -1:
        """Append a JOURNAL_DELIVER_RUN (with attempt) or JOURNAL_ACK_RUN of
        the count offsets from first on. The caller holds the group lock."""
        cdef uint8_t out[17]
        cdef uint32_t entries = <uint32_t>count
        cdef BodyRef ref

        out[0] = op
        memcpy(out + 1, &entries, 4)
        memcpy(out + 5, &first, 8)
        memcpy(out + 13, &attempt, 4)
        ref.data = out
        ref.length = 17 if op == JOURNAL_DELIVER_RUN else 13
        return self.append_journal(&ref)

    cdef int write_checkpoint(self, bint wait) except -1:
        """Append the window's unsettled offsets, then drop older segments.

        Offsets from low to cursor that the record does not list are
        settled, so one message held far behind keeps the record small.
        The older segments go once the record is synced. Without wait,
        under fsync="interval", that sync is left to the next background
        flush, and finish() drops them after it (drop_checkpointed), so the
        call does not wait for the disk. drop_now() names the exceptions.
        """
        cdef RingBuffer ring = self.ring
        cdef uint64_t offset, first
        cdef uint32_t entries = 0, moves = len(self.moving)
        cdef bytes record, moving = None
        cdef uint8_t *out
        cdef Slot *slot
        cdef BodyRef refs[2]

        for offset in range(ring.low, ring.cursor):
            if ring.slot(offset).state != SLOT_SETTLED:
                entries += 1
        if (21 + entries * CHECKPOINT_ENTRY_BYTES >
                self.journal.max_message_bytes or
                5 + 8 * moves > self.journal.max_message_bytes):
            # NOTE: this many unsettled offsets are not checkpointed, so the
            # journal keeps growing until fewer are unsettled, and on a full
            # disk its reserve runs out (docs/reliability.md).
            return 0
        record = PyBytes_FromStringAndSize(
            NULL, 21 + entries * CHECKPOINT_ENTRY_BYTES)
        out = <uint8_t *>PyBytes_AS_STRING(record)
        out[0] = JOURNAL_CHECKPOINT
        memcpy(out + 1, &ring.low, 8)
        memcpy(out + 9, &ring.cursor, 8)
        memcpy(out + 17, &entries, 4)
        out += 21
        for offset in range(ring.low, ring.cursor):
            slot = ring.slot(offset)
            if slot.state == SLOT_SETTLED:
                continue
            memcpy(out, &offset, 8)
            memcpy(out + 8, &slot.attempt, 4)
            out[12] = 0
            out += CHECKPOINT_ENTRY_BYTES
        refs[0].data = <const uint8_t *>PyBytes_AS_STRING(record)
        refs[0].length = PyBytes_GET_SIZE(record)
        if moves:
            # Moves still under way outlive the records dropped below. One
            # append with the checkpoint: both are written, or neither.
            moving = PyBytes_FromStringAndSize(NULL, 5 + 8 * moves)
            out = <uint8_t *>PyBytes_AS_STRING(moving)
            out[0] = JOURNAL_MOVING
            memcpy(out + 1, &moves, 4)
            out += 5
            for offset in sorted(self.moving):
                memcpy(out, &offset, 8)
                out += 8
            refs[1].data = <const uint8_t *>PyBytes_AS_STRING(moving)
            refs[1].length = PyBytes_GET_SIZE(moving)
        self.journal.acquire()
        try:
            self.journal.append_locked(refs, 2 if moves else 1, 0, 0, &first)
            self.journal_written = self.journal.written_bytes
        finally:
            self.journal.release()
        # This record sums up every earlier one, so it replaces a
        # checkpoint still waiting for its sync.
        self.drop_offset = first
        self.drop_written = self.journal_written
        if self.journal.policy == FSYNC_NEVER or wait or self.drop_now():
            self.drop_checkpointed()
        else:
            self.drop_segments = len(self.journal.segments)
        return 0

    cdef bint drop_now(self) except -1:
        """Whether a waiting checkpoint must be synced by the call itself.

        A journal that has used its spare (a full disk) gets it back only
        when older segments are dropped; and one with DROP_WAIT_SEGMENTS
        segments is not being synced by a background flush fast enough.
        Both change only at a rollover, so finish() asks again only when
        the number of segments changed (drop_segments).
        """
        return (self.journal.policy != FSYNC_INTERVAL or
                (self.journal.reserve_ahead and self.journal.spare is None)
                or len(self.journal.segments) >= DROP_WAIT_SEGMENTS)

    cdef int drop_checkpointed(self) except -1:
        """Drop the journal segments below the last checkpoint.

        The records below are dropped (or zeroed, to be the journal's
        reserve): the checkpoint that sums them up must be on disk first,
        or a power loss could undo acks that were synced. The group lock
        is held.
        """
        if self.journal.policy != FSYNC_NEVER:
            self.journal.sync_to(self.drop_written)
        self.drop_written = 0
        self.journal.drop_below(self.drop_offset)
        return 0

    cdef int try_checkpoint(self, str when, bint wait=True) except -1:
        """write_checkpoint(), logging an OSError instead of raising it.

        A checkpoint only lets older journal segments go: the records it
        sums up stay until it is written, so a failed one loses nothing and
        is tried again later. The group lock is held.
        """
        try:
            self.write_checkpoint(wait)
        except OSError as exc:
            self.log_journal_error(f"writing a checkpoint {when}", exc)
        return 0

    cdef int record_dead(self) except -1:
        """Write the DEAD records that failed earlier; the lock is held."""
        cdef list offsets = sorted(self.unrecorded_dead)
        cdef Py_ssize_t count = len(offsets), i
        cdef uint64_t *values = <uint64_t *>PyMem_Malloc(count * 8)

        if values == NULL:
            raise MemoryError()
        try:
            for i in range(count):
                values[i] = offsets[i]
            try:
                self.write_journal(JOURNAL_DEAD, values, NULL, count)
            except OSError as exc:
                self.log_journal_error(
                    "recording moves to the dead-letter queue", exc)
                return 0
        finally:
            PyMem_Free(values)
        for offset in offsets:
            self.moving.discard(offset)
        self.unrecorded_dead.clear()
        return 0

    cdef int skip_offset(self, uint64_t offset) except -1:
        """Settle an offset with nothing for this group; the lock is held.

        If its ACK cannot be written, it is settled all the same: after a
        restart the offset is found again and skipped again.
        """
        try:
            self.write_journal(JOURNAL_ACK, &offset, NULL, 1)
        except OSError as exc:
            self.log_journal_error(f"recording skipped offset {offset}", exc)
        self.ring.settle(offset)
        return 0

    cdef int log_journal_error(self, str what, object exc) except -1:
        cdef int64_t now = coarse_monotonic_ns()

        if now - self.error_logged_ns >= ERROR_LOG_NS:
            self.error_logged_ns = now
            broker_logger.error("%s: %s failed: %s", consumer_label(self),
                                what, exc)
        return 0

    cdef int replay(self, uint64_t start) except -1:
        """Rebuild the ring from the journal; a new group starts at start."""
        cdef uint64_t low = start, cursor = start, offset, first
        cdef uint64_t covered = start   # checkpoint cursor: unlisted below it
        cdef uint32_t count, attempt, i
        cdef dict attempts = {}
        cdef set settled = set()
        cdef set moving = set()
        cdef const uint8_t *data
        cdef bytes body

        for body in self.journal.read_range(self.journal.first_offset,
                                            self.journal.next_offset):
            data = <const uint8_t *>PyBytes_AS_STRING(body)
            if len(body) < 5:
                continue
            if data[0] == JOURNAL_CHECKPOINT and len(body) >= 21:
                low = load_u64(data + 1)
                cursor = covered = load_u64(data + 9)
                count = load_u32(data + 17)
                attempts = {}
                settled = set()
                for i in range(min(count, (len(body) - 21) // 13)):
                    offset = load_u64(data + 21 + 13 * i)
                    attempts[offset] = load_u32(data + 29 + 13 * i)
                    if data[33 + 13 * i]:
                        settled.add(offset)
                continue
            count = load_u32(data + 1)
            if data[0] == JOURNAL_DELIVER_RUN and len(body) >= 17:
                first = load_u64(data + 5)
                attempt = load_u32(data + 13)
                for offset in range(first, first + count):
                    if attempt > attempts.get(offset, 0):
                        attempts[offset] = attempt
                if count:
                    cursor = max(cursor, first + count)
            elif data[0] == JOURNAL_ACK_RUN and len(body) >= 13:
                first = load_u64(data + 5)
                for offset in range(first, first + count):
                    settled.add(offset)
                    moving.discard(offset)
                if count:
                    cursor = max(cursor, first + count)
            elif data[0] == JOURNAL_DELIVER:
                for i in range(min(count, (len(body) - 5) // 12)):
                    offset = load_u64(data + 5 + 12 * i)
                    attempt = load_u32(data + 13 + 12 * i)
                    if attempt > attempts.get(offset, 0):
                        attempts[offset] = attempt
                    cursor = max(cursor, offset + 1)
            elif data[0] == JOURNAL_ACK or data[0] == JOURNAL_DEAD:
                for i in range(min(count, (len(body) - 5) // 8)):
                    offset = load_u64(data + 5 + 8 * i)
                    settled.add(offset)
                    moving.discard(offset)
                    cursor = max(cursor, offset + 1)
            elif data[0] == JOURNAL_MOVING:
                for i in range(min(count, (len(body) - 5) // 8)):
                    moving.add(load_u64(data + 5 + 8 * i))

        self.ring = RingBuffer(low)
        self.ring.receipt_key = int.from_bytes(os.urandom(8), "little")
        for offset in sorted(attempts.keys() | settled):
            if offset >= low:
                # A checkpoint lists only unsettled offsets: the others
                # below its cursor are settled. Above it, an offset with no
                # record was delivered without its journal entry surviving,
                # so it is available again.
                self.ring.fill_settled(min(offset, covered))
                self.ring.restore(offset, attempts.get(offset, 0),
                                  offset in settled)
        self.ring.fill_settled(covered)
        # A move to the DLQ that began and never finished may or may not
        # have put the message there: the broker looks (_unfinished_moves).
        self.moving = {offset for offset in moving
                       if offset >= low and offset not in settled}
        # Offsets this group saw are never handed to a new message, even if
        # the stream lost its tail.
        self.stream.store.ensure_next_offset(self.ring.cursor)
        self.acquire()
        try:
            # On a full disk the group opens all the same, from the records.
            self.try_checkpoint("at open")
        finally:
            self.release()
        self.journal.sync_to(self.journal_written)
        return 0

    # Delivering ----------------------------------------------------------

    cdef inline int expire(self, int64_t now) except -1:
        """Fail the deliveries whose deadline passed. The lock is held."""
        cdef RingBuffer ring = self.ring

        if ring.deadlines.size and ring.deadlines.entries[0].time <= now:
            # Inline, so that the common case, nothing due, costs no call.
            self.expire_due(now)
        return 0

    cdef int expire_due(self, int64_t now) except -1:
        cdef uint64_t offset

        while self.ring.pop_expired(now, &offset):
            self.fail(offset, now, "visibility timeout", False)
        return 0

    cdef int fail(self, uint64_t offset, int64_t not_before, str reason,
                  bint dead_now) except -1:
        """Redeliver a failed delivery, or queue it for the DLQ.

        Without _on_dead (the group of a dead-letter queue) the message is
        always redelivered, so it never leaves its DLQ.
        """
        cdef Slot *slot = self.ring.slot(offset)

        if dead_now or (
                self.max_deliveries and slot.attempt >= self.max_deliveries):
            if self._on_dead is not None:
                if not dead_now:
                    reason = f"{reason}; max_deliveries reached"
                # Until the move is done the slot stays delivered, and
                # never expires.
                self.ring.set_deadline(offset, FOREVER)
                self.dead_due.append((offset, slot.attempt, reason))
                self.dead_pending += 1
                return 0
        self.ring.make_available(offset, not_before)
        return 0

    @cython.final
    cdef Message take_one(self, int64_t now):
        """Deliver the next message, or return None; lock held."""
        cdef SegmentStore store = self.stream.store
        cdef const uint8_t *record
        cdef uint64_t offset
        cdef uint32_t attempt
        cdef size_t used
        cdef Message message

        if self.take_fresh(now, 1, &record, &used, None):
            try:
                return Message.new(self, record, self.ring.cursor - 1, 1,
                                   None, 0)
            finally:
                store.release()
        if not self.take_record(now, &offset, &attempt, &record):
            return None
        try:
            message = Message.new(self, record, offset, attempt,
                                  self.taken_headers, self.taken_used)
            self.taken_headers = None
        finally:
            store.release()
        if store.events_pending:
            store.report()
        return message

    @cython.final
    cdef bint take_record(self, int64_t now, uint64_t *offset_out,
                          uint32_t *attempt_out,
                          const uint8_t **record) except -1:
        """Find the next record to deliver; the group lock is held.

        Returns True with the stream store's lock held and record pointing
        at the record: the caller copies what it needs, then releases the
        store lock. taken_headers holds the record's headers (None without
        a header block; for a record routed to this group, without the
        routing one), and taken_used the size of its header block. Returns
        False, with no store lock held, when nothing is available.

        A record whose header block cannot be read (stored before publish
        checked header blocks, though its CRC is sound) is damaged like one
        failing its CRC: counted in the store's damaged, and skipped.
        """
        cdef RingBuffer ring = self.ring
        cdef SegmentStore store = self.stream.store
        cdef uint64_t offset, end
        cdef uint32_t attempt, pos
        cdef int status
        cdef const uint8_t *found
        cdef size_t used
        cdef dict headers
        cdef bint keep_lock
        cdef uint32_t flags

        if not store.segments:
            raise ClosedError(f"{consumer_label(self)} is closed")
        if ring.low < (<Segment>store.segments[0]).base:
            # Retention deleted records this group had not settled: resume
            # at the oldest kept one, and count what was passed over.
            self.skip_below((<Segment>store.segments[0]).base)
        # Slots on their way to the DLQ are still delivered in the ring, but
        # no consumer holds them, so they do not count against max_in_flight.
        while ring.delivered - self.dead_pending < self.max_in_flight:
            end = store.active.base + store.active.count
            if not ring.take(now, end, now + self.visibility_ns, &offset,
                             &attempt):
                return False
            if (self.max_deliveries and attempt > self.max_deliveries and
                    self._on_dead is not None):
                # Delivered max_deliveries times already, each time lost
                # with its consumer (a crash): dead-letter it now. A group
                # without _on_dead (a DLQ's) delivers it again instead, because
                # fail() would only make it available and this loop would
                # take it forever.
                ring.slot(offset).attempt = attempt - 1
                self.fail(offset, now, "consumer lost", False)
                continue
            headers = None
            used = 0
            keep_lock = False
            store.acquire()
            try:
                status = store.locate(offset, &pos)
                if status == FOUND:
                    found = store.last_read.data + pos
                    flags = load_u32(found + REC_OFF_FLAGS)
                    if flags & REC_FLAG_HEADERS:
                        try:
                            headers = decode_headers(
                                found + REC_HEADER_SIZE,
                                load_u32(found + REC_OFF_LENGTH), &used)
                        except (ValueError, UnicodeDecodeError) as exc:
                            store.last_read.mark_damaged(
                                offset, pos,
                                f"header block cannot be read ({exc})")
                            store.events_pending = True
                            status = DAMAGED
                if status == FOUND:
                    if not flags & REC_FLAG_TARGETED or (
                            headers is not None and
                            headers.get("x-for-group") == self._group_name):
                        if flags & REC_FLAG_TARGETED:
                            # The routing header is pymq's own.
                            del headers["x-for-group"]
                        self.taken_headers = headers
                        self.taken_used = used
                        offset_out[0] = offset
                        attempt_out[0] = attempt
                        record[0] = found
                        # Returned with the store lock held, for the caller.
                        keep_lock = True
                        return True
            finally:
                if not keep_lock:
                    store.release()
            if store.events_pending:
                store.report()
            if status == FOUND:
                # Redriven for another group of this stream: pass over it.
                ring.slot(offset).attempt = attempt - 1
                self.skip_offset(offset)
                continue
            # No readable record at this offset (a gap, or damage): skip it
            # for good.
            self.skip_offset(offset)
            self.skipped += 1
        return False

    @cython.final
    cdef Py_ssize_t take_fresh(self, int64_t now, Py_ssize_t limit,
                               const uint8_t **records, size_t *used,
                               list headers) except -1:
        """Deliver a run of up to limit never-delivered offsets in one step.

        take_record() hands out the cursor and the offsets after it only
        while nothing below the cursor is due. This takes such a run with
        one pass over the records and one ring update. The run stops before
        an offset that take_record() must handle: one with no record, a
        record that fails its check (the CRC included), one routed to a
        group, or one whose header block cannot be read. With headers None,
        it also stops before a record with headers. A run ends after
        FRESH_RUN_RECORDS records or FRESH_RUN_BYTES bytes of records, so
        that puts wait little for the store lock. The group lock is held.

        Returns the number taken. When it is more than 0, the stream store's
        lock is still held, records[i] points at the record of offset
        ring.cursor - taken + i, and used[i] is the size of its header
        block. headers, unless None, must come in empty: it gets an entry
        per record, a dict or None, or stays empty when no record taken
        has headers. The caller copies what it needs and releases the store
        lock. When nothing was taken, no store lock is held.
        """
        cdef RingBuffer ring = self.ring
        cdef SegmentStore store = self.stream.store
        cdef Segment seg
        cdef uint64_t offset, end, seg_first, seg_end
        cdef Py_ssize_t taken = 0
        cdef size_t size, header_size, run_bytes = 0
        cdef uint32_t pos, flags
        cdef const uint8_t *record
        cdef const uint8_t *data = NULL
        cdef size_t data_length = 0, position = 0
        cdef Py_ssize_t run
        cdef bint keep_lock = False, chained = False

        if ring.ready_due(now):
            return 0
        if ring.delivered - self.dead_pending >= self.max_in_flight:
            return 0
        limit = min(<size_t>limit, self.max_in_flight -
                    (ring.delivered - self.dead_pending))
        store.acquire_raw()
        try:
            if store.closed or not store.segments or (
                    ring.low < (<Segment>store.segments[0]).base):
                # take_record() raises for a closed store, and skips
                # offsets that retention deleted.
                return 0
            end = store.active.base + store.active.count
            if end <= ring.cursor:
                return 0
            limit = min(<uint64_t>limit, end - ring.cursor,
                        FRESH_RUN_RECORDS)
            offset = ring.cursor
            seg = store.last_read
            # The segment's bounds and mapping, kept in locals: the stores
            # to records and used below could otherwise alias them, and make
            # the compiler load them again for every record.
            seg_first, seg_end = 1, 0
            if seg is not None:
                seg_first, seg_end = seg.base, seg.base + seg.count
                data, data_length = seg.data, seg.length
            while taken < limit and run_bytes < FRESH_RUN_BYTES:
                if offset < seg_first or offset >= seg_end:
                    seg = store.find(offset)
                    if seg is None:
                        break
                    seg_first, seg_end = seg.base, seg.base + seg.count
                    data, data_length = seg.data, seg.length
                    chained = False
                if not chained:
                    # The first record of a segment comes from the index.
                    # Records lie one after the other, so each next one
                    # starts where the last one ends. A gap or damage there
                    # fails the checks, and take_record() goes by the index.
                    pos = seg.position(offset)
                    if pos == IDX_MISSING:
                        break
                    position = pos
                    chained = True
                if not headers:
                    # No header entries to keep in step: plain records go
                    # through the tight loop, and the one it stops at (if
                    # any) through the checks below.
                    run = scan_plain(data, data_length, &position, offset,
                                     min(<uint64_t>(limit - taken),
                                         seg_end - offset),
                                     &run_bytes, records + taken,
                                     used + taken)
                    taken += run
                    offset += run
                    if run and (offset == seg_end or taken == limit or
                                run_bytes >= FRESH_RUN_BYTES):
                        continue
                if not valid_record(data, data_length, position, offset,
                                    offset + 1, &size):
                    break
                record = data + position
                pymq_prefetch(record + PREFETCH_AHEAD)
                pymq_prefetch(record + PREFETCH_AHEAD + 64)
                flags = load_u32(record + REC_OFF_FLAGS)
                header_size = 0
                if flags & REC_FLAG_TARGETED:
                    break
                if flags & REC_FLAG_HEADERS:
                    if headers is None:
                        break
                    try:
                        header_map = decode_headers(
                            record + REC_HEADER_SIZE,
                            load_u32(record + REC_OFF_LENGTH), &header_size)
                    except (ValueError, UnicodeDecodeError):
                        break
                    if len(headers) < taken:
                        # None for each record before it, which had none.
                        headers.extend([None] * (taken - len(headers)))
                    headers.append(header_map)
                elif headers:
                    headers.append(None)
                records[taken] = record
                used[taken] = header_size
                run_bytes += size
                position += size
                taken += 1
                offset += 1
            if taken:
                ring.take_fresh(taken, now + self.visibility_ns)
                keep_lock = True
        finally:
            if not keep_lock:
                store.release()
        return taken

    @cython.final
    cdef int finish(self, bint settled) except -1:
        """Sync the journal, move dead letters, delete acked segments.

        settled is True after an ack, nack or reject, which wakes waiters.
        A get wakes nobody: a waiter woken by every empty get would retry
        at once, wake the others in turn, and spin. Most calls have none of
        this to do, which is checked here before finish_work() runs.
        """
        if ((settled and self.stream.waiters > 0) or
                self.journal.policy == FSYNC_ALWAYS or
                self.unrecorded_dead or self.dead_due or
                (self._deletes_acked and self.ring.low >= self.delete_mark and
                 len(self.stream.store.segments) > 1) or
                (len(self.journal.segments) > 1 and (
                    # The waiting checkpoint is synced, or none waits
                    # (drop_written is 0).
                    self.journal.synced_bytes >= self.drop_written or
                    # A rollover since the call chose to wait: see drop_now.
                    len(self.journal.segments) != self.drop_segments))):
            return self.finish_work(settled)
        return 0

    cdef int finish_work(self, bint settled) except -1:
        """Do the work of finish(), each step under its own condition."""
        cdef list due
        cdef uint64_t offset
        cdef int64_t now

        if settled and self.stream.waiters > 0:
            # A settled delivery frees room under max_in_flight, and a
            # nacked one is available again.
            self.stream.published()
        if self.journal.policy == FSYNC_ALWAYS:
            # Raised: the caller's own record may not be on disk. Errors
            # below are about other work, which is logged and tried again.
            self.journal.sync_to(self.journal_written)
        if self.unrecorded_dead:
            self.acquire()
            try:
                self.record_dead()
            finally:
                self.release()
        if self.dead_due:
            self.acquire()
            due = self.dead_due
            self.dead_due = []
            self.release()
            for i, (offset, attempt, reason) in enumerate(due):
                try:
                    self.begin_move(offset)
                except OSError as exc:
                    # Not moved: the message and those after it are
                    # available here again, and move at their next failure.
                    self.log_journal_error(
                        "recording a move to the dead-letter queue", exc)
                    self.restore_due(due[i:])
                    break
                try:
                    self._on_dead(self, offset, attempt, reason)
                except Exception:
                    # The move failed (_on_dead logs and counts it): the
                    # message stays here and is tried again at its next
                    # delivery.
                    self.moving.discard(offset)
                    self.restore_due(due[i:i + 1])
                    continue
                except BaseException:
                    self.moving.discard(offset)
                    self.restore_due(due[i:])
                    raise
                self.end_move(offset)
            if self.journal.policy == FSYNC_ALWAYS:
                try:
                    self.journal.sync_to(self.journal_written)
                except OSError as exc:
                    # The MOVING records are synced: a restart settles
                    # these moves from the DLQ.
                    self.log_journal_error(
                        "syncing moves to the dead-letter queue", exc)
        # With one segment there is nothing to delete: the active one stays.
        if (self._deletes_acked and self.ring.low >= self.delete_mark and
                len(self.stream.store.segments) > 1):
            self.retain()
        if len(self.journal.segments) > 1:
            # Promptly after a rollover, so that the older segment goes (or,
            # on a full disk, becomes the journal's reserve again).
            self.acquire()
            try:
                if self.drop_written and (
                        self.journal.synced_bytes >= self.drop_written or
                        self.drop_now()):
                    try:
                        self.drop_checkpointed()
                    except OSError as exc:
                        # Tried again after the next sync or rollover.
                        self.drop_segments = len(self.journal.segments)
                        self.log_journal_error(
                            "dropping journal segments after a checkpoint",
                            exc)
                elif self.drop_written:
                    self.drop_segments = len(self.journal.segments)
                if self.drop_written == 0 and len(self.journal.segments) > 1:
                    self.try_checkpoint("after a rollover", False)
            finally:
                self.release()
        return 0

    cdef int begin_move(self, uint64_t offset) except -1:
        """Journal that the move of offset to the DLQ begins; raise OSError
        when the record cannot be written (or synced, under "always").

        Journaled first, so a crash between the DLQ's put and the DEAD
        record of end_move() cannot leave the message in both places.
        """
        self.acquire()
        try:
            self.write_journal(JOURNAL_MOVING, &offset, NULL, 1)
            self.moving.add(offset)
        finally:
            self.release()
        if self.journal.policy == FSYNC_ALWAYS:
            try:
                self.journal.sync_to(self.journal_written)
            except OSError:
                # A restart that finds the MOVING record looks for the
                # message in the DLQ, and finds it missing.
                self.moving.discard(offset)
                raise
        return 0

    cdef int end_move(self, uint64_t offset) except -1:
        """Settle offset, which _on_dead put in the DLQ, and journal it."""
        cdef object error = None

        self.acquire()
        try:
            try:
                self.write_journal(JOURNAL_DEAD, &offset, NULL, 1)
            except OSError as exc:
                # The message is in the DLQ: settled here all the same. Its
                # MOVING record stays (checkpoints repeat it), so a restart
                # finds it in the DLQ, and the DEAD record is tried again at
                # the next call.
                self.unrecorded_dead.add(offset)
                error = exc
            else:
                self.moving.discard(offset)
            self.ring.settle(offset)
            self.dead_lettered += 1
            self.dead_pending -= 1
        finally:
            self.release()
        if error is not None:
            self.log_journal_error(
                "recording a move to the dead-letter queue", error)
        return 0

    cdef int skip_below(self, uint64_t offset) except -1:
        """Settle everything below offset, pending dead-letter moves too."""
        cdef list kept = []

        for item in self.dead_due:
            if item[0] < offset:
                self.dead_pending -= 1
            else:
                kept.append(item)
        self.dead_due = kept
        self.skipped += self.ring.skip_to(offset)
        # If it fails, the skip is found again after a restart.
        self.try_checkpoint("after a skip")
        return 0

    cdef int restore_due(self, list items) except -1:
        """Make dead-letter moves that did not happen available again."""
        cdef int64_t now = self.now()

        self.acquire()
        try:
            for item in items:
                self.ring.make_available(item[0], now)
            self.dead_pending -= len(items)
        finally:
            self.release()
        return 0

    cdef int retain(self) except -1:
        """Drop the segments below low; set where to check next.

        The next check comes once low passes the end of the first segment
        as it is now, so a drained queue drops its sealed segments at once.
        drop_below() leaves unlinking their files to the next background
        flush, so an ack does not wait for the disk.
        """
        cdef SegmentStore store = self.stream.store
        cdef Segment first

        if len(store.segments) > 1:
            store.drop_below(self.ring.low)
        # Read without the store lock: the GIL is held, and only this group
        # deletes a queue's segments, so the first segment cannot go away
        # unless the store was closed (its list is then empty).
        if not store.segments:
            return 0
        first = <Segment>store.segments[0]
        self.delete_mark = first.base + first.count
        return 0

    def get(self, timeout=None):
        """Deliver the lowest available message, waiting up to timeout seconds.

        Returns None when the timeout passes first; timeout=None waits until a
        message arrives. Thread-safe: each message goes to one caller at a time.
        """
        cdef Message message

        if timeout is not None:
            # Checked first, so a bad timeout raises whether or not a
            # message is available.
            check_timeout(timeout, "get")
        message = self.take_now()
        if message is not None or (timeout is not None and timeout == 0):
            return message
        # The subclass waits (pymq.queue._Consumer._wait), off the fast path.
        found = self._wait(timeout, self.get_nowait)
        return found if type(found) is Message else None

    def get_nowait(self):
        """Deliver the lowest available message, or return None."""
        return self.take_now()

    @cython.final
    cdef Message take_now(self):
        cdef int64_t now = self.now()
        cdef Message message = None

        self.acquire()
        try:
            self.expire(now)
            message = self.take_one(now)
            if message is not None:
                try:
                    self.write_journal(JOURNAL_DELIVER, &message.offset,
                                       &message.attempt, 1)
                except BaseException:
                    # Not journaled, so not handed out: available again,
                    # with this attempt not counted.
                    self.ring.untake(message.offset)
                    raise
        finally:
            self.release()
        self.finish(False)
        return message

    cdef Py_ssize_t batch_limit(self, object count, str method) except -1:
        """Check count for method; return it cut to one journal record.

        One journal record lists every delivery of a get, so a get takes at
        most what fits in one record.
        """
        return check_count(
            count, method,
            (self.journal.max_message_bytes - 5) // DELIVER_ENTRY_BYTES)

    cdef Py_ssize_t take_into(self, Py_ssize_t count, TakeSink sink) except -1:
        """Take up to count available deliveries, lowest offsets first.

        Never-delivered offsets go to sink.take_run in runs, read in one
        pass over their records; the others (redeliveries, and records
        take_fresh() leaves to take_record()) go to sink.take_one. One
        journal record lists them all. If the sink or the journal raises,
        every delivery taken is given back and none is handed out. count
        must be what batch_limit() returned. Returns the number taken; the
        caller calls finish().
        """
        cdef int64_t now = self.now()
        cdef SegmentStore store = self.stream.store
        cdef list run_headers = []
        cdef object headers
        cdef uint64_t *offsets = NULL
        cdef uint32_t *attempts = NULL
        cdef const uint8_t **records = NULL
        cdef size_t *used = NULL
        cdef const uint8_t *record
        cdef Py_ssize_t taken = 0, run, i
        cdef uint64_t first, offset
        cdef uint32_t attempt
        cdef bint runs_only = True
        cdef uint64_t small[SMALL_BATCH * 4]

        try:
            # One block for the four arrays, 8-byte entries first: on the
            # stack for a small batch, else allocated.
            offsets = small
            if count > SMALL_BATCH:
                offsets = <uint64_t *>PyMem_Malloc(count * (
                    8 + sizeof(const uint8_t *) + sizeof(size_t) + 4))
                if offsets == NULL:
                    raise MemoryError()
            records = <const uint8_t **>(offsets + count)
            used = <size_t *>(records + count)
            attempts = <uint32_t *>(used + count)
            self.acquire()
            try:
                try:
                    self.expire(now)
                    while taken < count:
                        run = self.take_fresh(now, count - taken, records,
                                              used, run_headers)
                        if run:
                            # Counted as taken first, so that a failure
                            # below hands the whole run back.
                            first = self.ring.cursor - run
                            for i in range(run):
                                offsets[taken + i] = first + i
                                attempts[taken + i] = 1
                            taken += run
                            try:
                                sink.take_run(self, records, used, run_headers,
                                              first, taken - run, run)
                            finally:
                                store.release()
                            if run_headers:
                                del run_headers[:]
                            continue
                        if not self.take_record(now, &offset, &attempt,
                                                &record):
                            break
                        offsets[taken] = offset
                        attempts[taken] = attempt
                        taken += 1
                        runs_only = False
                        try:
                            headers = self.taken_headers
                            self.taken_headers = None
                            sink.take_one(self, record, offset, attempt,
                                          headers, self.taken_used, taken - 1)
                        finally:
                            store.release()
                    if runs_only and taken > 1:
                        # Runs follow each other from the cursor on, so
                        # together they are one run of first attempts.
                        self.write_journal_run(JOURNAL_DELIVER_RUN, offsets[0],
                                               taken, 1)
                    elif taken:
                        self.write_journal(JOURNAL_DELIVER, offsets, attempts,
                                           taken)
                except BaseException:
                    # None was journaled, so none is handed out (see
                    # take_now).
                    for i in range(taken):
                        self.ring.untake(offsets[i])
                    raise
            finally:
                self.release()
        finally:
            if offsets != small:
                PyMem_Free(offsets)
        if store.events_pending:
            store.report()
        return taken

    def get_many(self, count, timeout=None):
        """Deliver up to count messages; wait up to timeout for the first one.

        timeout=None waits until a message arrives; an empty list means the
        timeout passed first.
        """
        return self.blocking_take(count, timeout, "get_many", False)

    def get_many_nowait(self, count):
        """Deliver up to count available messages, lowest offsets first."""
        return self.take_messages(self.batch_limit(count, "get_many_nowait"))

    @cython.final
    cdef list take_messages(self, Py_ssize_t limit):
        cdef MessageSink sink = MessageSink.__new__(MessageSink)

        sink.messages = []
        self.take_into(limit, sink)
        self.finish(False)
        return sink.messages

    def get_batch(self, count, timeout=None):
        """Deliver up to count messages as one MessageBatch of numpy columns.

        Waits up to timeout for the first message, like get_many; settle the
        batch with ack_many(batch).
        """
        return self.blocking_take(count, timeout, "get_batch", True)

    @cython.final
    cdef object blocking_take(self, object count, object timeout, str method,
                              bint columns):
        """Take up to count deliveries, as a batch with columns, else a list.

        Waits up to timeout (None: no limit) for the first one, and returns
        an empty batch or list when it passes first.
        """
        cdef Retake retake
        cdef Py_ssize_t limit

        if timeout is not None:
            check_timeout(timeout, method)
        limit = self.batch_limit(count, method)
        if columns:
            found = self.take_batch(limit)
        else:
            found = self.take_messages(limit)
        if len(found) or (timeout is not None and timeout == 0):
            return found
        retake = Retake.__new__(Retake)
        retake.group = self
        retake.limit = limit
        retake.columns = columns
        # The subclass waits (pymq.queue._Consumer._wait), off the fast path.
        waited = self._wait(timeout, retake)
        return found if waited is None else waited

    def get_batch_nowait(self, count):
        """Deliver up to count messages as one MessageBatch of columns.

        The columns and the bodies are copied straight from the records,
        without a Message object per message.
        """
        return self.take_batch(self.batch_limit(count, "get_batch_nowait"))

    @cython.final
    cdef MessageBatch take_batch(self, Py_ssize_t limit):
        cdef BatchSink sink = BatchSink.__new__(BatchSink)
        cdef MessageBatch batch = new_batch(limit)
        cdef Py_ssize_t taken

        sink.offsets = <uint64_t *>batch_column(batch, BATCH_OFFSETS)
        sink.receipts = <uint64_t *>batch_column(batch, BATCH_RECEIPTS)
        sink.attempts = <uint32_t *>batch_column(batch, BATCH_ATTEMPTS)
        sink.timestamps = <int64_t *>batch_column(batch, BATCH_TIMESTAMPS)
        sink.lengths = <uint64_t *>batch_column(batch, BATCH_LENGTHS)
        sink.headers = []
        sink.count = limit
        taken = self.take_into(limit, sink)
        batch.data = take_body_bytes(&sink.data)
        batch.count = taken
        if sink.headers:
            sink.pad_headers(taken)
            batch.header_list = sink.headers
        batch.group = self
        self.finish(False)
        return batch

    def _unfinished_moves(self):
        """Return the offsets whose move to the DLQ began before a crash.

        Each may or may not be in the DLQ: _settle_moved() those found there
        and _forget_move() the others, which stay available here.
        """
        self.acquire()
        try:
            return sorted(self.moving)
        finally:
            self.release()

    def _settle_moved(self, uint64_t offset):
        """Record that the message at offset is in the DLQ: settle it here."""
        self.acquire()
        try:
            if (self.ring.low <= offset < self.ring.cursor and
                    self.ring.slot(offset).state != SLOT_SETTLED):
                self.write_journal(JOURNAL_DEAD, &offset, NULL, 1)
                self.ring.settle(offset)
                self.dead_lettered += 1
            self.moving.discard(offset)
        finally:
            self.release()
        self.finish(True)

    def _forget_move(self, uint64_t offset):
        """Record that the move of offset never reached the DLQ."""
        self.acquire()
        try:
            self.moving.discard(offset)
        finally:
            self.release()

    def _next_due(self):
        """Return seconds until a delivery expires or a delay ends, or None."""
        cdef int64_t due

        self.acquire()
        try:
            due = self.ring.next_due()
        finally:
            self.release()
        if due < 0 or due == FOREVER:
            return None
        return max(0.0, (due - self.now()) / <double>NS_PER_SECOND)

    # Settling ------------------------------------------------------------

    @cython.final
    cdef uint64_t check_receipt(self, uint64_t receipt) except? 0:
        cdef uint64_t offset

        if self.ring.lookup(receipt, &offset):
            raise StaleReceiptError(
                f"receipt {receipt} of {consumer_label(self)} names a "
                f"delivery that expired or was already settled")
        return offset

    def ack(self, receipt):
        """Settle the delivery named by receipt."""
        self.ack_receipt(as_receipt(receipt))

    @cython.final
    cdef int ack_receipt(self, uint64_t receipt) except -1:
        cdef uint64_t offset

        self.acquire()
        try:
            # A delivery past its deadline is stale even when no get has
            # run since to notice it.
            self.expire(self.now())
            offset = self.check_receipt(receipt)
            self.write_journal(JOURNAL_ACK, &offset, NULL, 1)
            self.ring.settle(offset)
            self.acked += 1
        finally:
            self.release()
        self.finish(True)
        return 0

    def ack_many(self, items):
        """Settle many deliveries: Messages, receipts or a MessageBatch.

        All or none: raises StaleReceiptError, settling nothing, if any
        receipt is stale or appears twice.
        """
        cdef Py_ssize_t count, i
        cdef uint64_t *receipts = NULL
        cdef uint64_t *offsets = NULL
        cdef uint64_t small[SMALL_BATCH * 2]
        cdef list listed
        cdef object item

        if type(items) is MessageBatch:
            if (<MessageBatch>items).group is not self:
                raise StaleReceiptError(
                    f"the batch was delivered by another queue or group, not "
                    f"by this one, {consumer_label(self)}")
            listed = None
            count = (<MessageBatch>items).count
        else:
            listed = items if type(items) is list else list(items)
            count = len(listed)
        if count == 0:
            return
        # One block: receipts, then offsets (scratch of settle_receipts), on
        # the stack for a small batch.
        receipts = small
        if count > SMALL_BATCH:
            receipts = <uint64_t *>PyMem_Malloc(count * 16)
            if receipts == NULL:
                raise MemoryError()
        offsets = receipts + count
        try:
            if listed is None:
                memcpy(receipts, batch_column(<MessageBatch>items,
                                              BATCH_RECEIPTS), count * 8)
            else:
                for i in range(count):
                    item = listed[i]
                    if type(item) is Message:
                        if (<Message>item).group is not self:
                            raise StaleReceiptError(
                                f"message at offset {(<Message>item).offset} "
                                f"was delivered by another queue or group, "
                                f"not by this one, {consumer_label(self)}")
                        receipts[i] = (<Message>item).receipt
                    else:
                        try:
                            receipts[i] = as_receipt(item)
                        except TypeError:
                            raise TypeError(
                                f"ack_many takes Messages delivered by "
                                f"{consumer_label(self)}, receipts (int) or a "
                                f"MessageBatch; item {i} is a "
                                f"{type(item).__name__}") from None
            self.settle_receipts(receipts, offsets, count)
        finally:
            if receipts != small:
                PyMem_Free(receipts)
        self.finish(True)

    cdef int settle_receipts(self, const uint64_t *receipts,
                             uint64_t *offsets, Py_ssize_t count) except -1:
        """Ack count (1 or more) receipts, all or none; offsets is scratch.

        Raises StaleReceiptError, settling nothing, if any receipt is
        stale or appears twice. The caller calls finish(True) afterwards.
        """
        cdef Py_ssize_t i
        cdef uint64_t key = self.ring.receipt_key
        cdef uint64_t first
        cdef bint rising = True

        self.acquire()
        try:
            self.expire(self.now())
            if count > 1 and self.ring.lookup_run(receipts, count):
                # A batch taken in one run: consecutive offsets, each once.
                first = (receipts[0] ^ key) >> RECEIPT_ATTEMPT_BITS
                self.write_journal_run(JOURNAL_ACK_RUN, first, count, 0)
                self.ring.settle_run(first, count)
                self.acked += count
                return 0
            # Without the key a receipt is its offset and attempt, so the
            # receipts of one get_many come in strictly rising order, with
            # no duplicate, and the sort that finds duplicates is only
            # needed for other batches. XOR with one key keeps equal
            # receipts equal.
            offsets[0] = receipts[0] ^ key
            for i in range(1, count):
                offsets[i] = receipts[i] ^ key
                if offsets[i] <= offsets[i - 1]:
                    rising = False
            if not rising:
                qsort(offsets, count, 8, compare_u64)
                for i in range(1, count):
                    if offsets[i] == offsets[i - 1]:
                        raise StaleReceiptError(
                            f"receipt {offsets[i] ^ key} appears twice in "
                            f"the batch")
            i = self.ring.lookup_many(receipts, offsets, count)
            if i >= 0:
                self.check_receipt(receipts[i])
            self.write_journal(JOURNAL_ACK, offsets, NULL, count)
            self.ring.settle_many(offsets, count)
            self.acked += count
        finally:
            self.release()
        return 0

    def nack(self, receipt, delay=0.0):
        """Give a delivery back, for redelivery after delay seconds.

        A delivery whose attempt reached max_deliveries goes to the
        dead-letter queue instead. A nack's delay is not journaled: after
        a restart the message is available at once. A delay that is not a
        number raises TypeError, and one outside 0 to 1e9 ValueError.
        """
        cdef uint64_t offset, value = as_receipt(receipt)
        cdef double seconds = seconds_argument(delay, "nack", "delay")
        cdef int64_t now = self.now()

        self.acquire()
        try:
            self.expire(now)
            offset = self.check_receipt(value)
            self.fail(offset, now + <int64_t>(seconds * NS_PER_SECOND), "nack",
                      False)
        finally:
            self.release()
        self.finish(True)

    def extend(self, receipt, seconds):
        """Set the deadline of a delivery to now plus seconds.

        Raises TypeError for seconds that are not a number, and ValueError
        for seconds outside 0 to 1e9.
        """
        cdef uint64_t offset, value = as_receipt(receipt)
        cdef double duration = seconds_argument(seconds, "extend", "seconds")
        cdef int64_t now = self.now()

        self.acquire()
        try:
            self.expire(now)
            offset = self.check_receipt(value)
            self.ring.set_deadline(
                offset, now + <int64_t>(duration * NS_PER_SECOND))
        finally:
            self.release()
        # expire() may have queued dead letters for finish() to move.
        self.finish(False)

    def reject(self, receipt, str reason not None="rejected"):
        """Move a delivery's message to the dead-letter queue now.

        Raises ValueError, changing nothing, for a reason that cannot be
        encoded as UTF-8. If the move fails (the DLQ is full, say), raises
        its error and leaves the delivery as it was: in flight, with the
        same receipt and deadline, so it can be rejected again, nacked or
        acked. A message of a dead-letter queue, which has no DLQ of its
        own, is made available again in that queue instead.
        """
        cdef uint64_t offset, value = as_receipt(receipt)
        cdef int64_t now = self.now()
        cdef int64_t deadline
        cdef uint32_t attempt
        cdef Slot *slot

        check_reason(reason)
        self.acquire()
        try:
            self.expire(now)
            offset = self.check_receipt(value)
            if self._on_dead is None:
                self.fail(offset, now, reason, True)
            else:
                slot = self.ring.slot(offset)
                attempt = slot.attempt
                deadline = slot.time
                # As fail() does for a move queued in dead_due: no consumer
                # holds the slot while it moves, and it never expires.
                self.ring.set_deadline(offset, FOREVER)
                self.dead_pending += 1
        finally:
            self.release()
        if self._on_dead is not None:
            try:
                self.begin_move(offset)
                try:
                    self._on_dead(self, offset, attempt, reason)
                except BaseException:
                    self.moving.discard(offset)
                    raise
            except BaseException:
                self.acquire()
                try:
                    self.ring.set_deadline(offset, deadline)
                    self.dead_pending -= 1
                finally:
                    self.release()
                raise
            self.end_move(offset)
        self.finish(True)

    # State ---------------------------------------------------------------

    def _counts(self):
        """Return a dict: in_flight, waiting, backlog, acked, and more."""
        cdef SegmentStore store = self.stream.store
        cdef uint64_t end

        self.acquire()
        try:
            self.expire(self.now())
        finally:
            self.release()
        # expire() may have queued dead letters: move them before counting,
        # so a message past its last attempt is counted in the DLQ.
        self.finish(False)
        self.acquire()
        try:
            end = store.active.base + store.active.count
            return {
                "low": self.ring.low,
                "cursor": self.ring.cursor,
                "in_flight": self.ring.delivered - self.dead_pending,
                "waiting": self.ring.waiting,
                "backlog": end - self.ring.cursor if end > self.ring.cursor
                else 0,
                "acked": self.acked,
                "dead_lettered": self.dead_lettered,
                "skipped": self.skipped,
            }
        finally:
            self.release()

    def close(self):
        """Checkpoint the journal and close it. Calling it again does nothing.

        Deliveries still in flight are available again, with their attempt
        counted, when the group is opened next.
        """
        if self.closed:
            return
        self.acquire()
        try:
            # A checkpoint that fails (a full disk) loses nothing: the next
            # open replays the records. The journal is closed either way.
            self.try_checkpoint("at close")
            self.closed = True
        finally:
            pymq_lock_unlock(self.lock)
        self.journal.close()


def split_body(uint32_t flags, bytes body):
    """Return (headers, payload) of a stored record body and its flags."""
    cdef size_t used = 0
    cdef dict headers = {}

    if flags & REC_FLAG_HEADERS:
        headers = decode_headers(<const uint8_t *>PyBytes_AS_STRING(body),
                                 len(body), &used)
    return headers, body[used:]
