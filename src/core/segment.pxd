# One segment of a log: a preallocated file mapped with mmap, and its index.
#
# Record layout (little-endian, every record starts 8-byte aligned; fields
# are loaded and stored in host order, so the build refuses big-endian hosts):
#
#   byte  size  field
#   0     4     magic       REC_MAGIC, the bytes "PMQR"
#   4     4     length      body length in bytes
#   8     8     offset      offset of this record in the log
#   16    8     timestamp   nanoseconds since the Unix epoch
#   24    4     flags       low 16 bits belong to the caller
#   28    4     crc         CRC32C of bytes 0-27, then of the body
#   32    ...   body        padded with zeros to a multiple of 8
#
# Index file layout (little-endian): a 64-byte checkpoint header, then one
# u32 per offset from the segment's base: the record's byte position in the
# segment, or IDX_MISSING.
#
#   byte  size  field
#   0     4     magic       IDX_MAGIC, the bytes "PMQX"
#   4     4     version     IDX_VERSION
#   8     8     base        offset of the segment's first record
#   16    8     count       offsets covered by verified data
#   24    8     length      bytes of the segment verified at the checkpoint
#   32    4     flags       IDX_SEALED: no record will be added
#                             IDX_CLEAN: closed with no record past length
#   36    4     capacity    size of the segment file in bytes
#   40    20    reserved    zero
#   60    4     crc         CRC32C of bytes 0-59

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef enum:
    REC_MAGIC = 0x52514D50
    REC_OFF_MAGIC = 0
    REC_OFF_LENGTH = REC_OFF_MAGIC + 4
    REC_OFF_OFFSET = REC_OFF_LENGTH + 4
    REC_OFF_TIMESTAMP = REC_OFF_OFFSET + 8
    REC_OFF_FLAGS = REC_OFF_TIMESTAMP + 8
    REC_OFF_CRC = REC_OFF_FLAGS + 4
    REC_HEADER_SIZE = REC_OFF_CRC + 4
    REC_ALIGN = 8

cdef enum:
    IDX_MAGIC = 0x58514D50
    IDX_VERSION = 1
    IDX_OFF_MAGIC = 0
    IDX_OFF_VERSION = IDX_OFF_MAGIC + 4
    IDX_OFF_BASE = IDX_OFF_VERSION + 4
    IDX_OFF_COUNT = IDX_OFF_BASE + 8
    IDX_OFF_LENGTH = IDX_OFF_COUNT + 8
    IDX_OFF_FLAGS = IDX_OFF_LENGTH + 8
    IDX_OFF_CAPACITY = IDX_OFF_FLAGS + 4
    IDX_OFF_CRC = 60
    IDX_HEADER_SIZE = IDX_OFF_CRC + 4
    IDX_ENTRY_SIZE = 4
    IDX_SEALED = 1
    IDX_CLEAN = 2
    # The log file was used before and was not zeroed (Segment.reuse):
    # records of its earlier use may follow the new ones.
    IDX_REUSED = 4
    # Index files grow in steps of at least this many bytes.
    IDX_GROW_BYTES = 4096

cdef extern from *:
    """
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    #error "pymq stores integers in host order and its files are little-endian"
    #endif
    #define PYMQ_IDX_MISSING 0xFFFFFFFFu
    #define PYMQ_MAX_SEGMENT_BYTES ((size_t)1 << 31)
    """
    # Index entry of an offset with no record: lost to damage, or a gap.
    const uint32_t IDX_MISSING "PYMQ_IDX_MISSING"
    # Largest segment file; positions in the index are 32-bit.
    const size_t MAX_SEGMENT_BYTES "PYMQ_MAX_SEGMENT_BYTES"


cdef inline size_t record_size(size_t length) noexcept nogil:
    return REC_HEADER_SIZE + ((length + REC_ALIGN - 1) & ~(<size_t>REC_ALIGN - 1))


cdef inline uint32_t load_u32(const uint8_t *p) noexcept nogil:
    return (<const uint32_t *>p)[0]


