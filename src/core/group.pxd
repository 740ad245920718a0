# Messages, streams and consumer groups: the per-message path of the broker.
#
# A message with headers is stored with REC_FLAG_HEADERS set and its body
# prefixed by a header block (little-endian):
#
#   u16 count, then per header: u16 key length, key (UTF-8),
#                               u32 value length, value (UTF-8)
#
# Group journal records (little-endian), one SegmentStore per group:
#
#   JOURNAL_DELIVER     u8 op, u32 count, count x (u64 offset, u32 attempt)
#   JOURNAL_ACK         u8 op, u32 count, count x u64 offset
#   JOURNAL_DEAD        u8 op, u32 count, count x u64 offset
#   JOURNAL_MOVING      u8 op, u32 count, count x u64 offset
#   JOURNAL_CHECKPOINT  u8 op, u64 low, u64 cursor, u32 count,
#                       count x (u64 offset, u32 attempt, u8 settled)
#                       (the unsettled offsets; the others from low to
#                       cursor are settled)
#
# A delivery is journaled before the message is handed out, so attempt
# counts survive a crash of the consumer or of the broker. Journal records
# carry timestamp 0: replay does not need the time.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef enum:
    REC_FLAG_HEADERS = 1
    # For one group only, named by the header x-for-group; the stream's
    # other groups pass over it. Redrive of a group's DLQ writes these.
    REC_FLAG_TARGETED = 2

cdef enum:
    JOURNAL_DELIVER = 1
    JOURNAL_ACK = 2
    JOURNAL_DEAD = 3
    JOURNAL_CHECKPOINT = 4
    # A move to the DLQ began; JOURNAL_DEAD follows once it is done.
    JOURNAL_MOVING = 5
    # JOURNAL_DELIVER of consecutive offsets with one attempt, and
    # JOURNAL_ACK of consecutive offsets: the first offset, not a list.
    JOURNAL_DELIVER_RUN = 6
    JOURNAL_ACK_RUN = 7


cdef class GroupBase


cdef class TakeSink:
    # Receives the deliveries GroupBase.take_into takes, with the group lock
    # and the stream store's lock held; see take_into.
    cdef int take_run(self, GroupBase group, const uint8_t **records,
                      const size_t *used, list headers, uint64_t first,
                      Py_ssize_t index, Py_ssize_t count) except -1
    cdef int take_one(self, GroupBase group, const uint8_t *record,
                      uint64_t offset, uint32_t attempt, object headers,
                      size_t used, Py_ssize_t index) except -1


@cython.final
@cython.no_gc
cdef class Message:
    cdef readonly bytes body         # the payload
    cdef readonly uint64_t offset    # position in the stream
    cdef readonly int64_t timestamp  # ns since the epoch, set by put
    cdef readonly uint32_t attempt   # 1 for the first delivery
    cdef readonly uint64_t receipt   # names this delivery
    cdef object header_map           # dict, or None when there are none
    cdef GroupBase group             # settles the delivery

    @staticmethod
    cdef Message new(GroupBase group, const uint8_t *header, uint64_t offset,
                     uint32_t attempt, object headers, size_t used)


@cython.final
cdef class MessageBatch:
    cdef readonly bytes data            # the bodies back to back
    # The columns, little-endian, each with room for capacity entries:
    # offsets, receipts, timestamps and lengths (8 bytes an entry, in
    # that order), then attempts (4 bytes an entry). See batch_column().
    cdef bytes columns
    cdef Py_ssize_t count               # messages in the batch
    cdef Py_ssize_t capacity            # entries each column has room for
    cdef list header_list               # dict or None per message, or None: all None
    cdef GroupBase group                # settles the batch, if embedded
    cdef object owner                   # settles it, if from a server

    cdef object column(self, Py_ssize_t index, str dtype)


cdef class StreamBase:
    cdef readonly SegmentStore store  # the stream's records
    cdef readonly str name
    cdef readonly bint dead_letter    # a DLQ, whose puts take RESERVED_HEADERS
    cdef public int waiters           # callers blocked in get() or put()
    cdef public object wake           # callable() run after a put with waiters
    cdef public GroupBase queue_group # a queue's group, whose depth is bounded
    cdef public int64_t max_length    # messages not yet acked; -1: no limit
    cdef public int64_t max_bytes     # bytes of records on disk; -1: no limit
    cdef public bint overflow_block   # at a limit: wait (True) or raise
    cdef public object wait_room      # callable(seconds or None) -> bool
    cdef pymq_mutex *put_lock  # makes check and append one step

    cdef int published(self) except -1
    cdef int raise_closed(self) except -1
    cdef uint64_t append_batch_unsynced(self, list items, uint32_t flags,
                                        uint64_t *written) except? 0
    cdef bint has_room(self, Py_ssize_t count, size_t size) except -1
    cdef uint64_t put_refs(self, const BodyRef *refs, Py_ssize_t count,
                           uint32_t flags, object timeout) except? 0
    cdef int reserve_room(self, Py_ssize_t count, size_t size,
                          object timeout) except -1


