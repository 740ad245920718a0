"""State that survives closing the broker, and a SIGKILL of its process."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import pymq

CONSUMER = Path(__file__).parent / "broker_scripts" / "consumer.py"
PROCESS_TIMEOUT = 20.0


def capture_journals(monkeypatch: pytest.MonkeyPatch) -> list[pymq.SegmentStore]:
    """Make every broker append the journal stores it opens to the list returned."""
    journals: list[pymq.SegmentStore] = []
    open_journal = pymq.Broker._open_journal

    def capture(self: pymq.Broker, stream: str, group: str) -> pymq.SegmentStore:
        journal = open_journal(self, stream, group)
        journals.append(journal)
        return journal

    monkeypatch.setattr(pymq.Broker, "_open_journal", capture)
    return journals


def segment_logs(folder: Path) -> list[str]:
    """Return the names of the segment files (not spare or dropped ones) in folder."""
    return sorted(
        path.name for path in folder.glob("*.log") if path.name[:20].isdigit()
    )


def start_consumer(data: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CONSUMER), str(data), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_consumer(data: Path, mode: str) -> tuple[int, dict | None, str]:
    """Run the consumer until it exits, and return its exit code, report and stderr."""
    proc = start_consumer(data, mode)
    try:
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    lines = out.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None, err


def kill_when_ready(proc: subprocess.Popen) -> dict:
    """Read the consumer's report line, then SIGKILL it by its pid."""
    try:
        line = proc.stdout.readline()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=PROCESS_TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()
    assert line, "consumer exited before it reported"
    return json.loads(line)


# Dropped segments ---------------------------------------------------------


def move_one_at_a_time(queue: pymq.Queue, count: int) -> None:
    for _ in range(count):
        queue.put(b"m" * 100)
        queue.get_nowait().ack()


def test_interval_journal_drops_segments_after_a_flush(tmp_path, monkeypatch):
    """Under "interval" the checkpoint after a journal rollover waits for a
    flush, and the older segments go at the first call after it."""
    data = tmp_path / "data"
    journals = capture_journals(monkeypatch)
    folder = data / "streams" / "jobs" / "groups" / ".queue"
    # No background flush during the test: only the flush() calls below sync.
    with pymq.open(data, segment_bytes=1 << 20, flush_interval=3600) as broker:
        q = broker.queue("jobs")
        q.put(b"held")
        held = q.get_nowait()
        # 104 bytes of journal records per message: five 1 MiB segments.
        move_one_at_a_time(q, 50_000)
        journal = journals[0]
        names = segment_logs(folder)
        assert len(names) == journal.stats()["segments"] == 5
        assert names[0] == "00000000000000000000.log"
        journal.flush()
        assert q.get_nowait() is None
        names = segment_logs(folder)
        assert names[0] != "00000000000000000000.log"
        assert len(names) == journal.stats()["segments"]
        journal.flush()
        assert q.get_nowait() is None
        assert len(segment_logs(folder)) == journal.stats()["segments"] == 1
        # The dropped segments' files go at the next flush.
        assert len(list(folder.glob("dropped-*.log"))) == 3
        journal.flush()
        assert list(folder.glob("dropped-*")) == []
    with pymq.open(data, segment_bytes=1 << 20) as broker:
        q = broker.queue("jobs")
        again = q.get_nowait()
        assert (again.offset, again.attempt) == (held.offset, 2)
        assert q.get_nowait() is None
        assert q.stats().depth == 1


def test_journal_drop_waits_for_at_most_32_segments(tmp_path, monkeypatch):
    """With no flush at all, a call syncs the checkpoint itself once the
    journal has 32 segments, so the journal stays bounded."""
    data = tmp_path / "data"
    journals = capture_journals(monkeypatch)
    with pymq.open(data, segment_bytes=1 << 20, flush_interval=3600) as broker:
        q = broker.queue("jobs")
        counts = []
        for _ in range(40):
            move_one_at_a_time(q, 10_000)
            counts.append(journals[0].stats()["segments"])
        # 104 bytes of journal per message: a rollover about every 10,000
        # messages. The 32nd segment makes a call sync the checkpoint written
        # after the first rollover, which drops the first segment, and write
        # a new one; at the next 32nd, the sync of that one drops 30.
        assert counts == [*range(1, 32), 31, *range(2, 10)]


def test_never_journal_drops_segments_at_once(tmp_path, monkeypatch):
    data = tmp_path / "data"
    journals = capture_journals(monkeypatch)
    folder = data / "streams" / "jobs" / "groups" / ".queue"
    with pymq.open(
        data, fsync="never", segment_bytes=1 << 20, flush_interval=3600
    ) as broker:
        q = broker.queue("jobs")
        move_one_at_a_time(q, 50_000)
        # Renamed at once, unlinked by the next flush.
        assert len(segment_logs(folder)) == journals[0].stats()["segments"] == 1
        assert len(list(folder.glob("dropped-*.log"))) == 4
        journals[0].flush()
        assert list(folder.glob("dropped-*")) == []


