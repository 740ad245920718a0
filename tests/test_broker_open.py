"""Opening a broker: where it may live, its options, and its exit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pymq
from pymq._core import DirectoryLock
from pymq.broker import _remove_stale_memory_folders

PROCESS_TIMEOUT = 30.0


def test_unclosed_broker_exits_without_output(tmp_path: Path) -> None:
    # The unused function changes the order in which module globals are
    # torn down at exit, so that the os module goes before the locks.
    script = textwrap.dedent(
        """
        import logging
        import sys

        import pymq

        logging.basicConfig(level=logging.WARNING)

        def unused(label, function):
            pass

        broker = pymq.open(sys.argv[1], segment_bytes=1 << 22)
        jobs = broker.queue("jobs", max_deliveries=1)
        jobs.put(b"x")
        held = jobs.get(timeout=0)
        jobs.dlq.put(b"y")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert done.returncode == 0
    assert done.stderr == ""
    assert done.stdout == ""


def test_open_inside_data_directory_raises(tmp_path: Path) -> None:
    outer = tmp_path / "data"
    with pymq.open(outer) as broker:
        broker.stream("events").group("billing")
        broker.queue("jobs")
        for inner in (
            outer / "streams",
            outer / "streams" / "jobs",
            outer / "streams" / "events" / "groups",
            outer / "streams" / "events" / "groups" / "new",
        ):
            with pytest.raises(pymq.ConfigError) as raised:
                pymq.open(inner)
            assert str(raised.value) == (
                f"data directory {inner} is inside the data directory {outer} "
                f"of another broker; give a folder outside it"
            )
            assert not (inner / "LOCK").exists()
        assert not (outer / "streams" / "events" / "groups" / "new").exists()
    # Closed, the outer directory is still a data directory.
    with pytest.raises(pymq.ConfigError, match="is inside the data directory"):
        pymq.open(outer / "streams" / "events" / "groups")
    assert sorted(path.name for path in (outer / "streams").iterdir()) == [
        "events",
        "jobs",
    ]


def test_open_inside_empty_data_directory_raises(tmp_path: Path) -> None:
    outer = tmp_path / "data"
    with pymq.open(outer):
        # No queue yet, so no streams folder: only the marker shows it.
        assert sorted(path.name for path in outer.iterdir()) == ["LOCK", "PYMQ"]
        inner = outer / "streams" / "x"
        with pytest.raises(pymq.ConfigError) as raised:
            pymq.open(inner)
        assert str(raised.value) == (
            f"data directory {inner} is inside the data directory {outer} "
            f"of another broker; give a folder outside it"
        )
        assert not (outer / "streams").exists()
    with pytest.raises(pymq.ConfigError, match="is inside the data directory"):
        pymq.open(outer / "deeper" / "still")
    assert not (outer / "deeper").exists()


@pytest.mark.parametrize(
    "inner_parts", [("streams", "x"), ("a",), ("a", "b", "c", "d")]
)
def test_open_around_data_directory_raises(
    tmp_path: Path, inner_parts: tuple[str, ...]
) -> None:
    outer = tmp_path / "data"
    inner = outer.joinpath(*inner_parts)
    with pymq.open(inner) as broker:
        broker.queue("jobs").put(b"x")
    for opened_inner in (False, True):
        if opened_inner:
            # Open too: a broker in use below is found the same way.
            held = pymq.open(inner)
        try:
            with pytest.raises(pymq.ConfigError) as raised:
                pymq.open(outer)
            assert str(raised.value) == (
                f"data directory {outer} contains the data directory {inner} of "
                f"another broker; give a folder that contains no data directory"
            )
        finally:
            if opened_inner:
                held.close()
    assert not (outer / "LOCK").exists()
    assert not (outer / "PYMQ").exists()
    with pymq.open(inner) as broker:
        assert broker.queue("jobs").stats().depth == 1


def test_data_directory_of_older_version_detected(tmp_path: Path) -> None:
    outer = tmp_path / "data"
    with pymq.open(outer) as broker:
        broker.queue("jobs").put(b"x")
        broker.stream("events").group("billing")
    # A version before the marker left a LOCK file and a streams folder.
    (outer / "PYMQ").unlink()
    with pytest.raises(pymq.ConfigError, match="is inside the data directory"):
        pymq.open(outer / "streams" / "x")
    with pytest.raises(pymq.ConfigError, match="contains the data directory"):
        pymq.open(tmp_path)
    # Its own queues and groups are not taken for data directories inside it.
    with pymq.open(outer) as broker:
        assert broker.queue("jobs").stats().depth == 1
        assert (outer / "PYMQ").is_file()


