# Segment bodies; the layouts are in segment.pxd.

from cpython.buffer cimport PyBUF_WRITABLE
from libc.errno cimport EIO, errno
from libc.string cimport memcpy, memset
from posix.mman cimport (MADV_DONTNEED, MAP_FAILED, MAP_SHARED, MS_SYNC,
                         PROT_READ, PROT_WRITE, madvise, mmap, msync, munmap)
from posix.unistd cimport sysconf, _SC_PAGESIZE

import os

cdef size_t PAGE_SIZE = <size_t>sysconf(_SC_PAGESIZE)

# Records whose body is at least this long are copied and checksummed with
# the GIL released; below it the release costs more than it saves.
cdef enum:
    NOGIL_BODY_BYTES = 16384
    # Segments with less than this left to write are not prefaulted: a
    # thread costs more than the faults it would save.
    PREFAULT_MIN_BYTES = 1024 * 1024
    # A sync of at least this many whole pages unmaps them first (see
    # sync_range).
    UNMAP_MIN_BYTES = 256 * 1024
    # Batch writes and reads prefetch two cache lines this far ahead of the
    # record they are at. On batches of 100-byte records (a 2-core VM), it
    # cut the time of a get_batch of 100 from about 43 to 37 ns a message
    # and of a put_many from about 46 to 42. A prefetch never faults, even
    # past the end of a mapping.
    PREFETCH_AHEAD = 1024


cdef str segment_name(uint64_t base):
    return "%020d" % base


cdef int reserve_space(int fd, size_t length, str path, str purpose) except -1:
    """posix_fallocate the first length bytes of fd; errors name path.

    os.posix_fallocate raises OSError without a file name, so a full disk
    would not say which file could not grow.
    """
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot reserve {length} bytes on disk for {purpose} "
            f"({os.strerror(exc.errno)})", path) from None
    return 0


cdef inline size_t page_floor(size_t position) noexcept nogil:
    return position - position % PAGE_SIZE


cdef int sync_mapped(uint8_t *data, size_t start, size_t stop) noexcept nogil:
    """msync bytes start to stop of a mapped log; return 0 or the errno."""
    cdef size_t first = page_floor(start)
    cdef size_t whole = page_floor(stop)

    if stop <= start:
        return 0
    if whole >= first + UNMAP_MIN_BYTES:
        # Writeback write-protects every page mapped writable, and flushes
        # its TLB entry on each CPU running this process, one page at a
        # time: an interrupt of the appending thread per page. Unmapped
        # first, the pages are written back with no such flush; the kernel
        # keeps their dirty bits and contents, and a later read maps them
        # again. The last, partly written page stays mapped for the next
        # append.
        madvise(data + first, whole - first, MADV_DONTNEED)
    if msync(data + first, stop - first, MS_SYNC) != 0:
        return errno
    return 0


# record_crc() checksums the header fields before the CRC as the fixed head
# of pymq_crc32c_head().
assert REC_OFF_CRC == PYMQ_CRC32C_HEAD


cdef inline uint32_t record_crc(const uint8_t *header, const uint8_t *body,
                                size_t length) noexcept nogil:
    return pymq_crc32c_head(header, body, length)


cdef inline void put_record_header(uint8_t *header, size_t length,
                                   size_t size, uint64_t offset,
                                   int64_t timestamp,
                                   uint32_t flags) noexcept nogil:
    """Store a record's header fields, all but the CRC, and its padding."""
    if length & (REC_ALIGN - 1):
        # Zero the padding. The body, copied after, overwrites the rest of
        # this last word.
        store_u64(header + size - REC_ALIGN, 0)
    store_u32(header + REC_OFF_MAGIC, REC_MAGIC)
    store_u32(header + REC_OFF_LENGTH, <uint32_t>length)
    store_u64(header + REC_OFF_OFFSET, offset)
    store_u64(header + REC_OFF_TIMESTAMP, <uint64_t>timestamp)
    store_u32(header + REC_OFF_FLAGS, flags)


