/* Group commit: the threads that need a sync share it.
 *
 * One thread at a time leads a sync; the others wait for it to end and then
 * check whether it covered their bytes.  The protocol: read
 * pymq_commit_seq(), check the condition, try pymq_commit_lead(); when that
 * fails, pymq_commit_wait() with the count read first.  The leader
 * publishes its result before pymq_commit_end(), so a waiter that reads the
 * new count also reads the result.
 *
 * Waiting.  On Linux a waiter sleeps in futex(2) on the count, and a woken
 * waiter takes no lock.  With a mutex and a condition variable, every
 * waiter that a sync woke retook the mutex in turn, each after the wake-up
 * of the one before it.
 *
 * Gathering.  Threads that append one record at a time and wait for it
 * split into two groups that take turns: those a sync covers append again
 * while the next sync runs, which covers only the others.  Each sync then
 * covers about half of the threads.  So before it syncs, a leader waits
 * for as many arrivals as the largest sync since the last miss had, for
 * at most as long as the last sync took (and 10 ms).  After a wait that reaches that
 * bound, the next sync does not wait and starts the count again.  A lone
 * thread never waits, since its syncs have one record each.  With 8
 * threads putting 100-byte messages under fsync="always" on a 2-core VM,
 * syncs went from 4.3 to 7 records each.  The bound caps what a put can
 * lose: one sync's time, once per miss.
 */
#ifndef PYMQ_COMMIT_H
#define PYMQ_COMMIT_H

#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#if !defined(__linux__)
#include <pthread.h>
#endif

static inline uint64_t pymq_load_u64(const uint64_t *value)
{
    return __atomic_load_n(value, __ATOMIC_ACQUIRE);
}

static inline void pymq_store_u64(uint64_t *value, uint64_t new_value)
{
    __atomic_store_n(value, new_value, __ATOMIC_RELEASE);
}

typedef struct {
    uint32_t seq;           /* bumped each time a sync ends */
    int leading;            /* 1 while a thread leads a sync */
    uint32_t arrivals;      /* threads that came to wait, ever */
    int sleepers;           /* threads in pymq_commit_wait() now */
    /* Used by the leader alone. */
    uint32_t last_arrivals; /* arrivals when the last sync began */
    uint32_t target;        /* arrivals to wait for, 0 for none */
    int64_t last_sync_ns;   /* how long the last sync took */
#if !defined(__linux__)
    pthread_mutex_t mutex;
    pthread_cond_t ended;
#endif
} pymq_commit;

static inline int64_t pymq_commit_clock(void)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

static inline uint32_t pymq_commit_seq(pymq_commit *commit)
{
    return __atomic_load_n(&commit->seq, __ATOMIC_ACQUIRE);
}

/* Count the calling thread as one that waits for a sync. */
static inline void pymq_commit_arrive(pymq_commit *commit)
{
    __atomic_add_fetch(&commit->arrivals, 1, __ATOMIC_RELAXED);
}