def test_kill_before_dropped_segments_are_unlinked(tmp_path):
    """Acked segments are renamed at once: the first becomes the spare, the
    next is unlinked by a background flush. Files that a SIGKILL left in
    between go at the next open."""
    data = tmp_path / "data"
    with pymq.open(data, segment_bytes=1 << 20) as broker:
        # 136 bytes per record: segments of 7,710 records, so three.
        broker.queue("jobs").put_many([b"x" * 100] * 20_000)
    report = kill_when_ready(start_consumer(data, "drain"))
    assert report == {
        "acked": 20_000,
        "log": [
            "00000000000000015420.idx",
            "00000000000000015420.log",
            "LOCK",
            "dropped-00000000000000007710.idx",
            "dropped-00000000000000007710.log",
            "spare.idx",
            "spare.log",
        ],
    }
    with pymq.open(data, segment_bytes=1 << 20) as broker:
        q = broker.queue("jobs")
        log = data / "streams" / "jobs" / "log"
        assert sorted(path.name for path in log.iterdir()) == [
            "00000000000000015420.idx",
            "00000000000000015420.log",
            "LOCK",
        ]
        assert q.get_nowait() is None
        assert q.stats().depth == 0
        assert q.put(b"after") == 20_000


# Journal records of runs -------------------------------------------------

REC_MAGIC = 0x52514D50
REC_HEADER_SIZE = 32


def journal_records(folder: Path) -> list[bytes]:
    """Return the record bodies of every log file in folder, in file order.

    Reads the record layout of docs/storage.md: a 32-byte header whose
    second field is the body length, then the body padded to 8 bytes.
    """
    bodies = []
    for path in sorted(folder.glob("*.log")):
        data = path.read_bytes()
        position = 0
        while position + REC_HEADER_SIZE <= len(data):
            magic, length = struct.unpack_from("<II", data, position)
            if magic != REC_MAGIC:
                break
            start = position + REC_HEADER_SIZE
            bodies.append(data[start : start + length])
            position = start + (length + 7) // 8 * 8
    return bodies


def test_kill_after_batch_runs_keeps_acks(tmp_path):
    """A get_batch and an ack_many of consecutive offsets are journaled as
    runs. After a SIGKILL they give the same acks and attempts as lists."""
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        broker.queue("jobs").put_many([b"m%d" % i for i in range(10)])
    report = kill_when_ready(start_consumer(data, "runs"))
    assert report == {"acked": [1, 2, 3, 5], "held": [0, 4]}

    journal = data / "streams" / "jobs" / "groups" / ".queue"
    records = journal_records(journal)
    # Op, count and first offset (and attempt), little-endian.
    deliver_run = struct.pack("<BIQI", 6, 6, 0, 1)
    ack_run = struct.pack("<BIQ", 7, 3, 1)
    single_ack = struct.pack("<BIQ", 2, 1, 5)
    assert records[-3:] == [deliver_run, ack_run, single_ack]

    with pymq.open(data) as broker:
        messages = broker.queue("jobs").get_many(10, timeout=0)
    assert [(m.offset, m.attempt) for m in messages] == [
        (0, 2),
        (4, 2),
        (6, 1),
        (7, 1),
        (8, 1),
        (9, 1),
    ]


# Close and reopen -------------------------------------------------------


