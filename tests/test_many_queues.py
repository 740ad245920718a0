"""Many queues with tiny segments: file descriptors, mappings and disk stay bounded.

Segments of 64 bytes, the minimum segment_bytes (docs/storage.md),
hold one record each, so every put rolls a queue over and every ack lets
a segment go. After each round of puts and acks the process must have the
same mappings as before the round and, within FD_SLACK, the same
descriptors on its data files. It must map no deleted file and use the
same disk space.

The embedded test keeps its data in memory (pymq.open() with no path), and
the server's test puts it under tmp_path. The broker writes each queue's
option files with fsync under every fsync policy. On this project's
machine, 1,000 queues on disk took 49 s instead of 5 s in memory, most of
it waiting for the disk, which tests nothing here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import pymq
from tests.server.helpers import ServerProcess

SEGMENT_BYTES = 64
# A body that fits a 64-byte segment: 32 bytes of record header, then 16.
BODY = b"m" * 16
PUTS_PER_ROUND = 4
ROUNDS = 3
EMBEDDED_QUEUES = 1_000
SERVER_QUEUES = 200
# Each queue owns two stores (its records and its group's journal), each
# holding one LOCK file open and mapping a .log and an .idx. The journal
# also maps its spare (spare.log and spare.idx), reserved ahead so that
# acks go on on a full disk.
FDS_PER_QUEUE = 2
MAPPINGS_PER_QUEUE = 6
# Descriptors on data files that may come and go between two counts, such
# as a segment that a background thread is creating or prefaulting. A leak
# per queue or per segment would be hundreds.
FD_SLACK = 8


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def data_fds(folder: Path, pid: int | str = "self") -> int:
    """Return how many descriptors of the process name files under folder.

    Counting only these keeps descriptors that other tests' threads and
    sockets open or close meanwhile out of the comparison.
    """
    prefix = str(folder) + os.sep
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(prefix):
            count += 1
    return count


def data_mappings(folder: Path, pid: int | str = "self") -> list[str]:
    """Return the lines of /proc/PID/maps that map files under folder."""
    prefix = str(folder) + os.sep
    return [
        line.rstrip("\n")
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if prefix in line
    ]


def disk_bytes(folder: Path) -> int:
    """Return the sum of the sizes of the files under folder."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def segment_files(folder: Path, name: str) -> list[str]:
    log = folder / "streams" / name / "log"
    return sorted(path.name for path in log.iterdir() if path.name != "LOCK")


class Usage:
    """File descriptors, mappings and disk use of a process and its data."""

    def __init__(self, folder: Path, pid: int | str = "self") -> None:
        self.fds = data_fds(folder, pid)
        self.mappings = data_mappings(folder, pid)
        self.disk = disk_bytes(folder)

    @property
    def deleted(self) -> list[str]:
        return [line for line in self.mappings if line.endswith("(deleted)")]


