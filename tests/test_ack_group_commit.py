"""Under fsync="always", acks from many threads share the journal's syncs.

An LD_PRELOAD wrapper, built with the C compiler, counts the msync calls on
the mappings of group journal segments (files under /groups/ ending in
.log) and makes each one take 2 ms, as a sync to a disk would. While one
thread syncs, the acks of the others are written to the journal and wait
for the next sync, which covers all of them; so 8 threads acking at once
need fewer syncs than acks. A reopen then finds every ack kept.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

THREADS = 8
ACKS_PER_THREAD = 25

WRAPPER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_RANGES 4096

static struct { char *start; size_t length; } ranges[MAX_RANGES];
static pthread_mutex_t ranges_lock = PTHREAD_MUTEX_INITIALIZER;
static long journal_syncs;

long pymq_test_journal_syncs(void)
{
    return __atomic_load_n(&journal_syncs, __ATOMIC_SEQ_CST);
}

static int is_journal_segment(int fd)
{
    char link[64], path[4096];
    ssize_t length;

    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    length = readlink(link, path, sizeof(path) - 1);
    if (length < 4)
        return 0;
    path[length] = 0;
    return strstr(path, "/groups/") != NULL &&
           strcmp(path + length - 4, ".log") == 0;
}

void *mmap(void *address, size_t length, int prot, int flags, int fd,
           off_t offset)
{
    static void *(*next)(void *, size_t, int, int, int, off_t);
    void *mapped;
    int i;

    if (next == NULL)
        next = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(
            RTLD_NEXT, "mmap");
    mapped = next(address, length, prot, flags, fd, offset);
    if (mapped == MAP_FAILED || fd < 0 || !is_journal_segment(fd))
        return mapped;
    pthread_mutex_lock(&ranges_lock);
    for (i = 0; i < MAX_RANGES; i++) {
        if (ranges[i].start == NULL) {
            ranges[i].start = mapped;
            ranges[i].length = length;
            break;
        }
    }
    pthread_mutex_unlock(&ranges_lock);
    return mapped;
}

void *mmap64(void *address, size_t length, int prot, int flags, int fd,
             off_t offset)
{
    return mmap(address, length, prot, flags, fd, offset);
}

int munmap(void *address, size_t length)
{
    static int (*next)(void *, size_t);
    int i;

    if (next == NULL)
        next = (int (*)(void *, size_t))dlsym(RTLD_NEXT, "munmap");
    pthread_mutex_lock(&ranges_lock);
    for (i = 0; i < MAX_RANGES; i++) {
        if (ranges[i].start == address)
            ranges[i].start = NULL;
    }
    pthread_mutex_unlock(&ranges_lock);
    return next(address, length);
}

static int tracked(const char *address, size_t length)
{
    int i, found = 0;

    pthread_mutex_lock(&ranges_lock);
    for (i = 0; i < MAX_RANGES && !found; i++) {
        found = ranges[i].start != NULL &&
                address < ranges[i].start + ranges[i].length &&
                ranges[i].start < address + length;
    }
    pthread_mutex_unlock(&ranges_lock);
    return found;
}

int msync(void *address, size_t length, int flags)
{
    static int (*next)(void *, size_t, int);

    if (next == NULL)
        next = (int (*)(void *, size_t, int))dlsym(RTLD_NEXT, "msync");
    if ((flags & MS_SYNC) && tracked(address, length)) {
        __atomic_add_fetch(&journal_syncs, 1, __ATOMIC_SEQ_CST);
        usleep(2000);
    }
    return next(address, length, flags);
}
"""

# argv: data folder, wrapper library. Prints one JSON object.
SCRIPT = textwrap.dedent(
    """
    import ctypes, json, sys, threading
    import pymq

    data, library = sys.argv[1], sys.argv[2]
    threads, per_thread = int(sys.argv[3]), int(sys.argv[4])
    journal_syncs = ctypes.CDLL(library).pymq_test_journal_syncs
    journal_syncs.restype = ctypes.c_long
    results = {}

    # A long flush interval keeps the background flush out of the count.
    with pymq.open(data, fsync="always", flush_interval=3600) as broker:
        queue = broker.queue("jobs")
        queue.put_many([b"m%d" % i for i in range(threads * per_thread)])
        messages = queue.get_many(threads * per_thread)
        results["delivered"] = len(messages)
        start = threading.Barrier(threads)
        errors = []

        def ack_share(share):
            start.wait()
            try:
                for message in share:
                    message.ack()
            except Exception as exc:
                errors.append(repr(exc))

        workers = [
            threading.Thread(target=ack_share, args=(messages[i::threads],))
            for i in range(threads)
        ]
        before = journal_syncs()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        results["syncs"] = journal_syncs() - before
        results["errors"] = errors

    with pymq.open(data, fsync="always", flush_interval=3600) as broker:
        results["depth"] = broker.queue("jobs").stats().depth
    print(json.dumps(results))
    """
)


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the msync wrapper")
    source = tmp_path / "count_syncs.c"
    source.write_text(WRAPPER)
    library = tmp_path / "count_syncs.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"],
        check=True,
        capture_output=True,
    )
    return library


def run_acks(tmp_path: Path, wrapper: Path, threads: int, per_thread: int) -> dict:
    """Ack threads * per_thread messages from threads threads; return the results."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(tmp_path / "data"),
            str(wrapper),
            str(threads),
            str(per_thread),
        ],
        env={"LD_PRELOAD": str(wrapper)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    results: dict = json.loads(result.stdout)
    return results


def test_single_thread_acks_sync_each(tmp_path: Path, wrapper: Path) -> None:
    # Nothing to share: the count is one sync per ack, which shows that the
    # wrapper counts each sync of the journal once.
    results = run_acks(tmp_path, wrapper, 1, THREADS * ACKS_PER_THREAD)
    assert results["errors"] == []
    assert results["syncs"] == THREADS * ACKS_PER_THREAD
    assert results["depth"] == 0


def test_concurrent_acks_share_journal_syncs(tmp_path: Path, wrapper: Path) -> None:
    results = run_acks(tmp_path, wrapper, THREADS, ACKS_PER_THREAD)
    acks = THREADS * ACKS_PER_THREAD
    assert results["delivered"] == acks
    assert results["errors"] == []
    assert results["syncs"] >= 1
    assert results["syncs"] < acks
    assert results["depth"] == 0
