# Frame codec of the wire protocol; layouts are in protocol.pxd and
# docs/protocol.md. The server and the client both use it, so neither
# handles a message byte by byte in Python.

from cpython.bytearray cimport (PyByteArray_AS_STRING, PyByteArray_GET_SIZE,
                                PyByteArray_Resize)

from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, EINTR, errno

from collections import deque
from types import GenericAlias


cdef inline void put_u16(uint8_t *p, uint16_t value) noexcept nogil:
    memcpy(p, &value, 2)


cdef inline void put_u32(uint8_t *p, uint32_t value) noexcept nogil:
    memcpy(p, &value, 4)


cdef inline void put_u64(uint8_t *p, uint64_t value) noexcept nogil:
    memcpy(p, &value, 8)


cdef inline void put_header(uint8_t *p, uint32_t length, uint8_t opcode,
                            uint16_t flags, uint32_t request_id,
                            uint32_t handle) noexcept nogil:
    put_u32(p, length)
    p[4] = opcode
    p[5] = FRAME_VERSION
    put_u16(p + 6, flags)
    put_u32(p + 8, request_id)
    put_u32(p + 12, handle)


cdef bytes build_frame(uint8_t opcode, uint16_t flags, uint32_t request_id,
                       uint32_t handle, const char *payload, Py_ssize_t size):
    cdef bytes frame

    if size > 0xFFFFFFFF - FRAME_HEADER_BYTES:
        raise ValueError(f"payload is {size} bytes; a frame holds at most "
                         f"{0xFFFFFFFF - FRAME_HEADER_BYTES}")
    frame = PyBytes_FromStringAndSize(NULL, 4 + FRAME_HEADER_BYTES + size)
    put_header(<uint8_t *>PyBytes_AS_STRING(frame),
               <uint32_t>(FRAME_HEADER_BYTES + size), opcode, flags,
               request_id, handle)
    if size:
        memcpy(PyBytes_AS_STRING(frame) + 16, payload, size)
    return frame


def encode_frame(uint8_t opcode, uint16_t flags, uint32_t request_id,
                 uint32_t handle, payload=b""):
    """Return one frame: the 16 bytes of length and header, then payload."""
    cdef const uint8_t[::1] view

    # Replies and requests on the hot path carry bytes, which need no
    # buffer view.
    if type(payload) is bytes:
        return build_frame(opcode, flags, request_id, handle,
                           PyBytes_AS_STRING(payload),
                           PyBytes_GET_SIZE(payload))
    view = memoryview(payload).cast("B")
    if view.shape[0] == 0:
        return build_frame(opcode, flags, request_id, handle, NULL, 0)
    return build_frame(opcode, flags, request_id, handle,
                       <const char *>&view[0], view.shape[0])


cdef Py_ssize_t poll_recv(int fd, char *data, size_t capacity,
                          int64_t deadline) noexcept nogil:
    """Read what fd has without blocking, trying until deadline.

    Returns the bytes read, 0 when the peer closed, -1 when nothing came by
    deadline, or -2 when the read failed, with errno set. A failure such as
    ECONNRESET is reported only once, so the caller must raise it.
    """
    cdef Py_ssize_t got

    while True:
        got = recv(fd, data, capacity, MSG_DONTWAIT)
        if got >= 0:
            return got
        if errno != EAGAIN and errno != EINTR:  # EWOULDBLOCK is EAGAIN on Linux
            return -2
        if monotonic_ns() >= deadline:
            return -1
        # Lets the peer run, should it share this CPU.
        sched_yield()


