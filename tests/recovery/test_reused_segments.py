"""Acked segments reused as the spare: their old records stay in the file.

A queue whose segments are all acked turns the oldest one into its spare,
and the next rollover writes over it. The records of its earlier use lie
past the new ones. These tests check that reads and recovery after a
SIGKILL never take one of them for a new record, and that a torn record on
top of them is cut without zeroing them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pymq

SEGMENT_BYTES = 1 << 20
# A 100-byte body makes a 136-byte record: 7,710 fill a segment.
PER_SEGMENT = 7_710
# Acked before the kill: two whole segments and a little of the third, less
# than half of it, so that no fresh spare is made before the drain.
ACKED = 16_000
# Put after the drain: they fill the third segment and roll into the reused
# one, which then contains PUT_AFTER - (3 * PER_SEGMENT - ACKED) of them.
PUT_AFTER = 9_000
REUSED_BASE = 3 * PER_SEGMENT
RECORD_SIZE = 136
REC_MAGIC = 0x52514D50
TIMEOUT = 60.0

# The child fills, drains and refills a queue, prints a JSON report and
# waits to be killed.
CHILD = r"""
import json, os, sys, time
import pymq

data = sys.argv[1]
segment_bytes, acked, put_after, first_size = map(int, sys.argv[2:])
log = os.path.join(data, "streams", "jobs", "log")
broker = pymq.open(data, segment_bytes=segment_bytes)
queue = broker.queue("jobs")
queue.put_many([(b"a%d-" % i).ljust(first_size, b"a") for i in range(acked)])
first_inode = os.stat(os.path.join(log, "%020d.log" % 0)).st_ino
while True:
    batch = queue.get_batch(1000, timeout=0)
    if not len(batch):
        break
    queue.ack_many(batch)
names = sorted(os.listdir(log))
queue.put_many([b"b%099d" % i for i in range(put_after)])
inodes = {name: os.stat(os.path.join(log, name)).st_ino
          for name in os.listdir(log) if name.endswith(".log")}
print(json.dumps({"first_inode": first_inode, "after_drain": names,
                  "inodes": inodes}), flush=True)
time.sleep(60)
"""


def put_drain_put_and_kill(
    data: Path, acked: int = ACKED, put_after: int = PUT_AFTER, first_size: int = 100
) -> dict:
    """Run the child until it reports, SIGKILL it, and return the report.

    The child puts acked bodies of first_size bytes, drains them, and puts
    put_after bodies of 100 bytes.
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(data),
            str(SEGMENT_BYTES),
            str(acked),
            str(put_after),
            str(first_size),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert line, f"the child exited before it reported: {err}"
    return json.loads(line)


def reused_log(data: Path) -> Path:
    return data / "streams" / "jobs" / "log" / f"{REUSED_BASE:020d}.log"


def storage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "pymq.storage" and record.levelno >= logging.WARNING
    ]


def drain_bodies(queue: pymq.Queue) -> list[tuple[int, bytes]]:
    """Get and ack every message of queue, and return (offset, body) pairs.

    Stops after 100 gets of 1,000, more than any test here puts.
    """
    got = []
    for _ in range(100):
        messages = queue.get_many(1000, timeout=0)
        if not messages:
            break
        got += [(message.offset, message.body) for message in messages]
        queue.ack_many(messages)
    return got


def check_quiet_recovery(
    data: Path, caplog: pytest.LogCaptureFixture, acked: int, put_after: int
) -> None:
    """Open data: the put_after new messages, no damage, no warning."""
    caplog.set_level(logging.WARNING, logger="pymq.storage")
    with pymq.open(data, segment_bytes=SEGMENT_BYTES) as broker:
        queue = broker.queue("jobs")
        got = drain_bodies(queue)
        assert queue.stats().damaged == 0
    assert storage_warnings(caplog) == []
    assert got == [(acked + i, b"b%099d" % i) for i in range(put_after)]


@pytest.fixture(scope="module")
def killed_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    data = tmp_path_factory.mktemp("reused") / "data"
    return data, put_drain_put_and_kill(data)


def test_reuse_acked_segment_becomes_next(killed_template):
    _, report = killed_template
    # After the drain: the first segment is the spare, the second was
    # dropped (its files go at the next flush), the third is active.
    assert f"{2 * PER_SEGMENT:020d}.log" in report["after_drain"]
    assert "spare.log" in report["after_drain"]
    assert f"{0:020d}.log" not in report["after_drain"]
    # The rollover renamed the spare: the same file took the new records.
    assert report["inodes"][f"{REUSED_BASE:020d}.log"] == report["first_inode"]


def test_reuse_old_records_follow_new(killed_template):
    data, _ = killed_template
    content = reused_log(data).read_bytes()
    new_records = ACKED + PUT_AFTER - REUSED_BASE
    end = new_records * RECORD_SIZE
    magic, length, offset = struct.unpack_from("<IIQ", content, end - RECORD_SIZE)
    assert (magic, length, offset) == (REC_MAGIC, 100, REUSED_BASE + new_records - 1)
    # The next record in the file is the first segment's record of the
    # same position: offset `new_records`, body b"a..." of that index.
    magic, length, offset = struct.unpack_from("<IIQ", content, end)
    assert (magic, length, offset) == (REC_MAGIC, 100, new_records)
    assert content[end + 32 : end + 132] == (b"a%d-" % new_records).ljust(100, b"a")


def test_reuse_sigkill_loses_nothing(killed_template, tmp_path, caplog):
    template, _ = killed_template
    data = tmp_path / "data"
    copy_tree(template, data)
    check_quiet_recovery(data, caplog, ACKED, PUT_AFTER)


