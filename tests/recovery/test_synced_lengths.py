"""The synced lengths a store reports never pass the bytes msync wrote.

The power-cut checks of the torture harness cut each segment at the length
SegmentStore.synced_lengths() reports, so a store that reported more than
it had synced, or returned from an fsync="always" append before the sync
covered the record, would go unnoticed there. This test watches the store
from below instead: an LD_PRELOAD wrapper records, for every shared
writable mapping of a file, how many bytes from its start successful
msync calls have covered. Appending threads, with rollovers and the
background flush running, check each returned append against it, and
another thread checks every reported synced length against it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Tracks shared writable mappings of files, by device and inode so that a
# rename keeps them, and the prefix of each that successful msync calls
# covered, byte for byte. A sync of [start, stop) extends a prefix that
# reaches start to stop. pymq_test_synced_prefix() returns the largest
# prefix among live mappings of a file, or -1 when none is tracked.
WRAPPER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>

#define MAX_MAPPINGS 4096

static struct {
    char *start;
    size_t length;
    unsigned long long device, inode;
    size_t synced;
} mappings[MAX_MAPPINGS];
static pthread_mutex_t mappings_lock = PTHREAD_MUTEX_INITIALIZER;
static void *(*next_mmap)(void *, size_t, int, int, int, off_t);

void *mmap(void *address, size_t length, int prot, int flags, int fd,
           off_t offset)
{
    struct stat status;
    void *result;
    int i;

    if (next_mmap == NULL)
        next_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(
            RTLD_NEXT, "mmap");
    result = next_mmap(address, length, prot, flags, fd, offset);
    if (result == MAP_FAILED || fd < 0 || offset != 0 ||
            !(flags & MAP_SHARED) || !(prot & PROT_WRITE) ||
            fstat(fd, &status) != 0)
        return result;
    pthread_mutex_lock(&mappings_lock);
    for (i = 0; i < MAX_MAPPINGS; i++) {
        if (mappings[i].start == NULL) {
            mappings[i].start = result;
            mappings[i].length = length;
            mappings[i].device = status.st_dev;
            mappings[i].inode = status.st_ino;
            mappings[i].synced = 0;
            break;
        }
    }
    pthread_mutex_unlock(&mappings_lock);
    return result;
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
    pthread_mutex_lock(&mappings_lock);
    for (i = 0; i < MAX_MAPPINGS; i++) {
        if (mappings[i].start == address)
            mappings[i].start = NULL;
    }
    pthread_mutex_unlock(&mappings_lock);
    return next(address, length);
}

int msync(void *address, size_t length, int flags)
{
    static int (*next)(void *, size_t, int);
    char *start = address;
    size_t first, stop;
    int i, rc;

    if (next == NULL)
        next = (int (*)(void *, size_t, int))dlsym(RTLD_NEXT, "msync");
    rc = next(address, length, flags);
    if (rc != 0 || !(flags & MS_SYNC))
        return rc;
    pthread_mutex_lock(&mappings_lock);
    for (i = 0; i < MAX_MAPPINGS; i++) {
        if (mappings[i].start == NULL || start < mappings[i].start ||
                start >= mappings[i].start + mappings[i].length)
            continue;
        first = start - mappings[i].start;
        stop = first + length;
        if (first <= mappings[i].synced && stop > mappings[i].synced)
            mappings[i].synced = stop;
    }
    pthread_mutex_unlock(&mappings_lock);
    return rc;
}

long long pymq_test_synced_prefix(unsigned long long device,
                                  unsigned long long inode)
{
    long long prefix = -1;
    int i;

    pthread_mutex_lock(&mappings_lock);
    for (i = 0; i < MAX_MAPPINGS; i++) {
        if (mappings[i].start != NULL && mappings[i].device == device &&
                mappings[i].inode == inode &&
                (long long)mappings[i].synced > prefix)
            prefix = (long long)mappings[i].synced;
    }
    pthread_mutex_unlock(&mappings_lock);
    return prefix;
}
"""