cdef inline bint valid_record(const uint8_t *data, size_t capacity,
                              size_t pos, uint64_t min_offset,
                              uint64_t max_offset,
                              size_t *size) noexcept nogil:
    """Check the record at pos: magic, bounds, offset range and CRC."""
    cdef const uint8_t *header = data + pos
    cdef size_t length
    cdef uint64_t offset

    if pos > capacity or capacity - pos < REC_HEADER_SIZE:
        return False
    if load_u32(header + REC_OFF_MAGIC) != REC_MAGIC:
        return False
    length = load_u32(header + REC_OFF_LENGTH)
    if record_size(length) > capacity - pos:
        return False
    offset = load_u64(header + REC_OFF_OFFSET)
    if offset < min_offset or offset >= max_offset:
        return False
    if record_crc(header, header + REC_HEADER_SIZE, length) != load_u32(
            header + REC_OFF_CRC):
        return False
    size[0] = record_size(length)
    return True


cdef void store_crcs(uint8_t *record, Py_ssize_t count) noexcept nogil:
    """Store the CRCs of count records laid out one after another."""
    cdef const void *heads[3]
    cdef const void *bodies[3]
    cdef uint8_t *starts[3]
    cdef size_t lengths[3]
    cdef uint32_t crcs[3]
    cdef size_t length
    cdef int k

    while count >= 3:
        for k in range(3):
            starts[k] = record
            heads[k] = record
            bodies[k] = record + REC_HEADER_SIZE
            lengths[k] = load_u32(record + REC_OFF_LENGTH)
            record += record_size(lengths[k])
        pymq_crc32c_head3(heads, bodies, lengths, crcs)
        for k in range(3):
            store_u32(starts[k] + REC_OFF_CRC, crcs[k])
        count -= 3
    while count > 0:
        length = load_u32(record + REC_OFF_LENGTH)
        store_u32(record + REC_OFF_CRC, record_crc(
            record, record + REC_HEADER_SIZE, length))
        record += record_size(length)
        count -= 1


cdef size_t find_record(const uint8_t *data, size_t capacity, size_t start,
                        uint64_t min_offset, uint64_t max_offset,
                        size_t *nonzero_end) noexcept nogil:
    """Return the position of the next valid record at or after start.

    Returns capacity when there is none, and then sets nonzero_end to the end
    of the last 8-byte word that is not zero (0 when all are zero).
    """
    cdef size_t pos = start
    cdef size_t size

    nonzero_end[0] = 0
    # pos may start past capacity (recover passes the end of a full
    # segment plus REC_ALIGN), so compare without subtracting.
    while pos + REC_ALIGN <= capacity:
        if load_u64(data + pos) != 0:
            nonzero_end[0] = pos + REC_ALIGN
            if (load_u32(data + pos) == REC_MAGIC and
                    valid_record(data, capacity, pos, min_offset,
                                 max_offset, &size)):
                return pos
        pos += REC_ALIGN
    return capacity


