"""Coverage-guided fuzzing of the frame codec and the server's request handlers.

The fuzzer is atheris, libFuzzer for Python. Install it and run:

    .venv/bin/pip install atheris
    mkdir -p /tmp/pymq-corpus
    .venv/bin/python fuzz/fuzz_frames.py --write-seeds /tmp/pymq-corpus
    .venv/bin/python fuzz/fuzz_frames.py -max_total_time=600 /tmp/pymq-corpus

Arguments other than the script's own (--seeds, --write-seeds DIR) go to
libFuzzer: -runs=N, -max_total_time=S, -max_len=N, a corpus folder, or a
crash file to replay. Without -runs or -max_total_time the script adds
-max_total_time=60, so every run stops by itself. `--seeds` runs the
built-in seed inputs and a bounded number of mutations of them without
atheris (tests/server/test_fuzz.py runs it that way).

The first byte of an input picks the target, and the rest is its input:

- 0, FrameReader.feed: byte 1 picks max_frame_bytes, byte 2 the size of
  the pieces the data is fed in.
- 1, publish_into on a queue of a real in-memory broker: bit 0 of byte 1
  fixes the batch's CRC32C (so that the fuzzer gets past it), and bytes 2-3
  are max_count. A batch that is written must then be delivered
  and acked without error.
- 2, decode_deliveries: bit 0 of byte 1 fixes the CRC32C.
- 3, decode_receipts: byte 1 is the start position, as a signed byte.
- 4, the server's _Connection (data_received, and through it handle())
  on a fake transport, in an asyncio loop. Bit 0 of byte 1 puts the
  preamble, HELLO and three OPENs first, and bit 1 fixes the CRC32C of
  every whole PUBLISH frame. Byte 2 is the size of the pieces.

A finding is an exception that the target does not list as expected, or
a broken invariant (AssertionError): frames that do not add up, a batch
written in part, an error reply with code 18 (a bug in the server), a
connection left open after a protocol error, or deliveries still in flight
after the connection closed. atheris then prints the input and writes it to
crash-<sha1>; running the script with that file as its argument replays it.

Coverage feedback comes from the Python modules (pymq.server,
pymq.protocol, pymq.broker, pymq.queue), which atheris instruments. The
compiled core (pymq._core) runs, but gives no feedback, because it is not
built with libFuzzer's instrumentation. Nothing here opens a socket.

atheris runs in a child process, with the broker's data in a folder under
/dev/shm that the parent removes when the child ends: libFuzzer ends its
process without running Python's atexit handlers. The in-memory broker
keeps a stream of at most about 4 MiB and drains its queue after each
input: over a 5-minute run here, the fuzzer's RSS stayed near 70 MB.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymq
from pymq import protocol
from pymq._core import (
    FrameReader,
    crc32c,
    decode_deliveries,
    decode_receipts,
    encode_frame,
    encode_publish,
    encode_receipts,
    publish_into,
)
from pymq.errors import (
    CorruptBatchError,
    MessageTooLargeError,
    ProtocolError,
)
from pymq.protocol import FLAG_ERROR, PREAMBLE, encode_json
from pymq.server import Server, ServerLimits, _Connection

# Without either option libFuzzer runs until it finds something.
DEFAULT_LIBFUZZER_BOUND = "-max_total_time=60"
# --seeds runs at most this many mutated inputs, for at most this long.
SMOKE_MUTATIONS = 400
SMOKE_SECONDS = 60.0
# Error codes after which the server must close the connection.
FATAL_CODES = frozenset({1, 2, 3, 4, 5, 14})
MAX_FRAME_BYTES = (64, 4096, 1 << 20, 16 << 20)
QUEUE = "fuzz-q"
STREAM = "fuzz-s"
GROUP = "g"
# Inputs between two retention passes over the fuzzed stream.
RETENTION_EVERY = 1000
# Set for the process that runs atheris: the folder its brokers live in.
DATA_VARIABLE = "PYMQ_FUZZ_DATA"
# Segments as in a broker without a path, which keeps its data in memory.
SEGMENT_BYTES = 1 << 20


class FakeTransport:
    """The parts of asyncio.Transport that _Connection uses, in memory."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.written += data

    def writelines(self, items: list[bytes]) -> None:
        for data in items:
            self.write(data)

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 0) if name == "peername" else default