/* Return 1 when no thread led a sync and this one now does. */
static inline int pymq_commit_lead(pymq_commit *commit)
{
    int expected = 0;

    return __atomic_compare_exchange_n(&commit->leading, &expected, 1, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

/* The gather waits at most this long, whatever the last sync took, and
 * yields its CPU for the first GATHER_SPIN_NS of it, then sleeps in steps
 * of GATHER_NAP_NS.  Yielding reacts within microseconds, but it keeps a
 * CPU busy, and a slow disk would keep it busy for milliseconds. */
#define GATHER_MAX_NS 10000000
#define GATHER_SPIN_NS 100000
#define GATHER_NAP_NS 20000

/* Called by the leader before it syncs: see "Gathering" above.  Returns
 * the time the sync starts, for pymq_commit_end(). */
static inline int64_t pymq_commit_gather(pymq_commit *commit)
{
    int64_t start = pymq_commit_clock();
    int64_t now = start;
    int64_t deadline = start + (commit->last_sync_ns < GATHER_MAX_NS
                                    ? commit->last_sync_ns
                                    : GATHER_MAX_NS);
    struct timespec nap = {0, GATHER_NAP_NS};
    uint32_t arrived;

    while (1) {
        arrived = __atomic_load_n(&commit->arrivals, __ATOMIC_RELAXED) -
                  commit->last_arrivals;
        if (arrived >= commit->target)
            break;
        if (now >= deadline) {
            /* Missed: the next sync does not wait, and sets the target. */
            commit->target = 0;
            commit->last_arrivals += arrived;
            return now;
        }
        if (now - start < GATHER_SPIN_NS)
            sched_yield();
        else
            nanosleep(&nap, NULL);
        now = pymq_commit_clock();
    }
    if (arrived > commit->target)
        commit->target = arrived;
    commit->last_arrivals += arrived;
    return now;
}

#if defined(__linux__)
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

static inline pymq_commit *pymq_commit_new(void)
{
    return (pymq_commit *)calloc(1, sizeof(pymq_commit));
}

static inline void pymq_commit_free(pymq_commit *commit)
{
    free(commit);
}

/* End the sync this thread led, which began at started (0 when it was not
 * timed), and wake every waiter.  A lone thread makes no wake call.  The
 * count is bumped before sleepers is read, and a sleeper is counted before
 * its futex call compares the count, both sequentially consistent.  So
 * either this call reads the sleeper, or the sleeper reads the new count. */
static inline void pymq_commit_end(pymq_commit *commit, int64_t started)
{
    if (started)
        commit->last_sync_ns = pymq_commit_clock() - started;
    __atomic_store_n(&commit->leading, 0, __ATOMIC_RELEASE);
    __atomic_add_fetch(&commit->seq, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&commit->sleepers, __ATOMIC_SEQ_CST) > 0)
        syscall(SYS_futex, &commit->seq, FUTEX_WAKE_PRIVATE, INT_MAX, NULL,
                NULL, 0);
}

/* Sleep until the count moves past seen; return at once if it has.  May
 * return early, so the caller checks again. */
static inline void pymq_commit_wait(pymq_commit *commit, uint32_t seen)
{
    __atomic_add_fetch(&commit->sleepers, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &commit->seq, FUTEX_WAIT_PRIVATE, seen, NULL, NULL,
            0);
    __atomic_sub_fetch(&commit->sleepers, 1, __ATOMIC_SEQ_CST);
}
#else
static inline pymq_commit *pymq_commit_new(void)
{
    pymq_commit *commit = (pymq_commit *)calloc(1, sizeof(pymq_commit));

    if (commit == NULL)
        return NULL;
    if (pthread_mutex_init(&commit->mutex, NULL) != 0) {
        free(commit);
        return NULL;
    }
    if (pthread_cond_init(&commit->ended, NULL) != 0) {
        pthread_mutex_destroy(&commit->mutex);
        free(commit);
        return NULL;
    }
    return commit;
}

static inline void pymq_commit_free(pymq_commit *commit)
{
    if (commit != NULL) {
        pthread_cond_destroy(&commit->ended);
        pthread_mutex_destroy(&commit->mutex);
        free(commit);
    }
}

static inline void pymq_commit_end(pymq_commit *commit, int64_t started)
{
    if (started)
        commit->last_sync_ns = pymq_commit_clock() - started;
    __atomic_store_n(&commit->leading, 0, __ATOMIC_RELEASE);
    pthread_mutex_lock(&commit->mutex);
    __atomic_add_fetch(&commit->seq, 1, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&commit->ended);
    pthread_mutex_unlock(&commit->mutex);
}

static inline void pymq_commit_wait(pymq_commit *commit, uint32_t seen)
{
    pthread_mutex_lock(&commit->mutex);
    while (pymq_commit_seq(commit) == seen)
        pthread_cond_wait(&commit->ended, &commit->mutex);
    pthread_mutex_unlock(&commit->mutex);
}
#endif

#endif