@cython.final
cdef class Segment:
    """A log file mapped with mmap, and its dense offset index.

    Not thread-safe by itself: SegmentStore serialises every call.
    """

    def __cinit__(self):
        self.fd = -1
        self.index_fd = -1
        self.data = NULL
        self.index = NULL
        self.events = []

    def __dealloc__(self):
        with nogil:
            pymq_prefault_stop(&self.prefault)
        if self.data != NULL:
            munmap(self.data, self.capacity)
        if self.index != NULL:
            munmap(self.index, self.index_max)
        if self.fd >= 0:
            os.close(self.fd)
        if self.index_fd >= 0:
            os.close(self.index_fd)

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("segment views are read-only")
        if self.data == NULL:
            raise BufferError(f"segment {self.path} is closed")
        buffer.buf = self.data
        buffer.len = self.capacity
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = NULL
        buffer.ndim = 1
        buffer.shape = NULL
        buffer.strides = NULL
        buffer.suboffsets = NULL
        buffer.internal = NULL
        buffer.obj = self
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1
        if self.closed and self.exports == 0:
            self.release()

    @staticmethod
    cdef Segment create(str directory, str name, uint64_t base,
                        size_t capacity, bint full_index=False):
        """Create, preallocate and map name.log and name.idx.

        With full_index the index is preallocated at its largest size, so
        no append into this segment needs disk space.
        """
        cdef Segment seg = Segment.__new__(Segment)

        seg.base = base
        seg.path = os.path.join(directory, name + ".log")
        seg.index_path = os.path.join(directory, name + ".idx")
        seg.capacity = capacity
        seg.index_max = IDX_HEADER_SIZE + (
            capacity // REC_HEADER_SIZE) * IDX_ENTRY_SIZE
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            seg.fd = os.open(seg.path, flags, 0o644)
            reserve_space(seg.fd, capacity, seg.path, "a new segment")
            seg.index_fd = os.open(
                seg.index_path, flags & ~os.O_EXCL | os.O_TRUNC, 0o644)
            seg.index_alloc = (seg.index_max if full_index else
                               min(seg.index_max, IDX_GROW_BYTES))
            reserve_space(seg.index_fd, seg.index_alloc, seg.index_path,
                          "a new index")
            seg.map_files()
        except BaseException:
            seg.release()
            for path in (seg.path, seg.index_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            raise
        seg.write_checkpoint(0, 0, 0, False)
        return seg

    @staticmethod
    cdef Segment open(str path, uint64_t base, size_t capacity, bint last):
        """Map an existing segment and recover what lies past its checkpoint.

        A last segment shorter than capacity (created but not yet
        preallocated) is extended to capacity.
        """
        cdef Segment seg = Segment.__new__(Segment)
        cdef size_t size

        seg.base = base
        seg.path = path
        seg.index_path = path[:len(path) - len(".log")] + ".idx"
        try:
            seg.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            size = os.fstat(seg.fd).st_size
            if last and size < capacity:
                reserve_space(seg.fd, capacity, path,
                              "extending the last segment")
                size = capacity
            size = min(size, MAX_SEGMENT_BYTES)
            seg.capacity = size & ~(<size_t>REC_ALIGN - 1)
            seg.index_max = IDX_HEADER_SIZE + (
                seg.capacity // REC_HEADER_SIZE) * IDX_ENTRY_SIZE
            seg.index_fd = os.open(
                seg.index_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            seg.index_alloc = os.fstat(seg.index_fd).st_size
            if seg.index_alloc < IDX_HEADER_SIZE:
                seg.index_alloc = min(seg.index_max, IDX_GROW_BYTES)
                reserve_space(seg.index_fd, seg.index_alloc, seg.index_path,
                              "a new index")
            seg.index_alloc = min(seg.index_alloc, seg.index_max)
            if seg.capacity >= REC_HEADER_SIZE:
                seg.map_files()
            seg.load_checkpoint()
        except BaseException:
            seg.release()
            raise
        return seg

    @staticmethod
    cdef Segment open_spare(str directory, str name):
        """Map the spare files name.log and name.idx left by a close, or
        return None when they are missing or cannot be trusted to be empty.

        Only a spare whose index header was synced saying "empty, base 0"
        is trusted: that header is written after the log is known to be
        zero (a new file, or a recycled one whose zeroing was synced).
        """
        cdef Segment seg = Segment.__new__(Segment)
        cdef const uint8_t *header
        cdef size_t size

        seg.path = os.path.join(directory, name + ".log")
        seg.index_path = os.path.join(directory, name + ".idx")
        try:
            seg.fd = os.open(seg.path, os.O_RDWR | os.O_CLOEXEC)
            seg.index_fd = os.open(seg.index_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            seg.release()
            return None
        try:
            size = os.fstat(seg.fd).st_size
            seg.index_alloc = os.fstat(seg.index_fd).st_size
            if (size < REC_HEADER_SIZE or size > MAX_SEGMENT_BYTES or
                    size % REC_ALIGN or seg.index_alloc < IDX_HEADER_SIZE):
                seg.release()
                return None
            seg.capacity = size
            seg.index_max = IDX_HEADER_SIZE + (
                size // REC_HEADER_SIZE) * IDX_ENTRY_SIZE
            seg.index_alloc = min(seg.index_alloc, seg.index_max)
            seg.map_files()
        except BaseException:
            seg.release()
            raise
        header = seg.index
        if not (load_u32(header + IDX_OFF_MAGIC) == IDX_MAGIC and
                load_u32(header + IDX_OFF_VERSION) == IDX_VERSION and
                pymq_crc32c(0, header, IDX_OFF_CRC) ==
                load_u32(header + IDX_OFF_CRC) and
                load_u64(header + IDX_OFF_BASE) == 0 and
                load_u64(header + IDX_OFF_COUNT) == 0 and
                load_u64(header + IDX_OFF_LENGTH) == 0 and
                load_u32(header + IDX_OFF_FLAGS) == 0 and
                load_u32(header + IDX_OFF_CAPACITY) == seg.capacity):
            seg.release()
            return None
        return seg

    cdef int map_files(self) except -1:
        cdef void *address

        address = mmap(NULL, self.capacity, PROT_READ | PROT_WRITE,
                       MAP_SHARED, self.fd, 0)
        if address == MAP_FAILED:
            raise OSError(errno, f"mmap of {self.path} failed: "
                                 f"{os.strerror(errno)}")
        self.data = <uint8_t *>address

        # The index is mapped at its full size, but only the first
        # index_alloc bytes exist in the file: ensure_index() grows the file
        # before any entry past it is touched, so no access faults.
        address = mmap(NULL, self.index_max, PROT_READ | PROT_WRITE,
                       MAP_SHARED, self.index_fd, 0)
        if address == MAP_FAILED:
            raise OSError(errno, f"mmap of {self.index_path} failed: "
                                 f"{os.strerror(errno)}")
        self.index = <uint8_t *>address

        # The mappings keep the files open, so the descriptors are closed
        # now: a log of many segments would otherwise run out of them.
        # ensure_index() opens the index file again when it grows it.
        os.close(self.fd)
        self.fd = -1
        os.close(self.index_fd)
        self.index_fd = -1
        return 0

    cdef int rename_to(self, str directory, uint64_t base) except -1:
        """Give an empty segment a new first offset, renaming its files.

        When it raises, path still names the log file, which keeps its old
        name unless renaming it back failed too.
        """
        cdef str name = segment_name(base)
        cdef str path = os.path.join(directory, name + ".log")
        cdef str index_path = os.path.join(directory, name + ".idx")

        try:
            os.rename(self.path, path)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot rename {self.path} to "
                          f"{path} for a new segment "
                          f"({os.strerror(exc.errno)})", self.path) from None
        try:
            os.rename(self.index_path, index_path)
        except OSError as exc:
            try:
                # Back to the old name, so the segment is as it was.
                os.rename(path, self.path)
            except OSError:
                self.path = path
            raise OSError(exc.errno, f"cannot rename {self.index_path} to "
                          f"{index_path} for a new segment "
                          f"({os.strerror(exc.errno)})",
                          self.index_path) from None
        self.base = base
        self.path = path
        self.index_path = index_path
        self.write_checkpoint(0, 0, 0, False)
        return 0

    cdef int recycle(self, str directory, str name) except -1:
        """Turn this segment, whose records are no longer needed, into an
        empty one named name, keeping its disk space.

        The files are renamed first and zeroed after, so a crash in between
        leaves files that the next open deletes (spare files), not a
        segment with damaged records.
        """
        cdef str path = os.path.join(directory, name + ".log")
        cdef str index_path = os.path.join(directory, name + ".idx")
        cdef size_t entries_end
        cdef size_t data_end = self.capacity if self.reused else self.length

        with nogil:
            pymq_prefault_stop(&self.prefault)
        os.rename(self.path, path)
        self.path = path
        os.rename(self.index_path, index_path)
        self.index_path = index_path
        # Made durable before the records are zeroed, so that a power loss
        # cannot bring back the old name with empty contents.
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        # Past length the log is zero already (recovery zeroes a torn tail),
        # unless it was reused: the records of its earlier use lie there.
        # Synced, so that the header below, which a later open trusts (see
        # open_spare), never covers bytes that are not zero on disk.
        memset(self.data, 0, data_end)
        self.sync_range(0, data_end)
        entries_end = min(IDX_HEADER_SIZE + self.count * IDX_ENTRY_SIZE,
                          self.index_alloc)
        if entries_end > IDX_HEADER_SIZE:
            memset(self.index + IDX_HEADER_SIZE, 0,
                   entries_end - IDX_HEADER_SIZE)
        self.clear(True)
        return 0

    cdef int reuse(self, str directory, str name) except -1:
        """Rename the files of this segment, whose records are no longer
        needed, to name, for clear(False) to make it an empty segment.

        Unlike recycle(), the old records stay in the log. Each carries an
        offset below any base the segment can get next, so no check of a
        record of the new segment accepts one. Their bodies may contain
        anything, even the image of a sound record of a new offset, so
        recover() never looks past the new records of a reused segment.
        The pages stay mapped and in the page cache, so appends into them
        take no page faults that allocate and zero pages. When it raises,
        the files keep their names, unless renaming the log back failed too
        (path then names where it is).
        """
        cdef str path = os.path.join(directory, name + ".log")
        cdef str index_path = os.path.join(directory, name + ".idx")

        with nogil:
            pymq_prefault_stop(&self.prefault)
        os.rename(self.path, path)
        try:
            os.rename(self.index_path, index_path)
        except OSError:
            try:
                os.rename(path, self.path)
            except OSError:
                self.path = path
            raise
        self.path = path
        self.index_path = index_path
        return 0

    cdef int clear(self, bint zeroed) except -1:
        """Make a renamed segment empty, with base 0, and write its header.

        recycle() zeroed the log first: the header is synced, and a later
        open trusts such a spare. reuse() leaves the old records, so the
        header and every later one carry IDX_REUSED, which open_spare()
        does not trust and which makes recover() stop at the first bytes
        that are not a new record.
        """
        self.base = 0
        self.length = 0
        self.count = 0
        self.synced_length = 0
        self.synced_count = 0
        self.checkpoint_count = 0
        self.sealed = False
        self.damaged = 0
        self.events.clear()
        self.prefault_base = 0
        self.prefault_end = 0
        self.reused = not zeroed
        self.write_checkpoint(0, 0, 0, zeroed)
        return 0

    cdef int start_prefault(self, size_t start, size_t length) except -1:
        """Touch up to length bytes of pages from start, in a background thread.
        """
        cdef size_t first = page_floor(start + PAGE_SIZE - 1)

        if self.data == NULL or self.capacity < first + PREFAULT_MIN_BYTES:
            # Too little left to be worth a thread: the writer takes it.
            self.prefault_done()
            return 0
        length = min(length, self.capacity - first)
        if self.prefault_end == 0:
            self.prefault_base = first
        self.prefault_end = first + length
        if self.prefault_end == self.capacity:
            self.prefault_done()
        # A thread that cannot start only means the writer takes the faults.
        pymq_prefault_start(&self.prefault, self.data + first, length,
                            PAGE_SIZE)
        return 0

    cdef void prefault_done(self) noexcept:
        """Mark the segment as prefaulted to its end, or as never to be.

        Both bounds at capacity keep the appends' check of the prefault
        (twice the length past base plus end) false from now on.
        """
        self.prefault_base = self.capacity
        self.prefault_end = self.capacity

    cdef int ensure_index(self, uint64_t entries) except -1:
        """Reserve disk space for the first entries index slots."""
        cdef size_t needed = IDX_HEADER_SIZE + entries * IDX_ENTRY_SIZE
        cdef size_t grown

        if needed <= self.index_alloc:
            return 0
        if needed > self.index_max:
            raise AssertionError(
                f"segment {self.path}: index entry {entries} is past the "
                f"maximum {(self.index_max - IDX_HEADER_SIZE) // 4}")
        grown = max(needed, self.index_alloc * 2, IDX_GROW_BYTES)
        grown = min(grown, self.index_max)
        fd = os.open(self.index_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            reserve_space(fd, grown, self.index_path, "growing the index")
        finally:
            os.close(fd)
        self.index_alloc = grown
        return 0

    cdef int load_checkpoint(self) except -1:
        """Trust the index up to its checkpoint and recover the rest."""
        cdef const uint8_t *header = self.index
        cdef uint64_t count
        cdef size_t length
        cdef bint valid
        cdef size_t size
        cdef uint32_t pos

        if self.data == NULL:
            return 0
        valid = (self.index_alloc >= IDX_HEADER_SIZE and
                 load_u32(header + IDX_OFF_MAGIC) == IDX_MAGIC and
                 load_u32(header + IDX_OFF_VERSION) == IDX_VERSION and
                 pymq_crc32c(0, header, IDX_OFF_CRC) ==
                 load_u32(header + IDX_OFF_CRC) and
                 load_u32(header + IDX_OFF_CAPACITY) == self.capacity)
        if valid:
            # A sound header of another base is the last one of the file's
            # earlier use: it was reused, and a crash (a power cut) came
            # before its new header reached the disk.
            self.reused = (
                load_u64(header + IDX_OFF_BASE) != self.base or
                (load_u32(header + IDX_OFF_FLAGS) & IDX_REUSED) != 0)
            valid = load_u64(header + IDX_OFF_BASE) == self.base
        else:
            # Nothing tells whether the file was used before, and its new
            # records may have overwritten every old record header. So it
            # is scanned as a reused one, which never looks past damage.
            self.reused = True
        if valid:
            count = load_u64(header + IDX_OFF_COUNT)
            length = load_u64(header + IDX_OFF_LENGTH)
            valid = (length <= self.capacity and
                     count <= self.capacity // REC_HEADER_SIZE and
                     IDX_HEADER_SIZE + count * IDX_ENTRY_SIZE <=
                     self.index_alloc)
        if valid and count > 0:
            # A cheap check that the index and the log belong together: the
            # last checkpointed record must be where the index says.
            pos = self.position(self.base + count - 1)
            valid = pos == IDX_MISSING or valid_record(
                self.data, length, pos, self.base + count - 1,
                self.base + count, &size)
            if not valid:
                # The rebuild's own message does not say where the log
                # stopped matching its checkpoint.
                self.events.append(
                    f"segment {os.path.basename(self.path)}: checkpointed "
                    f"record at byte {pos} (offset {self.base + count - 1}) "
                    f"is missing or damaged")
                # The header itself is sound, so its count is: offsets it
                # covers stay covered, and lost ones are counted as damaged.
                self.count = count
        if not valid:
            return self.rebuild_index()

        self.checkpoint_count = self.synced_count = count
        self.checkpoint_length = self.synced_length = length
        self.checkpoint_flags = (load_u32(header + IDX_OFF_FLAGS) &
                                 ~(<uint32_t>IDX_REUSED))
        if self.checkpoint_flags & (IDX_SEALED | IDX_CLEAN):
            # Nothing was appended past the checkpoint: no scan needed.
            self.sealed = (self.checkpoint_flags & IDX_SEALED) != 0
            self.length = length
            self.count = count
            return 0
        return self.recover(length, count)

    cdef int rebuild_index(self) except -1:
        """Index the whole log again; offsets once covered stay covered."""
        cdef uint64_t covered = self.count
        cdef uint64_t offset

        self.events.append(
            f"segment {os.path.basename(self.path)}: index missing or "
            f"damaged; rebuilding it from the log")
        self.checkpoint_count = self.synced_count = 0
        self.checkpoint_length = self.synced_length = 0
        self.checkpoint_flags = 0
        self.sealed = False
        self.ensure_index(0)
        self.recover(0, 0)
        if self.count < covered:
            # Records that were readable before are gone: count them as
            # lost rather than let the next offset go back.
            self.ensure_index(covered)
            for offset in range(self.base + self.count, self.base + covered):
                store_u32(self.index_entry(offset), IDX_MISSING)
            self.damaged += covered - self.count
            self.count = covered
        return 0

    cdef int recover(self, size_t start, uint64_t start_count) except -1:
        """Scan the log from start and index every valid record.

        A damaged stretch followed by valid records is skipped and its
        offsets counted as lost. Bytes past the last valid record (a torn
        tail) are zeroed, so the next append lands right after it.
        """
        cdef size_t pos = start
        cdef size_t size, found, nonzero_end
        cdef uint64_t expect = self.base + start_count
        cdef uint64_t max_offset = self.base + self.capacity // REC_HEADER_SIZE
        cdef uint64_t offset, lost
        cdef str name = os.path.basename(self.path)

        while True:
            if valid_record(self.data, self.capacity, pos, expect,
                            max_offset, &size):
                offset = load_u64(self.data + pos + REC_OFF_OFFSET)
                self.ensure_index(offset - self.base + 1)
                if offset > expect:
                    lost = offset - expect
                    self.damaged += lost
                    self.events.append(
                        f"segment {name}: {lost} records lost to damage "
                        f"before byte {pos} (offsets {expect} to "
                        f"{offset - 1})")
                    while expect < offset:
                        store_u32(self.index_entry(expect), IDX_MISSING)
                        expect += 1
                store_u32(self.index_entry(offset), <uint32_t>pos)
                expect = offset + 1
                pos += size
                continue

            if self.reused:
                # NOTE: sound records past damage here are dropped without
                # being counted in damaged, unlike in a fresh segment.
                self.end_reused(pos, expect, max_offset)
                break
            with nogil:
                found = find_record(self.data, self.capacity,
                                    pos + REC_ALIGN, expect, max_offset,
                                    &nonzero_end)
            if found < self.capacity:
                self.events.append(
                    f"segment {name}: damaged bytes {pos} to {found} "
                    f"skipped")
                pos = found
                continue
            if pos < self.capacity and (
                    nonzero_end > 0 or load_u64(self.data + pos) != 0):
                nonzero_end = max(nonzero_end, pos + REC_ALIGN)
                nonzero_end = min(nonzero_end, self.capacity)
                memset(self.data + pos, 0, nonzero_end - pos)
                self.events.append(
                    f"segment {name}: cut torn tail at byte {pos} "
                    f"({nonzero_end - pos} bytes zeroed)")
            break

        self.length = pos
        self.count = expect - self.base
        return 0

    cdef int end_reused(self, size_t pos, uint64_t expect,
                        uint64_t max_offset) except -1:
        """End the scan of a reused segment at pos, the end of its last
        sound new record.

        What follows is the earlier use's records and bodies, which a scan
        for later records could misread, so none is made: records past a
        damaged one are lost, not skipped to. Only a record header of a new
        offset at pos (a record torn by the crash) is cut and logged: the
        bytes it claims are zeroed.
        """
        cdef const uint8_t *header = self.data + pos
        cdef uint64_t offset
        cdef size_t stop

        if pos > self.capacity or self.capacity - pos < REC_HEADER_SIZE:
            return 0
        if load_u32(header + REC_OFF_MAGIC) != REC_MAGIC:
            return 0
        offset = load_u64(header + REC_OFF_OFFSET)
        if offset < expect or offset >= max_offset:
            # An old record, or bytes of an old body.
            return 0
        stop = self.capacity
        if record_size(load_u32(header + REC_OFF_LENGTH)) < stop - pos:
            stop = pos + record_size(load_u32(header + REC_OFF_LENGTH))
        memset(self.data + pos, 0, stop - pos)
        self.events.append(
            f"segment {os.path.basename(self.path)}: cut torn tail at byte "
            f"{pos} ({stop - pos} bytes zeroed)")
        return 0

    cdef uint8_t *index_entry(self, uint64_t offset) noexcept:
        return self.index + IDX_HEADER_SIZE + (
            offset - self.base) * IDX_ENTRY_SIZE

    cdef uint32_t position(self, uint64_t offset) noexcept:
        return load_u32(self.index_entry(offset))

    cdef int check_at(self, uint64_t offset, uint32_t pos) except -1:
        """Return 0 when a valid record for offset starts at pos, else 1."""
        cdef size_t size

        if valid_record(self.data, self.length, pos, offset, offset + 1,
                        &size):
            return 0
        return 1

    cdef int mark_damaged(self, uint64_t offset, uint32_t pos,
                          str reason) except -1:
        store_u32(self.index_entry(offset), IDX_MISSING)
        self.damaged += 1
        self.events.append(
            f"segment {os.path.basename(self.path)}: {reason} at byte {pos} "
            f"(offset {offset}); record skipped")
        return 0

    cdef void write_records(self, const BodyRef *bodies, Py_ssize_t count,
                            int64_t timestamp, uint32_t flags) noexcept:
        """Append count records, as count calls of write_record() would.

        The caller has checked that they fit the log and the index, and
        that each body is shorter than NOGIL_BODY_BYTES, so all is done
        with the GIL held, in one pass that updates length and count once.
        """
        cdef size_t position = self.length, size, length
        cdef uint64_t offset = self.base + self.count
        cdef uint8_t *header
        cdef Py_ssize_t i
        # In locals: the stores below could alias the fields of self, so the
        # compiler would load them again for every record.
        cdef uint8_t *data = self.data
        cdef uint8_t *entry = self.index_entry(offset)

        for i in range(count):
            length = bodies[i].length
            header = data + position
            pymq_prefetch_write(header + PREFETCH_AHEAD)
            pymq_prefetch_write(header + PREFETCH_AHEAD + 64)
            size = record_size(length)
            put_record_header(header, length, size, offset, timestamp, flags)
            pymq_copy_body(header + REC_HEADER_SIZE, bodies[i].data, length)
            store_u32(entry, <uint32_t>position)
            entry += IDX_ENTRY_SIZE
            position += size
            offset += 1
        # Over the copies in the file, as write_record() does, in a second
        # pass that checksums three records at a time.
        store_crcs(self.data + self.length, count)
        self.length = position
        self.count += count

    cdef int write_record(self, const uint8_t *body, size_t length,
                          int64_t timestamp, uint32_t flags) except -1:
        """Append one record; the caller has checked that it fits."""
        cdef uint8_t *header = self.data + self.length
        cdef size_t size = record_size(length)
        cdef uint64_t offset = self.base + self.count

        put_record_header(header, length, size, offset, timestamp, flags)
        # The CRC is computed over the copy in the file: a caller's buffer
        # may change while the GIL is released, and what is stored must
        # match its checksum.
        if length >= NOGIL_BODY_BYTES:
            with nogil:
                memcpy(header + REC_HEADER_SIZE, body, length)
                store_u32(header + REC_OFF_CRC, record_crc(
                    header, header + REC_HEADER_SIZE, length))
        else:
            memcpy(header + REC_HEADER_SIZE, body, length)
            store_u32(header + REC_OFF_CRC, record_crc(
                header, header + REC_HEADER_SIZE, length))
        store_u32(self.index_entry(offset), <uint32_t>self.length)
        self.length += size
        self.count += 1
        return 0

    cdef int sync_range(self, size_t start, size_t stop) except -1:
        """Write bytes start to stop of the log to stable storage."""
        cdef int error

        if self.data == NULL:
            return 0
        with nogil:
            error = sync_mapped(self.data, start, stop)
        if error:
            raise OSError(error, f"msync of {self.path} failed: "
                                 f"{os.strerror(error)}")
        return 0

    cdef int write_checkpoint(self, size_t length, uint64_t count,
                              uint32_t flags, bint sync) except -1:
        """Store length and count in the index header.

        The caller has synced the log up to length. With sync, entries are
        synced before the header that covers them, so a crash between the
        two leaves the older checkpoint.
        """
        cdef uint8_t *header = self.index
        cdef size_t first, stop
        cdef int rc = 0

        if self.index == NULL:
            return 0
        first = page_floor(IDX_HEADER_SIZE +
                           self.checkpoint_count * IDX_ENTRY_SIZE)
        stop = IDX_HEADER_SIZE + count * IDX_ENTRY_SIZE
        if sync and stop > first:
            with nogil:
                rc = msync(self.index + first, stop - first, MS_SYNC)
        if rc == 0:
            store_u32(header + IDX_OFF_MAGIC, IDX_MAGIC)
            store_u32(header + IDX_OFF_VERSION, IDX_VERSION)
            store_u64(header + IDX_OFF_BASE, self.base)
            store_u64(header + IDX_OFF_COUNT, count)
            store_u64(header + IDX_OFF_LENGTH, length)
            store_u32(header + IDX_OFF_FLAGS,
                      flags | (IDX_REUSED if self.reused else 0))
            store_u32(header + IDX_OFF_CAPACITY, <uint32_t>self.capacity)
            memset(header + IDX_OFF_CAPACITY + 4, 0,
                   IDX_OFF_CRC - IDX_OFF_CAPACITY - 4)
            store_u32(header + IDX_OFF_CRC,
                      pymq_crc32c(0, header, IDX_OFF_CRC))
            if sync:
                with nogil:
                    rc = msync(self.index, PAGE_SIZE, MS_SYNC)
        if rc != 0:
            raise OSError(errno, f"msync of {self.index_path} failed: "
                                 f"{os.strerror(errno)}")
        self.checkpoint_length = length
        self.checkpoint_count = count
        self.checkpoint_flags = flags
        return 0

    cdef int release(self) except -1:
        """Close the files; unmap now, or when the last view is released."""
        with nogil:
            pymq_prefault_stop(&self.prefault)
        self.closed = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.index_fd >= 0:
            os.close(self.index_fd)
            self.index_fd = -1
        if self.exports > 0:
            return 0
        if self.data != NULL:
            munmap(self.data, self.capacity)
            self.data = NULL
        if self.index != NULL:
            munmap(self.index, self.index_max)
            self.index = NULL
        return 0