def check_round(
    names: list[str], folder: Path, opened: Usage, pid: int | str, label: str
) -> None:
    """Check that the round left what the queues had right after opening."""
    now = Usage(folder, pid)
    assert now.deleted == [], f"{label}: deleted files still mapped"
    assert abs(now.fds - opened.fds) <= FD_SLACK, (
        f"{label}: {now.fds} fds, {opened.fds} at open"
    )
    assert len(now.mappings) == len(opened.mappings), label
    assert now.disk == opened.disk, f"{label}: {now.disk} bytes, {opened.disk}"
    for name in (names[0], names[len(names) // 2], names[-1]):
        files = segment_files(folder, name)
        assert len(files) == 2, f"{label}: {name} keeps {files}"


# Embedded --------------------------------------------------------------------


def test_many_embedded_queues_release_segments():
    before = open_fds()
    names = [f"q{index:04d}" for index in range(EMBEDDED_QUEUES)]
    with pymq.open(segment_bytes=SEGMENT_BYTES) as broker:
        folder = broker.path
        queues = [broker.queue(name) for name in names]
        opened = Usage(folder)
        # One more for the LOCK of the data directory itself.
        expected = FDS_PER_QUEUE * EMBEDDED_QUEUES + 1
        assert abs(opened.fds - expected) <= FD_SLACK
        assert len(opened.mappings) == MAPPINGS_PER_QUEUE * EMBEDDED_QUEUES
        for round_number in range(ROUNDS):
            for queue in queues:
                queue.put_many([BODY] * PUTS_PER_ROUND)
            full = Usage(folder)
            # Every put took a segment of its own: two more mappings each.
            assert len(full.mappings) >= len(opened.mappings) + 2 * (
                PUTS_PER_ROUND - 1
            ) * len(queues)
            assert abs(full.fds - opened.fds) <= FD_SLACK
            for queue in queues:
                messages = queue.get_many(PUTS_PER_ROUND, timeout=0)
                assert [message.body for message in messages] == [BODY] * (
                    PUTS_PER_ROUND
                )
                queue.ack_many(messages)
            check_round(names, folder, opened, "self", f"round {round_number}")
        for queue in (queues[0], queues[-1]):
            stats = queue.stats()
            assert (stats.depth, stats.acked) == (0, ROUNDS * PUTS_PER_ROUND)
    assert open_fds() <= before + FD_SLACK


def test_spare_segments_are_released():
    """Segments of 1 MiB and more get a spare; rolling over must not leak it."""
    segment = 1 << 20
    body = b"s" * 4000
    # About 0.8 MiB per round, so that some rounds pass half a segment and
    # create a spare, and others roll over into it.
    per_round = 200
    with pymq.open(segment_bytes=segment) as broker:
        folder = broker.path
        queues = [broker.queue(f"spare{index}") for index in range(20)]
        opened = Usage(folder)
        rounds_with_spare = 0
        for round_number in range(5):
            for queue in queues:
                queue.put_many([body] * per_round)
            for queue in queues:
                messages = queue.get_many(per_round, timeout=0)
                assert len(messages) == per_round
                queue.ack_many(messages)
            for queue in queues:
                # Acked segments of 1 MiB and more are unmapped and
                # unlinked by the next background flush; flush() does it now.
                queue.stream.store.flush()
            now = Usage(folder)
            assert now.deleted == [], f"round {round_number}: deleted files mapped"
            assert abs(now.fds - opened.fds) <= FD_SLACK
            # At most the active segment and a spare per queue, each mapped
            # as .log and .idx, besides the journal's four (its segment and
            # its spare).
            assert len(now.mappings) <= 8 * len(queues)
            for queue in queues:
                files = segment_files(folder, queue.name)
                assert len(files) in (2, 4), files
            rounds_with_spare += "spare.log" in segment_files(folder, queues[0].name)
        # The rounds crossed half a segment, which creates the spare.
        assert rounds_with_spare > 0


# Through a server ------------------------------------------------------------


# A server like `pymq serve`, with segment_bytes, which the command line does
# not take. argv[1] is a JSON object with "data", "port_file" and
# "segment_bytes".
@pytest.fixture
def small_segment_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """Start a server with 64-byte segments; stop it after the test."""
    server = ServerProcess(tmp_path, segment_bytes=SEGMENT_BYTES).start()
    try:
        yield server
        assert server.stop() == 0, server.log()
    finally:
        server.kill()


def test_many_server_queues_release_segments(small_segment_server):
    process = small_segment_server.process
    folder = small_segment_server.data
    port = small_segment_server.port
    names = [f"s{index:03d}" for index in range(SERVER_QUEUES)]
    with pymq.connect(f"pymq://127.0.0.1:{port}", reconnect_attempts=0) as client:
        queues = [client.queue(name) for name in names]
        opened = Usage(folder, process.pid)
        expected = FDS_PER_QUEUE * SERVER_QUEUES + 1
        assert abs(opened.fds - expected) <= FD_SLACK
        assert len(opened.mappings) == MAPPINGS_PER_QUEUE * SERVER_QUEUES
        for round_number in range(ROUNDS):
            for queue in queues:
                assert len(queue.put_many([BODY] * PUTS_PER_ROUND)) == PUTS_PER_ROUND
            full = Usage(folder, process.pid)
            assert len(full.mappings) > len(opened.mappings)
            for queue in queues:
                messages = queue.get_many(PUTS_PER_ROUND, timeout=10.0)
                assert [message.body for message in messages] == [BODY] * (
                    PUTS_PER_ROUND
                )
                queue.ack_many(messages)
            check_round(names, folder, opened, process.pid, f"round {round_number}")
        stats = queues[-1].stats()
        assert (stats.depth, stats.acked) == (0, ROUNDS * PUTS_PER_ROUND)
