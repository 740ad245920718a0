"""Bodies of acked messages left in a reused segment, read again by recovery.

A reused segment keeps the records of its earlier use past the new ones,
and a body may contain the bytes of a whole record. A producer chooses
those bytes, so such a record must never become a message: recovery of a
reused segment does not scan past its new records for later ones.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pymq
from pymq._core import crc32c
from tests.recovery.test_reused_segments import drain_bodies
from tests.test_broker_restart import kill_when_ready

SEGMENT_BYTES = 1 << 20
# A 100-byte body makes a 136-byte record: 7,710 fill a segment.
RECORD_SIZE = 136
PER_SEGMENT = 7_710
# Put and acked before the refill: two whole segments and part of a third.
ACKED = 16_000
# Put after the drain: the third segment fills, and the rest goes into the
# reused first segment from its start.
PUT_AFTER = 9_000
REUSED_BASE = 3 * PER_SEGMENT
NEW_RECORDS = ACKED + PUT_AFTER - REUSED_BASE
# The acked message whose body contains a record image. Its body starts at
# byte FORGED_INDEX * RECORD_SIZE + 32 of the first segment's file, past the
# NEW_RECORDS records that the reused file takes.
FORGED_INDEX = 3_000
REC_MAGIC = 0x52514D50

# The child puts, drains and refills a queue, prints a line and waits to
# be killed. argv: data folder, body of message FORGED_INDEX in hex.
CHILD = r"""
import sys, time
import pymq

data, forged = sys.argv[1], bytes.fromhex(sys.argv[2])
broker = pymq.open(data, segment_bytes=1 << 20)
queue = broker.queue("jobs")
bodies = [b"a%099d" % i for i in range(16_000)]
bodies[3_000] = forged
queue.put_many(bodies)
for _ in range(100):
    batch = queue.get_batch(1000, timeout=0)
    if not len(batch):
        break
    queue.ack_many(batch)
queue.put_many([b"b%099d" % i for i in range(9_000)])
print('{"ready": true}', flush=True)
time.sleep(60)
"""


def record_image(offset: int, body: bytes) -> bytes:
    """Return the bytes of a sound record of body at offset (segment.pxd)."""
    head = struct.pack("<IIQqI", REC_MAGIC, len(body), offset, 1, 0)
    padding = b"\0" * (-len(body) % 8)
    return head + struct.pack("<I", crc32c(head + body)) + body + padding


def run_and_kill(data: Path, forged: bytes, child: str = CHILD) -> None:
    """Run the child script until it reports ready, then SIGKILL it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(data), forged.hex()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert kill_when_ready(proc) == {"ready": True}


def test_reuse_old_body_never_becomes_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # The image names the offset that the next put would take.
    image = record_image(ACKED + PUT_AFTER, b"F" * 60)
    forged = image + b"x" * (100 - len(image))
    assert FORGED_INDEX * RECORD_SIZE > NEW_RECORDS * RECORD_SIZE
    run_and_kill(data, forged)

    with pymq.open(data, segment_bytes=SEGMENT_BYTES) as broker:
        queue = broker.queue("jobs")
        got = drain_bodies(queue)
        damaged = queue.stats().damaged
    assert got[-1][1] != b"F" * 60
    assert got == [(ACKED + i, b"b%099d" % i) for i in range(PUT_AFTER)]
    assert damaged == 0


# The child puts one large message alone in the first segment, with a
# record image inside its body, moves to a third segment, drains the queue
# and puts again. The first new record in the reused file overwrites the
# only old record header, and ten small ones follow. argv: data folder,
# record image in hex.
COVERING_CHILD = r"""
import sys, time
import pymq

data, image = sys.argv[1], bytes.fromhex(sys.argv[2])
broker = pymq.open(data, segment_bytes=1 << 20)
queue = broker.queue("jobs")
large = bytearray(b"o" * 900_000)
large[100_000 : 100_000 + len(image)] = image
queue.put(bytes(large))
queue.put(b"p" * 600_000)
# Less than half of the third segment: no fresh spare is made, so the
# drain turns the first segment into the spare.
queue.put(b"q" * 500_000)
for _ in range(10):
    batch = queue.get_batch(10, timeout=0)
    if not len(batch):
        break
    queue.ack_many(batch)
queue.put(b"r" * 500_000)
queue.put(b"s" * 60_000)
queue.put_many([b"t%099d" % i for i in range(10)])
print('{"ready": true}', flush=True)
time.sleep(60)
"""
# Offset of the record that rolls into the reused file, and the offset
# after the last one put.
COVERING_BASE = 4
COVERING_END = 15


def test_reuse_lost_index_old_headers_covered(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image = record_image(COVERING_END, b"F" * 60)
    run_and_kill(data, image, COVERING_CHILD)
    log = data / "streams" / "jobs" / "log"
    reused = log / f"{COVERING_BASE:020d}.log"
    content = reused.read_bytes()
    # The image lies in the old body, past the new records.
    assert content.find(image) == 100_032
    # A power cut can lose the index, and with it the reused flag.
    reused.with_suffix(".idx").unlink()

    with pymq.open(data, segment_bytes=SEGMENT_BYTES) as broker:
        got = drain_bodies(broker.queue("jobs"))
    assert [offset for offset, _ in got] == list(range(3, COVERING_END))