def test_reuse_torn_record_zeroes_tear(killed_template, tmp_path, caplog):
    template, _ = killed_template
    data = tmp_path / "data"
    copy_tree(template, data)
    new_records = ACKED + PUT_AFTER - REUSED_BASE
    end = new_records * RECORD_SIZE
    # A record cut by the kill: its header names the next offset, and only
    # its first 64 bytes reached the file, over the old record there.
    torn = struct.pack("<IIQqII", REC_MAGIC, 100, ACKED + PUT_AFTER, 1, 0, 12345)
    with open(reused_log(data), "r+b") as file:
        file.seek(end)
        file.write(torn + b"t" * (64 - len(torn)))

    caplog.set_level(logging.WARNING, logger="pymq.storage")
    with pymq.open(data, segment_bytes=SEGMENT_BYTES) as broker:
        queue = broker.queue("jobs")
        got = drain_bodies(queue)
        assert queue.put(b"next") == ACKED + PUT_AFTER
    assert got == [(ACKED + i, b"b%099d" % i) for i in range(PUT_AFTER)]

    # The bytes that the torn header claims are zeroed, RECORD_SIZE of them,
    # and the old record after them is left as it is.
    assert [w for w in storage_warnings(caplog) if "torn" in w] == [
        f"segment {REUSED_BASE:020d}.log: cut torn tail at byte {end} "
        f"({RECORD_SIZE} bytes zeroed)"
    ]
    content = reused_log(data).read_bytes()
    assert struct.unpack_from("<IIQ", content, end + RECORD_SIZE) == (
        REC_MAGIC,
        100,
        new_records + 1,
    )

    caplog.clear()
    with pymq.open(data, segment_bytes=SEGMENT_BYTES) as broker:
        message = broker.queue("jobs").get_nowait()
        assert message is not None
        assert (message.offset, message.body) == (ACKED + PUT_AFTER, b"next")
    assert storage_warnings(caplog) == []


def test_reuse_missing_index_rebuilt(killed_template, tmp_path, caplog):
    """With its index lost, the reused segment is rebuilt from the log. It
    is scanned as a reused one, so the old records past the new ones are
    neither taken in nor cut."""
    template, _ = killed_template
    data = tmp_path / "data"
    copy_tree(template, data)
    reused_log(data).with_suffix(".idx").unlink()
    caplog.set_level(logging.WARNING, logger="pymq.storage")
    with pymq.open(data, segment_bytes=SEGMENT_BYTES) as broker:
        queue = broker.queue("jobs")
        got = drain_bodies(queue)
        assert queue.stats().damaged == 0
    assert got == [(ACKED + i, b"b%099d" % i) for i in range(PUT_AFTER)]
    messages = storage_warnings(caplog)
    assert any("rebuilding it from the log" in message for message in messages)
    assert not any("torn" in message or "lost" in message for message in messages)


def copy_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(path.read_bytes())


def test_reuse_end_inside_old_body(tmp_path, caplog):
    """Old records of 300 bytes, new ones of 100: the last new record ends
    inside an old body, and recovery stops there without a warning."""
    # 336-byte records: 3,120 fill a segment. Two segments and 1,000
    # records are acked, then 100-byte records fill the third segment
    # (5,239 fit) and 761 go into the reused first one.
    per_segment = SEGMENT_BYTES // 336
    acked = 2 * per_segment + 1_000
    put_after = 6_000
    in_third = (SEGMENT_BYTES - 1_000 * 336) // RECORD_SIZE
    data = tmp_path / "data"
    report = put_drain_put_and_kill(data, acked, put_after, first_size=300)
    name = f"{acked + in_third:020d}.log"
    assert report["inodes"][name] == report["first_inode"]
    reused = data / "streams" / "jobs" / "log" / name
    end = (put_after - in_third) * RECORD_SIZE
    assert end % 336 != 0
    assert struct.unpack_from("<I", reused.read_bytes(), end)[0] != REC_MAGIC

    check_quiet_recovery(data, caplog, acked, put_after)


# The child opens the log of a queue as a store with reserve_ahead, the mode
# of group journals, and keeps the disk from giving it a spare: RLIMIT_FSIZE
# makes posix_fallocate of a 1 MiB file fail with EFBIG. It deletes the
# segment before the reused one while it still has its spare, rolls into
# the spare, and drops the reused segment, which delete_below() then
# recycles as the new spare. close() keeps that spare for the next open.
RECYCLE_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    from pymq._core import SegmentStore

    folder = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    store = SegmentStore(folder, segment_bytes=1 << 20, reserve_ahead=True)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 19, limit[1]))
    store.delete_below(store.segment_ranges()[-1][0])
    for _ in range(10_000):
        if store.stats()["segments"] > 1:
            break
        store.append(b"c" * 1000)
    assert not store.reserved
    store.delete_below(store.segment_ranges()[-1][0])
    assert store.reserved
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    store.close()
    """
)


def test_reuse_recycled_spare_is_zeroed(killed_template, tmp_path):
    """A reused segment that a store with reserve_ahead recycles is zeroed
    whole, so the spare that close() keeps contains no earlier record."""
    template, _ = killed_template
    data = tmp_path / "data"
    copy_tree(template, data)
    log = data / "streams" / "jobs" / "log"
    result = subprocess.run(
        [sys.executable, "-c", RECYCLE_CHILD, str(log)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    # The header of the kept spare stores "empty, base 0", which the next
    # open with reserve_ahead trusts.
    header = (log / "spare.idx").read_bytes()[:40]
    assert struct.unpack_from("<QQQI", header, 8) == (0, 0, 0, 0)
    content = (log / "spare.log").read_bytes()
    assert content.find(struct.pack("<I", REC_MAGIC)) == -1
    assert content.count(0) == len(content)
