"""A sync that fails with EIO keeps failing until the store is reopened.

After a failed writeback the kernel may mark the pages clean, so a second
msync could report success for data that never reached the disk. The test
makes msync fail through an LD_PRELOAD wrapper built with the C compiler.

The journal tests use a second wrapper that fails only the calls on the
files of group journals (paths containing /groups/): msync of their
mappings, fsync, posix_fallocate and rename. A journaled call that could
not be made durable must raise, and a reopen must find a consistent state.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

WRAPPER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int msync(void *address, size_t length, int flags)
{
    static int (*next)(void *, size_t, int);
    const char *flag = getenv("PYMQ_TEST_EIO_FLAG");

    if (next == NULL)
        next = (int (*)(void *, size_t, int))dlsym(RTLD_NEXT, "msync");
    if (flag != NULL && access(flag, F_OK) == 0) {
        errno = EIO;
        return -1;
    }
    return next(address, length, flags);
}
"""

SCRIPT = textwrap.dedent(
    """
    import errno, json, os, sys
    from pymq import SegmentStore

    folder, flag = sys.argv[1], sys.argv[2]
    results = {}

    def attempt(name, body):
        try:
            results[name] = store.append(body)
        except OSError as exc:
            results[name] = [exc.errno, str(exc)]

    store = SegmentStore(folder, segment_bytes=4096, fsync="always")
    attempt("before", b"one")
    open(flag, "w").close()
    attempt("failing", b"two")
    os.unlink(flag)
    attempt("after", b"three")
    try:
        store.close()
    except OSError as exc:
        results["close"] = exc.errno
    store = SegmentStore(folder, segment_bytes=4096, fsync="always")
    attempt("reopened", b"four")
    results["bodies"] = [body.decode() for body in store.read_range(0, 10)]
    store.close()
    print(json.dumps(results))
    """
)


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the msync wrapper")
    source = tmp_path / "eio.c"
    source.write_text(WRAPPER)
    library = tmp_path / "eio.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"],
        check=True,
        capture_output=True,
    )
    return library


def test_sync_failure_eio_is_sticky(tmp_path: Path, wrapper: Path) -> None:
    flag = tmp_path / "fail-now"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "log"), str(flag)],
        env={"LD_PRELOAD": str(wrapper), "PYMQ_TEST_EIO_FLAG": str(flag)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert results["before"] == 0
    assert results["failing"][0] == 5  # EIO
    assert results["after"][0] == 5
    assert "close and reopen the store" in results["after"][1]
    assert results["close"] == 5
    assert results["reopened"] == 3
    assert results["bodies"] == ["one", "two", "three", "four"]


# Group journals -----------------------------------------------------------

# Fails, while the flag file exists, the calls named in PYMQ_TEST_EIO_CALLS
# (a comma-separated list: msync, fsync, fallocate, rename) on files whose
# path contains PYMQ_TEST_EIO_MATCH. msync takes an address, so mmap and
# munmap are wrapped to remember which ranges map such files.
JOURNAL_WRAPPER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_RANGES 4096

static struct { char *start; size_t length; } ranges[MAX_RANGES];
static pthread_mutex_t ranges_lock = PTHREAD_MUTEX_INITIALIZER;

static int failing(const char *call)
{
    const char *flag = getenv("PYMQ_TEST_EIO_FLAG");
    const char *calls = getenv("PYMQ_TEST_EIO_CALLS");

    if (flag == NULL || calls == NULL || strstr(calls, call) == NULL)
        return 0;
    return access(flag, F_OK) == 0;
}

static int matches_path(const char *path)
{
    const char *match = getenv("PYMQ_TEST_EIO_MATCH");

    return path != NULL && match != NULL && strstr(path, match) != NULL;
}

static int matches_fd(int fd)
{
    char link[64], path[4096];
    ssize_t length;

    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    length = readlink(link, path, sizeof(path) - 1);
    if (length < 0)
        return 0;
    path[length] = 0;
    return matches_path(path);
}

static void *(*next_mmap)(void *, size_t, int, int, int, off_t);

static void *track(void *address, size_t length, int fd)
{
    int i;

    if (address == MAP_FAILED || fd < 0 || !matches_fd(fd))
        return address;
    pthread_mutex_lock(&ranges_lock);
    for (i = 0; i < MAX_RANGES; i++) {
        if (ranges[i].start == NULL) {
            ranges[i].start = address;
            ranges[i].length = length;
            break;
        }
    }
    pthread_mutex_unlock(&ranges_lock);
    return address;
}

void *mmap(void *address, size_t length, int prot, int flags, int fd,
           off_t offset)
{
    if (next_mmap == NULL)
        next_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(
            RTLD_NEXT, "mmap");
    return track(next_mmap(address, length, prot, flags, fd, offset),
                 length, fd);
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
    if (failing("msync") && tracked(address, length)) {
        errno = EIO;
        return -1;
    }
    return next(address, length, flags);
}

int fsync(int fd)
{
    static int (*next)(int);

    if (next == NULL)
        next = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (failing("fsync") && matches_fd(fd)) {
        errno = EIO;
        return -1;
    }
    return next(fd);
}

int posix_fallocate(int fd, off_t offset, off_t length)
{
    static int (*next)(int, off_t, off_t);

    if (next == NULL)
        next = (int (*)(int, off_t, off_t))dlsym(RTLD_NEXT, "posix_fallocate");
    if (failing("fallocate") && matches_fd(fd))
        return EIO;
    return next(fd, offset, length);
}

int posix_fallocate64(int fd, off_t offset, off_t length)
{
    return posix_fallocate(fd, offset, length);
}

int rename(const char *old_path, const char *new_path)
{
    static int (*next)(const char *, const char *);

    if (next == NULL)
        next = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    if (failing("rename") && matches_path(old_path)) {
        errno = EIO;
        return -1;
    }
    return next(old_path, new_path);
}
"""

# argv: data folder, flag file. Prints one JSON object of what each call did.
JOURNAL_SYNC_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import pymq

    data, flag = sys.argv[1], sys.argv[2]
    results = {}

    def attempt(name, call):
        try:
            value = call()
        except OSError as exc:
            results[name] = {"errno": exc.errno, "text": str(exc)}
            return None
        results[name] = "ok"
        return value

    broker = pymq.open(data, segment_bytes=1 << 20, fsync="always")
    queue = broker.queue("jobs")
    queue.put_many([b"m%d" % i for i in range(10)])
    first, second, third = queue.get_many(3)
    attempt("ack before", first.ack)
    open(flag, "w").close()
    attempt("ack", second.ack)
    attempt("get", queue.get_nowait)
    attempt("put", lambda: queue.put(b"put during"))
    os.unlink(flag)
    attempt("ack after", third.ack)
    attempt("close", broker.close)

    with pymq.open(data, segment_bytes=1 << 20, fsync="always") as broker:
        queue = broker.queue("jobs")
        results["delivered"] = [
            [message.body.decode(), message.attempt]
            for message in queue.get_many(100)
        ]
    print(json.dumps(results))
    """
)