@cython.final
cdef class FrameReader:
    """Splits received bytes into frames, checking each length first.

    feed() returns the frames completed so far as tuples (opcode, flags,
    request_id, handle, payload). A length under 12 or over max_frame_bytes
    raises ProtocolError before any memory is set aside for the frame, and
    so does a version other than FRAME_VERSION.
    """

    def __cinit__(self, uint32_t max_frame_bytes):
        if max_frame_bytes < FRAME_HEADER_BYTES:
            raise ConfigError(f"max_frame_bytes is {max_frame_bytes}; it "
                              f"must be at least {FRAME_HEADER_BYTES}")
        self.buffer = bytearray()
        self.max_frame_bytes = max_frame_bytes
        self.ready = deque()
        self.poll_fd = -1

    def busy_poll(self, int fd, double seconds):
        """Poll fd for up to seconds before each blocking read of receive().

        A thread that sleeps in recv() until the reply comes pays for two
        context switches, and on a virtual machine for an interrupt sent
        from the peer's CPU to its own. A reply that comes within the poll
        costs neither. The poll adapts as the idle states of kernels do: it
        grows toward seconds while replies come soon after a poll gave up,
        and halves while waits run past seconds, so a consumer that waits
        on an idle queue soon stops polling. fd -1 or seconds 0 turns
        polling off. fd must be the descriptor of the socket that receive()
        is given.
        """
        if not 0 <= seconds <= 1:
            raise ConfigError(f"busy_poll is {seconds} seconds; it must be "
                              f"from 0 to 1")
        self.poll_fd = fd if seconds > 0 else -1
        self.poll_limit_ns = <int64_t>(seconds * 1e9)
        self.poll_ns = self.poll_limit_ns

    def receive(self, sock, buffer):
        """Read once from sock into buffer; append the frames completed to ready.

        Returns the bytes read, 0 when the peer closed the connection. The
        read and the split run in compiled code, with no Python bytecode
        between them. So a signal handler that raises when the read
        returns (Ctrl-C in a blocking client) finds the frames in ready,
        where the caller takes them from, instead of losing the bytes read.
        With busy_poll() set, the read polls first; buffer must then be a
        bytearray. A sock whose descriptor is no longer the polled one
        (closed by another thread, say) is read without polling, so that no
        bytes are taken from a socket that has reused the number since.
        """
        cdef Py_ssize_t size = -1
        cdef int64_t start, deadline
        cdef int error = 0
        cdef char *data
        cdef size_t capacity

        if self.poll_fd < 0 or sock.fileno() != self.poll_fd:
            size = sock.recv_into(buffer)
        else:
            if not isinstance(buffer, bytearray):
                raise TypeError(f"buffer must be a bytearray while busy_poll "
                                f"is set, not {type(buffer).__name__}")
            data = PyByteArray_AS_STRING(buffer)
            capacity = <size_t>PyByteArray_GET_SIZE(buffer)
            with nogil:
                start = monotonic_ns()
                deadline = start + self.poll_ns
                size = poll_recv(self.poll_fd, data, capacity, deadline)
                if size == -2:
                    error = errno
            if size == -2:
                raise OSError(error, os.strerror(error))
            if size < 0:
                # A signal that came during the poll interrupted no system
                # call, so its handler runs here: the recv below may sleep
                # until the next reply comes.
                PyErr_CheckSignals()
                size = sock.recv_into(buffer)
                self.adapt_poll(monotonic_ns() - start)
        if size:
            self.ready.extend(self.feed(buffer, size))
        return size

    cdef void adapt_poll(self, int64_t waited) noexcept:
        """Resize the poll after a read that had to sleep for waited ns."""
        cdef int64_t limit = self.poll_limit_ns

        if waited <= limit:
            # The reply came soon after the poll gave up: poll longer.
            self.poll_ns = min(limit, max(2 * self.poll_ns, limit // 4))
        elif self.poll_ns > limit // 64:
            self.poll_ns //= 2
        else:
            self.poll_ns = 0

    @property
    def poll_window(self):
        """How long the next read polls before it sleeps, in seconds."""
        return self.poll_ns / 1e9 if self.poll_fd >= 0 else 0.0

    @property
    def buffered(self):
        """Bytes received that do not make a whole frame yet."""
        return PyByteArray_GET_SIZE(self.buffer)

    def feed(self, data, Py_ssize_t size=-1):
        """Take received bytes; return the frames they complete.

        data is bytes or another contiguous buffer; with size, only its
        first size bytes were received.
        """
        cdef Py_buffer view

        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if size < 0:
                size = view.len
            elif size > view.len:
                raise ValueError(f"size is {size}, but the buffer holds "
                                 f"{view.len} bytes")
            return self.take(<const uint8_t *>view.buf, size)
        finally:
            PyBuffer_Release(&view)

    cdef list take(self, const uint8_t *data, Py_ssize_t size):
        cdef list frames = []
        cdef Py_ssize_t used, kept = PyByteArray_GET_SIZE(self.buffer)

        if kept == 0:
            # Nothing is left over from before, so the frames are read
            # straight from data and only an incomplete tail is kept.
            used = self.split(data, size, frames)
            if used < size:
                PyByteArray_Resize(self.buffer, size - used)
                memcpy(PyByteArray_AS_STRING(self.buffer), data + used,
                       size - used)
            return frames
        PyByteArray_Resize(self.buffer, kept + size)
        memcpy(PyByteArray_AS_STRING(self.buffer) + kept, data, size)
        used = self.split(<const uint8_t *>PyByteArray_AS_STRING(self.buffer),
                          kept + size, frames)
        if used:
            del self.buffer[:used]
        return frames

    cdef Py_ssize_t split(self, const uint8_t *p, Py_ssize_t available,
                          list frames) except -1:
        """Append the whole frames at p to frames; return the bytes used.

        Raises before any frame past a bad length is read.
        """
        cdef Py_ssize_t used = 0
        cdef uint32_t length

        while available - used >= 4:
            length = load_u32(p + used)
            if length < FRAME_HEADER_BYTES:
                raise ProtocolError(f"frame length is {length}; the least "
                                    f"is {FRAME_HEADER_BYTES}")
            if length > self.max_frame_bytes:
                raise FrameTooLargeError(
                    f"frame length is {length} bytes; max_frame_bytes is "
                    f"{self.max_frame_bytes}")
            if available - used >= 6 and p[used + 5] != FRAME_VERSION:
                raise ProtocolError(f"frame version is {p[used + 5]}; it must "
                                    f"be {FRAME_VERSION}")
            if available - used < 4 + <Py_ssize_t>length:
                break
            frames.append((
                p[used + 4],
                p[used + 6] | (<uint16_t>p[used + 7] << 8),
                load_u32(p + used + 8),
                load_u32(p + used + 12),
                PyBytes_FromStringAndSize(<const char *>p + used + 16,
                                          length - FRAME_HEADER_BYTES),
            ))
            used += 4 + length
        return used


cdef Py_ssize_t body_size(object body) except -1:
    if type(body) is bytes:
        return PyBytes_GET_SIZE(body)
    return memoryview(body).nbytes


def measure_bodies(bodies, str method=None):
    """Return (largest, total): the max and the sum of the bodies' sizes.

    Sizes are in bytes, as a PUBLISH frame carries them, so a client can
    check a batch against its limits without a Python call per body. With
    method ("put" or "put_many"), a body that is not bytes-like raises the
    embedded broker's TypeError for that call, naming the item.
    """
    cdef Py_ssize_t size, largest = 0, total = 0, index = 0

    for body in bodies:
        try:
            size = body_size(body)
        except TypeError:
            if method is None:
                raise
            name = type(body).__name__
            if method == "put":
                raise TypeError(f"put(): body must be a bytes-like object, "
                                f"not {name}") from None
            raise TypeError(f"{method}(): item {index} of bodies must be a "
                            f"bytes-like object, not {name}") from None
        total += size
        if size > largest:
            largest = size
        index += 1
    return largest, total


def encode_publish(uint32_t request_id, uint32_t handle, list bodies,
                   dict headers, int32_t timeout_ms):
    """Return a PUBLISH frame for bodies, each with headers (or none).

    The batch carries a CRC32C of its records, which the server checks
    before it writes anything.
    """
    cdef bytes block = b""
    cdef Py_ssize_t count = len(bodies), i, size, block_size
    cdef size_t total = 0
    cdef uint32_t flags = 0
    cdef bytes frame
    cdef uint8_t *out
    cdef uint8_t *records
    cdef const uint8_t[::1] view

    if headers:
        # The server checks the reserved names: only it knows whether the
        # target is a dead-letter queue, which takes them.
        block = encode_headers(headers, True)
        flags = BATCH_HEADERS
    block_size = PyBytes_GET_SIZE(block)
    for i in range(count):
        total += 4 + block_size + body_size(bodies[i])
    total += FRAME_HEADER_BYTES + PUBLISH_HEAD_BYTES
    if total > 0xFFFFFFFF:
        raise MessageTooLargeError(
            total, 0xFFFFFFFF, f"batch of {count} message"
            f"{'' if count == 1 else 's'} is {total} bytes; "
            f"a frame holds at most 4 GiB")
    frame = PyBytes_FromStringAndSize(NULL, 4 + total)
    out = <uint8_t *>PyBytes_AS_STRING(frame)
    put_header(out, <uint32_t>total, OP_PUBLISH, 0, request_id, handle)
    put_u32(out + 16, flags)
    put_u32(out + 20, <uint32_t>count)
    put_u32(out + 28, <uint32_t>timeout_ms)
    records = out + 16 + PUBLISH_HEAD_BYTES
    out = records
    for i in range(count):
        body = bodies[i]
        if type(body) is bytes:
            size = PyBytes_GET_SIZE(body)
            put_u32(out, <uint32_t>(block_size + size))
            memcpy(out + 4, PyBytes_AS_STRING(block), block_size)
            memcpy(out + 4 + block_size, PyBytes_AS_STRING(body), size)
        else:
            view = memoryview(body).cast("B")
            size = view.shape[0]
            put_u32(out, <uint32_t>(block_size + size))
            memcpy(out + 4, PyBytes_AS_STRING(block), block_size)
            if size:
                memcpy(out + 4 + block_size, &view[0], size)
        out += 4 + block_size + size
    put_u32(<uint8_t *>PyBytes_AS_STRING(frame) + 24,
            pymq_crc32c(0, records, out - records))
    return frame


def publish_into(StreamBase stream not None, bytes payload not None,
                 uint32_t max_count):
    """Check a PUBLISH payload and append its records to stream.

    Returns (first offset, count). Raises ProtocolError for a malformed
    batch and CorruptBatchError when its CRC32C does not match; either way
    nothing is written.
    """
    cdef uint32_t count
    cdef uint64_t first = publish_batch(stream, payload, max_count, &count)

    return first, count


def serve_publish(StreamBase stream not None, bytes payload not None,
                  uint32_t max_count, uint16_t flags, uint32_t request_id,
                  uint32_t handle):
    """Append a PUBLISH request's batch to stream; return the reply frame.

    Checks and appends as publish_into does. Returns None when flags has
    NO_REPLY, else the reply: u64 first offset, u32 count.
    """
    cdef uint32_t count
    cdef uint64_t first = publish_batch(stream, payload, max_count, &count)
    cdef uint8_t reply[12]

    if flags & FRAME_NO_REPLY:
        return None
    put_u64(reply, first)
    put_u32(reply + 8, count)
    return build_frame(OP_PUBLISH, FRAME_REPLY, request_id, handle,
                       <const char *>reply, 12)


cdef uint64_t publish_batch(StreamBase stream, bytes payload,
                            uint32_t max_count, uint32_t *appended) except? 0:
    """Check a PUBLISH payload, append its records; return the first offset.

    Sets appended to the number of records.
    """
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload), pos
    cdef uint32_t flags, count, crc, length, i
    cdef int32_t timeout_ms
    cdef BodyRef one
    cdef BodyRef *refs
    cdef uint64_t first
    cdef size_t used
    cdef dict headers

    if size < PUBLISH_HEAD_BYTES:
        raise ProtocolError(f"publish payload is {size} bytes; its head "
                            f"alone is {PUBLISH_HEAD_BYTES}")
    flags = load_u32(p)
    count = load_u32(p + 4)
    crc = load_u32(p + 8)
    timeout_ms = <int32_t>load_u32(p + 12)
    if timeout_ms < -1:
        raise ConfigError(f"publish timeout is {timeout_ms} ms; it must be -1 "
                          f"(no limit) or 0 or more")
    if flags & ~(<uint32_t>BATCH_HEADERS):
        raise ProtocolError(f"publish flags are {flags:#x}; only bit 0 is "
                            f"defined")
    if count == 0 or count > max_count:
        raise ProtocolError(f"publish batch holds {count} messages; it must "
                            f"hold 1 to {max_count}")
    if count > <uint32_t>((size - PUBLISH_HEAD_BYTES) // 4):
        raise ProtocolError(f"publish batch says {count} message"
                            f"{'' if count == 1 else 's'} but its {size} "
                            f"bytes cannot hold them")
    if pymq_crc32c(0, p + PUBLISH_HEAD_BYTES,
                   size - PUBLISH_HEAD_BYTES) != crc:
        raise CorruptBatchError(
            f"publish batch of {count} message{'' if count == 1 else 's'} "
            f"failed its CRC32C check; nothing was written")
    # A batch of one, the usual put, needs no allocation.
    refs = &one if count == 1 else <BodyRef *>PyMem_Malloc(count * sizeof(BodyRef))
    if refs == NULL:
        raise MemoryError()
    try:
        pos = PUBLISH_HEAD_BYTES
        for i in range(count):
            if size - pos < 4:
                raise ProtocolError(f"publish record {i} is cut off")
            length = load_u32(p + pos)
            pos += 4
            if <Py_ssize_t>length > size - pos:
                raise ProtocolError(f"publish record {i} says {length} bytes "
                                    f"but {size - pos} remain")
            refs[i].data = p + pos
            refs[i].length = length
            if flags & BATCH_HEADERS:
                # A record whose header block cannot be read would fail
                # every get that reaches it: check each one before writing.
                try:
                    used = 0
                    headers = decode_headers(p + pos, length, &used)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ValueError(
                        f"publish record {i} has an invalid header block "
                        f"({exc}); nothing was written") from None
                # The reserved names are checked here, where the target is
                # known, rather than by the client, as put does.
                if not stream.dead_letter:
                    try:
                        for key in headers:
                            check_user_header(key)
                    except ValueError as exc:
                        raise ValueError(f"publish record {i}: {exc}; nothing "
                                         f"was written") from None
            pos += length
        if pos != size:
            raise ProtocolError(f"publish batch has {size - pos} bytes past "
                                f"its last record")
        first = stream.put_refs(
            refs, count, REC_FLAG_HEADERS if flags & BATCH_HEADERS else 0,
            None if timeout_ms < 0 else timeout_ms / 1000.0)
    finally:
        if refs != &one:
            PyMem_Free(refs)
    appended[0] = count
    return first


def encode_deliveries(uint16_t flags, uint32_t request_id, uint32_t handle,
                      list messages not None, size_t max_frame_bytes):
    """Return DELIVER frames holding messages (core Message objects).

    Messages go into as few frames as max_frame_bytes allows; every frame
    but the last has FRAME_MORE set. A message too large for any frame
    raises MessageTooLargeError.
    """
    return delivery_frames(flags, request_id, handle, messages,
                           max_frame_bytes)


cdef list delivery_frames(uint16_t flags, uint32_t request_id,
                          uint32_t handle, list messages,
                          size_t max_frame_bytes):
    cdef list frames = []
    cdef Py_ssize_t start = 0, stop, count = len(messages)
    cdef size_t size, message_size
    cdef Message message

    while True:
        size = FRAME_HEADER_BYTES + 8
        stop = start
        while stop < count:
            message = <Message>messages[stop]
            message_size = DELIVERY_HEAD_BYTES + PyBytes_GET_SIZE(message.body)
            if message.header_map:
                message_size += header_block_size(message.header_map)
            if size + message_size > max_frame_bytes:
                break
            size += message_size
            stop += 1
        if stop == start and stop < count:
            raise MessageTooLargeError(
                FRAME_HEADER_BYTES + 8 + message_size, max_frame_bytes,
                f"message {(<Message>messages[stop]).offset} takes "
                f"{FRAME_HEADER_BYTES + 8 + message_size} bytes as a "
                f"delivery; max_frame_bytes is {max_frame_bytes}")
        frames.append(encode_delivery_frame(
            flags | (FRAME_MORE if stop < count else 0), request_id, handle,
            messages if start == 0 and stop == count
            else messages[start:stop]))
        start = stop
        if start >= count:
            return frames


# The wire code of the error for a FETCH with no room under max_unacked.
cdef enum:
    ERROR_TOO_MANY_UNACKED = 19

# A connection short of room checks its deliveries against the broker at
# least this often, to find those settled through another connection.
cdef int64_t UNACKED_RECHECK_NS = 1000000000
# After a check that took d ns, the next one starts no sooner than
# UNACKED_CHECK_SPACING * d ns after it ended, so that checks take at most
# about a tenth of the time of a connection kept at its limit.
cdef int64_t UNACKED_CHECK_SPACING = 10


@cython.final
cdef class UnackedCount:
    """The deliveries one connection holds unsettled, against max_unacked.

    held is the number of receipts in the connection's outstanding sets
    (one set per queue or group), plus the room that requests under way
    reserved with reserve(). A receipt enters its set when its delivery is
    sent, and leaves it when the connection acks, nacks or rejects it, or
    closes. A delivery whose visibility timeout passed, or that another
    connection settled, stays in its set until drop_settled() finds it.
    The server runs that check (reclaim) when a request is short of room
    and a delivery held may have expired since the last check, or a second
    has passed since it.

    Not locked: held changes only in whole C statements, which run with
    the GIL held, so threads of the server's pool may share it.
    """

    def __cinit__(self, Py_ssize_t limit, reclaim=None, freed=None):
        if limit < 1:
            raise ConfigError(f"max_unacked is {limit}; it must be 1 or more")
        self.limit = limit
        self.added_ns = FOREVER
        self.reclaim = reclaim
        self.freed = freed

    cdef Py_ssize_t take_room(self, Py_ssize_t count) except -1:
        """Reserve room for up to count deliveries; return how many.

        Returns 0 when the connection is at its limit. When count does not
        fit and a check is due, reclaim() runs first.
        """
        cdef Py_ssize_t room

        if (self.held + count > self.limit and self.reclaim is not None and
                self.check_due(coarse_monotonic_ns())):
            self.reclaim()
        room = self.limit - self.held
        if room <= 0:
            return 0
        if count > room:
            count = room
        self.held += count
        return count

    cdef int give_back(self, Py_ssize_t count) except -1:
        """Free room for count deliveries; tell the requests waiting for it."""
        if count <= 0:
            return 0
        self.held -= count
        if self.waiters > 0 and self.freed is not None:
            self.freed()
        return 0

    cdef void note_expiry(self, int64_t deadline_ns) noexcept:
        """Make a check due from deadline_ns (coarse monotonic ns) on."""
        if deadline_ns < self.expiry_ns:
            self.expiry_ns = deadline_ns

    cdef bint check_due(self, int64_t now) noexcept:
        return (not self.checking and now >= self.expiry_ns and
                now >= self.next_check_ns)

    cdef Py_ssize_t track(self, ReceiptSet outstanding, list messages,
                          Py_ssize_t granted, int64_t visibility_ns) except -1:
        """Add the receipts of messages, delivered with granted reserved.

        Frees the room reserved but not used. Returns the receipts added.
        """
        cdef Py_ssize_t before = outstanding.size(), i

        for i in range(len(messages)):
            outstanding.add_one((<Message?>messages[i]).receipt)
        return self.tracked(outstanding.size() - before, granted,
                            visibility_ns)

    cdef Py_ssize_t tracked(self, Py_ssize_t added, Py_ssize_t granted,
                            int64_t visibility_ns) except -1:
        """Count added receipts, just put in a set, against granted room."""
        if added > granted:
            # Only fewer messages than reserved can come; kept exact anyway.
            self.held += added - granted
        else:
            self.give_back(granted - added)
        if added:
            # Each delivery added since the last check was sent at or after
            # added_ns, so none expires before added_ns plus its visibility
            # timeout: one clock read per check, not per FETCH.
            if self.added_ns == FOREVER:
                self.added_ns = coarse_monotonic_ns()
            self.note_expiry(self.added_ns + visibility_ns)
        return added

    def reserve(self, Py_ssize_t count):
        """Reserve room for up to count deliveries; return how many (0: none)."""
        return self.take_room(count)

    def unreserve(self, Py_ssize_t count):
        """Free room reserved with reserve() and not used."""
        self.give_back(count)

    def commit(self, ReceiptSet outstanding not None, list messages not None,
               Py_ssize_t granted, GroupBase group not None):
        """Add the receipts of messages from group, reserved with reserve(granted).

        Frees the room not used; returns the number of receipts added.
        """
        return self.track(outstanding, messages, granted, group.visibility_ns)

    def settle(self, ReceiptSet outstanding not None, receipts):
        """Remove receipts from outstanding, and their room from held."""
        cdef Py_ssize_t settled = 0

        for receipt in receipts:
            settled += outstanding.discard_one(receipt)
        self.give_back(settled)

    def drop_settled(self, GroupBase group not None,
                     ReceiptSet outstanding not None, list receipts=None):
        """Remove the receipts that name no delivery in flight; return how many.

        Checks every receipt in outstanding, or with receipts only those.
        A receipt is stale once its delivery was settled, or expired and
        was taken back. When every receipt is checked, the earliest
        deadline of the deliveries still in flight makes the next check
        due then.
        """
        cdef uint64_t *stale = NULL
        cdef Py_ssize_t count = 0, dropped = 0, i
        cdef uint64_t offset, receipt
        cdef int64_t now, deadline, earliest = FOREVER
        cdef RingBuffer ring

        # Expired deliveries are taken back, and those past their last
        # attempt moved to the DLQ, as every call of the group does first.
        group.acquire()
        try:
            group.expire(group.now())
        finally:
            group.release()
        group.finish(False)
        if receipts is not None:
            group.acquire()
            try:
                ring = group.ring
                for item in receipts:
                    receipt = item
                    if ring.lookup(receipt, &offset):
                        dropped += outstanding.discard_one(receipt)
            finally:
                group.release()
            self.give_back(dropped)
            return dropped
        group.acquire()
        try:
            # A test's clock is Python code, which may let other threads run.
            now = group.now()
            # Sized here, after the waits that let other threads add
            # receipts. Nothing below releases the GIL, so the set stays
            # as it is until the scan ends.
            stale = <uint64_t *>PyMem_Malloc(
                max(1, outstanding.size()) * sizeof(uint64_t))
            if stale == NULL:
                raise MemoryError()
            try:
                ring = group.ring
                if outstanding.has_zero and ring.lookup(0, &offset):
                    stale[count] = 0
                    count += 1
                for i in range(outstanding.capacity):
                    receipt = outstanding.slots[i]
                    if receipt == 0:
                        continue
                    if ring.lookup(receipt, &offset):
                        stale[count] = receipt
                        count += 1
                        continue
                    deadline = ring.slot(offset).time
                    if deadline < earliest:
                        earliest = deadline
                # Removed after the scan, which a removal would reorder.
                for i in range(count):
                    dropped += outstanding.discard_one(stale[i])
            finally:
                PyMem_Free(stale)
        finally:
            group.release()
        if earliest != FOREVER:
            self.note_expiry(coarse_monotonic_ns() + (earliest - now))
        self.give_back(dropped)
        return dropped

    def begin_check(self):
        """Start a check of every set; False when one is under way already."""
        if self.checking:
            return False
        self.checking = True
        self.added_ns = FOREVER
        self.check_started_ns = monotonic_ns()
        # Lowered again by each delivery found in flight, and by those
        # sent while the check runs.
        self.expiry_ns = coarse_monotonic_ns() + UNACKED_RECHECK_NS
        return True

    def end_check(self):
        """Finish the check that begin_check() started."""
        cdef int64_t took = monotonic_ns() - self.check_started_ns

        self.next_check_ns = (coarse_monotonic_ns() +
                              UNACKED_CHECK_SPACING * max(0, took))
        self.checking = False

    def note_extend(self, double seconds):
        """Make a check due once seconds pass: an EXTEND moved a deadline.

        A value that extend() rejects (negative, NaN, over 1e9) is ignored.
        """
        if not 0 <= seconds <= 1e9:
            return
        self.note_expiry(coarse_monotonic_ns() + <int64_t>(seconds * 1e9))

    def seconds_to_check(self):
        """Return the seconds until a check is due (0 when it is due now)."""
        cdef int64_t now = coarse_monotonic_ns()
        cdef int64_t due = max(self.expiry_ns, self.next_check_ns)

        return max(0, due - now) / 1e9

    def full_error(self):
        """Return the error for a request that found no room at all."""
        return ServerError(
            f"this connection holds {self.held} unsettled deliveries, "
            f"max_unacked ({self.limit}); ack, nack or reject some of them "
            f"before fetching more", code=ERROR_TOO_MANY_UNACKED)


# A DELIVER frame's bytes before its first delivery: the frame length, the
# header, the count and the CRC.
cdef enum:
    DELIVER_PREFIX_BYTES = 4 + FRAME_HEADER_BYTES + 8


cdef int write_delivery(BodyBuffer *frame, Py_ssize_t count, uint64_t offset,
                        uint64_t receipt, int64_t timestamp, uint32_t attempt,
                        object header_map, const uint8_t *body,
                        size_t length) except -1:
    """Append one delivery, in the layout of a DELIVER frame, to frame."""
    cdef bytes block = None
    cdef size_t block_size = 0
    cdef uint8_t *out

    if header_map:
        # A DLQ's messages carry the headers of their move.
        block = encode_headers(header_map, True)
        block_size = PyBytes_GET_SIZE(block)
    reserve_body_bytes(frame, DELIVERY_HEAD_BYTES + block_size + length,
                       count)
    out = <uint8_t *>bytes_pointer(frame.bytes) + frame.size
    put_u64(out, offset)
    put_u64(out + 8, receipt)
    put_u64(out + 16, <uint64_t>timestamp)
    put_u32(out + 24, attempt)
    put_u32(out + 28, BATCH_HEADERS if block_size else 0)
    put_u32(out + 32, <uint32_t>(block_size + length))
    out += DELIVERY_HEAD_BYTES
    if block_size:
        memcpy(out, PyBytes_AS_STRING(block), block_size)
        out += block_size
    memcpy(out, body, length)
    frame.size += DELIVERY_HEAD_BYTES + block_size + length
    return 0


cdef bytes finish_deliver_frame(bytes frame, uint16_t flags,
                                uint32_t request_id, uint32_t handle,
                                uint32_t count):
    """Fill in the prefix of frame, whose deliveries are written."""
    cdef uint8_t *out = <uint8_t *>PyBytes_AS_STRING(frame)
    cdef size_t size = PyBytes_GET_SIZE(frame)

    put_header(out, <uint32_t>(size - 4), OP_DELIVER, flags, request_id,
               handle)
    put_u32(out + 16, count)
    put_u32(out + 20, pymq_crc32c(0, out + DELIVER_PREFIX_BYTES,
                                  size - DELIVER_PREFIX_BYTES))
    return frame


cdef list split_deliver_frame(bytes frame, uint32_t request_id,
                              uint32_t handle, size_t max_frame_bytes):
    """Return the deliveries of frame as frames of max_frame_bytes at most.

    Every frame but the last has FRAME_MORE set. A delivery too large for
    any frame raises MessageTooLargeError.
    """
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(frame)
    cdef size_t end = PyBytes_GET_SIZE(frame)
    cdef size_t pos = DELIVER_PREFIX_BYTES, start = pos, size, delivery
    cdef uint32_t count = 0
    cdef list frames = []
    cdef bytes part

    size = FRAME_HEADER_BYTES + 8
    while pos < end:
        delivery = DELIVERY_HEAD_BYTES + load_u32(p + pos + 32)
        if size + delivery > max_frame_bytes:
            if count == 0:
                raise MessageTooLargeError(
                    FRAME_HEADER_BYTES + 8 + delivery, max_frame_bytes,
                    f"message {load_u64(p + pos)} takes "
                    f"{FRAME_HEADER_BYTES + 8 + delivery} bytes as a "
                    f"delivery; max_frame_bytes is {max_frame_bytes}")
            part = PyBytes_FromStringAndSize(
                NULL, DELIVER_PREFIX_BYTES + pos - start)
            memcpy(PyBytes_AS_STRING(part) + DELIVER_PREFIX_BYTES, p + start,
                   pos - start)
            frames.append(finish_deliver_frame(
                part, FRAME_REPLY | FRAME_MORE, request_id, handle, count))
            start = pos
            size = FRAME_HEADER_BYTES + 8
            count = 0
        size += delivery
        pos += delivery
        count += 1
    part = PyBytes_FromStringAndSize(NULL, DELIVER_PREFIX_BYTES + pos - start)
    memcpy(PyBytes_AS_STRING(part) + DELIVER_PREFIX_BYTES, p + start,
           pos - start)
    frames.append(finish_deliver_frame(part, FRAME_REPLY, request_id, handle,
                                       count))
    return frames


@cython.final
cdef class FrameSink(TakeSink):
    """Writes each delivery into one DELIVER frame, for a FETCH.

    The bodies of never-delivered records go from the log into the frame,
    with no Message or bytes object per message. receipts[i] is the
    receipt of delivery i.
    """

    cdef BodyBuffer data
    cdef uint64_t *receipts
    cdef Py_ssize_t count

    def __dealloc__(self):
        Py_XDECREF(self.data.bytes)
        PyMem_Free(self.receipts)

    cdef int take_run(self, GroupBase group, const uint8_t **records,
                      const size_t *used, list headers, uint64_t first,
                      Py_ssize_t index, Py_ssize_t count) except -1:
        cdef Py_ssize_t i
        cdef const uint8_t *record

        for i in range(count):
            record = records[i]
            self.receipts[index + i] = group.ring.receipt(first + i, 1)
            write_delivery(
                &self.data, self.count, first + i, self.receipts[index + i],
                <int64_t>load_u64(record + REC_OFF_TIMESTAMP), 1,
                headers[i] if headers else None,
                record + REC_HEADER_SIZE + used[i],
                load_u32(record + REC_OFF_LENGTH) - used[i])
        return 0

    cdef int take_one(self, GroupBase group, const uint8_t *record,
                      uint64_t offset, uint32_t attempt, object headers,
                      size_t used, Py_ssize_t index) except -1:
        self.receipts[index] = group.ring.receipt(offset, attempt)
        write_delivery(
            &self.data, self.count, offset, self.receipts[index],
            <int64_t>load_u64(record + REC_OFF_TIMESTAMP), attempt, headers,
            record + REC_HEADER_SIZE + used,
            load_u32(record + REC_OFF_LENGTH) - used)
        return 0


cdef list fetch_frames(GroupBase group, Py_ssize_t count,
                       uint32_t request_id, uint32_t handle,
                       size_t max_frame_bytes, ReceiptSet outstanding,
                       UnackedCount unacked, Py_ssize_t granted):
    """Deliver up to count messages of group as the DELIVER frames of a reply.

    What get_many_nowait and delivery_frames do, without a Message object
    per message (FrameSink). The receipts join outstanding and are counted
    against the room granted by unacked, which is given back if the take
    raises. Returns [] when nothing was available.
    """
    cdef FrameSink sink = FrameSink.__new__(FrameSink)
    cdef Py_ssize_t taken = 0, before, i
    cdef bytes frame

    try:
        count = group.batch_limit(count, "fetch")
        sink.count = count
        sink.receipts = <uint64_t *>PyMem_Malloc(count * 8)
        if sink.receipts == NULL:
            raise MemoryError()
        reserve_body_bytes(&sink.data, DELIVER_PREFIX_BYTES, count)
        sink.data.size = DELIVER_PREFIX_BYTES
        taken = group.take_into(count, sink)
    except BaseException:
        unacked.give_back(granted)
        raise
    before = outstanding.size()
    for i in range(taken):
        outstanding.add_one(sink.receipts[i])
    unacked.tracked(outstanding.size() - before, granted, group.visibility_ns)
    group.finish(False)
    if taken == 0:
        return []
    frame = take_body_bytes(&sink.data)
    if <size_t>PyBytes_GET_SIZE(frame) - 4 <= max_frame_bytes:
        return [finish_deliver_frame(frame, FRAME_REPLY, request_id, handle,
                                     <uint32_t>taken)]
    return split_deliver_frame(frame, request_id, handle, max_frame_bytes)


def serve_fetch(consumer, bytes payload not None, uint32_t max_count,
                ReceiptSet outstanding not None, uint32_t request_id,
                uint32_t handle, size_t max_frame_bytes,
                UnackedCount unacked not None):
    """Run a FETCH request on consumer, a queue or group; return the reply.

    The payload is u32 count, i32 wait in ms. The count is cut to the room
    left under unacked's limit, and a connection with no room at all gets
    ServerError code 19. Returns the DELIVER frames, or None when no
    message is available and the request may wait: the caller then waits
    for one. The receipts delivered are added to outstanding.
    """
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(payload)
    cdef uint32_t count
    cdef int32_t wait_ms
    cdef list frames
    cdef Py_ssize_t granted
    cdef GroupBase group = <GroupBase?>consumer

    if PyBytes_GET_SIZE(payload) != 8:
        raise ProtocolError(f"FETCH payload is {PyBytes_GET_SIZE(payload)} "
                            f"bytes, not 8")
    count = load_u32(p)
    wait_ms = <int32_t>load_u32(p + 4)
    if count < 1 or count > max_count:
        raise ConfigError(f"fetch count is {count}; it must be from 1 to "
                          f"max_batch ({max_count})")
    granted = unacked.take_room(count)
    if granted == 0:
        raise unacked.full_error()
    frames = fetch_frames(group, granted, request_id, handle, max_frame_bytes,
                          outstanding, unacked, granted)
    if not frames and wait_ms != 0:
        return None
    if not frames:
        # An empty reply: a DELIVER frame with no deliveries.
        return delivery_frames(FRAME_REPLY, request_id, handle, [],
                               max_frame_bytes)
    return frames


def serve_ack(consumer, bytes payload not None,
              ReceiptSet outstanding not None,
              uint16_t flags, uint32_t request_id, uint32_t handle,
              UnackedCount unacked not None):
    """Run an ACK request on consumer, a queue or group; return the reply.

    The payload is a receipt list. Either every receipt is acked, or none
    when one is stale. The acked receipts leave outstanding, and so do
    the stale ones, whose deliveries are no longer held. Returns None
    when flags has NO_REPLY.
    """
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload), settled = 0, i, count
    cdef GroupBase group = <GroupBase?>consumer
    cdef uint64_t *receipts
    cdef uint64_t *offsets
    cdef bint acked = False

    # The receipts go from the payload to C arrays and into the group
    # without an int object each; read_receipts makes the same checks.
    if size < 4:
        raise ProtocolError("receipt list is cut off before its count")
    count = load_u32(p)
    if count > (size - 4) // 8:
        raise ProtocolError(f"receipt list says {count} receipts but only "
                            f"{size - 4} bytes follow")
    if 4 + 8 * count != size:
        raise ProtocolError("ACK payload has bytes past its receipts")
    if count:
        receipts = <uint64_t *>PyMem_Malloc(count * 16)
        if receipts == NULL:
            raise MemoryError()
        offsets = receipts + count
        try:
            for i in range(count):
                receipts[i] = load_u64(p + 4 + 8 * i)
            try:
                group.settle_receipts(receipts, offsets, count)
                acked = True
            finally:
                if not acked:
                    # A stale receipt's delivery is no longer held: it
                    # leaves the count now. The ACK's own error is the one
                    # raised.
                    try:
                        unacked.drop_settled(
                            consumer, outstanding,
                            [receipts[i] for i in range(count)])
                    except ClosedError:
                        pass
            for i in range(count):
                settled += outstanding.discard_one(receipts[i])
        finally:
            PyMem_Free(receipts)
        group.finish(True)
    unacked.give_back(settled)
    if flags & FRAME_NO_REPLY:
        return None
    return build_frame(OP_ACK, FRAME_REPLY, request_id, handle, NULL, 0)


cdef size_t header_block_size(dict headers) except 0:
    cdef size_t size = 2

    for key, value in headers.items():
        size += 6 + len((<str>key).encode("utf-8")) + len(
            (<str>value).encode("utf-8"))
    return size


cdef bytes encode_delivery_frame(uint16_t flags, uint32_t request_id,
                                 uint32_t handle, list messages):
    """Return one DELIVER frame holding messages (core Message objects)."""
    cdef Py_ssize_t count = len(messages), i, size
    cdef size_t total = FRAME_HEADER_BYTES + 8
    cdef list blocks = [None] * count
    cdef Message message
    cdef bytes frame, block
    cdef uint8_t *out
    cdef uint8_t *records
    cdef uint32_t record_flags

    for i in range(count):
        message = <Message>messages[i]
        if message.header_map:
            # A DLQ's messages carry the headers of their move.
            block = encode_headers(message.header_map, True)
            blocks[i] = block
            total += PyBytes_GET_SIZE(block)
        total += DELIVERY_HEAD_BYTES + PyBytes_GET_SIZE(message.body)
    if total > 0xFFFFFFFF:
        raise MessageTooLargeError(
            total, 0xFFFFFFFF, f"{count} deliveries take {total} bytes; a "
            f"frame holds at most 4 GiB")
    frame = PyBytes_FromStringAndSize(NULL, 4 + total)
    out = <uint8_t *>PyBytes_AS_STRING(frame)
    put_header(out, <uint32_t>total, OP_DELIVER, flags, request_id, handle)
    put_u32(out + 16, <uint32_t>count)
    records = out + 24
    out = records
    for i in range(count):
        message = <Message>messages[i]
        block = blocks[i]
        record_flags = 0
        size = 0
        if block is not None:
            record_flags = BATCH_HEADERS
            size = PyBytes_GET_SIZE(block)
        put_u64(out, message.offset)
        put_u64(out + 8, message.receipt)
        put_u64(out + 16, <uint64_t>message.timestamp)
        put_u32(out + 24, message.attempt)
        put_u32(out + 28, record_flags)
        put_u32(out + 32, <uint32_t>(size + PyBytes_GET_SIZE(message.body)))
        out += DELIVERY_HEAD_BYTES
        if size:
            memcpy(out, PyBytes_AS_STRING(block), size)
            out += size
        size = PyBytes_GET_SIZE(message.body)
        memcpy(out, PyBytes_AS_STRING(message.body), size)
        out += size
    put_u32(<uint8_t *>PyBytes_AS_STRING(frame) + 20,
            pymq_crc32c(0, records, out - records))
    return frame


def decode_deliveries(bytes payload not None, object owner):
    """Return the RemoteMessages of a DELIVER payload, settled via owner."""
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload), pos = 8
    cdef uint32_t count, i, length
    cdef size_t used
    cdef list messages = []
    cdef RemoteMessage message

    if size < 8:
        raise ProtocolError(f"deliver payload is {size} bytes; its head "
                            f"alone is 8")
    count = load_u32(p)
    if pymq_crc32c(0, p + 8, size - 8) != load_u32(p + 4):
        raise CorruptBatchError(f"batch of {count} "
                                f"{'delivery' if count == 1 else 'deliveries'} "
                                f"failed its CRC32C check")
    for i in range(count):
        if size - pos < DELIVERY_HEAD_BYTES:
            raise ProtocolError(f"delivery {i} of {count} is cut off")
        length = load_u32(p + pos + 32)
        if <Py_ssize_t>length > size - pos - DELIVERY_HEAD_BYTES:
            raise ProtocolError(f"delivery {i} says {length} bytes but "
                                f"{size - pos - DELIVERY_HEAD_BYTES} remain")
        message = RemoteMessage.__new__(RemoteMessage)
        message.offset = load_u64(p + pos)
        message.receipt = load_u64(p + pos + 8)
        message.timestamp = <int64_t>load_u64(p + pos + 16)
        message.attempt = load_u32(p + pos + 24)
        used = 0
        if load_u32(p + pos + 28) & BATCH_HEADERS:
            message.header_map = decode_headers(
                p + pos + DELIVERY_HEAD_BYTES, length, &used)
        message.body = PyBytes_FromStringAndSize(
            <const char *>p + pos + DELIVERY_HEAD_BYTES + used, length - used)
        message.owner = owner
        messages.append(message)
        pos += DELIVERY_HEAD_BYTES + length
    return messages