# argv: folder, appends per thread. Prints one JSON object.
SCRIPT = textwrap.dedent(
    """
    import ctypes, json, os, random, sys, threading
    from pymq.storage import open_store

    folder, appends = sys.argv[1], int(sys.argv[2])
    wrapper = ctypes.CDLL(os.environ["LD_PRELOAD"])
    wrapper.pymq_test_synced_prefix.restype = ctypes.c_longlong
    wrapper.pymq_test_synced_prefix.argtypes = [ctypes.c_ulonglong] * 2

    def synced_prefix(path):
        status = os.stat(path)
        return wrapper.pymq_test_synced_prefix(status.st_dev, status.st_ino)

    def segment_path(offset):
        for base, count, _ in store.segment_ranges():
            if base <= offset < base + count:
                return os.path.join(store.path, "%020d.log" % base)
        raise AssertionError(f"offset {offset} is in no segment")

    # Segments of 64 KiB roll over every 40 records or so; the background
    # flush runs every millisecond, beside the syncs of the appends.
    store = open_store(
        folder, segment_bytes=1 << 16, fsync="always", flush_interval=0.001
    )
    returned = []
    problems = []
    done = threading.Event()

    def append(seed):
        rng = random.Random(seed)
        for _ in range(appends):
            bodies = [rng.randbytes(rng.randrange(3000))
                      for _ in range(1 if rng.random() < 0.8 else rng.randrange(2, 6))]
            if len(bodies) == 1:
                first = store.append(bodies[0])
            else:
                first = store.append_many(bodies)
            last = first + len(bodies) - 1
            returned.append((last, synced_prefix(segment_path(last))))

    def check_lengths():
        checks = 0
        while not done.is_set() and checks < 100_000:
            for path, length in store.synced_lengths().items():
                prefix = synced_prefix(path)
                if length > max(prefix, 0):
                    problems.append(
                        f"{os.path.basename(path)}: synced length {length}, "
                        f"msync covered {prefix}")
            checks += 1
        return checks

    threads = [threading.Thread(target=append, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    checks = [0]
    checker = threading.Thread(target=lambda: checks.__setitem__(0, check_lengths()))
    checker.start()
    for thread in threads:
        thread.join()
    done.set()
    checker.join()

    # Where each returned record ends in its segment, from the final layout.
    ends = {}
    for base, count, _ in store.segment_ranges():
        position = 0
        for offset, _, _, body in store.read_records(base, base + count):
            position += 32 + (len(body) + 7) // 8 * 8
            ends[offset] = position
    for offset, prefix in returned:
        if ends[offset] > prefix:
            problems.append(
                f"append of offset {offset} returned with its record ending at "
                f"byte {ends[offset]}, msync covered {prefix}")
    stats = store.stats()
    store.close()
    print(json.dumps({
        "returned": len(returned),
        "checks": checks[0],
        "segments": stats["segments"],
        "unsynced_bytes": stats["written_bytes"] - stats["synced_bytes"],
        # The checker finds a wrong length again at each pass: once is enough.
        "problems": list(dict.fromkeys(problems))[:20],
    }))
    """
)
APPENDS_PER_THREAD = 400


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the msync wrapper")
    source = tmp_path / "synced.c"
    source.write_text(WRAPPER)
    library = tmp_path / "synced.so"
    subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-o",
            str(library),
            str(source),
            "-ldl",
            "-lpthread",
        ],
        check=True,
        capture_output=True,
    )
    return library


def test_synced_lengths_never_pass_msync(tmp_path: Path, wrapper: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "log"), str(APPENDS_PER_THREAD)],
        env={"LD_PRELOAD": str(wrapper)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["problems"] == []
    assert report["returned"] == 3 * APPENDS_PER_THREAD
    assert report["checks"] > 0
    # Enough rollovers that sealed segments were synced too.
    assert report["segments"] > 10
    assert report["unsynced_bytes"] == 0
