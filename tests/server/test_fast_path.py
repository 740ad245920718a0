"""The server's inline path for PUBLISH, FETCH and ACK, on raw sockets.

A request alone in a read is answered with its own write, and several
requests in one read share one write. These tests send the frames split at
every byte, pipelined in one write, with errors among them, and cut off by
a disconnect, and check every reply and the queue's counts after.
"""

from __future__ import annotations

import itertools
import socket
import struct
from collections.abc import Iterator

import pytest

import pymq
from pymq import protocol
from pymq._core import FrameReader, encode_frame, encode_publish, encode_receipts
from pymq.protocol import FLAG_ERROR, FLAG_NO_REPLY, FLAG_REPLY, PREAMBLE
from tests.server.helpers import RawClient, ServerProcess, error_of, take

_queues = itertools.count()
Frame = tuple[int, int, int, int, bytes]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("fast-path-server")).start()
    yield process
    try:
        assert process.stop() == 0, process.log()
    finally:
        process.kill()


@pytest.fixture
def raw(server: ServerProcess) -> Iterator[RawClient]:
    client = RawClient(server.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.handshake()
    yield client
    client.close()


def queue_name() -> str:
    return f"fast-{next(_queues)}"


def fetch(request_id: int, handle: int, count: int = 1, wait_ms: int = 0) -> bytes:
    return encode_frame(
        protocol.FETCH, 0, request_id, handle, struct.pack("<Ii", count, wait_ms)
    )


def publish(request_id: int, handle: int, body: bytes, flags: int = 0) -> bytes:
    frame = bytearray(encode_publish(request_id, handle, [body], None, -1))
    struct.pack_into("<H", frame, 6, flags)
    return bytes(frame)


def ack(request_id: int, handle: int, receipts: list[int], flags: int = 0) -> bytes:
    return encode_receipts(protocol.ACK, flags, request_id, handle, receipts)


def published(frame: Frame) -> tuple[int, int]:
    """Return (first offset, count) of a PUBLISH reply."""
    assert frame[1] == FLAG_REPLY, frame
    return struct.unpack("<QI", frame[4])


def delivered(frame: Frame) -> list[tuple[int, int, bytes]]:
    """Return (offset, receipt, body) of each delivery of a DELIVER reply."""
    assert frame[0] == protocol.DELIVER
    assert frame[1] == FLAG_REPLY, frame
    payload = frame[4]
    (count,) = struct.unpack_from("<I", payload)
    deliveries = []
    position = 8
    for _ in range(count):
        offset, receipt, _, _, _, length = struct.unpack_from(
            "<QQqIII", payload, position
        )
        position += 36
        deliveries.append((offset, receipt, payload[position : position + length]))
        position += length
    return deliveries


def stats(server: ServerProcess, name: str) -> pymq.QueueStats:
    with pymq.connect(server.url, reconnect_attempts=0) as client:
        return client.queue(name).stats()


# Frames split at every byte ---------------------------------------------------


def test_reader_splits_at_every_byte_like_whole():
    stream = (
        publish(1, 7, b"body")
        + fetch(2, 7)
        + ack(3, 7, [11, 12])
        + encode_frame(protocol.PING, 0, 4, 0, b"")
    )
    expected = FrameReader(1 << 20).feed(stream)
    assert [frame[2] for frame in expected] == [1, 2, 3, 4]
    for cut in range(len(stream) + 1):
        for kind in (bytes, bytearray):
            reader = FrameReader(1 << 20)
            frames = reader.feed(kind(stream[:cut])) + reader.feed(kind(stream[cut:]))
            assert frames == expected, (cut, kind)
            assert reader.buffered == 0


def test_reader_takes_received_size_of_buffer():
    stream = publish(1, 7, b"one") + fetch(2, 7)
    buffer = bytearray(4096)
    reader = FrameReader(1 << 20)
    frames: list[Frame] = []
    for start in range(0, len(stream), 5):
        chunk = stream[start : start + 5]
        buffer[: len(chunk)] = chunk
        frames += reader.feed(buffer, len(chunk))
    assert frames == FrameReader(1 << 20).feed(stream)
    assert reader.buffered == 0
    with pytest.raises(ValueError):
        reader.feed(buffer, len(buffer) + 1)


def test_requests_sent_byte_by_byte(server, raw):
    name = queue_name()
    handle = raw.open_queue(name)
    for round_ in range(3):
        body = f"dribbled {round_}".encode()
        for request in (publish(10, handle, body), fetch(11, handle)):
            for index in range(len(request)):
                raw.send(request[index : index + 1])
        put_reply = raw.next_frame()
        assert put_reply[2] == 10
        assert published(put_reply) == (round_, 1)
        fetch_reply = raw.next_frame()
        assert fetch_reply[2] == 11
        [(offset, receipt, received)] = delivered(fetch_reply)
        assert (offset, received) == (round_, body)
        request = ack(12, handle, [receipt])
        for index in range(len(request)):
            raw.send(request[index : index + 1])
        assert raw.next_frame()[:3] == (protocol.ACK, FLAG_REPLY, 12)
    counts = stats(server, name)
    assert counts.acked == 3
    assert counts.depth == 0


# Pipelined requests -----------------------------------------------------------


def test_pipelined_requests_answered_in_order(server, raw):
    name = queue_name()
    handle = raw.open_queue(name)
    count = 50
    raw.send(b"".join(publish(100 + i, handle, b"%d" % i) for i in range(count)))
    raw.send(b"".join(fetch(200 + i, handle) for i in range(count)))
    puts = [raw.next_frame() for _ in range(count)]
    assert [frame[2] for frame in puts] == [100 + i for i in range(count)]
    assert [published(frame) for frame in puts] == [(i, 1) for i in range(count)]
    fetches = [raw.next_frame() for _ in range(count)]
    assert [frame[2] for frame in fetches] == [200 + i for i in range(count)]
    deliveries = [delivered(frame)[0] for frame in fetches]
    assert [(offset, body) for offset, _, body in deliveries] == [
        (i, b"%d" % i) for i in range(count)
    ]
    raw.send(
        b"".join(
            ack(300 + i, handle, [receipt])
            for i, (_, receipt, _) in enumerate(deliveries)
        )
    )
    acks = [raw.next_frame() for _ in range(count)]
    assert [frame[:3] for frame in acks] == [
        (protocol.ACK, FLAG_REPLY, 300 + i) for i in range(count)
    ]
    counts = stats(server, name)
    assert counts.acked == count
    assert counts.depth == 0


def test_pipelined_no_reply_requests_send_nothing(server, raw):
    name = queue_name()
    handle = raw.open_queue(name)
    raw.send(
        publish(1, handle, b"quiet", FLAG_NO_REPLY)
        + fetch(2, handle)
        + encode_frame(protocol.PING, 0, 3, 0, b"")
    )
    [(offset, receipt, body)] = delivered(raw.next_frame())
    assert (offset, body) == (0, b"quiet")
    assert raw.next_frame()[:3] == (protocol.PING, FLAG_REPLY, 3)
    raw.send(ack(4, handle, [receipt], FLAG_NO_REPLY))
    raw.send(encode_frame(protocol.PING, 0, 5, 0, b""))
    assert raw.next_frame()[:3] == (protocol.PING, FLAG_REPLY, 5)
    assert stats(server, name).acked == 1


# Errors on the inline path ----------------------------------------------------


def test_request_errors_keep_connection_open(server, raw):
    name = queue_name()
    handle = raw.open_queue(name)
    damaged = bytearray(publish(1, handle, b"flipped"))
    damaged[-1] ^= 1
    raw.send(
        bytes(damaged)
        + fetch(2, handle, count=0)
        + ack(3, handle, [12345])
        + publish(4, handle, b"kept")
    )
    replies = [raw.next_frame() for _ in range(4)]
    assert [frame[2] for frame in replies] == [1, 2, 3, 4]
    assert error_of(replies[0])[0] == 12
    assert error_of(replies[1]) == (
        8,
        "fetch count is 0; it must be from 1 to max_batch (10000)",
    )
    assert error_of(replies[2])[0] == 9
    assert published(replies[3]) == (0, 1)
    assert replies[0][1] == FLAG_REPLY | FLAG_ERROR


def test_stale_no_reply_ack_gets_error_frame(server, raw):
    handle = raw.open_queue(queue_name())
    raw.send(ack(7, handle, [999], FLAG_NO_REPLY))
    frame = raw.next_frame()
    assert frame[:3] == (protocol.ACK, FLAG_REPLY | FLAG_ERROR, 7)
    assert error_of(frame)[0] == 9


@pytest.mark.parametrize(
    ("request_frame", "code"),
    [
        (publish(5, 99, b"nowhere"), 14),
        (fetch(5, 99), 14),
        (ack(5, 99, [1]), 14),
        (encode_frame(protocol.FETCH, 0, 5, 1, b"\x01\x00\x00\x00"), 1),
        (encode_frame(protocol.ACK, 0, 5, 1, struct.pack("<IQ", 1, 1) + b"\x00"), 1),
    ],
    ids=["publish-handle", "fetch-handle", "ack-handle", "fetch-short", "ack-long"],
)
def test_fatal_error_closes_after_earlier_replies(server, raw, request_frame, code):
    name = queue_name()
    handle = raw.open_queue(name)
    assert handle == 1
    raw.send(
        publish(4, handle, b"before")
        + request_frame
        + publish(6, handle, b"after, never written")
    )
    frames = raw.read_until_closed()
    assert [frame[2] for frame in frames] == [4, 5]
    assert published(frames[0]) == (0, 1)
    assert error_of(frames[1])[0] == code
    counts = stats(server, name)
    assert counts.depth == 1


def test_publish_to_group_is_rejected(server, raw):
    request = json_request({"kind": "group", "name": "g", "stream": queue_name()})
    reply = raw.request(protocol.OPEN, 2, 0, request)
    group = reply[3]
    frame = raw.request(protocol.PUBLISH, 3, group, publish(3, group, b"x")[16:])
    assert error_of(frame)[0] == 8
    assert raw.request(protocol.PING, 4, 0, b"")[:3] == (protocol.PING, FLAG_REPLY, 4)


def json_request(value: dict[str, str]) -> bytes:
    return protocol.encode_json({**value, "options": {}})


# Disconnects in the middle of a request -----------------------------------------


def test_disconnect_mid_publish_writes_nothing(server):
    name = queue_name()
    client = RawClient(server.port)
    client.handshake()
    handle = client.open_queue(name)
    request = publish(1, handle, b"half sent")
    client.send(request[: len(request) // 2])
    client.close()
    with pymq.connect(server.url, reconnect_attempts=0) as other:
        queue = other.queue(name)
        assert queue.get(timeout=0) is None
        assert queue.put(b"whole") == 0
        assert queue.stats().depth == 1


def test_disconnect_mid_ack_releases_delivery(server):
    name = queue_name()
    client = RawClient(server.port)
    client.handshake()
    handle = client.open_queue(name)
    put_reply = client.request(
        protocol.PUBLISH, 1, handle, publish(1, handle, b"held")[16:]
    )
    assert published(put_reply) == (0, 1)
    fetch_reply = client.request(protocol.FETCH, 2, handle, fetch(2, handle)[16:])
    [(_, receipt, _)] = delivered(fetch_reply)
    request = ack(3, handle, [receipt])
    client.send(request[: len(request) - 3])
    client.close()
    with pymq.connect(server.url, reconnect_attempts=0) as other:
        [message] = take(other.queue(name), 1)
        assert message.body == b"held"
        assert message.attempt == 2
        message.ack()
        assert other.queue(name).stats().acked == 1


def test_server_serves_after_preamble_split(server):
    client = RawClient(server.port)
    try:
        hello = protocol.encode_json({"versions": [1, 1], "token": None, "client": "x"})
        data = PREAMBLE + encode_frame(protocol.HELLO, 0, 1, 0, hello)
        for index in range(len(data)):
            client.send(data[index : index + 1])
        reply = client.next_frame()
        assert reply[:3] == (protocol.HELLO, FLAG_REPLY, 1)
    finally:
        client.close()