cdef Py_ssize_t check_deliveries(bytes payload, size_t *record_bytes) except -1:
    """Check a DELIVER payload's CRC32C and lengths; return its count.

    Adds the bytes of its records (header blocks and bodies) to
    record_bytes.
    """
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload), pos = 8
    cdef uint32_t count, i, length

    if size < 8:
        raise ProtocolError(f"deliver payload is {size} bytes; its head "
                            f"alone is 8")
    count = load_u32(p)
    if pymq_crc32c(0, p + 8, size - 8) != load_u32(p + 4):
        raise CorruptBatchError(f"batch of {count} "
                                f"{'delivery' if count == 1 else 'deliveries'} "
                                f"failed its CRC32C check")
    for i in range(count):
        if size - pos < DELIVERY_HEAD_BYTES:
            raise ProtocolError(f"delivery {i} of {count} is cut off")
        length = load_u32(p + pos + 32)
        if <Py_ssize_t>length > size - pos - DELIVERY_HEAD_BYTES:
            raise ProtocolError(f"delivery {i} says {length} bytes but "
                                f"{size - pos - DELIVERY_HEAD_BYTES} remain")
        record_bytes[0] += length
        pos += DELIVERY_HEAD_BYTES + length
    return count


def decode_batch(list payloads not None, object owner):
    """Return one MessageBatch of the deliveries of DELIVER payloads.

    payloads are the frames of one FETCH reply, in order. The columns and
    the bodies are copied straight from the payloads, without an object per
    message; owner (a client's queue or group) settles the batch.
    """
    cdef Py_ssize_t frames = len(payloads), k, total = 0, n = 0
    cdef size_t record_bytes = 0, size = 0, used
    cdef const uint8_t *p
    cdef Py_ssize_t pos
    cdef uint32_t count, i, length
    cdef uint8_t *data
    cdef uint64_t *offsets
    cdef uint64_t *receipts
    cdef uint32_t *attempts
    cdef int64_t *timestamps
    cdef uint64_t *lengths
    # None until a delivery with headers comes, as for an embedded batch.
    cdef list headers = None
    cdef bytes payload, buffer
    cdef MessageBatch batch

    for k in range(frames):
        if type(payloads[k]) is not bytes:
            raise TypeError(f"payloads must be bytes, not "
                            f"{type(payloads[k]).__name__}")
        total += check_deliveries(<bytes>payloads[k], &record_bytes)
    batch = new_batch(total)
    batch.count = total
    # Header blocks are left out, so the bodies take record_bytes at most.
    buffer = PyBytes_FromStringAndSize(NULL, record_bytes)
    offsets = <uint64_t *>batch_column(batch, BATCH_OFFSETS)
    receipts = <uint64_t *>batch_column(batch, BATCH_RECEIPTS)
    attempts = <uint32_t *>batch_column(batch, BATCH_ATTEMPTS)
    timestamps = <int64_t *>batch_column(batch, BATCH_TIMESTAMPS)
    lengths = <uint64_t *>batch_column(batch, BATCH_LENGTHS)
    data = <uint8_t *>PyBytes_AS_STRING(buffer)
    for k in range(frames):
        payload = <bytes>payloads[k]
        p = <const uint8_t *>PyBytes_AS_STRING(payload)
        count = load_u32(p)
        pos = 8
        for i in range(count):
            length = load_u32(p + pos + 32)
            offsets[n] = load_u64(p + pos)
            receipts[n] = load_u64(p + pos + 8)
            timestamps[n] = <int64_t>load_u64(p + pos + 16)
            attempts[n] = load_u32(p + pos + 24)
            used = 0
            if load_u32(p + pos + 28) & BATCH_HEADERS:
                if headers is None:
                    headers = [None] * n
                headers.append(decode_headers(
                    p + pos + DELIVERY_HEAD_BYTES, length, &used))
            elif headers is not None:
                headers.append(None)
            memcpy(data + size, p + pos + DELIVERY_HEAD_BYTES + used,
                   length - used)
            lengths[n] = length - used
            size += length - used
            pos += DELIVERY_HEAD_BYTES + length
            n += 1
    batch.data = buffer if size == record_bytes else buffer[:size]
    batch.header_list = headers
    batch.owner = owner
    return batch


