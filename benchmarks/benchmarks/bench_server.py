"""asv benchmarks of the pymq server over TCP on 127.0.0.1, with the blocking client.

The installed asv_runner calls setup before every sample and teardown after
it. So each sample starts its own server in a child process, with its data
in a fresh temporary folder, connects to it and opens one queue. Teardown
closes the connection, stops the server by its PID and deletes the folder.

ServerProcess is also what benchmarks/run_server.py and its test start.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pymq

from .common import (
    BROKER_PAYLOAD_SIZES,
    QUEUE_BATCH,
    QUEUE_MAX_IN_FLIGHT,
    QUEUE_NAME,
    Scratch,
    payloads,
)

# The server's entry point, run with python -c. Its arguments are the data
# folder, the port file and the fsync policy.
SERVER_CODE = (
    "from pymq.server import run; import sys; "
    "run(sys.argv[1], port=0, port_file=sys.argv[2], fsync=sys.argv[3])"
)
# Seconds to wait for the port file before start() raises, and for the
# server to exit after SIGTERM before stop() kills it.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# Characters of the server's log quoted in the error when it fails to start.
LOG_TAIL = 2000
# Seconds a benchmark's get or get_many waits for a message that was
# already put. The call returns at once when the message is there.
GET_TIMEOUT = 5.0


class ServerProcess:
    """A pymq server in a child process, listening on 127.0.0.1 on a free port.

    Its data, port file and log are in a Scratch folder that stop() deletes.
    Use it as a context manager, or call start() and stop().
    """

    def __init__(self, fsync: str = "interval") -> None:
        self.fsync = fsync
        self.scratch: Scratch | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"pymq://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.scratch is not None
        return self.scratch.path / "server.log"

    def start(self) -> ServerProcess:
        """Start the server and wait until it has written its port."""
        self.scratch = Scratch(prefix="pymq-server-")
        port_file = self.scratch.path / "port"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    SERVER_CODE,
                    str(self.scratch.path / "data"),
                    str(port_file),
                    self.fsync,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self.port = self._wait_for_port(port_file)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_port(self, port_file: Path) -> int:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if port_file.exists():
                return int(port_file.read_text())
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the pymq server exited with code {self.process.returncode} "
                    f"before listening; its log ends with: {self._log_tail()!r}"
                )
            time.sleep(0.01)
        raise TimeoutError(
            f"the pymq server (PID {self.process.pid}) wrote no port file within "
            f"{START_TIMEOUT} s; its log ends with: {self._log_tail()!r}"
        )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL:]
        except OSError as exc:
            return f"(log not readable: {exc})"

    def stop(self) -> int | None:
        """Send SIGTERM to the server's PID, wait, delete the folder.

        Kills the server when it has not exited STOP_TIMEOUT seconds after
        SIGTERM. Returns its exit code, None when it never started.
        """
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
            self.returncode = process.returncode
        if self.scratch is not None:
            self.scratch.remove()
            self.scratch = None
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ServerBenchmark:
    """A fresh server, connection and queue per sample, stopped after it."""

    params: ClassVar[list[list[int]]] = [list(BROKER_PAYLOAD_SIZES)]
    param_names: ClassVar[list[str]] = ["payload"]
    timeout = 120.0
    # At least 3 samples, at most 10, and no new one after 10 seconds.
    repeat = (3, 10, 10.0)
    rounds = 1

    server: ServerProcess | None = None
    broker: pymq.RemoteBroker | None = None

    def setup(self, payload: int) -> None:
        self.bodies = payloads(payload, QUEUE_BATCH)
        self.server = ServerProcess().start()
        self.broker = pymq.connect(self.server.url)
        self.queue = self.broker.queue(QUEUE_NAME, max_in_flight=QUEUE_MAX_IN_FLIGHT)

    def teardown(self, payload: int) -> None:
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        if self.server is not None:
            self.server.stop()
            self.server = None


class PutGetAck(ServerBenchmark):
    """One message: put, get and ack, each waiting for the server's reply."""

    def time_put_get_ack(self, payload: int) -> None:
        self.queue.put(self.bodies[0])
        message = self.queue.get(timeout=GET_TIMEOUT)
        if message is None:
            raise RuntimeError("get returned no message right after a put")
        message.ack()


class PutGetAckBatch(ServerBenchmark):
    """100 messages: one put_many, one get_many(100) and one ack_many."""

    def time_batch(self, payload: int) -> None:
        self.queue.put_many(self.bodies)
        messages = self.queue.get_many(QUEUE_BATCH, timeout=GET_TIMEOUT)
        if len(messages) != QUEUE_BATCH:
            raise RuntimeError(
                f"get_many returned {len(messages)} of {QUEUE_BATCH} messages"
            )
        self.queue.ack_many(messages)
