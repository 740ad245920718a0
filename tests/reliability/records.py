"""Message bodies, broker names and the line logs of the crash torture harness.

Every process of a torture run (and every thread of the embedded worker)
appends to its own log with one os.write() per line, on a file opened with
O_APPEND, so a SIGKILL leaves each line whole or absent. The logs are not
fsynced: only processes are killed, and a killed process's writes are in
the page cache, which outlives it. The power cut is simulated on a copy of
the data directory, so the logs never have to survive one.

A line is written before each request that changes the broker and another
after it returns. So any reading of the logs is consistent with the broker.
A message in the broker has a T line, a D line means the put is stored, and
an acked message has an I line. Fields are separated by one space:

    S NS PID ROLE                      a process starts writing this log
    T NS SEQ TARGET COUNT              a put of messages SEQ to SEQ+COUNT-1
    D NS SEQ TARGET COUNT OFFSET       the put returned: SEQ+i is at OFFSET+i
    E NS SEQ TARGET COUNT ERROR        the put raised ERROR (a class name)
    G CALL RETURN TARGET OFFSET SEQ ATTEMPT INTACT
                                       a get that started at CALL and returned
                                       at RETURN delivered this message;
                                       INTACT is 1 when body and header match SEQ
    I NS OP TARGET OFFSET ATTEMPT      an ack, nack or reject is about to be sent
    O NS OP TARGET OFFSET ATTEMPT      it returned
    X NS OP TARGET OFFSET ATTEMPT ERROR  it raised ERROR

NS, CALL and RETURN are time.monotonic_ns() readings. On Linux that is
CLOCK_MONOTONIC, which every process of the machine shares, so times of
different logs compare. Puts name their TARGET "queue" or "stream", and
deliveries "queue" or "group" (the consumer group of the stream).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Final

QUEUE: Final = "torture-queue"
STREAM: Final = "torture-stream"
GROUP: Final = "workers"
# A second group of the stream, read only by the harness's checks.
AUDIT_GROUP: Final = "audit"
QUEUE_DLQ: Final = f"{QUEUE}.dlq"
GROUP_DLQ: Final = f"{STREAM}.{GROUP}.dlq"

# Long enough that no delivery expires while its consumer is stopped for a
# check. A kill releases deliveries at once without it.
VISIBILITY_TIMEOUT: Final = 120.0
MAX_DELIVERIES: Final = 4
CONSUMER_OPTIONS: Final[dict[str, Any]] = {
    "visibility_timeout": VISIBILITY_TIMEOUT,
    "max_deliveries": MAX_DELIVERIES,
}
AUDIT_OPTIONS: Final[dict[str, Any]] = {
    "visibility_timeout": 3600.0,
    "max_deliveries": 0,
    "max_in_flight": 1 << 30,
}

# Deliveries of the queue are named "queue", those of the group "group".
# Each reads the log of the put target named here.
PUT_TARGET_OF: Final = {"queue": "queue", "group": "stream"}
DLQ_OF: Final = {"queue": QUEUE_DLQ, "group": GROUP_DLQ}

# Messages whose sequence number leaves these remainders are settled with a
# nack every time (so they reach the DLQ after MAX_DELIVERIES attempts) or
# rejected at once.
NACK_MODULUS, NACK_REMAINDER = 53, 7
REJECT_MODULUS, REJECT_REMAINDER = 71, 3
REJECT_REASON: Final = "rejected by the torture consumer"
CORRUPT_REASON: Final = "body does not match its sequence number"


def make_payload(body_seed: int, seq: int) -> bytes:
    """Return the body of message seq: "SEQ|" and 0 to 64 KiB of random bytes.

    Most bodies are under 512 bytes, one in seven is up to 8 KiB and one in
    a hundred up to 64 KiB, so that some records cross pages.
    """
    rng = random.Random(body_seed * 1_000_003 + seq)
    roll = rng.random()
    if roll < 0.85:
        size = rng.randrange(512)
    elif roll < 0.99:
        size = rng.randrange(512, 8192)
    else:
        size = rng.randrange(8192, 65536)
    return b"%d|" % seq + rng.randbytes(size)


def parse_seq(payload: bytes) -> int | None:
    """Return the sequence number at the start of a body, or None if it has none."""
    prefix, bar, _ = payload[:24].partition(b"|")
    if not bar or not prefix.isdigit():
        return None
    return int(prefix)


def inspect_message(
    body_seed: int, payload: bytes, headers: dict[str, str]
) -> tuple[int, bool]:
    """Return (sequence number, intact) of a delivered or stored message.

    The message is intact when its body is the one make_payload gives for
    its sequence number and its "seq" header, if any, names the same number.
    The sequence number is -1 when the body does not start with one.
    """
    seq = parse_seq(payload)
    if seq is None:
        return -1, False
    header = headers.get("seq")
    if header is not None and header != str(seq):
        return seq, False
    return seq, payload == make_payload(body_seed, seq)


def settlement_of(seq: int) -> str:
    """Return how consumers settle message seq: "ack", "nack" or "reject"."""
    if seq % NACK_MODULUS == NACK_REMAINDER:
        return "nack"
    if seq % REJECT_MODULUS == REJECT_REMAINDER:
        return "reject"
    return "ack"


def now() -> int:
    """Return time.monotonic_ns(), the clock of every log line."""
    return time.monotonic_ns()


class LineLog:
    """An append-only log of lines, one os.write() per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # A line torn by an earlier kill would run into the next one.
        if os.fstat(self._fd).st_size:
            with open(path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def write(self, *fields: object) -> None:
        """Append one line of the fields, separated by spaces."""
        line = " ".join(str(field) for field in fields) + "\n"
        os.write(self._fd, line.encode("ascii"))

    def close(self) -> None:
        os.close(self._fd)


class LineReader:
    """Reads the complete lines appended to a log since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._position = 0
        self._partial = b""

    def read_new(self) -> list[list[str]]:
        """Return the lines completed since the last call, split into fields."""
        try:
            with open(self.path, "rb") as file:
                file.seek(self._position)
                data = file.read()
        except FileNotFoundError:
            return []
        self._position += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [line.decode("ascii", "replace").split() for line in lines if line]


def next_sequence(path: Path) -> int:
    """Return the first sequence number no put in the producer log at path used."""
    following = 0
    for fields in LineReader(path).read_new():
        if fields[0] == "T" and len(fields) == 5:
            try:
                following = max(following, int(fields[2]) + int(fields[4]))
            except ValueError:
                continue
    return following
