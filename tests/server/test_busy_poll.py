"""Busy polling of the blocking client's reader, and connect(busy_poll=...).

The reader tests run over socket pairs or TCP sockets on 127.0.0.1. A
thread writes after a set pause. The client tests run against the shared
server, servers of their own, or a relay that cuts a reply short.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import numpy
import pytest

import pymq
from pymq import protocol
from pymq._core import FrameReader, encode_frame
from pymq.client import DEFAULT_BUSY_POLL
from pymq.errors import ConfigError, ConnectionLostError
from tests.server.helpers import ServerProcess, free_port

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
    # Pieces of 24 bytes split the 16-byte frames. Some follow at once,
    # some after a pause within the poll, and some after one well past it.
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
        (math.inf, ConfigError, "busy_poll is inf seconds; it must be from 0 to"),
        ("0.001", TypeError, "busy_poll must be a number of seconds, not '0.001'"),
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


@pytest.mark.parametrize("busy_poll", [0, 0.01, 1e-9])
def test_connect_accepts_busy_poll_bounds(shared_server, name, busy_poll):
    with pymq.connect(shared_server.url, busy_poll=busy_poll) as broker:
        queue = broker.queue(name)
        assert queue.put(b"bound") == 0
        message = queue.get(timeout=5.0)
        assert message is not None
        assert message.body == b"bound"
        message.ack()


def test_reader_rejects_buffer_of_other_type(pair):
    reader_sock, writer_sock = pair
    reader = FrameReader(1 << 20)
    reader.busy_poll(reader_sock.fileno(), 0.001)
    writer_sock.sendall(ping(1))
    with pytest.raises(TypeError, match="buffer must be a bytearray"):
        reader.receive(reader_sock, memoryview(bytearray(4096)))
    # Polling off, the reader takes any writable buffer.
    reader.busy_poll(reader_sock.fileno(), 0.0)
    assert reader.receive(reader_sock, memoryview(bytearray(4096))) == 16
    assert [frame[2] for frame in reader.ready] == [1]


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


@pytest.mark.parametrize(
    "busy_poll",
    [numpy.int64(0), numpy.float64(0.0005), numpy.float32(0.001), Fraction(1, 1000)],
)
def test_busy_poll_takes_any_real(busy_poll: object) -> None:
    from pymq.client import check_busy_poll

    seconds = check_busy_poll(busy_poll)
    assert type(seconds) is float
    assert seconds == float(busy_poll)  # type: ignore[arg-type]


def test_busy_poll_rejects_complex() -> None:
    from pymq.client import check_busy_poll

    with pytest.raises(TypeError, match=r"not \(1\+0j\)"):
        check_busy_poll(1 + 0j)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (10**400, "1" + "0" * 400),
        (-(10**400), "-1" + "0" * 400),
        (Fraction(10**400, 3), f"{10**400}/3"),
        (numpy.longdouble("1e4000"), "1e+4000"),
        (10**5000, "<int of more than 4300 digits>"),
        (Fraction(10**5000, 10**5000 + 1), "<Fraction of more than 4300 digits>"),
    ],
    ids=["int", "negative int", "Fraction", "longdouble", "long int", "long Fraction"],
)
def test_connect_rejects_busy_poll_past_float(shared_server, value, shown):
    # float() raises OverflowError on these, and format() prints a
    # longdouble through a float, as inf.
    expected = f"busy_poll is {shown} seconds; it must be from 0 to 0.01"
    with pytest.raises(ConfigError) as raised:
        pymq.connect(shared_server.url, busy_poll=value)
    assert str(raised.value) == expected


# Closed and reset sockets, signals, threads and reconnects ---------------


def test_reader_does_not_poll_closed_socket(pair):
    reader_sock, writer_sock = pair
    reader = FrameReader(1 << 20)
    descriptor = reader_sock.fileno()
    reader.busy_poll(descriptor, 0.001)
    left, right = socket.socketpair()
    reader_sock.close()
    writer_sock.close()
    # The closed socket's descriptor now names a socket of another pair, as
    # when a reconnect in another thread takes over the lowest free number.
    os.dup2(right.fileno(), descriptor)
    try:
        left.sendall(ping(1))
        with pytest.raises(OSError):
            reader.receive(reader_sock, bytearray(4096))
        assert list(reader.ready) == []
        assert right.recv(4096) == ping(1)
    finally:
        os.close(descriptor)
        left.close()
        right.close()


def test_reader_raises_on_reset() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=5.0)
        with client:
            peer, _ = listener.accept()
            # Linger 0 makes close() send a reset instead of a FIN.
            peer.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            peer.close()
            reader = FrameReader(1 << 20)
            reader.busy_poll(client.fileno(), 0.001)
            deadline = time.monotonic() + 5.0
            with pytest.raises(ConnectionResetError):
                while time.monotonic() < deadline:
                    reader.receive(client, bytearray(4096))


class Interrupted(Exception):
    """Raised by a SIGALRM handler, as Ctrl-C raises KeyboardInterrupt."""


@pytest.fixture
def interrupt_after() -> Iterator[Callable[[float], None]]:
    """Return a function that raises Interrupted in the main thread later."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_signal_during_poll_interrupts_read(pair, interrupt_after):
    reader_sock, writer_sock = pair
    reader = FrameReader(1 << 20)
    # A 10 ms poll, so that the signal comes while the reader polls.
    reader.busy_poll(reader_sock.fileno(), 0.01)
    sender = send_later(writer_sock, ping(1), 3.0)
    started = time.monotonic()
    interrupt_after(0.002)
    with pytest.raises(Interrupted):
        reader.receive(reader_sock, bytearray(4096))
    waited = time.monotonic() - started
    sender.join()
    # Without a check for signals after the poll, the handler runs only once
    # the frame comes, 3 s later.
    assert waited < 2.0


