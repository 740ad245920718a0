# Extern declarations the Cython packages do not ship.

from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "includes/crc32c.h" nogil:
    uint32_t pymq_crc32c(uint32_t crc, const void *data, size_t length)
    uint32_t pymq_crc32c_pair(const void *first, size_t first_length,
                              const void *second, size_t second_length)
    enum:
        PYMQ_CRC32C_HEAD
    uint32_t pymq_crc32c_head(const void *head, const void *body,
                              size_t length)
    void pymq_crc32c_head3(const void **head, const void **body,
                           const size_t *length, uint32_t *out)
    uint32_t pymq_crc32c_portable(uint32_t crc, const void *data,
                                  size_t length)
    const char *pymq_crc32c_impl()


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_REALTIME
        CLOCK_MONOTONIC
        CLOCK_REALTIME_COARSE
        CLOCK_MONOTONIC_COARSE
    int clock_gettime(int clock, timespec *out)


cdef inline int64_t realtime_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_REALTIME, &now)
    return <int64_t>now.tv_sec * 1000000000 + now.tv_nsec


# The coarse clocks tick every few milliseconds (4 ms on many kernels) but
# cost a fraction of the precise ones: enough for visibility deadlines and
# journal records, not for message timestamps.
cdef inline int64_t coarse_realtime_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_REALTIME_COARSE, &now)
    return <int64_t>now.tv_sec * 1000000000 + now.tv_nsec


cdef inline int64_t coarse_monotonic_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC_COARSE, &now)
    return <int64_t>now.tv_sec * 1000000000 + now.tv_nsec


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <int64_t>now.tv_sec * 1000000000 + now.tv_nsec


cdef extern from "includes/prefault.h" nogil:
    ctypedef struct pymq_prefault:
        int running
    int pymq_prefault_start(pymq_prefault *job, void *start, size_t length,
                            size_t page_size)
    void pymq_prefault_stop(pymq_prefault *job)
    int pymq_prefault_busy(pymq_prefault *job)


cdef extern from "includes/mutex.h" nogil:
    ctypedef struct pymq_mutex:
        pass
    pymq_mutex *pymq_mutex_new()
    void pymq_mutex_free(pymq_mutex *mutex)
    bint pymq_mutex_trylock(pymq_mutex *mutex)
    void pymq_mutex_lock(pymq_mutex *mutex)
    void pymq_mutex_unlock(pymq_mutex *mutex)
    ctypedef struct pymq_cond:
        pass
    pymq_cond *pymq_cond_new()
    void pymq_cond_free(pymq_cond *cond)
    void pymq_cond_wait(pymq_cond *cond, pymq_mutex *mutex)
    void pymq_cond_broadcast(pymq_cond *cond)
    ctypedef struct pymq_lock:
        pass
    pymq_lock *pymq_lock_new()
    void pymq_lock_free(pymq_lock *lock)
    bint pymq_lock_trylock(pymq_lock *lock)
    void pymq_lock_lock(pymq_lock *lock)
    void pymq_lock_unlock(pymq_lock *lock)


cdef extern from "includes/commit.h" nogil:
    uint64_t pymq_load_u64(const uint64_t *value)
    void pymq_store_u64(uint64_t *value, uint64_t new_value)
    ctypedef struct pymq_commit:
        pass
    pymq_commit *pymq_commit_new()
    void pymq_commit_free(pymq_commit *commit)
    uint32_t pymq_commit_seq(pymq_commit *commit)
    void pymq_commit_arrive(pymq_commit *commit)
    bint pymq_commit_lead(pymq_commit *commit)
    int64_t pymq_commit_gather(pymq_commit *commit)
    void pymq_commit_end(pymq_commit *commit, int64_t started)
    void pymq_commit_wait(pymq_commit *commit, uint32_t seen)

cdef inline void lock_without_gil(pymq_mutex *mutex) noexcept:
    """Lock mutex; when it is taken, wait for it with the GIL released.

    Waiting with the GIL held could deadlock against the thread that holds
    the mutex and needs the GIL to finish.
    """
    if not pymq_mutex_trylock(mutex):
        with nogil:
            pymq_mutex_lock(mutex)


cdef inline void take_lock(pymq_lock *lock) noexcept:
    """Lock lock; when it is taken, wait for it with the GIL released.

    As in lock_without_gil(), waiting with the GIL held could deadlock.
    """
    if not pymq_lock_trylock(lock):
        with nogil:
            pymq_lock_lock(lock)


cdef extern from "includes/allocator.h" nogil:
    int pymq_keep_large_buffers(int mmap_threshold, int trim_threshold)


cdef extern from "<sys/socket.h>" nogil:
    enum:
        MSG_DONTWAIT
    ssize_t recv(int fd, void *buffer, size_t length, int flags)


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef extern from *:
    """
    #include <string.h>
    #define pymq_prefetch(address) __builtin_prefetch((address), 0, 3)
    #define pymq_prefetch_write(address) __builtin_prefetch((address), 1, 3)

    /* memcpy, inline for 32 to 128 bytes: blocks of 32 from the start and
     * one that ends at the end, overlapping the one before it. A body of
     * that size then costs no call and no size dispatch. */
    static inline void pymq_copy_body(void *target, const void *source,
                                      size_t length)
    {
        unsigned char *to = (unsigned char *)target;
        const unsigned char *from = (const unsigned char *)source;

        if (length - 32 > 96) {
            memcpy(to, from, length);
            return;
        }
        memcpy(to, from, 32);
        if (length > 64)
            memcpy(to + 32, from + 32, 32);
        if (length > 96)
            memcpy(to + 64, from + 64, 32);
        memcpy(to + length - 32, from + length - 32, 32);
    }
    """
    void pymq_prefetch(const void *address) nogil
    void pymq_prefetch_write(const void *address) nogil
    void pymq_copy_body(void *target, const void *source,
                        size_t length) nogil