class Harness:
    """One broker and server, shared by every input of a run.

    The broker keeps its data in memory: in a folder of its own under
    parent, or, without parent, in a temporary folder that close() removes.
    """

    def __init__(self, parent: Path | None = None) -> None:
        logging.getLogger("pymq").setLevel(logging.CRITICAL)
        if parent is None:
            self.broker = pymq.open()
        else:
            folder = tempfile.mkdtemp(prefix="broker-", dir=parent)
            self.broker = pymq.open(folder, fsync="never", segment_bytes=SEGMENT_BYTES)
        self.queue = self.broker.queue(QUEUE, visibility_timeout=3600)
        # The stream keeps about 4 MiB, so that a long run stays small.
        self.stream = self.broker.stream(STREAM, max_bytes=4 << 20)
        self.group = self.stream.group(GROUP, visibility_timeout=3600)
        self.loop = asyncio.new_event_loop()
        self.server = Server(self.broker, limits=ServerLimits())
        self.inputs = 0

    def close(self) -> None:
        self.loop.close()
        self.broker.close()
        self.server.close()

    def run(self, data: bytes) -> None:
        """Run one input through the target its first byte picks."""
        if not data:
            return
        self.inputs += 1
        if self.inputs % RETENTION_EVERY == 0:
            self.broker.apply_retention()
        targets: list[Callable[[bytes], None]] = [
            self.feed,
            self.publish,
            self.deliveries,
            self.receipts,
            self.connection,
        ]
        targets[data[0] % len(targets)](data[1:])

    # Targets ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if len(data) < 2:
            return
        limit = MAX_FRAME_BYTES[data[0] % len(MAX_FRAME_BYTES)]
        step = data[1] + 1
        body = data[2:]
        reader = FrameReader(limit)
        used = 0
        for start in range(0, len(body), step):
            try:
                frames = reader.feed(body[start : start + step])
            except ProtocolError:
                return
            for _, _, _, _, payload in frames:
                assert len(payload) + 12 <= limit
                used += 16 + len(payload)
        assert used + reader.buffered == len(body), (used, reader.buffered)

    def publish(self, data: bytes) -> None:
        if len(data) < 3:
            return
        payload = bytearray(data[3:])
        if data[0] & 1 and len(payload) >= 16:
            payload[8:12] = struct.pack("<I", crc32c(bytes(payload[16:])))
        max_count = max(1, struct.unpack_from("<H", data, 1)[0])
        store = self.queue.stream.store
        before = store.next_offset
        try:
            first, count = publish_into(self.queue.stream, bytes(payload), max_count)
        except (ProtocolError, CorruptBatchError, MessageTooLargeError, ValueError):
            assert store.next_offset == before, "a rejected batch was written"
            return
        assert first == before
        assert store.next_offset == first + count
        assert 1 <= count <= max_count
        # Every message written must come out again.
        messages = self.queue.get_many_nowait(count)
        assert [message.offset for message in messages] == list(
            range(first, first + count)
        )
        self.queue.ack_many(messages)

    def deliveries(self, data: bytes) -> None:
        if not data:
            return
        payload = bytearray(data[1:])
        if data[0] & 1 and len(payload) >= 8:
            payload[4:8] = struct.pack("<I", crc32c(bytes(payload[8:])))
        try:
            messages = decode_deliveries(bytes(payload), None)
        except (ProtocolError, CorruptBatchError, ValueError):
            return
        assert len(messages) == struct.unpack_from("<I", payload)[0]
        for message in messages:
            assert isinstance(message.body, bytes)
            assert isinstance(message.headers, dict)

    def receipts(self, data: bytes) -> None:
        if not data:
            return
        start = struct.unpack_from("<b", data)[0]
        payload = data[1:]
        try:
            receipts, end = decode_receipts(payload, start)
        except ProtocolError:
            return
        assert start >= 0
        assert end <= len(payload)
        assert len(receipts) == (end - start - 4) // 8
        assert all(0 <= receipt < 1 << 64 for receipt in receipts)

    def connection(self, data: bytes) -> None:
        if len(data) < 2:
            return
        mode, step, body = data[0], data[1] + 1, data[2:]
        if mode & 2:
            body = fix_publish_crcs(body)
        if mode & 1:
            body = handshake_frames() + body
        self.loop.run_until_complete(self.serve(body, step))

    async def serve(self, data: bytes, step: int) -> None:
        transport = FakeTransport()
        connection = _Connection(self.server)
        connection.connection_made(transport)  # type: ignore[arg-type]
        for start in range(0, len(data), step):
            if transport.closing:
                # A closed transport reads no more, as asyncio's do.
                break
            connection.data_received(data[start : start + step])
            await asyncio.sleep(0)
        await settle(connection)
        check_replies(bytes(transport.written), transport.closing)
        connection.connection_lost(None)
        await settle(connection)
        for task in [*connection.tasks, *subscription_tasks(connection)]:
            assert task.done(), f"{task!r} still runs after the connection closed"
        for consumer in (self.queue, self.group):
            stats = consumer.stats()
            assert stats.in_flight == 0, f"deliveries left in flight: {stats}"
        # Drained, so that a long run keeps the queue small.
        self.queue.ack_many(self.queue.get_many_nowait(10_000))


