"""A full disk: appends raise OSError, never SIGBUS, and the store stays sound.

Segment space is reserved with posix_fallocate before it is mapped, so a
write into the mapping never needs a block the disk does not have. The
tests with a real full disk mount a small tmpfs and need root; the others
make posix_fallocate fail with RLIMIT_FSIZE, which needs no privilege.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymq import _core
from tests.recovery import writer
from tests.recovery.tmpfs import fill_until_free, mounted_tmpfs
from tests.recovery.writer import batch_bodies, make_body, run_writer

# Seconds to wait for the writer at each step.
TIMEOUT = 60.0


@pytest.fixture
def small_tmpfs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """Mount a tmpfs of request.param bytes under tmp_path, unmounted after."""
    with mounted_tmpfs(tmp_path / "tmpfs", request.param) as mount_point:
        yield mount_point


def writer_exited(proc: subprocess.Popen[str], expected: str) -> AssertionError:
    """Assert that the writer that closed its stdout did not die of SIGBUS."""
    proc.wait(TIMEOUT)
    assert proc.returncode != -signal.SIGBUS
    stderr = proc.stderr.read() if proc.stderr else ""
    return AssertionError(
        f"writer exited with status {proc.returncode} before {expected}: {stderr}"
    )


def read_line(proc: subprocess.Popen[str], prefix: str) -> str:
    """Return the writer's next line that starts with prefix, without it."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise writer_exited(proc, f"a line starting with {prefix!r}")


def check_segment_files(directory: Path, segment_bytes: int) -> None:
    """Assert that every segment is whole: a full-size log with an index."""
    names = sorted(os.listdir(directory))
    assert [name for name in names if name.startswith("spare")] == []
    logs = [name for name in names if name.endswith(".log")]
    indexes = [name for name in names if name.endswith(".idx")]
    assert [name[:-4] for name in logs] == [name[:-4] for name in indexes]
    for name in logs:
        assert os.path.getsize(directory / name) == segment_bytes, name


def talk_to_filler(
    proc: subprocess.Popen[str], filler: Path, segment_bytes: int
) -> dict[str, object]:
    """Check the fill writer up to the full disk, free space, return its summary."""
    assert read_line(proc, "ready ") == "0"
    appended = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("error "):
            assert int(line.split()[1]) == errno.ENOSPC
            break
        offset, index = map(int, line.split())
        assert offset == index
        appended.append(offset)
    else:
        raise writer_exited(proc, "the disk was full")
    assert len(appended) > segment_bytes // 300

    # append_many needs two new segments: it raises and writes nothing.
    batch = json.loads(read_line(proc, "batch "))
    assert batch["errno"] == errno.ENOSPC
    assert batch["next_offset"] == len(appended)
    assert batch["files_after"] == batch["files_before"]

    filler.unlink()
    assert proc.stdin is not None
    proc.stdin.write("space freed\n")
    proc.stdin.flush()
    after = json.loads(read_line(proc, "after "))
    after["appended"] = len(appended)
    return after


@pytest.mark.root
@pytest.mark.parametrize(
    ("small_tmpfs", "segment_bytes", "free_bytes"),
    [
        ("1m", 64 * 1024, 200 * 1024),
        # From 1 MiB up the store creates a spare segment ahead of the roll.
        # With 2.5 MiB free, the second spare does not fit.
        ("5m", 1024 * 1024, 2560 * 1024),
    ],
    indirect=["small_tmpfs"],
)
def test_disk_full_append_raises_enospc_then_recovers(
    small_tmpfs: Path, segment_bytes: int, free_bytes: int
) -> None:
    directory = small_tmpfs / "log"
    filler = fill_until_free(small_tmpfs, free_bytes)
    command = [
        sys.executable,
        writer.__file__,
        "fill",
        str(directory),
        str(segment_bytes),
    ]
    with subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            after = talk_to_filler(proc, filler, segment_bytes)
            proc.wait(TIMEOUT)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(TIMEOUT)
        assert proc.returncode != -signal.SIGBUS
        stderr = proc.stderr.read() if proc.stderr else ""
        assert proc.returncode == 0, stderr

    count = after.pop("appended")
    assert after["offsets"] == [count, count + 1, count + 2]
    assert after["batch_first"] == count + 3
    new_batch = batch_bodies(3, 1, segment_bytes)
    assert after["next_offset"] == count + 3 + len(new_batch)
    expected = [make_body(0, i) for i in range(count)]
    expected += [make_body(2, i) for i in range(3)] + new_batch
    assert after["crcs"] == [_core.crc32c(body) for body in expected]

    check_segment_files(directory, segment_bytes)
    with _core.SegmentStore(directory, segment_bytes=segment_bytes) as store:
        assert store.read_range(0, store.next_offset) == expected
        assert store.verify()["damaged"] == []


@pytest.mark.parametrize(
    ("segment_bytes", "limit"),
    [
        (64 * 1024, 32 * 1024),
        # Also makes the spare segment fail, which must leave no files.
        (1024 * 1024, 512 * 1024),
    ],
)
def test_disk_full_failed_fallocate_leaves_no_segment(
    segment_dir: Path, segment_bytes: int, limit: int
) -> None:
    result = run_writer("fsize", segment_dir, segment_bytes, limit)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert report["errno"] == errno.EFBIG
    assert report["files_after_error"] == report["files_before"]
    assert report["next_after_error"] == report["appended"]
    assert report["batch_errno"] == errno.EFBIG
    assert report["next_after_batch"] == report["appended"]
    assert report["files_after_batch"] == report["files_before"]
    assert report["offset_after_limit"] == report["appended"]

    check_segment_files(segment_dir, segment_bytes)
    with _core.SegmentStore(segment_dir, segment_bytes=segment_bytes) as store:
        expected = [make_body(0, i) for i in range(report["appended"])]
        assert store.read_range(0, report["appended"]) == expected
        assert store.read(report["appended"]) == b"after the limit"