cdef class GroupBase:
    cdef readonly StreamBase stream
    cdef SegmentStore journal         # this group's journal
    cdef RingBuffer ring
    cdef pymq_lock *lock       # ring and counters; before store locks
    cdef int64_t visibility_ns
    cdef public uint32_t max_deliveries
    cdef public size_t max_in_flight
    # Public for pymq.broker, pymq.queue and the tests, but internal: their
    # names start with "_" so that they are not taken for public API.
    cdef public object _on_dead       # callable(group, offset, attempt,
                                      # reason); raises if not moved
    cdef public object _clock         # callable() -> ns for tests, or None
    cdef public str _group_name       # a stream group's name; None for queues
    cdef public bint _deletes_acked   # a queue: delete segments once acked
    cdef uint64_t delete_mark         # check for deletable segments from here
    cdef uint64_t acked               # acks since open
    cdef uint64_t dead_lettered
    cdef uint64_t skipped             # offsets with no readable record
    cdef list dead_due                # (offset, attempt, reason) to move
    cdef size_t dead_pending          # slots queued for or being moved to the DLQ
    cdef uint64_t journal_written     # journal bytes to sync before returning
    # A checkpoint written after a rollover under fsync="interval" is synced
    # by the next background flush; the journal segments below drop_offset
    # are dropped once the journal's synced bytes reach drop_written (0:
    # no checkpoint waits).
    cdef uint64_t drop_offset
    cdef uint64_t drop_written
    cdef Py_ssize_t drop_segments     # journal segments when a call last
                                      # chose to wait for that flush
    cdef readonly bint closed
    cdef object taken_headers         # set by take_record: dict or None
    cdef size_t taken_used            # and the size of its header block
    cdef set moving                   # offsets whose move to the DLQ began
    cdef set unrecorded_dead          # moved to the DLQ; DEAD record failed
    cdef int64_t error_logged_ns      # when a journal error was last logged

    cdef int acquire(self) except -1
    cdef void release(self) noexcept
    cdef inline int64_t now(self) except? -1
    cdef int write_journal(self, uint8_t op, const uint64_t *offsets,
                           const uint32_t *attempts, Py_ssize_t count) except -1
    cdef int append_journal(self, const BodyRef *ref) except -1
    cdef int write_journal_run(self, uint8_t op, uint64_t first,
                               Py_ssize_t count, uint32_t attempt) except -1
    cdef int finish(self, bint settled) except -1
    cdef int finish_work(self, bint settled) except -1
    cdef inline int expire(self, int64_t now) except -1
    cdef int expire_due(self, int64_t now) except -1
    cdef Message take_one(self, int64_t now)
    cdef bint take_record(self, int64_t now, uint64_t *offset_out,
                          uint32_t *attempt_out,
                          const uint8_t **record) except -1
    cdef Py_ssize_t take_fresh(self, int64_t now, Py_ssize_t limit,
                               const uint8_t **records, size_t *used,
                               list headers) except -1
    cdef Message take_now(self)
    cdef list take_messages(self, Py_ssize_t limit)
    cdef MessageBatch take_batch(self, Py_ssize_t limit)
    cdef object blocking_take(self, object count, object timeout, str method,
                              bint columns)
    cdef Py_ssize_t batch_limit(self, object count, str method) except -1
    cdef Py_ssize_t take_into(self, Py_ssize_t count, TakeSink sink) except -1
    cdef int fail(self, uint64_t offset, int64_t not_before, str reason,
                  bint dead_now) except -1
    cdef uint64_t check_receipt(self, uint64_t receipt) except? 0
    cdef int ack_receipt(self, uint64_t receipt) except -1
    cdef int settle_receipts(self, const uint64_t *receipts,
                             uint64_t *offsets, Py_ssize_t count) except -1
    cdef int begin_move(self, uint64_t offset) except -1
    cdef int end_move(self, uint64_t offset) except -1
    cdef int skip_below(self, uint64_t offset) except -1
    cdef int restore_due(self, list items) except -1
    cdef int retain(self) except -1
    cdef int replay(self, uint64_t start) except -1
    cdef int write_checkpoint(self, bint wait) except -1
    cdef int try_checkpoint(self, str when, bint wait=*) except -1
    cdef bint drop_now(self) except -1
    cdef int drop_checkpointed(self) except -1
    cdef int record_dead(self) except -1
    cdef int skip_offset(self, uint64_t offset) except -1
    cdef int log_journal_error(self, str what, object exc) except -1