@pytest.fixture
def journal_wrapper(tmp_path: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the journal wrapper")
    source = tmp_path / "journal_eio.c"
    source.write_text(JOURNAL_WRAPPER)
    library = tmp_path / "journal_eio.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"],
        check=True,
        capture_output=True,
    )
    return library


def run_journal_script(
    tmp_path: Path, wrapper: Path, script: str, calls: str
) -> dict[str, Any]:
    flag = tmp_path / "fail-now"
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data"), str(flag)],
        env={
            **os.environ,
            "LD_PRELOAD": str(wrapper),
            "PYMQ_TEST_EIO_FLAG": str(flag),
            "PYMQ_TEST_EIO_MATCH": "/groups/",
            "PYMQ_TEST_EIO_CALLS": calls,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    results: dict[str, Any] = json.loads(result.stdout)
    return results


def test_journal_sync_failure_raises_and_reopens_consistent(
    tmp_path: Path, journal_wrapper: Path
) -> None:
    results = run_journal_script(
        tmp_path, journal_wrapper, JOURNAL_SYNC_SCRIPT, "msync,fsync"
    )
    journal = str(tmp_path / "data" / "streams" / "jobs" / "groups" / ".queue")
    assert results["ack before"] == "ok"
    # Neither the ack nor the get reports success; both name the journal.
    for name in ("ack", "get", "ack after", "close"):
        assert results[name]["errno"] == errno.EIO, name
        assert journal in results[name]["text"], name
    # Sticky: the sync after the flag is gone fails too, until a reopen.
    assert "close and reopen the store" in results["ack after"]["text"]
    # The stream's own log is not affected.
    assert results["put"] == "ok"
    # Both failed acks were written to the journal file, only not synced:
    # without a power loss they are kept. The get that raised handed no
    # message out, and its delivery is counted as an attempt.
    assert results["delivered"] == [
        ["m3", 2],
        *[[f"m{i}", 1] for i in range(4, 10)],
        ["put during", 1],
    ]


# argv: data folder, flag file. The journal's files cannot be created or
# renamed while the flag exists, so it cannot roll over once its spare is
# used; every call's journal record is then refused.
JOURNAL_ROLL_SCRIPT = textwrap.dedent(
    """
    import json, logging, os, sys
    import pymq

    data, flag = sys.argv[1], sys.argv[2]
    results = {"acked": 0}
    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("pymq.storage").addHandler(Collect())
    broker = pymq.open(data, segment_bytes=1 << 20)
    queue = broker.queue("jobs", max_deliveries=0)
    queue.put_many([b"m%d" % i for i in range(40_000)])
    open(flag, "w").close()
    while "ack" not in results:
        message = queue.get_nowait()
        try:
            message.ack()
        except OSError as exc:
            results["ack"] = {"errno": exc.errno, "text": str(exc)}
            results["unacked"] = message.offset
        else:
            results["acked"] += 1
    try:
        queue.get_nowait()
    except OSError as exc:
        results["get"] = {"errno": exc.errno, "text": str(exc)}
    results["in flight"] = queue.stats().in_flight
    os.unlink(flag)
    warnings.clear()
    # Nothing was half done: the ack works now, and the get gives the
    # message the failed get did not hand out, as a first attempt.
    message.ack()
    again = queue.get_nowait()
    results["again"] = [again.offset, again.attempt]
    results["warnings"] = warnings
    broker.close()

    with pymq.open(data, segment_bytes=1 << 20) as broker:
        queue = broker.queue("jobs")
        message = queue.get_nowait()
        results["after reopen"] = [message.offset, message.attempt]
        results["depth"] = queue.stats().depth
    print(json.dumps(results))
    """
)


def test_journal_roll_failure_changes_nothing(
    tmp_path: Path, journal_wrapper: Path
) -> None:
    results = run_journal_script(
        tmp_path, journal_wrapper, JOURNAL_ROLL_SCRIPT, "fallocate,rename"
    )
    journal = str(tmp_path / "data" / "streams" / "jobs" / "groups" / ".queue")
    # A rollover of the 1 MiB journal needs its spare renamed: it fails
    # before the journal is full, after about 10,000 gets and acks.
    assert 1000 < results["acked"] < 15_000
    for name in ("ack", "get"):
        assert results[name]["errno"] == errno.EIO, name
        assert journal in results[name]["text"], name
    acked = results["acked"]
    assert results["unacked"] == acked
    # Only the delivery whose ack failed is in flight.
    assert results["in flight"] == 1
    assert results["again"] == [acked + 1, 1]
    # The spare that could not be renamed took the rollover once it could,
    # and a new spare was made.
    assert results["warnings"] == []
    assert results["after reopen"] == [acked + 1, 2]
    assert results["depth"] == 40_000 - acked - 1


# argv: data folder, flag file. As JOURNAL_ROLL_SCRIPT, then a reject when
# the journal cannot take the record that starts the move to the DLQ.
JOURNAL_DLQ_SCRIPT = textwrap.dedent(
    """
    import json, logging, os, sys
    import pymq

    data, flag = sys.argv[1], sys.argv[2]
    results = {}
    errors = []

    class Collect(logging.Handler):
        def emit(self, record):
            errors.append(record.getMessage())

    logging.getLogger("pymq.broker").addHandler(Collect())
    broker = pymq.open(data, segment_bytes=1 << 20)
    queue = broker.queue("jobs", max_deliveries=0)
    queue.put_many([b"m%d" % i for i in range(40_000)])
    open(flag, "w").close()
    while True:
        message = queue.get_nowait()
        try:
            message.ack()
        except OSError:
            break
    # Raises: the move did not start, and the delivery stays in flight.
    try:
        message.reject("bad")
    except OSError as exc:
        results["raised"] = str(exc)
    results["errors"] = list(errors)
    stats = queue.stats()
    results["stats"] = [stats.in_flight, stats.waiting, stats.dead_lettered]
    os.unlink(flag)
    # The same receipt rejects it once the journal takes writes again.
    message.reject("bad")
    results["dlq"] = [m.body.decode() for m in broker.queue("jobs.dlq").get_many(5)]
    results["dead_lettered"] = queue.stats().dead_lettered
    broker.close()

    with pymq.open(data, segment_bytes=1 << 20) as broker:
        results["after reopen"] = [
            broker.queue("jobs").get_nowait().offset == message.offset + 1,
            broker.queue("jobs.dlq").stats().depth,
        ]
    results["offset"] = message.offset
    print(json.dumps(results))
    """
)


def test_journal_failure_keeps_message_out_of_dlq(
    tmp_path: Path, journal_wrapper: Path
) -> None:
    results = run_journal_script(
        tmp_path, journal_wrapper, JOURNAL_DLQ_SCRIPT, "fallocate,rename"
    )
    # The reject raised the journal's error, and nothing was logged for it.
    assert "Input/output error" in results["raised"]
    assert results["errors"] == []
    assert results["stats"] == [1, 0, 0]
    offset = results["offset"]
    assert results["dlq"] == [f"m{offset}"]
    assert results["dead_lettered"] == 1
    assert results["after reopen"] == [True, 1]
