"""Stopping the server: SIGTERM keeps what returned, SIGKILL loses no synced put."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pymq
import pymq.aio
from pymq import ConnectionLostError, ShuttingDownError
from tests.server.helpers import START_TIMEOUT, STOP_TIMEOUT, take
from tests.server_loop import loop_options

PUT_LIMIT = 5000  # bounds the putting loop of the SIGKILL test in count
PUT_SECONDS = 10.0  # and in time
JOIN_TIMEOUT = 60.0


def test_sigterm_keeps_puts_and_acks(servers, name):
    server = servers().start()
    with pymq.connect(server.url) as client:
        q = client.queue(name, visibility_timeout=3600)
        offsets = [q.put(f"message {i}".encode()) for i in range(200)]
        assert offsets == list(range(200))
        q.ack_many(q.get_many(50, timeout=10.0))
        unsettled = q.get_many(10, timeout=10.0)
        assert [m.offset for m in unsettled] == list(range(50, 60))

        assert server.stop() == 0
    log = server.log()
    assert f"INFO:pymq.server:listening on 127.0.0.1:{server.port}" in log
    assert "INFO:pymq.server:stopped; broker in" in log

    server.start()
    with pymq.connect(server.url) as client:
        q = client.queue(name)
        assert q.stats().depth == 150
        messages = take(q, 150)
        assert [m.offset for m in messages] == list(range(50, 200))
        assert [m.body for m in messages] == [
            f"message {i}".encode() for i in range(50, 200)
        ]
        # The ten unsettled at the stop were released, their attempt counted.
        assert [m.attempt for m in messages] == [2] * 10 + [1] * 140
        assert q.get(timeout=0) is None


def test_sigterm_with_idle_clients_exits_zero(servers, name):
    server = servers().start()
    clients = [pymq.connect(server.url) for _ in range(3)]
    try:
        for index, client in enumerate(clients):
            client.queue(f"{name}-{index}").put(b"x")
        assert server.stop() == 0
    finally:
        for client in clients:
            client.close()


def test_sigterm_during_long_poll_exits_zero(servers, name):
    server = servers().start()
    # With the default reconnect attempts: a get that found its connection
    # closed would try to reconnect, with pauses of 1.55 s in all, then
    # raise ConnectionLostError.
    with pymq.connect(server.url) as client:
        q = client.queue(name)
        outcome: list[Any] = []

        def poll() -> None:
            try:
                outcome.append(q.get(timeout=30.0))
            except BaseException as exc:
                outcome.append(exc)

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.2)
        assert server.stop() == 0
        poller.join(timeout=JOIN_TIMEOUT)
        assert not poller.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ShuttingDownError), outcome
    assert outcome[0].code == 13


def test_sigterm_answers_aio_waits(servers, name):
    """A waiting get, subscription and put raise ShuttingDownError at once."""
    server = servers().start()
    assert server.process is not None
    process = server.process

    async def body() -> list[Any]:
        broker = await pymq.aio.connect(server.url)
        try:
            polled = await broker.queue(name)
            subscribed = await broker.queue(f"{name}-s")
            full = await broker.queue(f"{name}-full", max_length=1, overflow="block")
            await full.put(b"fills the queue")

            async def first_pushed() -> Any:
                async for message in subscribed:
                    return message
                return None

            waits = [
                asyncio.ensure_future(polled.get(timeout=30.0)),
                asyncio.ensure_future(first_pushed()),
                asyncio.ensure_future(full.put(b"waits for room", timeout=30.0)),
            ]
            await asyncio.sleep(0.3)
            os.kill(process.pid, signal.SIGTERM)
            return await asyncio.wait_for(
                asyncio.gather(*waits, return_exceptions=True), JOIN_TIMEOUT
            )
        finally:
            await broker.close()

    outcomes = asyncio.run(body())
    assert process.wait(timeout=STOP_TIMEOUT) == 0
    for outcome in outcomes:
        assert isinstance(outcome, ShuttingDownError), outcomes
        assert outcome.code == 13
    assert "ERROR" not in server.log()

    server.start()
    with pymq.connect(server.url) as client:
        # The put that waited for room wrote nothing.
        assert client.queue(f"{name}-full").stats().depth == 1


def test_sigterm_with_blocked_put_exits(servers, name):
    server = servers().start()
    with pymq.connect(server.url) as client:
        q = client.queue(name, max_length=1, overflow="block")
        q.put(b"fills the queue")
        outcome: list[Any] = []

        def blocked_put() -> None:
            try:
                outcome.append(q.put(b"waits for room"))
            except BaseException as exc:
                outcome.append(exc)

        putter = threading.Thread(target=blocked_put, daemon=True)
        putter.start()
        time.sleep(0.3)
        assert server.stop() == 0
        putter.join(timeout=JOIN_TIMEOUT)
    assert len(outcome) == 1
    # Error 13 came before the connection closed, and nothing was written.
    assert isinstance(outcome[0], ShuttingDownError), outcome
    assert outcome[0].code == 13
    assert "Traceback" not in server.log()
    assert "ERROR" not in server.log()

    server.start()
    with pymq.connect(server.url) as client:
        assert client.queue(name).stats().depth == 1


def test_sigkill_keeps_synced_puts(servers, name):
    server = servers(fsync="always").start()
    returned: list[tuple[int, bytes]] = []
    ended: list[BaseException] = []
    enough = threading.Event()

    def put_until_lost() -> None:
        deadline = time.monotonic() + PUT_SECONDS
        try:
            with pymq.connect(server.url, reconnect_attempts=0) as client:
                q = client.queue(name)
                for index in range(PUT_LIMIT):
                    if time.monotonic() > deadline:
                        break
                    body = f"synced {index}".encode() * 8
                    returned.append((q.put(body), body))
                    if index == 200:
                        enough.set()
        except BaseException as exc:
            ended.append(exc)
        finally:
            enough.set()

    putter = threading.Thread(target=put_until_lost)
    putter.start()
    assert enough.wait(timeout=JOIN_TIMEOUT)
    server.kill()
    putter.join(timeout=JOIN_TIMEOUT)
    assert not putter.is_alive()
    assert len(ended) == 1
    assert isinstance(ended[0], ConnectionLostError)
    assert len(returned) > 200

    server.start()
    with pymq.connect(server.url) as client:
        q = client.queue(name)
        depth = q.stats().depth
        # At most the one put in flight at the kill is there beyond those
        # that returned.
        assert depth in (len(returned), len(returned) + 1)
        stored = take(q, depth, bound=30.0)
    assert [m.offset for m in stored] == list(range(depth))
    assert [(m.offset, m.body) for m in stored[: len(returned)]] == returned


def test_sigkill_keeps_acks_and_attempts(servers, name):
    server = servers(fsync="always").start()
    with pymq.connect(server.url, reconnect_attempts=0) as client:
        q = client.queue(name, visibility_timeout=3600)
        q.put_many([b"a", b"b", b"c", b"d"])
        delivered = q.get_many(3, timeout=10.0)
        delivered[0].ack()
        server.kill()

    server.start()
    with pymq.connect(server.url) as client:
        q = client.queue(name)
        messages = take(q, 3)
    assert [(m.body, m.attempt) for m in messages] == [(b"b", 2), (b"c", 2), (b"d", 1)]


def test_unix_socket(servers, tmp_path, name):
    path = tmp_path / "pymq.sock"
    server = servers(host=None, unix=path).start()
    with pymq.connect(f"pymq+unix://{path}") as client:
        q = client.queue(name)
        assert q.put(b"over a unix socket", headers={"k": "v"}) == 0
        message = q.get(timeout=10.0)
        assert (message.body, message.headers) == (b"over a unix socket", {"k": "v"})
        message.ack()
        assert q.stats().acked == 1
    assert server.stop() == 0
    assert f"INFO:pymq.server:listening on {path}" in server.log()


def test_tcp_and_unix_listeners_share_broker(servers, tmp_path, name):
    path = tmp_path / "both.sock"
    server = servers(unix=path).start()
    with (
        pymq.connect(server.url) as over_tcp,
        pymq.connect(f"pymq+unix://{path}") as over_unix,
    ):
        assert over_tcp.queue(name).put(b"from tcp") == 0
        message = over_unix.queue(name).get(timeout=10.0)
        assert message.body == b"from tcp"
        message.ack()
        assert over_tcp.queue(name).stats().acked == 1
    assert server.stop() == 0


def test_sigint_stops_like_sigterm(servers, name):
    server = servers().start()
    assert server.process is not None
    with pymq.connect(server.url) as client:
        q = client.queue(name, visibility_timeout=3600)
        q.put_many([b"a", b"b", b"c"])
        held = q.get(timeout=10.0)
        assert held is not None
        os.kill(server.process.pid, signal.SIGINT)
        assert server.process.wait(timeout=STOP_TIMEOUT) == 0
    assert "INFO:pymq.server:stopped; broker in" in server.log()

    server.start()
    with pymq.connect(server.url) as client:
        messages = take(client.queue(name), 3)
        assert [m.body for m in messages] == [b"a", b"b", b"c"]
        assert [m.attempt for m in messages] == [2, 1, 1]


def serve_in_network_namespace(
    tmp_path: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    """Run pymq serve on 0.0.0.0 in a new network namespace, then SIGTERM it.

    The namespace has only its own loopback device, so the listener on every
    address cannot be reached from outside it.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a new network namespace needs root and unshare")
    port_file = tmp_path / "port"
    serve = [sys.executable, "-m", "pymq", "serve", "--data", str(tmp_path / "d")]
    serve += ["--host", "0.0.0.0", "--port", "0", "--port-file", str(port_file)]
    serve += loop_options()
    script = f"ip link set lo up && exec {shlex.join([*serve, *options])}"
    process = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists() and process.poll() is None:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=STOP_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
    if "unshare failed" in output:
        pytest.skip(f"no network namespace here: {output.strip()}")
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def test_public_address_without_token_warns(tmp_path):
    result = serve_in_network_namespace(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "listening on 0.0.0.0:" in result.stdout
    assert (
        "WARNING pymq.server: listening on 0.0.0.0 without a token: anyone who "
        "can reach it can read and write every queue; set --token-file"
    ) in result.stdout


def test_public_address_with_token_does_not_warn(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    result = serve_in_network_namespace(tmp_path, "--token-file", str(token))
    assert result.returncode == 0, result.stdout
    assert "listening on 0.0.0.0:" in result.stdout
    assert "WARNING" not in result.stdout


def test_unix_socket_of_live_server_is_kept(servers, tmp_path, name):
    path = tmp_path / "pymq.sock"
    first = servers(host=None, unix=path).start()
    command = [sys.executable, "-m", "pymq", "serve", "--data", str(tmp_path / "b")]
    command += ["--port", "0", "--unix", str(path), *loop_options()]
    second = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert second.returncode == 2
    assert f"Unix socket {path} is in use by a running server" in second.stderr
    with pymq.connect(f"pymq+unix://{path}") as client:
        assert client.queue(name).put(b"still the first") == 0
    assert first.stop() == 0
    assert (first.data / "streams" / name).is_dir()
    assert not (tmp_path / "b" / "streams" / name).exists()


def test_unix_socket_of_killed_server_is_replaced(servers, tmp_path, name):
    path = tmp_path / "pymq.sock"
    server = servers(host=None, unix=path).start()
    server.kill()
    assert path.is_socket()
    server.start()
    with pymq.connect(f"pymq+unix://{path}") as client:
        assert client.queue(name).put(b"after the kill") == 0
    assert server.stop() == 0
