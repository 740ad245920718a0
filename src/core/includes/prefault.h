/* Background prefaulting of a shared file mapping.
 *
 * The first write to each page of a fresh segment costs a page fault, and
 * with small records those faults take most of an append's time. A thread
 * touches every page of a new segment ahead of the writer, on another core.
 * It touches a page with an atomic OR of zero: the page contents never
 * change, even when the writer stores to the same word at the same time.
 * NOTE: a touched page is dirty, so a segment filled more slowly than the
 * kernel's writeback delay has its zero pages written out once before the
 * records that replace them. A read touch avoids that but saves no time.
 */
#ifndef PYMQ_PREFAULT_H
#define PYMQ_PREFAULT_H

#include <pthread.h>
#include <stddef.h>
#include <sys/types.h>

typedef struct {
    unsigned char *start;   /* first page to touch */
    size_t length;          /* bytes to touch from start */
    size_t page_size;
    int stop;               /* set by pymq_prefault_stop, read atomically */
    int running;            /* a thread was started and not yet joined */
    int done;               /* set by the thread as it ends, read atomically */
    pid_t owner;            /* process that started it; a forked child
                               has no such thread and must not join it */
    pthread_t thread;
} pymq_prefault;

/* Start touching [start, start + length). Returns 0 or an errno value. */
int pymq_prefault_start(pymq_prefault *job, void *start, size_t length,
                        size_t page_size);

/* Ask the thread to stop and wait for it; does nothing if none runs. */
void pymq_prefault_stop(pymq_prefault *job);

/* Return 1 while a started thread has not yet touched its last page. */
int pymq_prefault_busy(pymq_prefault *job);

#endif