def test_restart_keeps_acks(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        q = broker.queue("jobs")
        q.put_many([b"a", b"b", b"c"])
        q.get(timeout=0).ack()
    with pymq.open(data) as broker:
        q = broker.queue("jobs")
        messages = q.get_many(10, timeout=0)
        assert [m.body for m in messages] == [b"b", b"c"]
        assert [m.attempt for m in messages] == [1, 1]


def test_restart_in_flight_available_with_attempt(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        q = broker.queue("jobs", visibility_timeout=600.0)
        q.put_many([b"a", b"b"])
        q.get(timeout=0)
    with pymq.open(data) as broker:
        q = broker.queue("jobs")
        msg = q.get(timeout=0)
        assert msg.body == b"a"
        assert msg.attempt == 2
        assert q.get(timeout=0).attempt == 1


def test_restart_offsets_continue(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        broker.queue("jobs").put_many([b"a", b"b"])
    with pymq.open(data) as broker:
        assert broker.queue("jobs").put(b"c") == 2


def test_restart_dead_letter_not_redelivered(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        q = broker.queue("jobs")
        q.put_many([b"bad", b"good"])
        q.get(timeout=0).reject("bad")
    with pymq.open(data) as broker:
        q = broker.queue("jobs")
        assert q.get(timeout=0).body == b"good"
        assert q.dlq.get(timeout=0).body == b"bad"


def test_restart_after_many_acks_keeps_position(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data, segment_bytes=4096) as broker:
        q = broker.queue("jobs")
        q.put_many([b"%d" % i for i in range(3000)])
        for _ in range(30):
            q.ack_many(q.get_many(100, timeout=0)[:99])
    with pymq.open(data, segment_bytes=4096) as broker:
        q = broker.queue("jobs")
        redelivered = q.get_many(30, timeout=0)
        assert [m.offset for m in redelivered] == [99 + 100 * i for i in range(30)]
        assert {m.attempt for m in redelivered} == {2}
        assert q.stats().depth == 30


# SIGKILL ----------------------------------------------------------------


def test_sigkill_keeps_acks_and_attempts(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        broker.queue("jobs", visibility_timeout=600.0).put_many(
            [b"m%d" % i for i in range(8)]
        )
    report = kill_when_ready(start_consumer(data, "hold"))
    assert report["acked"] == [0, 1, 2]
    assert report["held"] == [[3, 1], [4, 1]]
    with pymq.open(data) as broker:
        q = broker.queue("jobs")
        messages = q.get_many(10, timeout=0)
        assert [m.offset for m in messages] == [3, 4, 5, 6, 7]
        assert [m.attempt for m in messages] == [2, 2, 1, 1, 1]


def test_sigkill_attempts_add_up_across_crashes(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        broker.queue("jobs", max_deliveries=10).put_many([b"m%d" % i for i in range(5)])
    first = kill_when_ready(start_consumer(data, "hold"))
    second = kill_when_ready(start_consumer(data, "hold"))
    assert first["held"] == [[3, 1], [4, 1]]
    assert second["acked"] == [3, 4]
    with pymq.open(data) as broker:
        q = broker.queue("jobs")
        assert q.get(timeout=0) is None
        assert q.stats().depth == 0


def test_sigkill_releases_directory_lock(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        broker.queue("jobs").put_many([b"a", b"b", b"c", b"d"])
    kill_when_ready(start_consumer(data, "hold"))
    with pymq.open(data) as broker:
        msg = broker.queue("jobs").get(timeout=0)
        assert msg.offset == 3
        assert msg.attempt == 2


def test_sigkill_poison_reaches_dlq_after_max_deliveries(tmp_path):
    data = tmp_path / "data"
    max_deliveries = 3
    with pymq.open(data) as broker:
        q = broker.queue("jobs", max_deliveries=max_deliveries)
        q.put(b"poison", headers={"kind": "demo"})
        q.put_many([b"after1", b"after2"])
    killed = 0
    delivered = []
    for _ in range(max_deliveries + 5):
        code, report, err = run_consumer(data, "once")
        if code == -signal.SIGKILL:
            killed += 1
            continue
        assert code == 0, err
        if report["body"] is None:
            break
        delivered.append(report["body"])
    assert killed == max_deliveries
    assert delivered == ["after1", "after2"]
    with pymq.open(data) as broker:
        dead = broker.queue("jobs.dlq").get(timeout=0)
        assert dead.body == b"poison"
        assert dead.headers["kind"] == "demo"
        assert dead.headers["x-attempts"] == str(max_deliveries)
        assert dead.headers["x-offset"] == "0"
        assert "max_deliveries reached" in dead.headers["x-reason"]
        assert broker.queue("jobs").stats().depth == 0


def test_straggler_keeps_journal_compacted(tmp_path, monkeypatch):
    data = tmp_path / "data"
    journals = capture_journals(monkeypatch)
    with pymq.open(data, segment_bytes=1 << 20) as broker:
        q = broker.queue("jobs", max_in_flight=200_000)
        q.put(b"straggler")
        held = q.get(timeout=0)
        q.put_many([b"x"] * 100_000)
        # One journal record per get and per ack: about 11 MB of journal.
        for _ in range(100_000):
            q.get_nowait().ack()
        # A checkpoint lists only the one unsettled offset, so it is small
        # enough to be written (listing all 100,001 offsets of the window
        # would not fit one journal record), and older segments are dropped
        # at the first call after a flush has synced it. Twice: the first
        # drop may leave segments written after the checkpoint, and the
        # checkpoint written then covers them.
        for _ in range(2):
            journals[0].flush()
            assert q.get_nowait() is None
        journal = data / "streams" / "jobs" / "groups" / ".queue"
        assert len(segment_logs(journal)) == 1
        assert held.offset == 0
    with pymq.open(data, segment_bytes=1 << 20) as broker:
        q = broker.queue("jobs")
        again = q.get(timeout=0)
        assert again.offset == 0
        assert again.attempt == 2
        assert q.get(timeout=0) is None
        # Only the straggler, now in flight again, is left unsettled.
        assert q.stats().depth == 1
        assert q.stats().in_flight == 1
