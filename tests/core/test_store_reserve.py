"""SegmentStore(reserve_ahead=True), the mode of group journals.

The next segment (the spare) is created when the store opens and right
after each rollover, every index is preallocated whole, and close() keeps
the spare for the next open. A segment that delete_below() drops while the
spare is missing becomes the spare, zeroed, so a store that rolled into its
spare on a full disk gets its reserve back without asking for disk space.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pymq._core import SegmentStore

SEGMENT = 64 * 1024
# The largest index of a 64 KiB segment: the header and one entry per 32 bytes.
FULL_INDEX = 64 + SEGMENT // 32 * 4
BODY = b"r" * 1000


def spare_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("spare.*"))


def open_reserved(folder: Path) -> SegmentStore:
    return SegmentStore(folder, segment_bytes=SEGMENT, reserve_ahead=True)


def test_spare_and_full_index_at_open(segment_dir: Path) -> None:
    with open_reserved(segment_dir) as store:
        assert store.reserve_ahead
        assert store.reserved
        assert spare_files(segment_dir) == ["spare.idx", "spare.log"]
        assert (segment_dir / "spare.log").stat().st_size == SEGMENT
        assert (segment_dir / "spare.idx").stat().st_size == FULL_INDEX
        index = segment_dir / f"{0:020d}.idx"
        assert index.stat().st_size == FULL_INDEX


def test_spare_made_again_after_each_roll(segment_dir: Path) -> None:
    with open_reserved(segment_dir) as store:
        for _ in range(3 * SEGMENT // len(BODY)):
            store.append(BODY)
            assert store.reserved
        assert store.stats()["segments"] >= 3
        assert spare_files(segment_dir) == ["spare.idx", "spare.log"]


def test_close_keeps_spare_and_reopen_reuses_it(
    segment_dir: Path, tmp_path: Path
) -> None:
    with open_reserved(segment_dir) as store:
        store.append(b"one")
    # A second name keeps the inode from being reused by a new file.
    link = tmp_path / "kept-spare"
    os.link(segment_dir / "spare.log", link)
    inode = link.stat().st_ino
    with open_reserved(segment_dir) as store:
        assert store.reserved
        assert (segment_dir / "spare.log").stat().st_ino == inode
        for _ in range(SEGMENT // len(BODY) + 1):
            store.append(BODY)
        # The kept spare took the rollover, and was empty.
        second = store.segment_ranges()[1][0]
        assert (segment_dir / f"{second:020d}.log").stat().st_ino == inode
        assert store.verify()["damaged"] == []
    # A store without reserve_ahead deletes the spare, as after a crash.
    with SegmentStore(segment_dir, segment_bytes=SEGMENT) as store:
        assert not store.reserved
        assert spare_files(segment_dir) == []


def test_spare_with_bad_header_is_not_reused(segment_dir: Path, tmp_path: Path) -> None:
    with open_reserved(segment_dir):
        pass
    link = tmp_path / "old-spare"
    os.link(segment_dir / "spare.log", link)
    inode = link.stat().st_ino
    with open(segment_dir / "spare.idx", "r+b") as index:
        index.seek(16)
        index.write(b"\x01")  # count 1: the spare may hold records
    messages: list[str] = []
    with SegmentStore(
        segment_dir,
        segment_bytes=SEGMENT,
        reserve_ahead=True,
        on_damage=messages.append,
    ) as store:
        assert store.reserved
        assert (segment_dir / "spare.log").stat().st_ino != inode
    assert messages == []


# The spare cannot be made: RLIMIT_FSIZE makes posix_fallocate of a 64 KiB
# file fail with EFBIG. Each rollover uses the spare, and delete_below(), as
# a group's checkpoint calls it, turns the dropped segment into the spare.
RECYCLE_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, signal, sys, time
    from pymq._core import SegmentStore

    folder = sys.argv[1]
    body = b"r" * 1000
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    store = SegmentStore(folder, segment_bytes=65536, reserve_ahead=True)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32768, limit[1]))
    report = {"reserved": [], "segments": []}
    for _ in range(4):
        first = store.next_offset
        while store.stats()["segments"] == 1:
            store.append(body)
        report["reserved"].append(store.reserved)
        store.delete_below(store.next_offset)
        report["reserved"].append(store.reserved)
        report["segments"].append(store.stats()["segments"])
    report["next_offset"] = store.next_offset
    report["first_offset"] = store.first_offset
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    store.close()
    messages = []
    with SegmentStore(folder, segment_bytes=65536, reserve_ahead=True,
                      on_damage=messages.append) as store:
        report["messages"] = messages
        report["reopened"] = [store.first_offset, store.next_offset]
        report["verify"] = store.verify()
        report["bodies_ok"] = store.read_range(0, store.next_offset) == [
            body] * (store.next_offset - store.first_offset)
        report["reserved after"] = store.reserved
    print(json.dumps(report))
    """
)


def test_dropped_segment_becomes_spare_when_disk_refuses(segment_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", RECYCLE_SCRIPT, str(segment_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # After each rollover the spare is gone (it cannot be made), and after
    # each delete_below() the dropped segment is the spare.
    assert report["reserved"] == [False, True] * 4
    assert report["segments"] == [1] * 4
    # Only the record that rolled the store over is left.
    assert report["first_offset"] == report["next_offset"] - 1
    assert "cannot reserve disk space for its next segment" in result.stderr
    assert "reserved again" in result.stderr
    # The recycled segments were zeroed: nothing to recover, nothing lost.
    assert report["messages"] == []
    assert report["reopened"] == [report["first_offset"], report["next_offset"]]
    assert report["verify"] == {"records": 1, "missing": 0, "damaged": []}
    assert report["bodies_ok"]
    assert report["reserved after"]
