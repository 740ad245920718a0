"""Stopping the server: SIGTERM keeps what returned, SIGKILL loses no synced put."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import pymq
from pymq import ConnectionLostError
from tests.server.helpers import take

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
    with pymq.connect(server.url, reconnect_attempts=0) as client:
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
    assert isinstance(outcome[0], ConnectionLostError)


@pytest.mark.slow
def test_sigterm_with_blocked_put_exits(servers, name):
    server = servers().start()
    with pymq.connect(server.url, reconnect_attempts=0) as client:
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
        # The server gives requests under way 5 s, then closes connections.
        assert server.stop(timeout=12.0) == 0
        putter.join(timeout=JOIN_TIMEOUT)
    assert len(outcome) == 1
    assert isinstance(outcome[0], ConnectionLostError)

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
