/* Allocator settings for the server process.
 *
 * A server moves frames of many megabytes. glibc hands each allocation
 * over 128 KiB to mmap and returns it to the kernel when freed, so every
 * large frame's pages are faulted in and zeroed again. Raising the mmap
 * and trim thresholds keeps such buffers in the heap for reuse. Other C
 * libraries have no such knobs; there the call does nothing.
 */
#ifndef PYMQ_ALLOCATOR_H
#define PYMQ_ALLOCATOR_H

#if defined(__GLIBC__)
#include <malloc.h>
#endif

/* Return 1 when the settings were applied, 0 when this libc has none. */
static inline int pymq_keep_large_buffers(int mmap_threshold, int trim_threshold)
{
#if defined(__GLIBC__)
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 &&
           mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1;
#else
    (void)mmap_threshold;
    (void)trim_threshold;
    return 0;
#endif
}

#endif
