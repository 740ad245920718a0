"""Under fsync="always", puts and acks from many threads share syncs.

An LD_PRELOAD wrapper, built with the C compiler, counts the msync calls on
the mappings of one kind of segment. It makes each one take 2 ms, as a sync
to a disk would. The kind is message segments (files under /log/ ending in
.log) or group journal segments (under /groups/). While one thread syncs,
the others append and wait for the next sync, which covers all of them. So
8 threads at once need fewer syncs than records. A reopen then finds every
record.
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
PER_THREAD = 25

WRAPPER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_RANGES 4096

static struct { char *start; size_t length; } ranges[MAX_RANGES];
static pthread_mutex_t ranges_lock = PTHREAD_MUTEX_INITIALIZER;
static long syncs;
static long yields;

long pymq_test_syncs(void)
{
    return __atomic_load_n(&syncs, __ATOMIC_SEQ_CST);
}

long pymq_test_yields(void)
{
    return __atomic_load_n(&yields, __ATOMIC_SEQ_CST);
}

/* A group commit leader yields while it waits for more threads to arrive. */
int sched_yield(void)
{
    static int (*next)(void);

    if (next == NULL)
        next = (int (*)(void))dlsym(RTLD_NEXT, "sched_yield");
    __atomic_add_fetch(&yields, 1, __ATOMIC_SEQ_CST);
    return next();
}

/* A segment log whose path contains PYMQ_TEST_SYNC_MATCH. */
static int is_counted_segment(int fd)
{
    const char *match = getenv("PYMQ_TEST_SYNC_MATCH");
    char link[64], path[4096];
    ssize_t length;

    if (match == NULL)
        return 0;
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    length = readlink(link, path, sizeof(path) - 1);
    if (length < 4)
        return 0;
    path[length] = 0;
    return strstr(path, match) != NULL &&
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
    if (mapped == MAP_FAILED || fd < 0 || !is_counted_segment(fd))
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
        __atomic_add_fetch(&syncs, 1, __ATOMIC_SEQ_CST);
        usleep(2000);
    }
    return next(address, length, flags);
}
"""

# argv: data folder, wrapper library, "put" or "ack", threads, records per
# thread. Prints one JSON object.
SCRIPT = textwrap.dedent(
    """
    import ctypes, json, sys, threading
    import pymq

    data, library, work = sys.argv[1], sys.argv[2], sys.argv[3]
    threads, per_thread = int(sys.argv[4]), int(sys.argv[5])
    syncs = ctypes.CDLL(library).pymq_test_syncs
    syncs.restype = ctypes.c_long
    total = threads * per_thread
    results = {}

    # A long flush interval keeps the background flush out of the count.
    with pymq.open(data, fsync="always", flush_interval=3600) as broker:
        queue = broker.queue("jobs")
        if work == "put":
            shares = [
                [b"t%d-%d" % (i, n) for n in range(per_thread)]
                for i in range(threads)
            ]
            call = queue.put
        else:
            queue.put_many([b"m%d" % i for i in range(total)])
            messages = queue.get_many(total)
            results["delivered"] = len(messages)
            shares = [messages[i::threads] for i in range(threads)]
            call = lambda message: message.ack()
        start = threading.Barrier(threads)
        errors = []

        def work_share(share):
            start.wait()
            try:
                for item in share:
                    call(item)
            except Exception as exc:
                errors.append(repr(exc))

        workers = [
            threading.Thread(target=work_share, args=(share,))
            for share in shares
        ]
        before = syncs()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        results["syncs"] = syncs() - before
        results["errors"] = errors

    with pymq.open(data, fsync="always", flush_interval=3600) as broker:
        queue = broker.queue("jobs")
        results["depth"] = queue.stats().depth
        if work == "put":
            bodies = [message.body for message in queue.get_many(total + 1)]
            # Each thread's puts, in the order they were made.
            results["orders"] = [
                [body for body in bodies if body.startswith(b"t%d-" % i)]
                == [b"t%d-%d" % (i, n) for n in range(per_thread)]
                for i in range(threads)
            ]
    print(json.dumps(results))
    """
)

# argv: store folder, wrapper library, records. One thread appends 100-byte
# records to 4 KiB segments, so it rolls a segment about every 30 records.
LONE_SCRIPT = textwrap.dedent(
    """
    import ctypes, json, sys
    from pymq import SegmentStore

    folder, library, records = sys.argv[1], sys.argv[2], int(sys.argv[3])
    yields = ctypes.CDLL(library).pymq_test_yields
    yields.restype = ctypes.c_long
    with SegmentStore(folder, segment_bytes=4096, fsync="always") as store:
        for _ in range(records):
            store.append(b"x" * 100)
        segments = len(store.segment_ranges())
    print(json.dumps({"yields": yields(), "segments": segments}))
    """
)

# The wrapper's PYMQ_TEST_SYNC_MATCH for the syncs of each kind of work.
SEGMENTS = {"put": "/log/", "ack": "/groups/"}


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


def run_work(
    tmp_path: Path, wrapper: Path, work: str, threads: int, per_thread: int
) -> dict:
    """Put or ack threads * per_thread records from threads threads."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(tmp_path / "data"),
            str(wrapper),
            work,
            str(threads),
            str(per_thread),
        ],
        env={"LD_PRELOAD": str(wrapper), "PYMQ_TEST_SYNC_MATCH": SEGMENTS[work]},
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
    results = run_work(tmp_path, wrapper, "ack", 1, THREADS * PER_THREAD)
    assert results["errors"] == []
    assert results["syncs"] == THREADS * PER_THREAD
    assert results["depth"] == 0


def test_concurrent_acks_share_journal_syncs(tmp_path: Path, wrapper: Path) -> None:
    results = run_work(tmp_path, wrapper, "ack", THREADS, PER_THREAD)
    acks = THREADS * PER_THREAD
    assert results["delivered"] == acks
    assert results["errors"] == []
    assert results["syncs"] >= 1
    assert results["syncs"] < acks
    assert results["depth"] == 0


def test_single_thread_puts_sync_each(tmp_path: Path, wrapper: Path) -> None:
    results = run_work(tmp_path, wrapper, "put", 1, THREADS * PER_THREAD)
    assert results["errors"] == []
    assert results["syncs"] == THREADS * PER_THREAD
    assert results["depth"] == THREADS * PER_THREAD
    assert results["orders"] == [True]


def test_concurrent_puts_gather_into_shared_syncs(
    tmp_path: Path, wrapper: Path
) -> None:
    # Without gathering, the threads take turns: half of them append while
    # the other half wait for a sync, so a sync covers about 4 puts. A
    # leader that waits for the threads the last sync released makes it
    # about 8, less a few syncs while the count grows and the threads end.
    results = run_work(tmp_path, wrapper, "put", THREADS, PER_THREAD)
    puts = THREADS * PER_THREAD
    assert results["errors"] == []
    assert results["depth"] == puts
    assert results["orders"] == [True] * THREADS
    assert 1 <= results["syncs"] <= puts // 5


def test_lone_thread_never_waits_to_gather(tmp_path: Path, wrapper: Path) -> None:
    # The first sync and the sync after each roll take the GIL, and the
    # leader then checks its bytes again. A thread alone must still never
    # wait for others to arrive, and each such wait yields many times.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LONE_SCRIPT,
            str(tmp_path / "store"),
            str(wrapper),
            "100",
        ],
        env={"LD_PRELOAD": str(wrapper), "PYMQ_TEST_SYNC_MATCH": "/store/"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert results["segments"] >= 3
    assert results["yields"] == 0
