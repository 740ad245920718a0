"""Slow consumers: subscription credit, and peers that never read.

A subscriber holds at most its credit, and a peer that stops reading its
socket must not make the server's memory grow: the server stops pushing,
and stops reading requests, while the peer's write buffer is full. Other
connections keep working meanwhile. The server runs in a subprocess, so
that its VmRSS can be read.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import pymq
from pymq import protocol
from pymq._core import decode_deliveries, encode_frame
from pymq.protocol import FLAG_ERROR
from tests.server.helpers import RawClient, ServerProcess, take
from tests.server.test_fuzz import read_status_bytes

BODY_BYTES = 64 * 1024
# Bodies put while a peer does not read: 3,000 of 64 KiB, about 190 MiB.
FLOOD = 3_000
# How much the server's VmRSS may grow while a peer does not read. The
# flood is four times as large, so a server that queued it would fail.
MEMORY_MARGIN = 48 << 20
# How long a test lets the server push before it counts what arrived.
SETTLE_SECONDS = 1.0


def pushed_offsets(client: RawClient, seconds: float) -> list[int]:
    """Read PUSH frames for seconds; return the offsets they delivered."""
    offsets: list[int] = []
    frames = list(client.frames)
    client.frames.clear()
    for frame in frames:
        assert frame[0] == protocol.DELIVER, frame
        offsets.extend(message.offset for message in decode_deliveries(frame[4], None))
    client.sock.settimeout(0.1)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                data = client.sock.recv(1 << 20)
            except TimeoutError:
                continue
            assert data, "the server closed the connection"
            for frame in client.reader.feed(data):
                assert not frame[1] & FLAG_ERROR, frame
                assert frame[0] == protocol.DELIVER, frame
                offsets.extend(
                    message.offset for message in decode_deliveries(frame[4], None)
                )
    finally:
        client.sock.settimeout(10.0)
    return offsets


def subscribe(client: RawClient, handle: int, request_id: int, credit: int) -> None:
    """SUBSCRIBE with credit and check the empty reply."""
    reply = client.request(
        protocol.SUBSCRIBE, request_id, handle, struct.pack("<I", credit)
    )
    assert reply[0] == protocol.SUBSCRIBE, reply
    assert not reply[1] & FLAG_ERROR, reply


def test_subscription_pushes_at_most_credit(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers().start()
    with pymq.connect(server.url) as producer:
        producer.queue("jobs").put_many([b"%d" % i for i in range(50)])
    client = RawClient(server.port)
    try:
        client.handshake()
        handle = client.open_queue("jobs")
        subscribe(client, handle, 7, 3)
        assert pushed_offsets(client, SETTLE_SECONDS) == [0, 1, 2]

        client.send(encode_frame(protocol.CREDIT, 0, 7, handle, struct.pack("<I", 2)))
        assert pushed_offsets(client, SETTLE_SECONDS) == [3, 4]
    finally:
        client.close()
    with pymq.connect(server.url) as consumer:
        stats = consumer.queue("jobs").stats()
        # The closed subscriber's five deliveries came back.
        assert stats.depth == 50
        assert stats.in_flight == 0


def test_stalled_subscriber_keeps_server_memory_bounded(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers().start()
    assert server.process is not None
    stalled = RawClient(server.port)
    try:
        stalled.handshake()
        handle = stalled.open_queue("jobs")
        # Room to receive little, and a credit far larger than the flood.
        stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        subscribe(stalled, handle, 7, 1_000_000)
        before = read_status_bytes(server.process.pid, "RssAnon")

        body = bytes(BODY_BYTES)
        with pymq.connect(server.url) as other:
            jobs = other.queue("jobs")
            for _ in range(FLOOD // 100):
                jobs.put_many([body] * 100)
            time.sleep(SETTLE_SECONDS)
            grown = read_status_bytes(server.process.pid, "RssAnon") - before
            assert grown < MEMORY_MARGIN, f"server RssAnon grew by {grown} bytes"

            # What the stalled subscriber was not pushed goes to others.
            held = jobs.stats().in_flight
            assert 0 < held < FLOOD // 4
            received = take(jobs, FLOOD - held, bound=60.0)
            assert len(received) == FLOOD - held
            jobs.ack_many(received)
    finally:
        stalled.close()


def test_unread_fetch_replies_keep_server_memory_bounded(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers().start()
    assert server.process is not None
    body = bytes(BODY_BYTES)
    with pymq.connect(server.url) as producer:
        jobs = producer.queue("jobs")
        for _ in range(FLOOD // 100):
            jobs.put_many([body] * 100)
    before = read_status_bytes(server.process.pid, "RssAnon")
    stalled = RawClient(server.port)
    try:
        stalled.handshake()
        handle = stalled.open_queue("jobs")
        stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # FETCHes of 100 for the whole flood, sent without reading a reply.
        fetch = struct.pack("<Ii", 100, 0)
        requests = b"".join(
            encode_frame(protocol.FETCH, 0, 10 + index, handle, fetch)
            for index in range(FLOOD // 100)
        )
        stalled.send(requests)
        time.sleep(SETTLE_SECONDS)
        grown = read_status_bytes(server.process.pid, "RssAnon") - before
        assert grown < MEMORY_MARGIN, f"server RssAnon grew by {grown} bytes"

        with pymq.connect(server.url) as other:
            stats = other.queue("jobs").stats()
            # The server stopped reading FETCHes once their replies piled up.
            assert 0 < stats.in_flight < FLOOD // 4
            assert stats.depth == FLOOD
            ping = other.queue("jobs").get(timeout=10.0)
            assert ping is not None
            ping.ack()
    finally:
        stalled.close()