cdef inline uint64_t load_u64(const uint8_t *p) noexcept nogil:
    return (<const uint64_t *>p)[0]


cdef inline void store_u32(uint8_t *p, uint32_t value) noexcept nogil:
    (<uint32_t *>p)[0] = value


cdef inline void store_u64(uint8_t *p, uint64_t value) noexcept nogil:
    (<uint64_t *>p)[0] = value


cdef struct BodyRef:
    const uint8_t *data
    size_t length


cdef enum:
    # Batches of up to this many messages keep their scratch arrays on the
    # stack instead of allocating them.
    SMALL_BATCH = 128


@cython.final
cdef class Segment:
    cdef readonly uint64_t base      # offset of the first record
    cdef readonly str path           # the log file, named by base
    cdef readonly str index_path     # the index file beside it
    cdef int fd                      # log file, -1 once closed
    cdef int index_fd                # index file, -1 once closed
    cdef uint8_t *data               # mapping of the whole log file
    cdef readonly size_t capacity    # size of the log file in bytes
    cdef readonly size_t length      # end of the last valid record
    cdef readonly uint64_t count     # offsets covered: next offset - base
    cdef uint8_t *index              # mapping of the index, index_max bytes
    cdef size_t index_max            # index size with every entry in use
    cdef size_t index_alloc          # index bytes reserved on disk
    cdef size_t synced_length        # bytes known to be on stable storage
    cdef uint64_t synced_count       # offsets covered by synced_length
    cdef size_t checkpoint_length    # length stored in the index header
    cdef uint64_t checkpoint_count   # count stored in the index header
    cdef uint32_t checkpoint_flags   # IDX_SEALED and IDX_CLEAN in the header
    cdef readonly bint sealed        # no record will be appended
    cdef readonly uint64_t damaged   # records lost or failing their CRC
    cdef Py_ssize_t exports          # buffers handed out over the mapping
    cdef bint closed                 # files closed; unmapped once exports is 0
    cdef list events                 # damage messages not yet reported
    cdef pymq_prefault prefault      # thread touching pages ahead of writes
    cdef size_t prefault_base        # where its first prefault started
    cdef size_t prefault_end         # end of the pages given to it, or 0
    cdef bint reused                 # IDX_REUSED: old records past the new

    @staticmethod
    cdef Segment create(str directory, str name, uint64_t base,
                        size_t capacity, bint full_index=*)
    @staticmethod
    cdef Segment open(str path, uint64_t base, size_t capacity, bint last)
    @staticmethod
    cdef Segment open_spare(str directory, str name)

    cdef int map_files(self) except -1
    cdef int rename_to(self, str directory, uint64_t base) except -1
    cdef int recycle(self, str directory, str name) except -1
    cdef int reuse(self, str directory, str name) except -1
    cdef int clear(self, bint zeroed) except -1
    cdef int start_prefault(self, size_t start, size_t length) except -1
    cdef void prefault_done(self) noexcept
    cdef int ensure_index(self, uint64_t entries) except -1
    cdef int load_checkpoint(self) except -1
    cdef int recover(self, size_t start, uint64_t start_count) except -1
    cdef int rebuild_index(self) except -1
    cdef int end_reused(self, size_t pos, uint64_t expect,
                        uint64_t max_offset) except -1
    cdef uint8_t *index_entry(self, uint64_t offset) noexcept
    cdef uint32_t position(self, uint64_t offset) noexcept
    cdef int check_at(self, uint64_t offset, uint32_t pos) except -1
    cdef int mark_damaged(self, uint64_t offset, uint32_t pos,
                          str reason) except -1
    cdef void write_records(self, const BodyRef *bodies, Py_ssize_t count,
                            int64_t timestamp, uint32_t flags) noexcept
    cdef int write_record(self, const uint8_t *body, size_t length,
                          int64_t timestamp, uint32_t flags) except -1
    cdef int sync_range(self, size_t start, size_t stop) except -1
    cdef int write_checkpoint(self, size_t length, uint64_t count,
                              uint32_t flags, bint sync) except -1
    cdef int release(self) except -1
