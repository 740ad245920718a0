"""Server processes, in-process servers and raw sockets for the server tests.

Every server listens on 127.0.0.1 or a Unix socket under the test's own
temporary folder, and every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pymq import protocol
from pymq._core import FrameReader, encode_frame
from pymq.broker import Broker
from pymq.protocol import FLAG_ERROR, PREAMBLE, encode_json
from pymq.server import Server, ServerLimits
from tests import server_loop

SERVE = Path(__file__).parent / "serve.py"
HOLD = Path(__file__).parent / "hold.py"
# Bounds that only stop a hung test; no test asserts on how fast anything is.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
REPLY_TIMEOUT = 10.0

Frame = tuple[int, int, int, int, bytes]


def take(consumer: Any, count: int, bound: float = 10.0) -> list[Any]:
    """Get count messages, waiting at most bound seconds in all."""
    messages: list[Any] = []
    deadline = time.monotonic() + bound
    while len(messages) < count and time.monotonic() < deadline:
        messages.extend(consumer.get_many(count - len(messages), timeout=1.0))
    return messages


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One `serve.py` subprocess, with its log in a file beside its data."""

    def __init__(
        self,
        folder: Path,
        *,
        fsync: str = "interval",
        port: int = 0,
        host: str | None = "127.0.0.1",
        unix: Path | None = None,
        token: str | None = None,
        limits: dict[str, Any] | None = None,
        log_level: str = "INFO",
        data: Path | None = None,
        segment_bytes: int | None = None,
    ) -> None:
        self.folder = folder
        self.data = folder / "data" if data is None else data
        self.port_file = folder / "port"
        self.log_file = folder / "server.log"
        self.port = port
        self.config: dict[str, Any] = {
            "data": str(self.data),
            "fsync": fsync,
            "host": host,
            "port": port,
            "unix": None if unix is None else str(unix),
            "token": token,
            "limits": limits,
            "log_level": log_level,
            "port_file": str(self.port_file),
            "segment_bytes": segment_bytes,
            "loop": server_loop.NAME,
        }
        self.unix = unix
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        if self.config["host"] is None:
            return f"pymq+unix://{self.unix}"
        return f"pymq://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        """Start the server and return once it listens; raise if it does not."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        self.starts += 1
        with open(self.log_file, "ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, str(SERVE), json.dumps(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.process.returncode} before "
                    f"it listened; its log:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"server did not listen within {START_TIMEOUT} s; its log:\n"
                    f"{self.log()}"
                )
            time.sleep(0.02)
        if self.config["host"] is not None:
            self.port = int(self.port_file.read_text())
        return self

    def _listening(self) -> bool:
        if self.config["host"] is not None:
            return self.port_file.exists()
        assert self.unix is not None
        if not self.unix.is_socket():
            return False
        # The path appears at bind(), a moment before listen().
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.unix))
            except OSError:
                return False
        return True

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Send SIGTERM, wait for the exit, and return the exit code.

        Raises subprocess.TimeoutExpired, after a SIGKILL, when the server
        does not exit within timeout seconds.
        """
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the server, if it still runs, and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


@contextlib.contextmanager
def server_in_thread(
    broker: Broker, limits: ServerLimits | None = None
) -> Iterator[Server]:
    """Serve broker on 127.0.0.1 from an event loop in a background thread."""
    loop = server_loop.new_server_loop()
    server = Server(broker, limits=limits)
    thread = threading.Thread(target=loop.run_forever, name="test-server")
    thread.start()
    try:
        started = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0), loop)
        started.result(timeout=START_TIMEOUT)
        yield server
    finally:
        stopped = asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop)
        stopped.result(timeout=STOP_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=STOP_TIMEOUT)
        loop.close()


class RawClient:
    """A socket that speaks the wire protocol byte by byte, for bad input."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.sock.settimeout(REPLY_TIMEOUT)
        self.reader = FrameReader(0xFFFFFFFF)
        self.frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self) -> None:
        """Send the preamble and HELLO; check that the reply is no error."""
        hello = encode_json({"versions": [1, 1], "token": None, "client": "raw"})
        self.send(PREAMBLE + encode_frame(protocol.HELLO, 0, 1, 0, hello))
        reply = self.next_frame()
        assert reply[0] == protocol.HELLO
        assert not reply[1] & FLAG_ERROR

    def request(
        self, opcode: int, request_id: int, handle: int, payload: bytes
    ) -> Frame:
        self.send(encode_frame(opcode, 0, request_id, handle, payload))
        return self.next_frame()

    def open_queue(self, name: str) -> int:
        """OPEN the queue name and return its handle on this connection."""
        request = encode_json({"kind": "queue", "name": name, "options": {}})
        reply = self.request(protocol.OPEN, 2, 0, request)
        assert not reply[1] & FLAG_ERROR, reply
        return int(json.loads(reply[4])["handle"])

    def next_frame(self) -> Frame:
        """Return the next frame; raise EOFError if the server closes first."""
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the server closed the connection")
            self.frames.extend(self.reader.feed(data))
        return self.frames.pop(0)

    def read_until_closed(self) -> list[Frame]:
        """Return every frame the server sends until it closes the connection.

        Raises socket.timeout if it stays open for REPLY_TIMEOUT seconds.
        """
        frames = list(self.frames)
        self.frames.clear()
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return frames
            if not data:
                return frames
            frames.extend(self.reader.feed(data))

    def close(self) -> None:
        self.sock.close()


def error_of(frame: Frame) -> tuple[int, str]:
    """Return the code and text of an error frame."""
    assert frame[1] & FLAG_ERROR, f"not an error frame: {frame!r}"
    code = struct.unpack_from("<H", frame[4])[0]
    return code, frame[4][4:].decode("utf-8")
