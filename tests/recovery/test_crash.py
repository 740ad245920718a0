"""Process crashes: writers killed with SIGKILL over and over in one folder.

A record is in the shared mapping when append returns (and, with
fsync="always", synced), so a SIGKILL must never lose a record whose append
returned, nor leave a damaged record behind.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pymq import _core
from tests.recovery import writer
from tests.recovery.writer import make_body, make_sized_body, run_writer

# The kill comes at most this many seconds after the writer's marker line.
MAX_KILL_DELAY = 0.02
# Seconds to wait for a writer to print a line or to die.
TIMEOUT = 20.0


def read_lines(
    fd: int, buffer: bytearray, marker: bytes | None, timeout: float
) -> None:
    """Read fd into buffer until a line starts with marker, or to EOF if None."""
    deadline = time.monotonic() + timeout
    while marker is None or not any(
        line.startswith(marker) for line in bytes(buffer).split(b"\n")[:-1]
    ):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {marker!r} from the writer"
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            assert marker is None, f"writer exited before printing {marker!r}"
            return
        buffer += chunk


def run_and_kill(
    command: list[str], marker: bytes, delay: float, stderr_path: Path
) -> tuple[list[bytes], int]:
    """Start a writer, SIGKILL it delay seconds after marker, return its lines."""
    output = bytearray()
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    try:
        read_lines(proc.stdout.fileno(), output, marker, TIMEOUT)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        read_lines(proc.stdout.fileno(), output, None, TIMEOUT)
        returncode = proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(TIMEOUT)
        proc.stdout.close()
    # A line cut by the kill has no newline, and is dropped.
    return bytes(output).split(b"\n")[:-1], returncode


def check_store(
    directory: Path,
    segment_bytes: int,
    expected: dict[int, bytes],
    runs: list[tuple[int, int]],
    max_body_bytes: int,
    where: str,
) -> tuple[int, int]:
    """Reopen and check the store, and return its next offset and segment count.

    runs contains (first offset, seed) of every writer that opened the store.
    """
    store = _core.SegmentStore(directory, segment_bytes=segment_bytes, fsync="always")
    try:
        next_offset = store.next_offset
        if expected:
            assert next_offset > max(expected), where
        records = {
            offset: body for offset, _, _, body in store.read_records(0, next_offset)
        }
        for offset, body in expected.items():
            assert records.get(offset) == body, f"{where}: offset {offset}"

        # A record never reported (the kill came between its write and the
        # report) must still be the body its writer appended there.
        starts = [start for start, _ in runs]
        for offset, body in records.items():
            if offset in expected:
                continue
            start, seed = runs[bisect.bisect_right(starts, offset) - 1]
            assert body == make_body(seed, offset - start, max_body_bytes), (
                f"{where}: unreported offset {offset}"
            )

        report = store.verify()
        assert report["damaged"] == [], where
        assert report["missing"] == 0, where
        assert store.damaged == 0, where
        segments = store.stats()["segments"]
    finally:
        store.close()
    return next_offset, segments


@pytest.mark.slow
@pytest.mark.parametrize(
    ("segment_bytes", "max_body_bytes", "kills"),
    [
        # Small segments: the writer rolls over every run or two.
        (32 * 1024, 200, 200),
        # From 1 MiB up the store prefaults a spare segment and renames it at
        # the roll. Larger bodies make the rolls happen.
        (1024 * 1024, 16 * 1024, 40),
    ],
)
def test_crash_sigkill_keeps_every_returned_append(
    segment_dir: Path,
    tmp_path: Path,
    segment_bytes: int,
    max_body_bytes: int,
    kills: int,
) -> None:
    rng = random.Random(1729)
    expected: dict[int, bytes] = {}
    runs: list[tuple[int, int]] = []
    next_offset = 0
    segments = 0

    for kill in range(kills):
        seed = rng.randrange(2**32)
        # One kill in ten lands while the writer opens and recovers the store.
        marker = b"start" if rng.random() < 0.1 else b"ready"
        delay = rng.uniform(0, MAX_KILL_DELAY)
        where = f"kill {kill} (seed {seed}, {delay:.4f} s after {marker.decode()})"
        command = [
            sys.executable,
            writer.__file__,
            "loop",
            str(segment_dir),
            str(segment_bytes),
            str(seed),
            str(max_body_bytes),
        ]
        stderr_path = tmp_path / "writer-stderr.txt"
        lines, returncode = run_and_kill(command, marker, delay, stderr_path)
        assert returncode == -signal.SIGKILL, f"{where}: {stderr_path.read_text()}"

        start = None
        for line in lines:
            words = line.split()
            if words[0] == b"ready":
                start = int(words[1])
                assert start == next_offset, where
                runs.append((start, seed))
            elif words[0] != b"start":
                offset, index = int(words[0]), int(words[1])
                assert start is not None, where
                assert offset == start + index, where
                expected[offset] = make_body(seed, index, max_body_bytes)

        next_offset, segments = check_store(
            segment_dir, segment_bytes, expected, runs, max_body_bytes, where
        )
        spares = [name for name in os.listdir(segment_dir) if name.startswith("spare")]
        assert spares == [], where

    assert len(expected) > kills
    assert segments > 1


def test_crash_with_full_segments_reopens(segment_dir: Path) -> None:
    # 16 records of 32 + 32 bytes fill a 1 KiB segment exactly, so recovery
    # of the unverified segments starts its scan at their very end.
    segment_bytes, body_bytes, count = 1024, 32, 40
    written = run_writer("tail", segment_dir, segment_bytes, count, body_bytes)
    assert written.returncode == 0, written.stderr
    sizes = {
        name: os.path.getsize(segment_dir / name) for name in os.listdir(segment_dir)
    }
    assert sizes["00000000000000000000.log"] == segment_bytes

    # Opened in a subprocess, so that a SIGBUS fails this test alone.
    checked = run_writer("check", segment_dir, segment_bytes)
    assert checked.returncode != -signal.SIGBUS
    assert checked.returncode == 0, checked.stderr
    result = json.loads(checked.stdout)
    assert result["next_offset"] == count
    assert result["verify_records"] == count
    assert result["damaged"] == 0
    expected = {
        str(i): _core.crc32c(make_sized_body(i, body_bytes)) for i in range(count)
    }
    assert result["crcs"] == expected
