"""A sync that fails with EIO keeps failing until the store is reopened.

After a failed writeback the kernel may mark the pages clean, so a second
msync could report success for data that never reached the disk. The test
makes msync fail through an LD_PRELOAD wrapper built with the C compiler.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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
