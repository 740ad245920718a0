# SegmentStore: a log of segments in one folder, with fsync policies.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef enum FsyncPolicy:
    FSYNC_NEVER = 0
    FSYNC_INTERVAL = 1
    FSYNC_ALWAYS = 2


cdef enum LookupStatus:
    FOUND = 0
    OUT_OF_RANGE = 1      # below the first offset or at/after the next one
    NO_RECORD = 2         # inside the log, but lost to damage or a gap
    DAMAGED = 3           # the record failed its check just now


cdef class DirectoryLock:
    cdef readonly str path           # the lock file
    cdef int fd                      # holds the flock; -1 once released

    cpdef release(self)


cdef class SegmentStore:
    cdef readonly str path           # the folder of this log
    cdef list segments               # Segment objects in offset order
    cdef Segment active              # the last segment, taking appends
    cdef Segment last_read           # where the previous lookup ended
    cdef list pending                # sealed segments not yet checkpointed
    # Segments that drop_below() took out of the log and renamed to
    # DROPPED_PREFIX + name; the next background flush, flush() or close()
    # unmaps them and unlinks their files.
    cdef list dropped
    cdef Segment spare               # prefaulted, takes the next roll
    cdef bint spare_failed           # creating a spare failed since the roll
    # reserve_ahead (group journals): the spare is created at open and after
    # every roll, and every index at its full size, so appends need no new
    # disk space until the spare is used.
    cdef readonly bint reserve_ahead
    cdef int64_t spare_retry_ns      # when to try a failed spare again
    cdef bint reserve_lost           # the last try to reserve failed (logged)
    cdef bint spare_warm             # the spare's pages are being touched
    cdef readonly size_t segment_bytes
    cdef readonly size_t max_message_bytes
    cdef FsyncPolicy policy
    # Lock order: sync_lock before lock. lock guards the segment list and
    # every length and counter; sync_lock lets one thread sync at a time
    # and keeps segments mapped while it syncs them.
    cdef pymq_lock *lock
    cdef pymq_mutex *sync_lock
    # Group commit: the thread leading a sync for sync_to() holds it;
    # threads whose records that sync or the next will cover wait on it.
    cdef pymq_commit *commit_state
    cdef bint sync_eio               # a sync failed with EIO; all later fail
    # Every byte outside the active segment is synced: a sync_to() can then
    # sync the active segment's tail without the GIL (see sync_tail).
    cdef bint tail_synced
    cdef uint64_t installs           # times install() replaced the active
    cdef uint64_t written_bytes      # bytes appended since open
    cdef readonly uint64_t stored_bytes  # bytes of records in the segments
    # Of those, bytes known to be synced. Read without the store's locks
    # by threads waiting in sync_to(), so stored with pymq_store_u64.
    cdef uint64_t synced_bytes
    cdef bint directory_dirty        # a file was created or renamed
    cdef bint events_pending         # a segment has damage to report
    cdef uint64_t deleted_damaged    # damage counted in deleted segments
    cdef DirectoryLock owner_lock
    cdef object on_damage            # callable(str) for damage messages
    cdef readonly bint closed
    cdef object __weakref__

    cdef int acquire(self) except -1
    cdef int acquire_raw(self) except -1
    cdef void release(self) noexcept
    cdef int acquire_sync(self) except -1
    cdef int check_size(self, size_t length) except -1
    cdef int open_segments(self, uint64_t min_next_offset) except -1
    cdef Segment find(self, uint64_t offset)
    cdef report_events(self, Segment seg)
    cdef Segment new_segment(self, uint64_t base)
    cdef int make_spare(self) except -1
    cdef int follow_prefault(self, Segment seg) except -1
    cdef int append_list(self, list items, int64_t timestamp, uint32_t flags,
                         uint64_t *first) except -1
    cdef int after_append(self, Segment seg) except -1
    cdef bint reserve_index(self, Segment seg) except -1
    cdef int refill_reserve(self) except -1
    cdef int keep_reserve(self, Segment seg) except -1
    cdef bint recycle(self, Segment seg) except -1
    cdef int reserve_failed(self, str what, object exc) except -1
    cdef int install(self, Segment seg) except -1
    cdef int skip_to(self, uint64_t offset) except -1
    cdef int reserve(self, const BodyRef *bodies, Py_ssize_t count,
                     list fresh) except -1
    cdef int append_locked(self, const BodyRef *bodies, Py_ssize_t count,
                           int64_t timestamp, uint32_t flags,
                           uint64_t *first) except -1
    cdef int append_refs(self, const BodyRef *bodies, Py_ssize_t count,
                         int64_t timestamp, uint32_t flags,
                         uint64_t *first) except -1
    cdef int append_unsynced(self, const BodyRef *bodies, Py_ssize_t count,
                             int64_t timestamp, uint32_t flags,
                             uint64_t *first, uint64_t *written) except -1
    cdef int sync_to(self, uint64_t written) except -1
    cdef int commit(self, uint64_t written, int64_t *started,
                    int *error) noexcept nogil
    cdef int sync_tail(self) noexcept nogil
    cdef object sync_error(self, int error)
    cdef int forget_first(self) except -1
    cdef Py_ssize_t drop_below(self, uint64_t offset) except -1
    cdef bint reuse_dropped(self, Segment seg) except -1
    cdef int warn_not_reused(self, Segment seg, object error) except -1
    cdef int unlink_dropped(self) except -1
    cdef int sync_segments(self, bint include_active,
                           bint checkpoint) except -1
    cdef int locate(self, uint64_t offset, uint32_t *pos) except -1
    cdef object lookup_error(self, int status, uint64_t offset)
    cdef object make_item(self, Segment seg, uint32_t pos, uint64_t offset,
                          int kind, object view)
    cdef object read_one(self, uint64_t offset, int kind)
    cdef list collect(self, uint64_t start, uint64_t stop, int kind)
    cdef int report(self) except -1
    cdef uint64_t count_gaps(self)