async def settle(connection: _Connection, bound: float = 2.0) -> None:
    """Let the connection's worker and tasks run, for at most bound seconds.

    Returns early once the worker is done and, if the connection closed,
    every task of it has ended.
    """
    deadline = time.monotonic() + bound
    for _ in range(3):
        await asyncio.sleep(0)
    while time.monotonic() < deadline:
        running = [*connection.tasks, *subscription_tasks(connection)]
        busy = connection.worker is not None or (
            connection.closed and any(not task.done() for task in running)
        )
        if not busy:
            break
        await asyncio.sleep(0.001)


def subscription_tasks(connection: _Connection) -> Iterator[asyncio.Task[None]]:
    for subscription in connection.subscriptions.values():
        if subscription.task is not None:
            yield subscription.task


def check_replies(written: bytes, closed: bool) -> None:
    """Check every frame the server wrote, and that it closed after a fatal one."""
    frames = FrameReader(0xFFFF_FFFF).feed(written)
    for index, (opcode, flags, _, _, payload) in enumerate(frames):
        if not flags & FLAG_ERROR:
            if opcode == protocol.DELIVER:
                decode_deliveries(payload, None)
            continue
        assert len(payload) >= 4, payload
        (code,) = struct.unpack_from("<H", payload)
        assert code in protocol.ERROR_CODES, code
        assert code != 18, f"the server hit a bug: {payload[4:]!r}"
        if code in FATAL_CODES:
            assert closed, f"error {code} left the connection open"
            assert index == len(frames) - 1, "frames followed a protocol error"


def handshake_frames() -> bytes:
    """Return the preamble, HELLO and OPENs of handles 1 (queue), 2 and 3."""
    opens = [
        {"kind": "queue", "name": QUEUE},
        {"kind": "stream", "name": STREAM},
        {"kind": "group", "name": GROUP, "stream": STREAM},
    ]
    hello = encode_json({"versions": [1, 1], "token": None, "client": "fuzz"})
    return (
        PREAMBLE
        + encode_frame(protocol.HELLO, 0, 1, 0, hello)
        + b"".join(
            encode_frame(protocol.OPEN, 0, 2 + index, 0, encode_json(request))
            for index, request in enumerate(opens)
        )
    )


def fix_publish_crcs(data: bytes) -> bytes:
    """Return data with the CRC32C of each whole PUBLISH frame made right."""
    fixed = bytearray(data)
    position = 0
    while len(fixed) - position >= 16:
        (length,) = struct.unpack_from("<I", fixed, position)
        if length < 12 or len(fixed) - position < 4 + length:
            break
        payload_start = position + 16
        payload_end = position + 4 + length
        if fixed[position + 4] == protocol.PUBLISH and length >= 28:
            crc = crc32c(bytes(fixed[payload_start + 16 : payload_end]))
            struct.pack_into("<I", fixed, payload_start + 8, crc)
        position = payload_end
    return bytes(fixed)


# Seeds ------------------------------------------------------------------------


