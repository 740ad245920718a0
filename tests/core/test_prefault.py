"""Prefaulting of the active segment, read from this process's /proc/self/smaps.

A store prefaults the first 4 MiB past its end when it opens. Each time
appends pass the middle of what was prefaulted, a thread touches as many
pages again, up to the end of the segment. The tests compare the resident
bytes of the segment's mapping against those bounds.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymq import SegmentStore

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/smaps"
)

MIB = 1 << 20
SEGMENT_BYTES = 32 * MIB
# Bound on each wait for the prefault thread, in seconds.
WAIT_SECONDS = 30.0


def mapped_rss(path: Path) -> int:
    """Return the resident bytes of this process's mappings of path."""
    total = 0
    inside = False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def wait_for_rss(path: Path, minimum: int) -> int:
    """Wait until the mapping of path has minimum bytes resident; return them."""
    deadline = time.monotonic() + WAIT_SECONDS
    resident = mapped_rss(path)
    while resident < minimum and time.monotonic() < deadline:
        time.sleep(0.01)
        resident = mapped_rss(path)
    return resident


def append_until_rss(store: SegmentStore, path: Path, minimum: int) -> int:
    """Append a small record every 10 ms until path has minimum bytes resident.

    Returns the resident bytes. An append starts the next prefault only once
    the thread of the last one has ended, so the store must stay in use
    while the test waits.
    """
    deadline = time.monotonic() + WAIT_SECONDS
    resident = mapped_rss(path)
    while resident < minimum and time.monotonic() < deadline:
        store.append(b"tick")
        time.sleep(0.01)
        resident = mapped_rss(path)
    return resident


@contextlib.contextmanager
def one_cpu() -> Iterator[None]:
    """Run this thread, and the threads it starts, on one CPU only."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def active_log(folder: Path) -> Path:
    (log,) = sorted(folder.glob("*.log"))
    return log


def fill(store: SegmentStore, megabytes: int) -> None:
    body = bytes(1000)
    for _ in range(megabytes):
        store.append_many([body] * 1024)


def test_busy_segment_prefaulted_to_end(tmp_path):
    # 10 MiB pass the middle of 4, 8 and 16 MiB prefaulted, so the last
    # doubling reaches the end of the 32 MiB segment.
    with SegmentStore(tmp_path, segment_bytes=SEGMENT_BYTES, fsync="never") as store:
        fill(store, 10)
        log = active_log(tmp_path)
        # Nearly the whole segment: the bound leaves a margin of 2 MiB.
        resident = append_until_rss(store, log, SEGMENT_BYTES - 2 * MIB)
        assert resident >= SEGMENT_BYTES - 2 * MIB


def test_prefault_follows_once_first_ends(tmp_path):
    # On one CPU the prefault thread, which runs under SCHED_IDLE, gets
    # little or no time while the appends run, so the appends that pass the
    # middle of its pages find it still busy. Later appends start the rest.
    with (
        one_cpu(),
        SegmentStore(tmp_path, segment_bytes=SEGMENT_BYTES, fsync="never") as store,
    ):
        fill(store, 10)
        log = active_log(tmp_path)
        resident = append_until_rss(store, log, SEGMENT_BYTES - 2 * MIB)
        assert resident >= SEGMENT_BYTES - 2 * MIB


def test_little_used_segment_prefaulted_ahead(tmp_path):
    with SegmentStore(tmp_path, segment_bytes=SEGMENT_BYTES, fsync="never") as store:
        fill(store, 1)
        log = active_log(tmp_path)
        # The 4 MiB prefaulted at open, which cover the 1 MiB written.
        assert wait_for_rss(log, 4 * MIB) >= 4 * MIB
        time.sleep(0.2)
        assert mapped_rss(log) < 6 * MIB


def test_few_mib_prefault_doubles_once(tmp_path):
    # 3 MiB pass the middle of the first 4 MiB, which doubles the pages
    # prefaulted to 8 MiB, but not the middle of those 8.
    with SegmentStore(tmp_path, segment_bytes=SEGMENT_BYTES, fsync="never") as store:
        fill(store, 3)
        log = active_log(tmp_path)
        assert append_until_rss(store, log, 8 * MIB) >= 8 * MIB
        for _ in range(20):
            store.append(b"tick")
            time.sleep(0.01)
        assert mapped_rss(log) < 10 * MIB