def test_reopen_data_directory_works(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for _ in range(2):
        with pymq.open(data) as broker:
            broker.queue("jobs").put(b"x")
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 2


def test_open_beside_data_directory_works(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        broker.queue("jobs")
        with pymq.open(tmp_path / "other") as other:
            other.queue("jobs").put(b"x")


def test_lock_file_in_streams_ignored_by_case_check(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        broker.queue("jobs")
    # An older version let a broker open data/streams and leave its LOCK.
    (data / "streams" / "LOCK").write_text("123\n")
    with pymq.open(data) as broker:
        lower = broker.queue("lock")
        lower.put(b"x")
        assert broker.names() == {"jobs": "queue", "lock": "queue"}
        with pytest.raises(pymq.ConfigError) as raised:
            broker.queue("LOCK")
        assert str(raised.value) == (
            f"queue LOCK cannot be created: {data / 'streams' / 'LOCK'} exists "
            f"and is not a folder"
        )
        assert (data / "streams" / "LOCK").read_text() == "123\n"


def dead_pid() -> int:
    """Return the PID of a child process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    assert process.wait(timeout=PROCESS_TIMEOUT) == 0
    return process.pid


def make_memory_folder(
    parent: Path, name: str, owner: int | None, lock: bool = True
) -> Path:
    folder = parent / name
    (folder / "streams" / "jobs").mkdir(parents=True)
    (folder / "streams" / "jobs" / "kind").write_text("queue")
    if lock:
        (folder / "LOCK").write_text("")
    if owner is not None:
        (folder / "OWNER").write_text(f"{owner}\n")
    return folder


def test_stale_memory_folders_removed(tmp_path: Path) -> None:
    gone = dead_pid()
    stale = make_memory_folder(tmp_path, "pymq-memory-stale", gone)
    live = make_memory_folder(tmp_path, "pymq-memory-live", os.getpid())
    unmarked = make_memory_folder(tmp_path, "pymq-memory-unmarked", None)
    locked = make_memory_folder(tmp_path, "pymq-memory-locked", gone)
    other = make_memory_folder(tmp_path, "other-stale", gone)
    # Not a data directory: no LOCK file.
    no_lock = make_memory_folder(tmp_path, "pymq-memory-nolock", gone, lock=False)
    # OWNER is a link to a file that names a dead process.
    linked = make_memory_folder(tmp_path, "pymq-memory-linked", None)
    (tmp_path / "fake-owner").write_text(f"{gone}\n")
    (linked / "OWNER").symlink_to(tmp_path / "fake-owner")
    (tmp_path / "pymq-memory-file").write_text(f"{gone}\n")
    lock = DirectoryLock(str(locked))
    try:
        removed = _remove_stale_memory_folders(str(tmp_path))
    finally:
        lock.release()
    assert removed == [str(stale)]
    assert not stale.exists()
    for kept in (live, unmarked, locked, other, no_lock, linked):
        assert (kept / "streams" / "jobs" / "kind").read_text() == "queue"
    assert (tmp_path / "pymq-memory-file").read_text() == f"{gone}\n"


def test_memory_broker_writes_owner_pid() -> None:
    with pymq.open() as broker:
        assert broker.path.name.startswith("pymq-memory-")
        assert (broker.path / "OWNER").read_text() == f"{os.getpid()}\n"


def test_memory_folder_of_terminated_process_removed() -> None:
    script = textwrap.dedent(
        """
        import os
        import signal

        import pymq

        broker = pymq.open()
        broker.queue("jobs").put(b"x")
        print(os.getpid(), broker.path, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    pid, _, path = done.stdout.strip().partition(" ")
    left = Path(path)
    # Checked first, so that the cleanup below never removes another folder.
    assert left.name.startswith("pymq-memory-")
    try:
        assert done.returncode == -signal.SIGTERM
        assert (left / "OWNER").read_text() == f"{pid}\n"
        with pymq.open() as broker:
            assert broker.path != left
            assert not left.exists()
    finally:
        shutil.rmtree(left, ignore_errors=True)
