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

#endif
