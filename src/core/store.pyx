# SegmentStore bodies: open and recovery, append, read, sync, delete.

from cpython.buffer cimport (PyBUF_ANY_CONTIGUOUS, PyBUF_FORMAT,
                             PyBUF_SIMPLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.string cimport memcpy
from posix.unistd cimport close as close_fd

import fcntl
import logging
import re


cdef extern from "Python.h":
    # Bytes objects behind a PyObject pointer: a list's borrowed item, or a
    # buffer being filled, looked at without taking a reference.
    bint is_exact_bytes "PyBytes_CheckExact" (PyObject *bytes)
    char *bytes_pointer "PyBytes_AS_STRING" (PyObject *bytes)
    Py_ssize_t bytes_length "PyBytes_GET_SIZE" (PyObject *bytes)


DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
MIN_SEGMENT_BYTES = 64
# Bytes of the header in front of every record's body (docs/storage.md).
RECORD_HEADER_BYTES = REC_HEADER_SIZE
# Bytes of the active segment prefaulted when a store opens.
cdef size_t OPEN_PREFAULT_BYTES = 4 * 1024 * 1024
# With reserve_ahead, how long a failed reservation waits before the next
# try, so that appends on a full disk do not each create and delete files.
cdef int64_t RESERVE_RETRY_NS = 1000000000
cdef object storage_logger = logging.getLogger("pymq.storage")
# Largest next offset that ensure_next_offset() and min_next_offset accept.
# It leaves 2**63 offsets before a uint64 offset could wrap around to 0.
MAX_NEXT_OFFSET = 2**63 - 1

cdef dict FSYNC_POLICIES = {
    "never": FSYNC_NEVER,
    "interval": FSYNC_INTERVAL,
    "always": FSYNC_ALWAYS,
}
cdef object SEGMENT_FILE = re.compile(r"^[0-9]{20}\.log$")
# The spare segment's files, renamed to a segment's name when it rolls.
cdef str SPARE_NAME = "spare"
# Files of segments that drop_below() took out of the log, before they are
# unlinked: this prefix, then the segment file's name.
cdef str DROPPED_PREFIX = "dropped-"

cdef enum CollectKind:
    COLLECT_BODIES = 0
    COLLECT_RECORDS = 1
    COLLECT_VIEWS = 2
    COLLECT_TIMESTAMP = 3


cdef long long read_length(Py_buffer *sizes, Py_ssize_t i,
                           bint signed) except? -1:
    """Return lengths[i]; unsigned values above 2**62 return 2**62."""
    cdef const char *item = <const char *>sizes.buf + i * sizes.itemsize

    if sizes.itemsize == 4:
        if signed:
            return (<const int *>item)[0]
        return (<const unsigned int *>item)[0]
    if sizes.itemsize == 8:
        if signed:
            return (<const long long *>item)[0]
        if (<const unsigned long long *>item)[0] > (
                <unsigned long long>1 << 62):
            # No buffer is this large, so the caller reports the length as
            # past the end of buffer.
            return <long long>1 << 62
        return (<const unsigned long long *>item)[0]
    raise TypeError(f"lengths items must be 4 or 8 bytes, not "
                    f"{sizes.itemsize}")


def make_directories(path):
    """Create path and its missing parents, syncing each new entry.

    A folder that was created but whose entry in its parent was never
    synced can vanish in a power loss, and the records in it with it.
    """
    path = os.path.abspath(os.fsdecode(path))
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
        fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_store_options(segment_bytes, max_message_bytes, fsync):
    """Check store options; return max_message_bytes with its default applied.

    Raises ConfigError (a ValueError) naming the option, its value and its
    range, or TypeError for a value of the wrong type.
    """
    cdef size_t largest

    check_integer("segment_bytes", segment_bytes)
    if max_message_bytes is not None:
        check_integer("max_message_bytes", max_message_bytes)
    if not MIN_SEGMENT_BYTES <= segment_bytes <= MAX_SEGMENT_BYTES:
        raise ConfigError(
            f"segment_bytes is {segment_bytes}; it must be from "
            f"{MIN_SEGMENT_BYTES} to {MAX_SEGMENT_BYTES}")
    if segment_bytes % REC_ALIGN:
        raise ConfigError(
            f"segment_bytes is {segment_bytes}; it must be a multiple "
            f"of {REC_ALIGN}")
    largest = segment_bytes - REC_HEADER_SIZE
    if max_message_bytes is None:
        max_message_bytes = min(DEFAULT_MAX_MESSAGE_BYTES, largest)
    if not 0 <= max_message_bytes <= largest:
        raise ConfigError(
            f"max_message_bytes is {max_message_bytes}; it must be from "
            f"0 to {largest} (segment_bytes minus the "
            f"{REC_HEADER_SIZE}-byte record header)")
    if not isinstance(fsync, str) or fsync not in FSYNC_POLICIES:
        raise ConfigError(
            f"fsync is {fsync!r}; it must be one of "
            f"{', '.join(map(repr, FSYNC_POLICIES))}")
    return max_message_bytes


cdef check_integer(str name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")


@cython.final
cdef class DirectoryLock:
    """An exclusive flock on a file in a folder, held until release().

    A second lock of the same folder fails in any process, this one
    included, because flock locks belong to each open of the file.
    """

    def __cinit__(self, str directory, str name="LOCK"):
        cdef int fd

        self.fd = -1
        self.path = os.path.join(directory, name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            pid = int(text) if text.isdigit() else None
            raise BrokerLockedError(directory, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        self.fd = fd

    def __dealloc__(self):
        # libc's close: at interpreter exit the os module may be gone.
        if self.fd >= 0:
            close_fd(self.fd)

    cpdef release(self):
        """Release the lock; calling it again does nothing."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@cython.final
cdef class SegmentStore:
    """An append-only log of records in a folder of segment files.

    Every method is thread-safe. Offsets start at 0 and grow by one per
    record; they never go back, and after damage or ensure_next_offset()
    some of them have no record (a gap).

    Durability by fsync policy: "always" returns from append after the
    record is on stable storage (concurrent appenders share one sync);
    "interval" leaves syncing to flush(), which pymq.storage calls on a
    timer; "never" leaves it to the operating system. A record is in the
    shared mapping when append returns, so it survives a crash of the
    process under every policy. close() flushes.
    """

    def __cinit__(self):
        self.lock = pymq_lock_new()
        self.sync_lock = pymq_mutex_new()
        self.commit_state = pymq_commit_new()
        if self.commit_state == NULL:
            raise MemoryError()
        if self.lock == NULL or self.sync_lock == NULL:
            raise MemoryError()
        self.segments = []
        self.pending = []
        self.dropped = []
        self.closed = True

    def __init__(self, path, *, segment_bytes=DEFAULT_SEGMENT_BYTES,
                 max_message_bytes=None, fsync="interval",
                 uint64_t min_next_offset=0, on_damage=None,
                 bint reserve_ahead=False):
        max_message_bytes = check_store_options(segment_bytes,
                                                max_message_bytes, fsync)
        if on_damage is not None and not callable(on_damage):
            raise TypeError("on_damage must be callable or None")
        if min_next_offset > MAX_NEXT_OFFSET:
            raise ConfigError(
                f"min_next_offset is {min_next_offset}; it must be at most "
                f"{MAX_NEXT_OFFSET}")

        self.path = os.path.abspath(os.fsdecode(path))
        self.segment_bytes = segment_bytes
        self.max_message_bytes = max_message_bytes
        self.policy = FSYNC_POLICIES[fsync]
        self.on_damage = on_damage
        self.reserve_ahead = reserve_ahead
        make_directories(self.path)
        self.owner_lock = DirectoryLock(self.path)
        try:
            self.open_segments(min_next_offset)
        except BaseException:
            for seg in self.segments:
                (<Segment>seg).release()
            self.segments = []
            if self.spare is not None:
                self.spare.release()
                self.spare = None
            self.owner_lock.release()
            raise
        self.closed = False
        self.report()

    def __dealloc__(self):
        if self.lock != NULL:
            pymq_lock_free(self.lock)
        if self.sync_lock != NULL:
            pymq_mutex_free(self.sync_lock)
        pymq_commit_free(self.commit_state)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return f"<SegmentStore {self.path!r} {state}>"

    # Locking -------------------------------------------------------------

    cdef int acquire(self) except -1:
        """Take lock, waiting without the GIL; raise if the store closed."""
        self.acquire_raw()
        if self.closed:
            pymq_lock_unlock(self.lock)
            raise ClosedError(f"segment store {self.path} is closed")
        return 0

    cdef int acquire_raw(self) except -1:
        """Take lock, waiting without the GIL, whether closed or not."""
        take_lock(self.lock)
        return 0

    cdef void release(self) noexcept:
        pymq_lock_unlock(self.lock)

    cdef int acquire_sync(self) except -1:
        lock_without_gil(self.sync_lock)
        return 0

    cdef int check_size(self, size_t length) except -1:
        if length > self.max_message_bytes:
            raise MessageTooLargeError(length, self.max_message_bytes)
        return 0

    # Opening -------------------------------------------------------------

    cdef int open_segments(self, uint64_t min_next_offset) except -1:
        cdef Segment seg, previous = None
        cdef uint64_t previous_end

        if self.reserve_ahead:
            # Kept by close(): the reserve outlives a restart, so that no
            # other writer can take its space meanwhile.
            self.spare = Segment.open_spare(self.path, SPARE_NAME)
            if self.spare is not None and self.spare.capacity < record_size(
                    self.max_message_bytes):
                self.spare.release()
                self.spare = None
        if self.spare is None:
            for suffix in (".log", ".idx"):
                try:
                    os.unlink(os.path.join(self.path, SPARE_NAME + suffix))
                except FileNotFoundError:
                    pass
        names = sorted(name for name in os.listdir(self.path)
                       if SEGMENT_FILE.match(name))
        for name in os.listdir(self.path):
            # An index whose log is gone: deletion unlinks the log first, and
            # a crash can come between the two. Files of dropped segments
            # whose unlink a crash prevented go too.
            if (name.endswith(".idx") and len(name) == 24 and
                    name[:20] + ".log" not in names and name[:20].isdigit()
                    or name.startswith(DROPPED_PREFIX)):
                os.unlink(os.path.join(self.path, name))
        for i, name in enumerate(names):
            seg = Segment.open(os.path.join(self.path, name), int(name[:20]),
                               self.segment_bytes, i == len(names) - 1)
            if seg.data == NULL:
                seg.events.append(
                    f"segment {name}: empty file removed")
                seg.release()
                os.unlink(seg.path)
                if os.path.exists(seg.index_path):
                    os.unlink(seg.index_path)
                self.report_events(seg)
                continue
            if previous is not None:
                previous_end = previous.base + previous.count
                if seg.base < previous_end:
                    seg.events.append(
                        f"segment {name}: starts at offset {seg.base}, "
                        f"inside the previous segment (which ends at "
                        f"{previous_end}); ignored")
                    seg.release()
                    self.report_events(seg)
                    continue
            self.segments.append(seg)
            self.stored_bytes += seg.length
            previous = seg
        self.active = None

        if not self.segments:
            self.install(self.new_segment(min_next_offset))
        else:
            last = len(self.segments) - 1
            for seg in self.segments[:last]:
                seg.sealed = True
                if not seg.checkpoint_flags & IDX_SEALED:
                    self.pending.append(seg)
            self.active = self.segments[last]
            seg = self.active
            if seg.checkpoint_flags:
                # Appends resume in the last segment: its header must stop
                # saying sealed or clean before a record lands past it.
                seg.sealed = False
                seg.write_checkpoint(seg.checkpoint_length,
                                     seg.checkpoint_count, 0, True)
        # Left as it is: files created while opening are made durable by the
        # first sync, with the folder that lists them.
        self.events_pending = True
        # Only the next few MiB: a store that is opened and barely used
        # should not fault in a whole segment.
        self.active.start_prefault(self.active.length, OPEN_PREFAULT_BYTES)
        if min_next_offset > self.active.base + self.active.count:
            self.skip_to(min_next_offset)
        if self.reserve_ahead:
            # A failure is logged and tried again later: the store still
            # opens on a full disk.
            self.refill_reserve()
        return 0

    cdef report_events(self, Segment seg):
        if self.on_damage is not None:
            for message in seg.events:
                self.on_damage(message)
        seg.events.clear()

    # Appending -----------------------------------------------------------

    def append(self, body, *, int64_t timestamp=0, uint32_t flags=0):
        """Append one record and return its offset.

        body is bytes or any contiguous buffer, and may be empty. A body
        larger than max_message_bytes raises MessageTooLargeError before
        anything is written. timestamp is in ns since the epoch (0: now).
        """
        cdef BodyRef ref
        cdef Py_buffer view
        cdef uint64_t first

        if type(body) is bytes:
            ref.data = <const uint8_t *>PyBytes_AS_STRING(body)
            ref.length = PyBytes_GET_SIZE(body)
            self.append_refs(&ref, 1, timestamp, flags, &first)
            return first
        PyObject_GetBuffer(body, &view, PyBUF_SIMPLE | PyBUF_ANY_CONTIGUOUS)
        try:
            ref.data = <const uint8_t *>view.buf
            ref.length = view.len
            self.append_refs(&ref, 1, timestamp, flags, &first)
        finally:
            PyBuffer_Release(&view)
        return first

    def append_many(self, bodies, *, int64_t timestamp=0, uint32_t flags=0):
        """Append every body in order and return the first offset.

        The records take consecutive offsets. Either all are written or,
        when a check or a reservation of disk space fails, none.
        """
        cdef list items = bodies if type(bodies) is list else list(bodies)
        cdef uint64_t first

        if PyList_GET_SIZE(items) == 0:
            return self.next_offset
        self.append_list(items, timestamp, flags, &first)
        return first

    cdef int append_list(self, list items, int64_t timestamp, uint32_t flags,
                         uint64_t *first) except -1:
        """append_many() of a list of one or more bytes-like bodies."""
        cdef Py_ssize_t count = PyList_GET_SIZE(items)
        cdef Py_ssize_t i
        cdef BodyRef small[SMALL_BATCH]
        cdef BodyRef *refs = small
        cdef list views = None
        cdef object item
        cdef PyObject *borrowed
        cdef const uint8_t[::1] buffer

        if count > SMALL_BATCH:
            refs = <BodyRef *>PyMem_Malloc(count * sizeof(BodyRef))
            if refs == NULL:
                raise MemoryError()
        try:
            for i in range(count):
                # Borrowed, and looked at without a new reference first: a
                # bytes body, the common case, costs no reference count.
                borrowed = PyList_GET_ITEM(items, i)
                if is_exact_bytes(borrowed):
                    refs[i].data = <const uint8_t *>bytes_pointer(borrowed)
                    refs[i].length = bytes_length(borrowed)
                else:
                    item = <object>borrowed
                    buffer = memoryview(item).cast("B")
                    if views is None:
                        views = []
                    views.append(buffer)
                    refs[i].data = &buffer[0] if buffer.shape[0] else NULL
                    refs[i].length = buffer.shape[0]
            self.append_refs(refs, count, timestamp, flags, first)
        finally:
            if refs != small:
                PyMem_Free(refs)
        return 0

    def append_buffer(self, buffer, lengths, *, int64_t timestamp=0,
                      uint32_t flags=0):
        """Append the bodies packed in one buffer and return the first offset.

        lengths is a 1-D array of integers (numpy int32, int64, uint32 or
        uint64, or array.array) whose sum is the size of buffer. The
        buffer is copied into the log; nothing keeps a reference to it.
        """
        cdef Py_buffer data, sizes
        cdef BodyRef *refs = NULL
        cdef Py_ssize_t count, i
        cdef size_t position = 0
        cdef long long length
        cdef uint64_t first
        cdef bint signed

        PyObject_GetBuffer(buffer, &data, PyBUF_SIMPLE | PyBUF_ANY_CONTIGUOUS)
        try:
            PyObject_GetBuffer(lengths, &sizes,
                               PyBUF_FORMAT | PyBUF_ANY_CONTIGUOUS)
            try:
                fmt = (sizes.format or b"B").lstrip(b"@=<")
                if sizes.ndim != 1 or fmt not in (b"i", b"I", b"l", b"L",
                                                  b"q", b"Q"):
                    raise TypeError(
                        f"lengths must be a 1-D array of 32- or 64-bit "
                        f"integers, not format {fmt.decode()!r} with "
                        f"{sizes.ndim} dimensions")
                signed = fmt in (b"i", b"l", b"q")
                count = sizes.shape[0]
                if count == 0:
                    if data.len:
                        raise ValueError(
                            f"lengths is empty but buffer has {data.len} "
                            f"bytes")
                    return self.next_offset
                refs = <BodyRef *>PyMem_Malloc(count * sizeof(BodyRef))
                if refs == NULL:
                    raise MemoryError()
                for i in range(count):
                    length = read_length(&sizes, i, signed)
                    if length < 0:
                        raise ValueError(
                            f"lengths[{i}] is {length}; lengths must not "
                            f"be negative")
                    if <size_t>length > <size_t>data.len - position:
                        raise ValueError(
                            f"lengths add up past the end of buffer "
                            f"({data.len} bytes) at lengths[{i}]")
                    refs[i].data = <const uint8_t *>data.buf + position
                    refs[i].length = <size_t>length
                    position += <size_t>length
                if position != <size_t>data.len:
                    raise ValueError(
                        f"lengths add up to {position} bytes but buffer has "
                        f"{data.len}")
                self.append_refs(refs, count, timestamp, flags, &first)
            finally:
                PyBuffer_Release(&sizes)
        finally:
            PyMem_Free(refs)
            PyBuffer_Release(&data)
        return first

    cdef int append_refs(self, const BodyRef *bodies, Py_ssize_t count,
                         int64_t timestamp, uint32_t flags,
                         uint64_t *first) except -1:
        cdef uint64_t written

        self.append_unsynced(bodies, count, timestamp, flags, first, &written)
        if self.policy == FSYNC_ALWAYS:
            self.sync_to(written)
        return 0

    cdef int append_unsynced(self, const BodyRef *bodies, Py_ssize_t count,
                             int64_t timestamp, uint32_t flags,
                             uint64_t *first, uint64_t *written) except -1:
        """Append without the sync of "always"; the caller calls sync_to.

        written is set to what sync_to must cover.
        """
        cdef Py_ssize_t i

        for i in range(count):
            self.check_size(bodies[i].length)
        if timestamp == 0:
            timestamp = realtime_ns()
        self.acquire()
        try:
            self.append_locked(bodies, count, timestamp, flags, first)
            written[0] = self.written_bytes
        finally:
            self.release()
        return 0

    cdef int append_locked(self, const BodyRef *bodies, Py_ssize_t count,
                           int64_t timestamp, uint32_t flags,
                           uint64_t *first) except -1:
        cdef Segment seg = self.active
        cdef Py_ssize_t i, used = 0
        cdef size_t size, total = 0
        cdef list fresh

        first[0] = seg.base + seg.count
        if count == 1 and record_size(bodies[0].length) <= (
                seg.capacity - seg.length):
            if (IDX_HEADER_SIZE + (seg.count + 1) * IDX_ENTRY_SIZE >
                    seg.index_alloc):
                seg.ensure_index(seg.count + 1)
            seg.write_record(bodies[0].data, bodies[0].length, timestamp,
                             flags)
            self.written_bytes += record_size(bodies[0].length)
            self.stored_bytes += record_size(bodies[0].length)
            self.after_append(seg)
            return 0

        for i in range(count):
            if bodies[i].length >= NOGIL_BODY_BYTES:
                total = 0
                break
            total += record_size(bodies[i].length)
        if (total and total <= seg.capacity - seg.length and
                IDX_HEADER_SIZE + (seg.count + count) * IDX_ENTRY_SIZE <=
                seg.index_alloc):
            seg.write_records(bodies, count, timestamp, flags)
            self.written_bytes += total
            self.stored_bytes += total
            self.after_append(seg)
            return 0

        fresh = []
        self.reserve(bodies, count, fresh)
        for i in range(count):
            size = record_size(bodies[i].length)
            if size > seg.capacity - seg.length:
                seg = <Segment>fresh[used]
                used += 1
                self.install(seg)
            seg.write_record(bodies[i].data, bodies[i].length, timestamp,
                             flags)
            self.written_bytes += size
            self.stored_bytes += size
        self.after_append(seg)
        return 0

    cdef int after_append(self, Segment seg) except -1:
        """Keep the reserve, the spare and the prefault up with seg's end."""
        if self.reserve_ahead:
            if (self.spare is None or seg.index_alloc < seg.index_max or
                    (not self.spare_warm and seg.length > seg.capacity // 2)):
                # keep_reserve() has nothing to do otherwise.
                self.keep_reserve(seg)
        elif (self.spare is None and seg.length > seg.capacity // 2 and
                self.segment_bytes >= PREFAULT_MIN_BYTES and
                not self.spare_failed):
            self.make_spare()
        if 2 * seg.length > seg.prefault_base + seg.prefault_end:
            self.follow_prefault(seg)
        return 0

    cdef int follow_prefault(self, Segment seg) except -1:
        """Double what is prefaulted of seg, whose appends passed its middle.

        Appends that pass the middle of the prefaulted pages start a thread
        for as many pages again, so a busy segment is soon prefaulted to
        its end while one that takes a few MiB has at most four times what
        it holds (4 MiB at least) in memory. A segment that was never
        prefaulted (prefault_end 0) is left to its writer, as are the last
        few pages of a segment. While the thread of the last prefault
        still runs, a later append tries again: the thread runs at the
        lowest priority, and waiting for it to stop could stall this
        append on a busy machine.
        """
        if seg.prefault_end == 0:
            seg.prefault_done()
        elif (seg.prefault_end < seg.capacity and
                not pymq_prefault_busy(&seg.prefault)):
            # The pages up to prefault_end are touched already. Starting
            # past them keeps the thread off the pages the writer is about
            # to fault in.
            seg.start_prefault(max(seg.length, seg.prefault_end),
                               seg.prefault_end - seg.prefault_base)
        return 0

    cdef int reserve(self, const BodyRef *bodies, Py_ssize_t count,
                     list fresh) except -1:
        """Create the segments and index space a batch needs, or none.

        Every new segment is preallocated here, so a full disk raises
        before the first record of the batch is written.
        """
        cdef Segment seg = self.active
        cdef size_t used = seg.length, capacity = seg.capacity, size
        cdef uint64_t entries = seg.count, base = seg.base
        cdef Py_ssize_t i

        try:
            for i in range(count):
                size = record_size(bodies[i].length)
                if size > capacity - used:
                    seg.ensure_index(entries)
                    base += entries
                    seg = self.new_segment(base)
                    fresh.append(seg)
                    used = 0
                    capacity = seg.capacity
                    entries = 0
                used += size
                entries += 1
            seg.ensure_index(entries)
        except BaseException:
            for seg in fresh:
                seg.release()
                os.unlink(seg.path)
                os.unlink(seg.index_path)
            fresh.clear()
            raise
        return 0

    cdef Segment new_segment(self, uint64_t base):
        """Return an empty segment for base: the spare, or a new one."""
        cdef Segment seg = self.spare

        if seg is None:
            return Segment.create(self.path, segment_name(base), base,
                                  self.segment_bytes, self.reserve_ahead)
        self.spare = None
        try:
            seg.rename_to(self.path, base)
        except BaseException:
            if os.path.basename(seg.path) == SPARE_NAME + ".log":
                # Still the spare, files and all: the next roll tries again.
                self.spare = seg
            else:
                seg.release()
            raise
        return seg

    cdef int make_spare(self) except -1:
        """Create the next segment early, so its pages fault in meanwhile."""
        try:
            self.spare = Segment.create(self.path, SPARE_NAME, 0,
                                        self.segment_bytes, self.reserve_ahead)
            # A reserved spare may wait long for its rollover: its pages are
            # touched only once the active segment is half full.
            self.spare_warm = not self.reserve_ahead
            if self.spare_warm:
                self.spare.start_prefault(0, self.segment_bytes)
        except OSError as exc:
            # A full disk, say: the next roll creates its segment itself
            # and raises there if it still fails.
            self.spare_failed = True
            if self.reserve_ahead:
                self.reserve_failed("its next segment", exc)
        return 0

    cdef bint reserve_index(self, Segment seg) except -1:
        """Preallocate seg's whole index; False (logged) when it fails."""
        if seg.data == NULL or seg.index_alloc >= seg.index_max:
            return True
        try:
            seg.ensure_index(seg.capacity // REC_HEADER_SIZE)
        except OSError as exc:
            self.reserve_failed(
                f"the index of {os.path.basename(seg.path)}", exc)
            return False
        return True

    cdef int refill_reserve(self) except -1:
        """reserve_ahead: reserve the active index and a spare, if missing.

        A failure is logged once, on the first failure after a success, and
        tried again after RESERVE_RETRY_NS, at an append or a flush.
        """
        if not self.reserve_index(self.active):
            return 0
        if self.spare is None:
            self.make_spare()
            if self.spare is None:
                return 0
        if self.reserve_lost:
            self.reserve_lost = False
            storage_logger.warning(
                "segment store %s: disk space for the next segment is "
                "reserved again", self.path)
        return 0

    cdef int keep_reserve(self, Segment seg) except -1:
        """reserve_ahead, after an append to seg (the active segment)."""
        if ((self.spare is None or seg.index_alloc < seg.index_max) and
                coarse_monotonic_ns() >= self.spare_retry_ns):
            self.refill_reserve()
        if (self.spare is not None and not self.spare_warm and
                seg.length > seg.capacity // 2):
            self.spare_warm = True
            self.spare.start_prefault(0, self.spare.capacity)
        return 0

    cdef int reserve_failed(self, str what, object exc) except -1:
        self.spare_retry_ns = coarse_monotonic_ns() + RESERVE_RETRY_NS
        if not self.reserve_lost:
            self.reserve_lost = True
            storage_logger.warning(
                "segment store %s: cannot reserve disk space for %s: %s; "
                "appends go on until the active segment and the spare are "
                "used up, and it is tried again meanwhile", self.path, what,
                exc)
        return 0

    cdef bint recycle(self, Segment seg) except -1:
        """Make a segment that delete_below() drops the spare, keeping its
        disk space; False when it cannot be reused (it is then deleted).

        A store that had to roll into its spare on a full disk gets its
        reserve back this way, without asking the disk for space that
        another writer may have taken meanwhile.
        """
        if (seg.exports > 0 or seg.data == NULL or
                seg.capacity < record_size(self.max_message_bytes)):
            return False
        try:
            seg.recycle(self.path, SPARE_NAME)
        except OSError as exc:
            self.warn_not_reused(seg, exc)
            return False
        self.spare = seg
        self.spare_failed = False
        # Its pages are in memory already: they held the dropped records.
        self.spare_warm = True
        self.reserve_index(seg)
        self.refill_reserve()
        return True

    cdef int warn_not_reused(self, Segment seg, object error) except -1:
        storage_logger.warning(
            "segment store %s: could not reuse %s as the spare: %s",
            self.path, os.path.basename(seg.path), error)
        return 0

    cdef int install(self, Segment seg) except -1:
        """Make seg the active segment; the previous one is sealed."""
        self.spare_failed = False
        if self.active is not None:
            self.active.sealed = True
            self.pending.append(self.active)
        self.segments.append(seg)
        self.active = seg
        self.installs += 1
        self.tail_synced = False
        self.directory_dirty = True
        if self.reserve_ahead:
            self.refill_reserve()
        return 0

    cdef int skip_to(self, uint64_t offset) except -1:
        """Move the next offset up to offset, leaving a gap below it."""
        cdef Segment seg = self.active
        cdef uint64_t skipped = offset - (seg.base + seg.count)

        if seg.count == 0:
            # An empty active segment is renamed rather than left behind.
            seg.rename_to(self.path, offset)
            self.directory_dirty = True
        else:
            self.install(self.new_segment(offset))
        return 0

    def ensure_next_offset(self, uint64_t offset):
        """Make the next append take at least offset; return offsets skipped.

        The broker calls this on open with the highest offset its groups
        have seen, so offsets lost with a cut tail are never reused.
        """
        cdef uint64_t skipped = 0

        if offset > MAX_NEXT_OFFSET:
            raise ValueError(
                f"offset is {offset}; it must be at most {MAX_NEXT_OFFSET}")
        self.acquire()
        try:
            if offset > self.active.base + self.active.count:
                skipped = offset - (self.active.base + self.active.count)
                self.skip_to(offset)
        finally:
            self.release()
        return skipped

    # Syncing -------------------------------------------------------------

    cdef int sync_to(self, uint64_t written) except -1:
        """Return once the first written bytes of this session are synced.

        Group commit: one thread syncs at a time. Threads that arrive
        meanwhile wait for it to end, and all of them are covered by it or
        by the next sync, which one of them leads (see includes/commit.h).
        Waiting, and a sync of the active segment's tail alone, need no GIL,
        so a thread that a sync leaves uncovered waits again without it.
        """
        cdef int error = 0
        cdef int lead
        cdef int64_t started

        if self.synced_bytes >= written:
            return 0
        # Counted once per call: a leader that ran a sync with the GIL comes
        # back to commit(), and a second count would make a lone thread
        # wait in pymq_commit_gather() for an arrival that never comes.
        pymq_commit_arrive(self.commit_state)
        while True:
            with nogil:
                lead = self.commit(written, &started, &error)
            if not lead:
                break
            try:
                self.acquire_sync()
                try:
                    if not self.closed:
                        self.sync_segments(True, False)
                finally:
                    pymq_mutex_unlock(self.sync_lock)
            finally:
                with nogil:
                    pymq_commit_end(self.commit_state, started)
        if error:
            raise self.sync_error(error)
        if self.synced_bytes < written:
            # Closed meanwhile: close() syncs under sync_lock, so wait for it
            # and report a record it could not sync.
            self.acquire_sync()
            pymq_mutex_unlock(self.sync_lock)
            if self.synced_bytes < written:
                raise ClosedError(
                    f"segment store {self.path} was closed before the record "
                    f"was synced; it may or may not be stored")
        return 0

    cdef int commit(self, uint64_t written, int64_t *started,
                    int *error) noexcept nogil:
        """Wait for, or lead, a sync covering the first written bytes.

        Returns 0 once they are synced, the store is closed, or a sync this
        thread led failed (error is then set to its errno). Returns 1 when
        this thread leads a sync that needs the GIL: the caller runs it and
        then calls pymq_commit_end() with started. The caller has counted
        this thread with pymq_commit_arrive() once, before the first call.
        """
        cdef uint32_t seen
        cdef int outcome

        while True:
            seen = pymq_commit_seq(self.commit_state)
            if (pymq_load_u64(&self.synced_bytes) >= written
                    or self.closed):
                return 0
            if not pymq_commit_lead(self.commit_state):
                # The sync under way, or the next one, covers these bytes.
                pymq_commit_wait(self.commit_state, seen)
                continue
            if pymq_load_u64(&self.synced_bytes) >= written:
                # A sync that ended between the check above and the lead
                # covered them: lead nothing, but wake any waiter.
                pymq_commit_end(self.commit_state, 0)
                return 0
            started[0] = pymq_commit_gather(self.commit_state)
            outcome = self.sync_tail()
            if outcome < 0:
                return 1
            pymq_commit_end(self.commit_state, started[0])
            if outcome > 0:
                error[0] = outcome
                return 0

    cdef int sync_tail(self) noexcept nogil:
        """Sync the active segment's unsynced bytes when nothing else is.

        Returns 0 when synced_bytes now covers every byte appended before
        the call, the errno when msync failed, and -1 when the sync needs
        sync_segments: a pending segment or the folder is unsynced, a sync
        failed with EIO, or the store is closed.
        """
        cdef uint8_t *data
        cdef size_t start, stop
        cdef uint64_t count, target, installs
        cdef int error

        pymq_mutex_lock(self.sync_lock)
        pymq_lock_lock(self.lock)
        if (self.closed or not self.tail_synced or self.directory_dirty
                or self.sync_eio):
            pymq_lock_unlock(self.lock)
            pymq_mutex_unlock(self.sync_lock)
            return -1
        # The active segment stays mapped while sync_lock is held, even if
        # an append replaces it meanwhile.
        data = self.active.data
        start = self.active.synced_length
        stop = self.active.length
        count = self.active.count
        target = self.written_bytes
        installs = self.installs
        pymq_lock_unlock(self.lock)

        error = sync_mapped(data, start, stop)
        if error == 0:
            pymq_lock_lock(self.lock)
            # Once replaced, the segment is pending, and the next sync goes
            # through sync_segments, which syncs it from its older length.
            if self.installs == installs and stop > self.active.synced_length:
                self.active.synced_length = stop
                self.active.synced_count = count
            pymq_lock_unlock(self.lock)
            if target > self.synced_bytes:
                pymq_store_u64(&self.synced_bytes, target)
        elif error == EIO:
            self.sync_eio = True
        pymq_mutex_unlock(self.sync_lock)
        return error

    cdef object sync_error(self, int error):
        if error == EIO:
            # After a failed writeback the kernel may mark the pages clean,
            # so a later sync would succeed without writing them: every
            # later sync fails too, until the store is reopened.
            return OSError(
                EIO, f"segment store {self.path}: a sync failed with EIO, so "
                f"records since the last good sync may not be on stable "
                f"storage; close and reopen the store")
        return OSError(error, f"msync in segment store {self.path} failed: "
                              f"{os.strerror(error)}")

    cdef int sync_segments(self, bint include_active,
                           bint checkpoint) except -1:
        """Sync the pending segments (and the active one) outside lock.

        The caller holds sync_lock, so no segment in the snapshot is
        deleted or unmapped while its bytes are synced.
        """
        cdef Segment seg
        cdef list work = []
        cdef uint64_t target, installs
        cdef bint directory_dirty

        self.acquire_raw()
        try:
            target = self.written_bytes
            installs = self.installs
            segments = list(self.pending)
            if include_active:
                segments.append(self.active)
            for seg in segments:
                work.append((seg, seg.synced_length, seg.length, seg.count))
            directory_dirty = self.directory_dirty
            self.directory_dirty = False
        finally:
            self.release()

        if self.sync_eio:
            raise self.sync_error(EIO)
        try:
            for seg, start, stop, count in work:
                seg.sync_range(start, stop)
            if directory_dirty:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            self.directory_dirty = self.directory_dirty or directory_dirty
            if exc.errno == EIO:
                self.sync_eio = True
                raise self.sync_error(EIO) from exc
            raise
        except BaseException:
            self.directory_dirty = self.directory_dirty or directory_dirty
            raise

        for seg, start, stop, count in work:
            if stop > seg.synced_length:
                seg.synced_length = stop
                seg.synced_count = count
        if include_active and target > self.synced_bytes:
            pymq_store_u64(&self.synced_bytes, target)
        if include_active:
            self.acquire_raw()
            # The pending segments were synced: unless the active one was
            # replaced meanwhile, only its tail can be unsynced now.
            if self.installs == installs:
                self.tail_synced = True
            self.release()
        if not checkpoint:
            return 0

        for seg, start, stop, count in work:
            flags = IDX_SEALED if (
                seg.sealed and seg.synced_length == seg.length) else 0
            if (seg.checkpoint_length != seg.synced_length or
                    seg.checkpoint_flags != flags):
                seg.write_checkpoint(seg.synced_length, seg.synced_count,
                                     flags, True)
        self.acquire_raw()
        try:
            self.pending = [seg for seg in self.pending
                            if not seg.checkpoint_flags & IDX_SEALED]
        finally:
            self.release()
        return 0

    def flush(self):
        """Sync every record appended so far and write checkpoints.

        Reopening verifies only what lies past the last checkpoint.
        """
        self.acquire_sync()
        try:
            if self.closed:
                raise ClosedError(f"segment store {self.path} is closed")
            try:
                self.sync_segments(True, True)
            finally:
                if self.dropped:
                    self.unlink_dropped()
        finally:
            pymq_mutex_unlock(self.sync_lock)

    def background_flush(self):
        """Do the periodic work of the fsync policy.

        "interval" and "always" flush everything; "never" syncs and
        checkpoints only sealed segments, so that reopening stays fast.
        """
        self.acquire_sync()
        try:
            if self.closed:
                return
            if self.reserve_ahead and self.spare is None:
                # Tried here too, so that a reserve lost to a full disk
                # comes back without waiting for an append.
                self.acquire()
                try:
                    if (self.spare is None and
                            coarse_monotonic_ns() >= self.spare_retry_ns):
                        self.refill_reserve()
                finally:
                    self.release()
            try:
                self.sync_segments(self.policy != FSYNC_NEVER, True)
            finally:
                if self.dropped:
                    self.unlink_dropped()
        finally:
            pymq_mutex_unlock(self.sync_lock)

    def segment_ranges(self):
        """Return (first offset, offsets covered, bytes used) per segment."""
        cdef Segment seg

        self.acquire()
        try:
            return [(seg.base, seg.count, seg.length) for seg in self.segments]
        finally:
            self.release()

    def synced_lengths(self):
        """Return {segment path: bytes known to be on stable storage}.

        A segment counts what this store synced since it opened, or what
        its checkpoint covers when that is more. Records that an earlier
        process synced past the checkpoint count from the next sync.
        """
        self.acquire()
        try:
            return {seg.path: (<Segment>seg).synced_length
                    for seg in self.segments}
        finally:
            self.release()

    # Reading -------------------------------------------------------------

    cdef Segment find(self, uint64_t offset):
        cdef Segment seg = self.last_read
        cdef Py_ssize_t low, high, middle

        if (seg is not None and seg.base <= offset and
                offset - seg.base < seg.count):
            return seg
        seg = self.active
        if offset < seg.base:
            low = 0
            high = len(self.segments) - 1
            while low < high:
                middle = (low + high + 1) // 2
                if (<Segment>self.segments[middle]).base <= offset:
                    low = middle
                else:
                    high = middle - 1
            seg = <Segment>self.segments[low]
        if offset < seg.base or offset - seg.base >= seg.count:
            return None
        self.last_read = seg
        return seg

    cdef int locate(self, uint64_t offset, uint32_t *pos) except -1:
        """Find offset's record; set last_read and pos when FOUND."""
        cdef Segment seg = self.find(offset)
        cdef uint32_t position
        cdef size_t size, found

        if seg is None:
            first = (<Segment>self.segments[0]).base
            if first <= offset < self.active.base + self.active.count:
                return NO_RECORD
            return OUT_OF_RANGE
        position = seg.position(offset)
        if position == IDX_MISSING:
            return NO_RECORD
        if seg.check_at(offset, position) == 0:
            pos[0] = position
            return FOUND

        self.events_pending = True
        # Before calling the record damaged, look for it elsewhere in the
        # segment: a wrong index entry must not hide a sound record.
        with nogil:
            found = find_record(seg.data, seg.length, 0, offset, offset + 1,
                                &size)
        if found < seg.length:
            store_u32(seg.index_entry(offset), <uint32_t>found)
            seg.events.append(
                f"segment {os.path.basename(seg.path)}: index entry of offset "
                f"{offset} pointed to byte {position}, not {found}; fixed")
            pos[0] = <uint32_t>found
            return FOUND
        seg.mark_damaged(offset, position, "checksum mismatch")
        return DAMAGED

    cdef object lookup_error(self, int status, uint64_t offset):
        """Return the exception for a lookup that did not find a record."""
        cdef uint64_t first = (<Segment>self.segments[0]).base
        cdef uint64_t end = self.active.base + self.active.count

        if status == DAMAGED:
            return CorruptSegmentError(
                f"segment {os.path.basename(self.last_read.path)}: record "
                f"at offset {offset} failed its checksum",
                path=self.last_read.path, offset=offset)
        if status == NO_RECORD:
            return OffsetNotFoundError(
                f"offset {offset} in {self.path} has no record: it was "
                f"lost to damage or skipped", offset, first, end)
        if first == end:
            where = "the log is empty"
        else:
            where = f"the log has offsets {first} to {end - 1}"
        return OffsetNotFoundError(
            f"offset {offset} is not in {self.path}: {where}",
            offset, first, end)

    cdef object make_item(self, Segment seg, uint32_t pos, uint64_t offset,
                          int kind, object view):
        """Build the body, record tuple or view of the record at pos."""
        cdef const uint8_t *header = seg.data + pos
        cdef size_t length = load_u32(header + REC_OFF_LENGTH)
        cdef bytes body
        cdef char *target

        if kind == COLLECT_VIEWS:
            return view[pos + REC_HEADER_SIZE:pos + REC_HEADER_SIZE + length]
        if kind == COLLECT_TIMESTAMP:
            return <int64_t>load_u64(header + REC_OFF_TIMESTAMP)
        body = PyBytes_FromStringAndSize(NULL, length)
        target = PyBytes_AS_STRING(body)
        if length >= NOGIL_BODY_BYTES:
            with nogil:
                memcpy(target, header + REC_HEADER_SIZE, length)
        else:
            memcpy(target, header + REC_HEADER_SIZE, length)
        if kind == COLLECT_BODIES:
            return body
        return (offset, <int64_t>load_u64(header + REC_OFF_TIMESTAMP),
                load_u32(header + REC_OFF_FLAGS), body)

    cdef object read_one(self, uint64_t offset, int kind):
        cdef uint32_t pos
        cdef int status
        cdef object result = None

        self.acquire()
        try:
            status = self.locate(offset, &pos)
            if status == FOUND:
                view = None
                if kind == COLLECT_VIEWS:
                    view = memoryview(self.last_read)
                result = self.make_item(self.last_read, pos, offset, kind,
                                        view)
            else:
                result = self.lookup_error(status, offset)
        finally:
            self.release()
        if self.events_pending:
            self.report()
        if status != FOUND:
            raise result
        return result

    def read(self, uint64_t offset):
        """Return the body of the record at offset, as bytes.

        Raises OffsetNotFoundError for an offset with no record, and
        CorruptSegmentError when the record fails its checksum (it is then
        counted in damaged and skipped by later reads).
        """
        return self.read_one(offset, COLLECT_BODIES)

    def read_record(self, uint64_t offset):
        """Return (offset, timestamp, flags, body) of the record at offset."""
        return self.read_one(offset, COLLECT_RECORDS)

    def read_timestamp(self, uint64_t offset):
        """Return the timestamp (ns) of the record at offset, without its body."""
        return self.read_one(offset, COLLECT_TIMESTAMP)

    def read_view(self, uint64_t offset):
        """Return a read-only memoryview of the body at offset, without a copy.

        The view keeps its segment mapped: it stays valid after the
        segment is deleted or the store is closed.
        """
        return self.read_one(offset, COLLECT_VIEWS)

    def read_range(self, uint64_t start, uint64_t stop):
        """Return the bodies of offsets start to stop - 1, as bytes.

        Offsets with no record, and records that fail their checksum, are
        left out; read_records() shows which offsets are returned.
        """
        return self.collect(start, stop, COLLECT_BODIES)

    def read_records(self, uint64_t start, uint64_t stop):
        """Return (offset, timestamp, flags, body) for start to stop - 1."""
        return self.collect(start, stop, COLLECT_RECORDS)

    def read_views(self, uint64_t start, uint64_t stop):
        """Return memoryviews of the bodies of offsets start to stop - 1.

        Like read_range(), without copies; see read_view().
        """
        return self.collect(start, stop, COLLECT_VIEWS)

    cdef list collect(self, uint64_t start, uint64_t stop, int kind):
        cdef list result = []
        cdef uint64_t offset, end
        cdef uint32_t pos
        cdef Segment view_segment = None
        cdef object view = None

        self.acquire()
        try:
            offset = max(start, (<Segment>self.segments[0]).base)
            end = min(stop, self.active.base + self.active.count)
            while offset < end:
                if self.locate(offset, &pos) == FOUND:
                    if kind == COLLECT_VIEWS and (
                            self.last_read is not view_segment):
                        view_segment = self.last_read
                        view = memoryview(view_segment)
                    result.append(self.make_item(self.last_read, pos, offset,
                                                 kind, view))
                offset += 1
        finally:
            self.release()
        if self.events_pending:
            self.report()
        return result

    # Deleting and closing ------------------------------------------------

    def delete_below(self, uint64_t offset):
        """Delete every whole segment whose records are all below offset.

        The active segment is kept, so the next offset survives a restart.
        Views of deleted segments stay valid. Returns segments deleted.
        """
        cdef Segment seg
        cdef int deleted = 0

        self.acquire_sync()
        try:
            self.acquire()
            try:
                while len(self.segments) > 1:
                    seg = <Segment>self.segments[0]
                    if seg.base + seg.count > offset:
                        break
                    self.forget_first()
                    deleted += 1
                    if (self.reserve_ahead and self.spare is None and
                            self.recycle(seg)):
                        continue
                    seg.release()
                    os.unlink(seg.path)
                    os.unlink(seg.index_path)
                if deleted:
                    self.last_read = None
                    self.directory_dirty = True
            finally:
                self.release()
        finally:
            pymq_mutex_unlock(self.sync_lock)
        return deleted

    cdef int forget_first(self) except -1:
        """Take the first segment out of the log's list and counts.

        The lock is held; the caller deletes or drops the segment's files.
        """
        cdef Segment seg = <Segment>self.segments[0]

        del self.segments[0]
        if seg in self.pending:
            self.pending.remove(seg)
        self.deleted_damaged += seg.damaged
        self.stored_bytes -= seg.length
        return 0

    cdef Py_ssize_t drop_below(self, uint64_t offset) except -1:
        """Take every whole segment below offset out of the log, as
        delete_below() does, without waiting for the disk.

        A segment of at least PREFAULT_MIN_BYTES is renamed to
        DROPPED_PREFIX + its name, and the next background_flush(),
        flush() or close() unmaps it and unlinks its files. So the caller
        waits neither for a sync under way, which holds the sync lock that
        delete_below() takes, nor for the file system to free the blocks,
        which on a file system mounted with discard and without a journal
        waits for the disk. The next open deletes files that a crash left
        behind. Smaller segments, and every segment while reserve_ahead has
        no spare (a dropped segment then becomes the spare), go through
        delete_below(). Returns the segments taken out.
        """
        cdef Segment seg
        cdef Py_ssize_t dropped = 0
        cdef bint small = False
        cdef str path

        if self.reserve_ahead and self.spare is None:
            return self.delete_below(offset)
        self.acquire()
        try:
            while len(self.segments) > 1:
                seg = <Segment>self.segments[0]
                if seg.base + seg.count > offset:
                    break
                if seg.capacity < PREFAULT_MIN_BYTES:
                    small = True
                    break
                if self.reuse_dropped(seg):
                    dropped += 1
                    continue
                path = os.path.join(
                    self.path, DROPPED_PREFIX + os.path.basename(seg.path))
                os.rename(seg.path, path)
                seg.path = path
                path = os.path.join(
                    self.path,
                    DROPPED_PREFIX + os.path.basename(seg.index_path))
                try:
                    os.rename(seg.index_path, path)
                    seg.index_path = path
                except OSError:
                    # Unlinked under its own name, or by the next open as
                    # an index whose log is gone.
                    pass
                self.forget_first()
                self.dropped.append(seg)
                dropped += 1
            if dropped:
                self.last_read = None
                self.directory_dirty = True
        finally:
            self.release()
        if small:
            dropped += self.delete_below(offset)
        return dropped

    cdef bint reuse_dropped(self, Segment seg) except -1:
        """Make seg, the first segment, the spare rather than drop it.

        Only when there is no spare, seg has the store's segment size and no
        view of it is out, and no sync is under way, because a sync that
        took seg in its snapshot would store its old length over the new
        one. Returns whether seg became the spare. The caller holds the lock.
        """
        if (self.spare is not None or seg.exports > 0 or seg.data == NULL or
                seg.capacity != self.segment_bytes):
            return False
        if not pymq_mutex_trylock(self.sync_lock):
            return False
        try:
            try:
                seg.reuse(self.path, SPARE_NAME)
            except OSError as exc:
                self.warn_not_reused(seg, exc)
                return False
            self.forget_first()
            seg.clear(False)
            self.spare = seg
            self.spare_warm = True
            # Touched ahead of the appends that will reuse them: a page that
            # was synced since is write-protected again, and its first write
            # would fault in the appending thread.
            seg.start_prefault(0, OPEN_PREFAULT_BYTES)
        finally:
            pymq_mutex_unlock(self.sync_lock)
        return True

    cdef int unlink_dropped(self) except -1:
        """Unmap the segments drop_below() took out and unlink their files.

        The caller holds sync_lock, so no sync is using their mappings.
        Raises the first error after trying every file.
        """
        cdef Segment seg
        cdef list work

        self.acquire_raw()
        work = self.dropped
        self.dropped = []
        self.release()
        error = None
        for seg in work:
            seg.release()
            for path in (seg.path, seg.index_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if error is None:
                        error = exc
        if error is not None:
            raise error
        return 0

    def close(self):
        """Flush, unmap every segment and release the folder's lock.

        Views handed out stay valid until they are released. Calling close
        again does nothing. A failed flush is raised after the store is
        closed; records appended before it are still in the files.
        """
        cdef Segment seg

        error = None
        self.acquire_sync()
        try:
            if self.closed:
                return
            self.acquire()
            self.closed = True
            self.release()
            try:
                self.sync_segments(True, True)
                seg = self.active
                if seg.synced_length == seg.length:
                    # Tells the next open that no scan past length is needed.
                    seg.write_checkpoint(seg.length, seg.count, IDX_CLEAN,
                                         True)
            except OSError as exc:
                error = exc
            self.acquire_raw()
            try:
                if self.spare is not None:
                    kept = False
                    if self.reserve_ahead and error is None:
                        # Kept for the next open (see open_spare), with a
                        # synced header that says it is empty.
                        try:
                            self.spare.write_checkpoint(0, 0, 0, True)
                            kept = True
                        except OSError:
                            pass
                    self.spare.release()
                    if not kept:
                        os.unlink(self.spare.path)
                        os.unlink(self.spare.index_path)
                    self.spare = None
                for seg in self.segments:
                    seg.release()
                self.segments = []
                self.pending = []
                self.last_read = None
            finally:
                self.release()
            if self.dropped:
                try:
                    self.unlink_dropped()
                except OSError as exc:
                    if error is None:
                        error = exc
        finally:
            pymq_mutex_unlock(self.sync_lock)
        self.owner_lock.release()
        if error is not None:
            raise error

    # Reporting -----------------------------------------------------------

    cdef int report(self) except -1:
        """Pass damage messages to on_damage, outside the lock."""
        cdef Segment seg
        cdef list messages = []

        self.acquire()
        try:
            self.events_pending = False
            for seg in self.segments:
                if seg.events:
                    messages.extend(seg.events)
                    seg.events.clear()
        finally:
            self.release()
        if self.on_damage is not None:
            for message in messages:
                self.on_damage(message)
        return 0

    @property
    def first_offset(self):
        """The offset of the first segment's first record."""
        self.acquire()
        try:
            return (<Segment>self.segments[0]).base
        finally:
            self.release()

    @property
    def next_offset(self):
        """The offset the next append will take."""
        self.acquire()
        try:
            return self.active.base + self.active.count
        finally:
            self.release()

    cdef uint64_t count_gaps(self):
        """Count offsets between segments: skipped, never written."""
        cdef uint64_t gaps = 0
        cdef Segment seg, previous = None

        for seg in self.segments:
            if previous is not None:
                gaps += seg.base - (previous.base + previous.count)
            previous = seg
        return gaps

    @property
    def gap_offsets(self):
        """Offsets from first_offset to next_offset that lie between segments.

        They were skipped by ensure_next_offset() and never written.
        """
        self.acquire()
        try:
            return self.count_gaps()
        finally:
            self.release()

    @property
    def reserved(self):
        """True while the next segment is created ahead (the spare) and the
        active segment's index is preallocated whole: the appends that fill
        the active segment and the next one need no new disk space.
        """
        self.acquire()
        try:
            return (self.spare is not None and
                    self.active.index_alloc >= self.active.index_max)
        finally:
            self.release()

    @property
    def fsync(self):
        """The fsync policy: "never", "interval" or "always"."""
        return ("never", "interval", "always")[self.policy]

    @property
    def damaged(self):
        """Records lost to damage or failing their checksum, since open."""
        cdef Segment seg
        cdef uint64_t total = self.deleted_damaged

        self.acquire()
        try:
            for seg in self.segments:
                total += seg.damaged
        finally:
            self.release()
        return total

    def stats(self):
        """Return a dict of counts: segments, bytes, offsets, damage."""
        cdef Segment seg
        cdef uint64_t used = 0, damaged = self.deleted_damaged

        self.acquire()
        try:
            for seg in self.segments:
                used += seg.length
                damaged += seg.damaged
            return {
                "segments": len(self.segments),
                "bytes": used,
                "first_offset": (<Segment>self.segments[0]).base,
                "next_offset": self.active.base + self.active.count,
                "damaged": damaged,
                "gap_offsets": self.count_gaps(),
                "written_bytes": self.written_bytes,
                "synced_bytes": self.synced_bytes,
            }
        finally:
            self.release()

    def verify(self):
        """Check every record's checksum; return a dict of what was found.

        Keys: "records" (sound records), "missing" (offsets without a
        record) and "damaged" (a list of (segment path, offset) that failed
        now; they are counted and skipped from then on).
        """
        cdef Segment seg
        cdef uint64_t offset
        cdef uint32_t pos
        cdef int status
        cdef uint64_t records = 0, missing = 0
        cdef list damaged = []

        self.acquire()
        try:
            for seg in list(self.segments):
                for offset in range(seg.base, seg.base + seg.count):
                    status = self.locate(offset, &pos)
                    if status == FOUND:
                        records += 1
                    elif status == DAMAGED:
                        damaged.append((seg.path, offset))
                    else:
                        missing += 1
        finally:
            self.release()
        if self.events_pending:
            self.report()
        return {"records": records, "missing": missing, "damaged": damaged}