def seed_inputs() -> list[bytes]:
    """Return valid inputs for every target: where the fuzzer starts from."""
    frames = encode_frame(protocol.PING, 0, 1, 0, b"") + encode_frame(
        protocol.OPEN, 0, 2, 0, b'{"kind": "queue", "name": "x"}'
    )
    batch = encode_publish(5, 1, [b"a", b"bc", b""], {"k": "v"}, 0)[16:]
    plain = encode_publish(5, 1, [b"no headers"], None, -1)[16:]
    record = struct.pack("<QQqIII", 7, 7 << 16 | 1, 0, 1, 0, 3) + b"abc"
    deliver = struct.pack("<II", 1, crc32c(record)) + record
    receipts = encode_receipts(protocol.ACK, 0, 1, 1, [1, 2, 3])[16:]
    session = b"".join(
        [
            encode_publish(10, 1, [b"one", b"two"], None, 0),
            encode_publish(11, 2, [b"event"], {"h": "1"}, 0),
            encode_frame(protocol.FETCH, 0, 12, 1, struct.pack("<Ii", 10, 0)),
            encode_frame(protocol.FETCH, 0, 13, 3, struct.pack("<Ii", 10, 5)),
            encode_frame(protocol.SUBSCRIBE, 0, 14, 1, struct.pack("<I", 2)),
            encode_frame(protocol.CREDIT, 0, 14, 1, struct.pack("<I", 5)),
            encode_frame(protocol.STATS, 0, 15, 1, b""),
            encode_receipts(protocol.ACK, 0, 16, 1, [1 << 16 | 1]),
            encode_receipts(protocol.NACK, 0, 17, 3, [1], prefix=struct.pack("<d", 0)),
            encode_receipts(protocol.REJECT, 0, 18, 1, [2], suffix=b"bad"),
            encode_frame(protocol.NAMES, 0, 19, 0, b"{}"),
            encode_frame(protocol.GROUPS, 0, 20, 0, b'{"stream": "fuzz-s"}'),
            encode_frame(protocol.UNSUBSCRIBE, 0, 21, 0, struct.pack("<I", 14)),
        ]
    )
    return [
        bytes([0, 1, 255]) + frames,
        bytes([0, 0, 3]) + frames + b"\x05\x00\x00\x00",
        bytes([1, 1]) + struct.pack("<H", 100) + batch,
        bytes([1, 1]) + struct.pack("<H", 100) + plain,
        bytes([2, 1]) + deliver,
        bytes([3, 0]) + receipts,
        bytes([4, 3, 255]) + session,
        bytes([4, 3, 7]) + session,
        bytes([4, 0, 255]) + PREAMBLE + b"garbage",
    ]


def mutate(data: bytes, chooser: random.Random) -> bytes:
    """Return data with a few random bit flips, cuts and inserted bytes."""
    mutated = bytearray(data)
    for _ in range(chooser.randint(1, 4)):
        action = chooser.choice(["flip", "cut", "insert", "byte"])
        if action == "flip" and len(mutated) > 1:
            index = chooser.randrange(1, len(mutated))
            mutated[index] ^= 1 << chooser.randrange(8)
        elif action == "cut" and len(mutated) > 2:
            del mutated[chooser.randrange(2, len(mutated)) :]
        elif action == "insert":
            index = chooser.randrange(1, len(mutated) + 1)
            mutated[index:index] = chooser.randbytes(chooser.randint(1, 8))
        elif len(mutated) > 1:
            mutated[chooser.randrange(1, len(mutated))] = chooser.choice(
                [0, 0xFF, 0x7F, 0x80, 11, 12]
            )
    return bytes(mutated)


def run_seeds() -> int:
    """Run the seeds, then bounded random mutations of them; return 0 on success."""
    harness = Harness()
    try:
        seeds = seed_inputs()
        for seed in seeds:
            harness.run(seed)
        chooser = random.Random(20_240_601)
        deadline = time.monotonic() + SMOKE_SECONDS
        mutations = 0
        while mutations < SMOKE_MUTATIONS and time.monotonic() < deadline:
            harness.run(mutate(chooser.choice(seeds), chooser))
            mutations += 1
    finally:
        harness.close()
    print(f"{len(seeds)} seed inputs passed, and {mutations} mutations of them")
    return 0


def write_seeds(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seed_inputs()):
        (folder / f"seed-{index:02d}").write_bytes(seed)
    print(f"wrote {len(seed_inputs())} seed inputs to {folder}")
    return 0


def fuzz_in_child(argv: list[str]) -> int:
    """Run the fuzzer in a child process, then remove the brokers' data."""
    shm = "/dev/shm"
    parent = tempfile.mkdtemp(
        prefix="pymq-fuzz-", dir=shm if os.access(shm, os.W_OK) else None
    )
    try:
        child = subprocess.run(
            [sys.executable, *argv],
            env={**os.environ, DATA_VARIABLE: parent},
            check=False,
        )
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    return child.returncode


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--seeds"]:
        return run_seeds()
    if argv[1:2] == ["--write-seeds"] and len(argv) == 3:
        return write_seeds(Path(argv[2]))
    if not any(arg.startswith(("-runs=", "-max_total_time=")) for arg in argv):
        argv = [*argv, DEFAULT_LIBFUZZER_BOUND]
    parent = os.environ.get(DATA_VARIABLE)
    if parent is None:
        return fuzz_in_child(argv)
    import atheris  # type: ignore[import-not-found]

    atheris.instrument_all()
    harness = Harness(Path(parent))
    atheris.Setup(argv, harness.run)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
