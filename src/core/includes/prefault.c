/* Background prefaulting of a shared file mapping; see prefault.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE  /* SCHED_IDLE */
#endif
#include "prefault.h"

#include <sched.h>
#include <stdint.h>
#include <unistd.h>

static void *prefault_run(void *argument)
{
    pymq_prefault *job = (pymq_prefault *)argument;
    size_t pos;
    struct sched_param param = {0};

    /* Runs only on a CPU that nothing else wants, so it never takes the
     * writer's CPU away. On a busy machine the writer takes its own faults.
     * NOTE: a writer that reaches the page this thread is faulting in waits
     * for it. On a saturated machine that wait may last a scheduler period. */
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &param);
    for (pos = 0; pos < job->length; pos += job->page_size) {
        if (__atomic_load_n(&job->stop, __ATOMIC_RELAXED))
            break;
        __atomic_fetch_or((uint64_t *)(job->start + pos), 0,
                          __ATOMIC_RELAXED);
    }
    __atomic_store_n(&job->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

int pymq_prefault_start(pymq_prefault *job, void *start, size_t length,
                        size_t page_size)
{
    int rc;

    pymq_prefault_stop(job);
    job->start = (unsigned char *)start;
    job->length = length;
    job->page_size = page_size;
    __atomic_store_n(&job->stop, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&job->done, 0, __ATOMIC_RELAXED);
    rc = pthread_create(&job->thread, NULL, prefault_run, job);
    job->running = rc == 0;
    job->owner = getpid();
    return rc;
}

void pymq_prefault_stop(pymq_prefault *job)
{
    if (!job->running)
        return;
    if (job->owner != getpid()) {
        job->running = 0;
        return;
    }
    __atomic_store_n(&job->stop, 1, __ATOMIC_RELAXED);
    pthread_join(job->thread, NULL);
    job->running = 0;
}

int pymq_prefault_busy(pymq_prefault *job)
{
    /* A forked child has no such thread: its copy of done never changes. */
    return job->running && job->owner == getpid() &&
           !__atomic_load_n(&job->done, __ATOMIC_ACQUIRE);
}