def test_signal_during_poll_interrupts_get(shared_server, name, interrupt_after):
    with pymq.connect(shared_server.url, busy_poll=0.01) as broker:
        queue = broker.queue(name)
        started = time.monotonic()
        interrupt_after(0.002)
        with pytest.raises(Interrupted):
            queue.get(timeout=5.0)
        waited = time.monotonic() - started
        assert waited < 3.0
        # The connection still works after the interrupted get.
        queue.put(b"after")
        message = queue.get(timeout=5.0)
        assert message is not None
        assert message.body == b"after"
        message.ack()


def test_threads_share_polling_connection(shared_server, name):
    rounds = 200
    with pymq.connect(shared_server.url, busy_poll=0.001) as broker:
        empty = broker.queue(f"{name}-empty")
        busy = broker.queue(f"{name}-busy")
        waited: list[Any] = []
        failures: list[BaseException] = []
        waiter = threading.Thread(target=lambda: waited.append(empty.get(timeout=30.0)))
        waiter.start()

        def work(index: int) -> None:
            try:
                for round_ in range(rounds):
                    busy.put(f"{index}:{round_}".encode())
                    message = busy.get(timeout=10.0)
                    assert message is not None
                    message.ack()
            except BaseException as exc:
                failures.append(exc)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60.0)
        assert not any(worker.is_alive() for worker in workers)
        assert failures == []
        assert busy.stats().acked == 4 * rounds
        assert waiter.is_alive()

        empty.put(b"at last")
        waiter.join(timeout=10.0)
        assert not waiter.is_alive()
        assert [message.body for message in waited] == [b"at last"]


def test_poll_follows_reconnect(servers, name):
    server = servers(port=free_port()).start()
    with pymq.connect(server.url, busy_poll=0.001, reconnect_attempts=10) as broker:
        connection = broker._connection
        queue = broker.queue(name)
        assert queue.put(b"before") == 0
        old_reader = connection._reader
        assert server.stop() == 0
        server.start()
        message = queue.get(timeout=10.0)
        assert message is not None
        assert message.body == b"before"
        message.ack()
        assert connection._reader is not old_reader
        assert connection._reader.poll_window > 0
        for index in range(20):
            assert queue.put(f"after {index}".encode()) == index + 1


