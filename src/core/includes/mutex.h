/* A plain pthread mutex for the core's locks.
 *
 * CPython's PyThread locks read the monotonic clock on every acquire, even
 * a non-blocking one (to compute a deadline), and a get and its ack take
 * five locks: those clock reads cost more than the rest of the lock work.
 * A pthread mutex is unlocked by the thread that locked it, which is how
 * the core uses all of its locks.
 */
#ifndef PYMQ_MUTEX_H
#define PYMQ_MUTEX_H

#include <pthread.h>
#include <stdlib.h>

typedef pthread_mutex_t pymq_mutex;

static inline pymq_mutex *pymq_mutex_new(void)
{
    pymq_mutex *mutex = (pymq_mutex *)malloc(sizeof(pymq_mutex));

    if (mutex != NULL && pthread_mutex_init(mutex, NULL) != 0) {
        free(mutex);
        return NULL;
    }
    return mutex;
}

static inline void pymq_mutex_free(pymq_mutex *mutex)
{
    if (mutex != NULL) {
        pthread_mutex_destroy(mutex);
        free(mutex);
    }
}

/* Return 1 when the mutex was free and is now held. */
static inline int pymq_mutex_trylock(pymq_mutex *mutex)
{
    return pthread_mutex_trylock(mutex) == 0;
}

static inline void pymq_mutex_lock(pymq_mutex *mutex)
{
    pthread_mutex_lock(mutex);
}

static inline void pymq_mutex_unlock(pymq_mutex *mutex)
{
    pthread_mutex_unlock(mutex);
}

/* A condition variable used with a pymq_mutex. */
typedef pthread_cond_t pymq_cond;

static inline pymq_cond *pymq_cond_new(void)
{
    pymq_cond *cond = (pymq_cond *)malloc(sizeof(pymq_cond));

    if (cond != NULL && pthread_cond_init(cond, NULL) != 0) {
        free(cond);
        return NULL;
    }
    return cond;
}

static inline void pymq_cond_free(pymq_cond *cond)
{
    if (cond != NULL) {
        pthread_cond_destroy(cond);
        free(cond);
    }
}

static inline void pymq_cond_wait(pymq_cond *cond, pymq_mutex *mutex)
{
    pthread_cond_wait(cond, mutex);
}

static inline void pymq_cond_broadcast(pymq_cond *cond)
{
    pthread_cond_broadcast(cond);
}

/* pymq_lock: a lock for the short critical sections that every message
 * passes through (a group's lock, a store's lock).  In glibc 2.36,
 * pthread_mutex_trylock and pthread_mutex_unlock took 34 and 26
 * instructions a call (callgrind), mostly checks of the mutex kind that
 * these locks never need.  Here a free lock is taken with one
 * compare-and-swap and released with one exchange.
 * On Linux a waiter sleeps in futex(2).  The state is 0 when free, 1 when
 * held and 2 when held with a thread that may be sleeping, so that an
 * unlock calls into the kernel only then.  Elsewhere it is a pthread mutex.
 * Like pymq_mutex, it is unlocked by the thread that locked it, and it
 * takes no part in a pymq_cond. */
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    int state;
} pymq_lock;

static inline pymq_lock *pymq_lock_new(void)
{
    return (pymq_lock *)calloc(1, sizeof(pymq_lock));
}

static inline void pymq_lock_free(pymq_lock *lock)
{
    free(lock);
}

/* Return 1 when the lock was free and is now held. */
static inline int pymq_lock_trylock(pymq_lock *lock)
{
    int expected = 0;

    return __atomic_compare_exchange_n(&lock->state, &expected, 1, 0,
                                       __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

static inline void pymq_lock_lock(pymq_lock *lock)
{
    if (pymq_lock_trylock(lock))
        return;
    /* Marked as waited on before each sleep, so the holder's unlock wakes
     * a sleeper.  FUTEX_WAIT returns at once when the state is no longer
     * 2, and may return early; the exchange then tries again. */
    while (__atomic_exchange_n(&lock->state, 2, __ATOMIC_ACQUIRE) != 0)
        syscall(SYS_futex, &lock->state, FUTEX_WAIT_PRIVATE, 2, NULL, NULL,
                0);
}

static inline void pymq_lock_unlock(pymq_lock *lock)
{
    if (__atomic_exchange_n(&lock->state, 0, __ATOMIC_RELEASE) == 2)
        syscall(SYS_futex, &lock->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL,
                0);
}
#else
typedef pymq_mutex pymq_lock;
#define pymq_lock_new pymq_mutex_new
#define pymq_lock_free pymq_mutex_free
#define pymq_lock_trylock pymq_mutex_trylock
#define pymq_lock_lock pymq_mutex_lock
#define pymq_lock_unlock pymq_mutex_unlock
#endif

#endif
