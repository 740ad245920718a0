"""Connections: released deliveries, shared connections, long polls, reconnects.

Queues that hold deliveries use visibility_timeout=3600, so a redelivery
within a test can only come from the server releasing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import pymq
import pymq.aio
from pymq import ConnectionLostError, protocol
from pymq._core import encode_frame
from pymq.client import encode_reason
from pymq.protocol import FLAG_REPLY
from tests.server.helpers import HOLD, RawClient, free_port, take

THREADS = 8
ROUNDS = 500
JOIN_TIMEOUT = 60.0  # bounds a hung thread; the threads finish long before


# Deliveries held by a client that goes away --------------------------------


def test_client_close_releases_deliveries(shared_server, name):
    with pymq.connect(shared_server.url) as other:
        q = other.queue(name, visibility_timeout=3600)
        q.put_many([b"a", b"b", b"c"])

        leaving = pymq.connect(shared_server.url)
        delivered = leaving.queue(name).get_many(2, timeout=10.0)
        assert [(m.offset, m.attempt) for m in delivered] == [(0, 1), (1, 1)]
        leaving.close()

        messages = take(q, 3)
        assert sorted((m.offset, m.attempt) for m in messages) == [
            (0, 2),
            (1, 2),
            (2, 1),
        ]


def test_socket_close_releases_deliveries(shared_server, name):
    with pymq.connect(shared_server.url) as other:
        q = other.queue(name, visibility_timeout=3600)
        q.put_many([b"a", b"b"])

        raw = RawClient(shared_server.port)
        raw.handshake()
        handle = raw.open_queue(name)
        fetch_two = struct.pack("<Ii", 2, 0)
        raw.send(encode_frame(protocol.FETCH, 0, 3, handle, fetch_two))
        reply = raw.next_frame()
        assert reply[:3] == (protocol.DELIVER, FLAG_REPLY, 3)
        # The socket closes with no goodbye of any kind.
        raw.close()

        messages = take(q, 2)
        assert [(m.offset, m.attempt, m.body) for m in messages] == [
            (0, 2, b"a"),
            (1, 2, b"b"),
        ]


def test_killed_client_releases_deliveries(shared_server, name):
    with pymq.connect(shared_server.url) as other:
        q = other.queue(name, visibility_timeout=3600)
        q.put_many([b"a", b"b", b"c"])

        holder = subprocess.Popen(
            [sys.executable, str(HOLD), shared_server.url, name, "2"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = holder.stdout.readline()
        finally:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=20.0)
            holder.stdout.close()
        assert json.loads(line) == [[0, 1], [1, 1]]

        messages = take(q, 3)
        assert sorted((m.offset, m.attempt) for m in messages) == [
            (0, 2),
            (1, 2),
            (2, 1),
        ]


# One connection shared by threads ------------------------------------------


def test_threads_share_one_connection(shared_server, name):
    with pymq.connect(shared_server.url) as client:
        q = client.queue(name, visibility_timeout=3600)
        received: list[list[tuple[bytes, int]]] = [[] for _ in range(THREADS)]
        failures: list[BaseException] = []

        def work(index: int) -> None:
            try:
                for round_ in range(ROUNDS):
                    q.put(f"{index}:{round_}".encode())
                    message = q.get(timeout=10.0)
                    received[index].append((message.body, message.attempt))
                    message.ack()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=JOIN_TIMEOUT)
        assert not any(thread.is_alive() for thread in threads)
        assert failures == []

        bodies = [body for part in received for body, _ in part]
        expected = {f"{i}:{r}".encode() for i in range(THREADS) for r in range(ROUNDS)}
        assert len(bodies) == THREADS * ROUNDS
        assert set(bodies) == expected
        assert {attempt for part in received for _, attempt in part} == {1}
        stats = q.stats()
        assert stats.depth == 0
        assert stats.acked == THREADS * ROUNDS


def test_blocked_get_stalls_no_other_thread(shared_server, name):
    with pymq.connect(shared_server.url) as client:
        empty = client.queue(f"{name}-empty")
        busy = client.queue(f"{name}-busy")
        waited: list[Any] = []
        waiter = threading.Thread(target=lambda: waited.append(empty.get(timeout=30.0)))
        waiter.start()
        time.sleep(0.2)

        for round_ in range(200):
            assert busy.put(str(round_).encode()) == round_
            message = busy.get(timeout=10.0)
            assert message.body == str(round_).encode()
            message.ack()
        assert busy.stats().acked == 200
        assert waiter.is_alive()
        assert waited == []

        empty.put(b"at last")
        waiter.join(timeout=JOIN_TIMEOUT)
        assert not waiter.is_alive()
        assert [m.body for m in waited] == [b"at last"]


def test_long_poll_returns_on_put(shared_server, name):
    with (
        pymq.connect(shared_server.url) as consumer,
        pymq.connect(shared_server.url) as producer,
    ):
        q = consumer.queue(name)
        got: list[Any] = []
        poller = threading.Thread(target=lambda: got.append(q.get(timeout=5.0)))
        poller.start()
        time.sleep(0.2)
        assert producer.queue(name).put(b"wake up", headers={"k": "v"}) == 0
        poller.join(timeout=JOIN_TIMEOUT)

        assert not poller.is_alive()
        assert len(got) == 1
        assert got[0] is not None
        assert (got[0].body, got[0].headers, got[0].offset) == (
            b"wake up",
            {"k": "v"},
            0,
        )


def test_long_poll_on_group(shared_server, name):
    with (
        pymq.connect(shared_server.url) as consumer,
        pymq.connect(shared_server.url) as producer,
    ):
        group = consumer.stream(name).group("readers")
        got: list[Any] = []
        poller = threading.Thread(target=lambda: got.append(group.get_many(5, 5.0)))
        poller.start()
        time.sleep(0.2)
        producer.stream(name).put_many([b"x", b"y"])
        poller.join(timeout=JOIN_TIMEOUT)

        assert not poller.is_alive()
        messages = got[0] + take(group, 2 - len(got[0]))
        assert [m.body for m in messages] == [b"x", b"y"]


def test_redrive_progress_in_caller_thread_while_another_reads(shared_server, name):
    with pymq.connect(shared_server.url) as client:
        client.queue(name)
        headers = {"x-source": name, "x-group": ""}
        client.queue(f"{name}.dlq").put_many([b"m"] * 2500, headers=headers)
        idle = client.queue(f"{name}-idle")
        polled: list[Any] = []
        # This thread's long poll reads the socket for every request.
        poller = threading.Thread(target=lambda: polled.append(idle.get(timeout=30.0)))
        poller.start()
        time.sleep(0.3)
        reports: list[tuple[int, int]] = []
        moved = client.redrive(
            f"{name}.dlq",
            progress=lambda count: reports.append((threading.get_ident(), count)),
        )
        assert poller.is_alive()
        me = threading.get_ident()
        assert moved == 2500
        assert reports == [(me, 1000), (me, 2000), (me, 2500)]
        idle.put(b"ends the poll")
        poller.join(timeout=JOIN_TIMEOUT)
        assert [message.body for message in polled] == [b"ends the poll"]
        assert client.queue(name).stats().depth == 2500


# Reconnecting ------------------------------------------------------------------


def test_request_built_before_reconnect_is_rebuilt(shared_server, name):
    client = pymq.connect(shared_server.url)
    try:
        first = client.queue(f"{name}-first")
        second = client.queue(f"{name}-second")
        # Handle 1 names the first queue on this connection, handle 2 the second.
        assert first.put(b"warm") == 0
        assert second.put(b"warm") == 0
        connection = client._connection
        encode = first._encode
        frames: list[bytes] = []

        def encode_then_reconnect(*args: Any) -> bytes:
            frame = encode(*args)
            frames.append(frame)
            if len(frames) == 1:
                # What another thread could do meanwhile: the socket breaks,
                # that thread reconnects and opens the second queue first,
                # so on the new connection handle 1 names the second queue.
                connection._broken(OSError("broken by the test"), connection._sock)
                assert second.put(b"other") == 1
            return frame

        first._encode = encode_then_reconnect
        assert first.put(b"mine") == 1
        assert len(frames) == 2
        assert first.stats().depth == 2
        assert second.stats().depth == 2
        bodies = [message.body for message in take(first, 2)]
        assert bodies == [b"warm", b"mine"]
    finally:
        client.close()


def test_reconnect_after_restart(servers, name):
    server = servers(port=free_port()).start()
    client = pymq.connect(server.url, reconnect_attempts=10)
    try:
        q = client.queue(name, visibility_timeout=3600)
        assert q.put(b"before") == 0
        assert server.stop() == 0
        server.start()

        stats = q.stats()
        assert stats.depth == 1
        message = q.get(timeout=10.0)
        assert (message.body, message.attempt) == (b"before", 1)
        message.ack()
        assert q.stats().acked == 1
    finally:
        client.close()


def test_get_reconnects_after_restart(servers, name):
    server = servers(port=free_port()).start()
    client = pymq.connect(server.url, reconnect_attempts=10)
    try:
        q = client.queue(name)
        assert q.put(b"before") == 0
        assert server.stop() == 0
        server.start()

        message = q.get(timeout=10.0)
        assert message is not None
        assert message.body == b"before"
    finally:
        client.close()


def test_put_works_after_reconnect(servers, name):
    server = servers(port=free_port()).start()
    client = pymq.connect(server.url, reconnect_attempts=10)
    try:
        q = client.queue(name)
        assert q.put(b"before") == 0
        assert server.stop() == 0
        server.start()

        # A put is never sent twice, so the first one after the restart may
        # go down with the old connection; the next one must get through.
        with contextlib.suppress(ConnectionLostError):
            q.put(b"maybe")
        offset = q.put(b"after")
        assert offset in (1, 2)
        assert q.stats().depth == offset + 1
    finally:
        client.close()


def test_put_during_crash_raises_connection_lost(servers, name):
    server = servers(port=free_port()).start()
    client = pymq.connect(server.url, reconnect_attempts=10)
    try:
        q = client.queue(name)
        full = client.queue(f"{name}-full", max_length=1, overflow="block")
        assert q.put(b"kept") == 0
        full.put(b"fills the queue")
        outcome: list[BaseException | int] = []

        def blocked_put() -> None:
            try:
                outcome.append(full.put(b"waits for room", timeout=30.0))
            except BaseException as exc:
                outcome.append(exc)

        putter = threading.Thread(target=blocked_put)
        putter.start()
        time.sleep(0.3)
        server.kill()
        putter.join(timeout=JOIN_TIMEOUT)
        assert not putter.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], ConnectionLostError)

        server.start()
        assert q.stats().depth == 1
        assert q.get(timeout=10.0).body == b"kept"
        assert full.stats().depth == 1
    finally:
        client.close()


@pytest.mark.parametrize(("attempts", "tries"), [(0, "1 attempt"), (1, "2 attempts")])
def test_failed_reconnect_counts_attempts(servers, name, attempts, tries):
    server = servers(port=free_port()).start()
    client = pymq.connect(server.url, reconnect_attempts=attempts)
    try:
        q = client.queue(name)
        assert server.stop() == 0
        # The first STATS may only find the connection broken; the second
        # starts with a reconnect.
        with contextlib.suppress(ConnectionLostError):
            q.stats()
        with pytest.raises(ConnectionLostError) as raised:
            q.stats()
        text = str(raised.value)
        assert text.startswith(f"could not reconnect to {server.url} after {tries}: ")
    finally:
        client.close()


def test_connect_to_closed_port_raises():
    port = free_port()
    with pytest.raises(OSError):
        pymq.connect(f"pymq://127.0.0.1:{port}", connect_timeout=5.0)


def test_connect_to_listener_that_closes():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def accept_and_close() -> None:
            listener.settimeout(10.0)
            connection, _ = listener.accept()
            connection.close()

        acceptor = threading.Thread(target=accept_and_close)
        acceptor.start()
        with pytest.raises(ConnectionError):
            pymq.connect(f"pymq://127.0.0.1:{port}", connect_timeout=5.0)
        acceptor.join(timeout=JOIN_TIMEOUT)


# Reject reasons and errors about the whole connection --------------------------


@pytest.mark.parametrize(
    ("reason", "sent"),
    [
        ("bad input", b"bad input"),
        ("x" * 1000, b"x" * 1000),
        ("x" * 1001, b"x" * 1000 + b"..."),
        # 4 bytes a character: 250 fit in 1000 bytes.
        ("\U0001f600" * 300, "\U0001f600".encode() * 250 + b"..."),
        # 2 bytes a character after one of 1 byte: 499 fit in 999 bytes.
        ("a" + "é" * 600, b"a" + "é".encode() * 499 + b"..."),
    ],
)
def test_reject_reason_cut_to_1000_bytes(reason, sent):
    assert encode_reason(reason) == sent


def test_reject_reason_not_encodable_raises(shared_server, name):
    with pytest.raises(ValueError) as raised:
        encode_reason("bad \udc80 byte")
    assert str(raised.value) == (
        "reason cannot be encoded as UTF-8: character '\\udc80' at index 4 is "
        "surrogates not allowed"
    )
    with pymq.connect(shared_server.url) as client:
        q = client.queue(name, visibility_timeout=3600)
        q.put(b"x")
        message = q.get(timeout=10.0)
        with pytest.raises(ValueError, match="reason cannot be encoded as UTF-8"):
            message.reject("bad \udc80 byte")
        with pytest.raises(TypeError, match="reason must be a str, not bytes"):
            q.reject(message.receipt, b"bytes")
        # Nothing was sent: the delivery is still out, and can be settled.
        assert q.stats().in_flight == 1
        message.ack()
        assert q.dlq.stats().depth == 0


def test_connection_error_not_raised_later(shared_server, name, caplog):
    with pymq.connect(shared_server.url) as client:
        q = client.queue(name)
        q.put(b"x")
        # A frame header whose length is over max_frame_bytes: the server
        # replies with an error for request 0 and closes the connection.
        client._connection.send(lambda request_id: struct.pack("<I", 0x7FFFFFFF))
        first = q.stats()
        second = q.stats()
    assert (first.depth, second.depth) == (1, 1)
    messages = [record.getMessage() for record in caplog.records]
    assert not [text for text in messages if "sent without waiting" in text]
    assert [
        text
        for text in messages
        if text.startswith("connection to")
        and "broke: the server closed the connection: frame length is" in text
    ]


def test_ack_many_across_connections(shared_server, name):
    with (
        pymq.connect(shared_server.url) as first,
        pymq.connect(shared_server.url) as second,
    ):
        on_first = first.queue(name, visibility_timeout=3600)
        on_second = second.queue(name)
        on_first.put_many([b"a", b"b", b"c", b"d", b"e"])
        single = on_first.get(timeout=10.0)
        batch = on_first.get_batch(2, timeout=10.0)
        messages = on_first.get_many(2, timeout=10.0)
        on_second.ack(single.receipt)
        with pytest.raises(pymq.StaleReceiptError) as stale_batch:
            on_second.ack_many(batch)
        assert str(stale_batch.value) == (
            "the batch was delivered by another queue or group, or by another "
            "connection, not by this queue or group object; to settle it on "
            "this connection, ack its receipts: ack_many(batch.receipts.tolist())"
        )
        with pytest.raises(pymq.StaleReceiptError) as stale_message:
            on_second.ack_many(messages)
        assert str(stale_message.value) == (
            "message at offset 3 was delivered by another queue or group, or by "
            "another connection, not by this queue or group object; to settle it "
            "on this connection, ack its receipt"
        )
        assert on_second.stats().acked == 1
        # Receipts settle on any connection to the same queue.
        on_second.ack_many(batch.receipts.tolist())
        on_second.ack_many([message.receipt for message in messages])
        assert on_second.stats().acked == 5
        assert on_second.stats().in_flight == 0


# Argument checks of the client -------------------------------------------------


def test_extend_and_nack_name_their_argument(shared_server, name):
    with pymq.connect(shared_server.url) as client:
        q = client.queue(name, visibility_timeout=3600)
        q.put(b"x")
        message = q.get(timeout=10.0)
        with pytest.raises(TypeError) as extend_error:
            message.extend("1")
        assert str(extend_error.value) == (
            "extend(): seconds must be a number of seconds, not '1'"
        )
        with pytest.raises(TypeError) as nack_error:
            message.nack("1")
        assert str(nack_error.value) == (
            "nack(): delay must be a number of seconds, not '1'"
        )
        message.ack()


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        (
            {"connect_timeout": -1},
            pymq.ConfigError,
            "connect_timeout is -1 seconds; it must be more than 0 and at most 1e+09",
        ),
        (
            {"connect_timeout": float("nan")},
            pymq.ConfigError,
            "connect_timeout is nan seconds; it must be more than 0 and at most 1e+09",
        ),
        (
            {"connect_timeout": "10"},
            TypeError,
            "connect_timeout must be a number of seconds, not '10'",
        ),
        (
            {"reconnect_attempts": -1},
            pymq.ConfigError,
            "reconnect_attempts is -1; it must be from 0 to 1000000",
        ),
        (
            {"reconnect_attempts": 2.5},
            TypeError,
            "reconnect_attempts must be an int, not 2.5",
        ),
    ],
)
def test_connect_options_checked(options, error, text):
    # Checked before any connection is made, so no server is needed.
    with pytest.raises(error) as raised:
        pymq.connect("pymq://127.0.0.1:1", **options)
    assert str(raised.value) == text


def test_reconnect_attempts_zero_allowed(shared_server, name):
    with pymq.connect(shared_server.url, reconnect_attempts=0) as client:
        assert client.queue(name).put(b"x") == 0
        assert client.server_version.startswith("pymq ")


# Connecting --------------------------------------------------------------


def test_refused_connection_names_the_address():
    url = f"pymq://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionRefusedError) as blocking:
        pymq.connect(url, reconnect_attempts=0)

    async def connect_async() -> None:
        await pymq.aio.connect(url, reconnect_attempts=0)

    with pytest.raises(ConnectionRefusedError) as asynchronous:
        asyncio.run(connect_async())
    for raised in (blocking, asynchronous):
        assert str(raised.value) == (
            f"[Errno {errno.ECONNREFUSED}] cannot connect to {url}: "
            f"{os.strerror(errno.ECONNREFUSED)}"
        )


def test_missing_unix_socket_names_the_path(tmp_path):
    url = f"pymq+unix://{tmp_path / 'missing.sock'}"
    with pytest.raises(FileNotFoundError) as raised:
        pymq.connect(url, reconnect_attempts=0)
    assert f"cannot connect to {url}: " in str(raised.value)


@pytest.mark.parametrize("token", [5, b"secret"])
def test_token_of_another_type_raises_type_error(token):
    with pytest.raises(TypeError, match="token must be a str, not"):
        pymq.connect(f"pymq://127.0.0.1:{free_port()}", token=token)


def test_queue_after_close_raises_closed(shared_server, name):
    client = pymq.connect(shared_server.url)
    client.queue(name)
    client.stream(f"{name}-events")
    client.close()
    with pytest.raises(pymq.ClosedError, match="is closed"):
        client.queue(name)
    with pytest.raises(pymq.ClosedError, match="is closed"):
        client.stream(f"{name}-events")