def test_close_from_other_thread_ends_get(shared_server, name):
    broker = pymq.connect(shared_server.url, busy_poll=0.01)
    queue = broker.queue(name)
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            queue.get(timeout=30.0)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    broker.close()
    waiter.join(timeout=10.0)
    assert not waiter.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], pymq.errors.ClosedError)


def test_unix_socket_connection_polls(servers, name, tmp_path):
    path = tmp_path / "pymq.sock"
    server = servers(host=None, unix=path).start()
    with pymq.connect(server.url, busy_poll=0.001) as broker:
        assert broker._connection._reader.poll_window > 0
        queue = broker.queue(name)
        for index in range(20):
            assert queue.put(f"body {index}".encode()) == index
        for index in range(20):
            message = queue.get(timeout=5.0)
            assert message is not None
            assert message.body == f"body {index}".encode()
            message.ack()


def test_idle_gets_stop_polling(shared_server, name):
    with pymq.connect(shared_server.url, busy_poll=0.01) as broker:
        queue = broker.queue(name)
        started_cpu = time.thread_time()
        started = time.monotonic()
        for _ in range(40):
            assert queue.get(timeout=0.05) is None
        cpu = time.thread_time() - started_cpu
        wall = time.monotonic() - started
        assert broker._connection._reader.poll_window == 0.0
        assert wall >= 2.0
        # A poll that never shrank would spin for 10 ms of each wait, 0.4 s
        # in all. One that halves spins for about 20 ms in all.
        assert cpu < 0.15


class CuttingProxy:
    """A relay to a server that closes each connection halfway through the
    first reply after the HELLO.

    It serves up to max_connections clients, one after the other, and each
    wait of its thread is bounded by timeout seconds.
    """

    def __init__(self, port: int, max_connections: int = 4, timeout: float = 10.0):
        self.port = port
        self.max_connections = max_connections
        self.timeout = timeout
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(timeout)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"pymq://127.0.0.1:{self.listener.getsockname()[1]}"

    def run(self) -> None:
        with self.listener:
            for _ in range(self.max_connections):
                try:
                    client, _ = self.listener.accept()
                except OSError:
                    return
                with client:
                    self.relay(client)

    def relay(self, client: socket.socket) -> None:
        server = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        client.settimeout(self.timeout)

        def forward_requests() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    server.sendall(data)

        upstream = threading.Thread(target=forward_requests, daemon=True)
        upstream.start()
        with server:
            received = b""
            hello_bytes = 0
            try:
                while True:
                    data = server.recv(65536)
                    if not data:
                        return
                    received += data
                    if not hello_bytes and len(received) >= 4:
                        hello_bytes = 4 + struct.unpack_from("<I", received)[0]
                    if hello_bytes and len(received) >= hello_bytes:
                        # The HELLO reply goes whole, the next reply as only
                        # 8 of the 16 bytes of its header.
                        client.sendall(received[:hello_bytes])
                        received = received[hello_bytes:]
                        break
                while len(received) < 8:
                    data = server.recv(65536)
                    if not data:
                        return
                    received += data
                client.sendall(received[:8])
                self.cuts += 1
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                return
            finally:
                upstream.join(timeout=self.timeout)


def test_peer_closing_mid_reply_breaks_connection(shared_server, name):
    proxy = CuttingProxy(shared_server.port)
    started = time.monotonic()
    broker = pymq.connect(proxy.url, busy_poll=0.001, reconnect_attempts=0)
    with broker, pytest.raises(ConnectionLostError):
        broker.queue(name)
    assert time.monotonic() - started < 10.0
    assert proxy.cuts >= 1