def encode_receipts(uint8_t opcode, uint16_t flags, uint32_t request_id,
                    uint32_t handle, items, bytes prefix not None=b"",
                    bytes suffix not None=b"", object owner=None):
    """Return a frame of prefix, u32 count, u64 receipts, then suffix.

    items holds messages, receipts (ints), or is a batch with a numpy
    receipts column. A RemoteMessage or MessageBatch delivered by another
    queue or group than owner raises StaleReceiptError.
    """
    cdef Py_ssize_t count, i, start
    cdef Py_ssize_t head = PyBytes_GET_SIZE(prefix)
    cdef bytes frame
    cdef uint8_t *out
    cdef uint64_t receipt
    cdef const uint8_t[::1] column

    if type(items) is MessageBatch:
        if (<MessageBatch>items).owner is not owner and owner is not None:
            raise StaleReceiptError(
                "the batch was delivered by another queue or group, or by "
                "another connection, not by this queue or group object; to "
                "settle it on this connection, ack its receipts: "
                "ack_many(batch.receipts.tolist())")
        start = BATCH_RECEIPTS * 8 * (<MessageBatch>items).capacity
        raw = memoryview((<MessageBatch>items).columns)[
            start:start + 8 * (<MessageBatch>items).count]
    elif hasattr(items, "receipts") and not isinstance(items, list):
        raw = items.receipts.astype("<u8").tobytes()
    else:
        raw = None
    if raw is not None:
        column = raw
        count = column.shape[0] // 8
        frame = PyBytes_FromStringAndSize(
            NULL, 20 + head + 8 * count + PyBytes_GET_SIZE(suffix))
        out = <uint8_t *>PyBytes_AS_STRING(frame)
        if count:
            memcpy(out + 20 + head, &column[0], 8 * count)
    else:
        if type(items) is not list:
            items = list(items)
        count = len(items)
        frame = PyBytes_FromStringAndSize(
            NULL, 20 + head + 8 * count + PyBytes_GET_SIZE(suffix))
        out = <uint8_t *>PyBytes_AS_STRING(frame)
        for i in range(count):
            item = items[i]
            if type(item) is RemoteMessage:
                if owner is not None and (<RemoteMessage>item).owner is not owner:
                    raise StaleReceiptError(
                        f"message at offset {(<RemoteMessage>item).offset} "
                        f"was delivered by another queue or group, or by "
                        f"another connection, not by this queue or group "
                        f"object; to settle it on this connection, ack its "
                        f"receipt")
                receipt = (<RemoteMessage>item).receipt
            elif type(item) is Message:
                receipt = (<Message>item).receipt
            else:
                receipt = item
            put_u64(out + 20 + head + 8 * i, receipt)
    put_header(out, <uint32_t>(PyBytes_GET_SIZE(frame) - 4), opcode, flags,
               request_id, handle)
    memcpy(out + 16, PyBytes_AS_STRING(prefix), head)
    put_u32(out + 16 + head, <uint32_t>count)
    memcpy(out + 20 + head + 8 * count, PyBytes_AS_STRING(suffix),
           PyBytes_GET_SIZE(suffix))
    return frame


