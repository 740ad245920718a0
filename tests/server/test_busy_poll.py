"""Busy polling of the blocking client's reader, and connect(busy_poll=...).

The reader tests run over socket pairs. A thread writes after a set pause.
The client tests run against the shared server.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import pymq
from pymq import protocol
from pymq._core import FrameReader, encode_frame
from pymq.client import DEFAULT_BUSY_POLL
from pymq.errors import ConfigError
from tests.server.helpers import ServerProcess

Frame = tuple[int, int, int, int, bytes]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    with left, right:
        yield left, right


def ping(request_id: int) -> bytes:
    return encode_frame(protocol.PING, 0, request_id, 0, b"")


def send_later(sock: socket.socket, data: bytes, pause: float) -> threading.Thread:
    def run() -> None:
        time.sleep(pause)
        sock.sendall(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def receive_frames(
    reader: FrameReader, sock: socket.socket, buffer: bytearray, count: int
) -> list[Frame]:
    frames: list[Frame] = []
    while len(frames) < count:
        assert reader.receive(sock, buffer) > 0
        while reader.ready:
            frames.append(reader.ready.popleft())
    return frames


def test_reader_splits_paused_sends(pair):
    reader_sock, writer_sock = pair
    reader = FrameReader(1 << 20)
    reader.busy_poll(reader_sock.fileno(), 0.001)
    # Pieces of 24 bytes split the 16-byte frames; some follow at once,
    # some after a pause within the poll, some after one well past it.
    stream = b"".join(ping(request_id) for request_id in range(1, 41))
    pieces = [stream[start : start + 24] for start in range(0, len(stream), 24)]
    pauses = [0.0, 0.0, 0.0005, 0.0, 0.02]

    def write() -> None:
        for index, piece in enumerate(pieces):
            time.sleep(pauses[index % len(pauses)])
            writer_sock.sendall(piece)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    frames = receive_frames(reader, reader_sock, bytearray(64), 40)
    writer.join()
    assert [frame[2] for frame in frames] == list(range(1, 41))
    assert all(frame[0] == protocol.PING for frame in frames)
    assert reader.buffered == 0


def test_reader_waits_for_late_frame(pair):
    reader_sock, writer_sock = pair
    reader = FrameReader(1 << 20)
    reader.busy_poll(reader_sock.fileno(), 0.0005)
    buffer = bytearray(4096)
    sender = send_later(writer_sock, ping(7) + ping(8), 0.05)
    frames = receive_frames(reader, reader_sock, buffer, 2)
    sender.join()
    assert [frame[2] for frame in frames] == [7, 8]


def test_reader_returns_zero_on_close(pair):
    reader_sock, writer_sock = pair
    reader = FrameReader(1 << 20)
    reader.busy_poll(reader_sock.fileno(), 0.001)
    writer_sock.sendall(ping(1))
    writer_sock.shutdown(socket.SHUT_WR)
    buffer = bytearray(4096)
    assert reader.receive(reader_sock, buffer) == 16
    assert reader.receive(reader_sock, buffer) == 0
    assert [frame[2] for frame in reader.ready] == [1]


def test_poll_halves_on_long_waits(pair):
    reader_sock, writer_sock = pair
    reader = FrameReader(1 << 20)
    reader.busy_poll(reader_sock.fileno(), 0.001)
    assert reader.poll_window == pytest.approx(0.001)
    buffer = bytearray(4096)
    windows = []
    for request_id in range(8):
        # 20 ms is far past the 1 ms poll, however loaded the machine is.
        sender = send_later(writer_sock, ping(request_id), 0.02)
        receive_frames(reader, reader_sock, buffer, 1)
        reader.ready.clear()
        sender.join()
        windows.append(reader.poll_window)
    expected = [0.001 / 2**halvings for halvings in range(1, 7)] + [0.0, 0.0]
    assert windows == pytest.approx(expected)


def test_busy_poll_resets_window(pair):
    reader_sock, writer_sock = pair
    reader = FrameReader(1 << 20)
    assert reader.poll_window == 0.0
    reader.busy_poll(reader_sock.fileno(), 0.0002)
    sender = send_later(writer_sock, ping(1), 0.02)
    receive_frames(reader, reader_sock, bytearray(4096), 1)
    sender.join()
    assert reader.poll_window == pytest.approx(0.0001)
    reader.busy_poll(reader_sock.fileno(), 0.0002)
    assert reader.poll_window == pytest.approx(0.0002)
    reader.busy_poll(-1, 0.0)
    assert reader.poll_window == 0.0


@pytest.mark.parametrize("seconds", [-0.001, 1.5, math.nan])
def test_reader_rejects_poll_out_of_range(seconds):
    with pytest.raises(ConfigError, match=r"busy_poll is .* seconds; it must be"):
        FrameReader(1 << 20).busy_poll(3, seconds)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("fast", TypeError, "busy_poll must be a number of seconds, not 'fast'"),
        (True, TypeError, "busy_poll must be a number of seconds, not True"),
        (-1, ConfigError, "busy_poll is -1 seconds; it must be from 0 to 0.01"),
        (0.5, ConfigError, "busy_poll is 0.5 seconds; it must be from 0 to 0.01"),
        (math.nan, ConfigError, "busy_poll is nan seconds; it must be from 0 to"),
    ],
)
def test_connect_rejects_bad_busy_poll(shared_server, value, error, message):
    with pytest.raises(error, match=message.replace(".", r"\.")):
        pymq.connect(shared_server.url, busy_poll=value)


@pytest.mark.parametrize("busy_poll", [None, 0, 0.002])
def test_requests_with_each_busy_poll(
    shared_server: ServerProcess, name: str, busy_poll: float | None
) -> None:
    with pymq.connect(shared_server.url, busy_poll=busy_poll) as broker:
        queue = broker.queue(name)
        offsets = [queue.put(f"body {index}".encode()) for index in range(50)]
        bodies = []
        for _ in range(50):
            message = queue.get(timeout=5.0)
            assert message is not None
            bodies.append(message.body)
            message.ack()
        assert bodies == [f"body {index}".encode() for index in range(50)]
        assert offsets == list(range(offsets[0], offsets[0] + 50))
        assert queue.stats().depth == 0


def test_long_poll_after_poll_stopped(shared_server: ServerProcess, name: str) -> None:
    with (
        pymq.connect(shared_server.url, busy_poll=0.001) as consumer,
        pymq.connect(shared_server.url) as producer,
    ):
        queue = consumer.queue(name)
        # Empty gets whose waits run far past the poll shrink it to nothing.
        for _ in range(3):
            assert queue.get(timeout=0.05) is None
        producer.queue(name).put(b"late")
        later = threading.Timer(0.1, producer.queue(name).put, args=(b"later",))
        later.start()
        first = queue.get(timeout=5.0)
        second = queue.get(timeout=5.0)
        later.join()
        assert first is not None and first.body == b"late"
        assert second is not None and second.body == b"later"
        first.ack()
        second.ack()


def test_default_busy_poll_depends_on_cpus(monkeypatch):
    from pymq.client import check_busy_poll

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert check_busy_poll(None) == 0.0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert check_busy_poll(None) == DEFAULT_BUSY_POLL
    assert check_busy_poll(0.0005) == 0.0005