def decode_receipts(bytes payload not None, Py_ssize_t start):
    """Read u32 count and count u64 receipts from payload at start.

    Returns (receipts as a list of ints, the position after them).
    """
    cdef Py_ssize_t end
    cdef list receipts = read_receipts(payload, start, &end)

    return receipts, end


cdef list read_receipts(bytes payload, Py_ssize_t start, Py_ssize_t *end):
    """Return the receipts of the list at start; set end to the position after it."""
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload), i
    cdef uint32_t count
    cdef list receipts

    if start < 0 or size - start < 4:
        raise ProtocolError("receipt list is cut off before its count")
    count = load_u32(p + start)
    if count > <uint32_t>((size - start - 4) // 8):
        raise ProtocolError(f"receipt list says {count} receipts but only "
                            f"{size - start - 4} bytes follow")
    receipts = [None] * count
    for i in range(count):
        receipts[i] = load_u64(p + start + 4 + 8 * i)
    end[0] = start + 4 + 8 * <Py_ssize_t>count
    return receipts


@cython.final
@cython.no_gc
cdef class RemoteMessage:
    """One delivery received from a server: the same fields as Message.

    ack(), nack(), extend() and reject() wait for the server's reply and
    raise its error. They return what the same method of the queue or group
    that delivered the message returns: None from the blocking client, a
    coroutine to await from the asyncio client. For type checkers the
    class is generic in that result: RemoteMessage is RemoteMessage[None],
    and pymq.aio.AsyncMessage names the asyncio client's deliveries.
    """

    def __class_getitem__(cls, item):
        return GenericAlias(cls, item)

    @property
    def headers(self):
        """The message's headers, a dict of str to str."""
        if self.header_map is None:
            self.header_map = {}
        return self.header_map

    def ack(self):
        """Settle this delivery: the message is done."""
        return self.owner.ack(self.receipt)

    def nack(self, delay=0.0):
        """Give the message back, for redelivery after delay seconds."""
        # The owner checks delay, so the error names it as the broker does.
        return self.owner.nack(self.receipt, delay)

    def extend(self, seconds):
        """Set this delivery's deadline to now plus seconds."""
        return self.owner.extend(self.receipt, seconds)

    def reject(self, str reason not None="rejected"):
        """Move the message to the dead-letter queue now, with reason."""
        return self.owner.reject(self.receipt, reason)

    def __repr__(self):
        return (f"<RemoteMessage offset={self.offset} attempt={self.attempt} "
                f"{len(self.body)} bytes>")


PROTOCOL_OPCODES = {
    "HELLO": OP_HELLO, "PING": OP_PING, "OPEN": OP_OPEN, "STATS": OP_STATS,
    "REDRIVE": OP_REDRIVE, "NAMES": OP_NAMES, "GROUPS": OP_GROUPS,
    "PUBLISH": OP_PUBLISH, "FETCH": OP_FETCH, "SUBSCRIBE": OP_SUBSCRIBE,
    "CREDIT": OP_CREDIT, "UNSUBSCRIBE": OP_UNSUBSCRIBE, "CANCEL": OP_CANCEL,
    "DELIVER": OP_DELIVER, "ACK": OP_ACK, "NACK": OP_NACK,
    "EXTEND": OP_EXTEND, "REJECT": OP_REJECT,
}


def keep_large_buffers(int mmap_threshold=64 << 20,
                       int trim_threshold=256 << 20):
    """Keep freed buffers up to mmap_threshold bytes in the heap (glibc).

    The server calls this once: its frames are too large for the default
    thresholds, which return each one to the kernel when it is freed.
    Returns True when the settings were applied.
    """
    return pymq_keep_large_buffers(mmap_threshold, trim_threshold) == 1
