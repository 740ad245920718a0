"""Bad bytes on raw sockets: each gets its error, and the server goes on.

Every test writes its bytes itself with socket and struct, then checks the
error frame the server sends (where the protocol allows one), whether the
server closes that connection, and that a second, well-behaved client is
still served.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

import pytest

import pymq
from pymq import protocol
from pymq._core import encode_frame, encode_publish, encode_receipts
from pymq.protocol import FLAG_ERROR, FLAG_MORE, FLAG_REPLY, PREAMBLE, encode_json
from tests.server.helpers import RawClient, ServerProcess, error_of

_queues = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("bad-input-server")).start()
    yield process
    try:
        assert process.stop() == 0, process.log()
    finally:
        process.kill()


@pytest.fixture
def raw(server: ServerProcess) -> Iterator[RawClient]:
    client = RawClient(server.port)
    yield client
    client.close()


def queue_name() -> str:
    return f"raw-{next(_queues)}"


def assert_serves(server: ServerProcess) -> None:
    """Check that a new, well-behaved client can put, get and ack."""
    with pymq.connect(server.url, reconnect_attempts=0) as client:
        q = client.queue(queue_name())
        assert q.put(b"still serving") == 0
        message = q.get(timeout=10.0)
        assert message.body == b"still serving"
        message.ack()
        assert q.stats().acked == 1


def assert_open(raw: RawClient) -> None:
    """Check that the raw connection still replies to a PING."""
    reply = raw.request(protocol.PING, 99, 0, b"")
    assert reply[:3] == (protocol.PING, FLAG_REPLY, 99)


# Before and at the handshake ---------------------------------------------


def test_wrong_preamble_gets_version_error(server, raw):
    raw.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert frames[0][0] == protocol.HELLO
    assert error_of(frames[0]) == (3, "expected the pymq protocol preamble")
    assert_serves(server)


def test_preamble_of_another_major_version(server, raw):
    raw.send(PREAMBLE[:4] + bytes([2]) + PREAMBLE[5:])
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0]) == (
        3,
        "this server speaks pymq protocol version 1, and the client asked for "
        "version 2; use a client of the same major version",
    )
    assert_serves(server)


@pytest.mark.parametrize("flag", [FLAG_REPLY, FLAG_ERROR, FLAG_MORE])
def test_request_with_a_server_flag_closes(server, raw, flag):
    raw.handshake()
    raw.send(encode_frame(protocol.PING, flag, 5, 0, b""))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    code, text = error_of(frames[0])
    assert code == 1
    assert text == (
        f"request flags are {flag:#x}; a request may set only NO_REPLY (0x4), "
        f"the others are the server's"
    )
    assert_serves(server)


def test_garbage_instead_of_preamble(server, raw):
    raw.send(bytes(range(7, 71)))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0])[0] == 3
    assert_serves(server)


def test_frame_before_hello_is_rejected(server, raw):
    raw.send(PREAMBLE + encode_frame(protocol.PING, 0, 7, 0, b""))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    opcode, flags, request_id, _, _ = frames[0]
    assert (opcode, request_id) == (protocol.PING, 7)
    assert flags == FLAG_REPLY | FLAG_ERROR
    code, text = error_of(frames[0])
    assert code == 1
    assert "before HELLO" in text
    assert_serves(server)


def test_hello_with_unsupported_versions(server, raw):
    hello = encode_json({"versions": [2, 3], "token": None})
    raw.send(PREAMBLE + encode_frame(protocol.HELLO, 0, 1, 0, hello))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0])[0] == 3
    assert_serves(server)


def test_hello_that_is_not_json(server, raw):
    raw.send(PREAMBLE + encode_frame(protocol.HELLO, 0, 1, 0, b"\xff{not json"))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0])[0] == 1
    assert_serves(server)


def test_second_hello_is_rejected(server, raw):
    raw.handshake()
    raw.send(encode_frame(protocol.HELLO, 0, 2, 0, encode_json({"versions": [1, 1]})))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0]) == (1, "HELLO came twice")
    assert_serves(server)


# Frame lengths and framing -------------------------------------------------


@pytest.mark.parametrize(
    ("length", "code"),
    [(0, 1), (11, 1), (1 << 31, 2), ((1 << 32) - 1, 2)],
    ids=["0", "11", "2^31", "2^32-1"],
)
def test_bad_frame_length(server, raw, length, code):
    raw.handshake()
    raw.send(struct.pack("<I", length) + bytes(12))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0])[0] == code
    assert_serves(server)


def test_bad_frame_length_before_hello(server, raw):
    raw.send(PREAMBLE + struct.pack("<I", 5) + bytes(12))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0])[0] == 1
    assert_serves(server)


def test_garbage_after_handshake(server, raw):
    raw.handshake()
    raw.send(b"\xde\xad\xbe\xef" * 16)
    frames = raw.read_until_closed()
    assert len(frames) == 1
    code, text = error_of(frames[0])
    assert code == 2
    assert str(0xEFBEADDE) in text
    assert_serves(server)


def test_frame_version_other_than_1(server, raw):
    raw.handshake()
    frame = bytearray(encode_frame(protocol.PING, 0, 7, 0, b""))
    frame[5] = 9
    raw.send(bytes(frame))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0]) == (1, "frame version is 9; it must be 1")
    assert_serves(server)


def test_truncated_frame_then_close(server, raw):
    raw.handshake()
    handle = raw.open_queue(queue_name())
    frame = encode_publish(5, handle, [b"never whole"], None, 0)
    raw.send(frame[: len(frame) // 2])
    raw.close()
    assert_serves(server)


def test_unknown_opcode(server, raw):
    raw.handshake()
    raw.send(encode_frame(0x7F, 0, 8, 0, b"payload"))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert frames[0][:3] == (0x7F, FLAG_REPLY | FLAG_ERROR, 8)
    assert error_of(frames[0]) == (4, "unknown opcode 0x7f")
    assert_serves(server)


def test_unknown_handle(server, raw):
    raw.handshake()
    raw.send(encode_frame(protocol.FETCH, 0, 6, 99, struct.pack("<Ii", 1, 0)))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0])[0] == 14
    assert_serves(server)


# Requests that fail but keep the connection --------------------------------


def test_publish_with_wrong_crc(server, raw):
    name = queue_name()
    raw.handshake()
    handle = raw.open_queue(name)
    frame = bytearray(encode_publish(9, handle, [b"a", b"b"], {"k": "v"}, 0))
    # Bytes 24-27 of a PUBLISH frame are the CRC32C of its records.
    frame[24] ^= 0xFF
    raw.send(bytes(frame))

    reply = raw.next_frame()
    assert reply[:4] == (protocol.PUBLISH, FLAG_REPLY | FLAG_ERROR, 9, handle)
    code, _ = error_of(reply)
    assert code == 12
    assert reply[4][2] == 1  # retriable: sending the batch again may succeed
    assert_open(raw)

    with pymq.connect(server.url) as client:
        q = client.queue(name)
        assert q.stats().depth == 0
        assert q.put(b"first real") == 0
    assert_serves(server)


def test_publish_with_damaged_body(server, raw):
    name = queue_name()
    raw.handshake()
    handle = raw.open_queue(name)
    frame = bytearray(encode_publish(9, handle, [b"body"], None, 0))
    frame[-1] ^= 0x01
    raw.send(bytes(frame))

    assert error_of(raw.next_frame())[0] == 12
    assert_open(raw)
    with pymq.connect(server.url) as client:
        assert client.queue(name).stats().depth == 0


def test_publish_timeout_below_minus_one(server, raw):
    name = queue_name()
    raw.handshake()
    handle = raw.open_queue(name)
    raw.send(encode_publish(9, handle, [b"body"], None, -7))

    assert error_of(raw.next_frame()) == (
        8,
        "publish timeout is -7 ms; it must be -1 (no limit) or 0 or more",
    )
    assert_open(raw)
    with pymq.connect(server.url) as client:
        assert client.queue(name).stats().depth == 0


def test_open_of_unknown_kind_keeps_connection(server, raw):
    raw.handshake()
    request = encode_json({"kind": "zzz", "name": queue_name()})
    reply = raw.request(protocol.OPEN, 3, 0, request)
    assert error_of(reply) == (
        17,
        'OPEN kind is \'zzz\'; it must be "queue", "stream" or "group"',
    )
    assert_open(raw)


def test_fetch_count_zero(server, raw):
    raw.handshake()
    handle = raw.open_queue(queue_name())
    reply = raw.request(protocol.FETCH, 4, handle, struct.pack("<Ii", 0, 0))
    assert reply[:3] == (protocol.FETCH, FLAG_REPLY | FLAG_ERROR, 4)
    assert error_of(reply)[0] == 8
    assert_open(raw)
    assert_serves(server)


@pytest.mark.parametrize("wait", [-2, -5, -(1 << 31)])
def test_fetch_wait_below_minus_one(server, raw, wait):
    raw.handshake()
    handle = raw.open_queue(queue_name())
    reply = raw.request(protocol.FETCH, 4, handle, struct.pack("<Ii", 1, wait))
    assert reply[:3] == (protocol.FETCH, FLAG_REPLY | FLAG_ERROR, 4)
    assert error_of(reply) == (
        8,
        f"fetch wait is {wait} ms; it must be -1 (no limit) or 0 or more",
    )
    assert_open(raw)
    assert_serves(server)


def test_ack_of_garbage_receipts(server, raw):
    name = queue_name()
    raw.handshake()
    handle = raw.open_queue(name)
    publish = encode_publish(3, handle, [b"kept"], None, 0)
    assert raw.request(protocol.PUBLISH, 3, handle, publish[16:])[1] == FLAG_REPLY

    ack = encode_receipts(protocol.ACK, 0, 5, handle, [12345, (1 << 64) - 1])
    raw.send(ack)
    reply = raw.next_frame()
    assert reply[:3] == (protocol.ACK, FLAG_REPLY | FLAG_ERROR, 5)
    assert error_of(reply)[0] == 9
    assert_open(raw)

    with pymq.connect(server.url) as client:
        stats = client.queue(name).stats()
        assert (stats.depth, stats.acked) == (1, 0)
    assert_serves(server)


def test_ack_with_cut_off_receipts(server, raw):
    raw.handshake()
    handle = raw.open_queue(queue_name())
    # The count is 5 receipts, but only one follows.
    payload = struct.pack("<IQ", 5, 1)
    raw.send(encode_frame(protocol.ACK, 0, 5, handle, payload))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0])[0] == 1
    assert_serves(server)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (
            b'{"kind": "queue", "name": "caf\xe9"}',
            "invalid continuation byte 0xe9 at byte 30",
        ),
        # json.loads alone would take this for UTF-16 and fail in that codec.
        (b'{\x00"\xff\xfe', "invalid start byte 0xff at byte 3"),
    ],
    ids=["latin-1", "utf-16-like"],
)
def test_open_with_invalid_utf8(server, raw, payload, problem):
    raw.handshake()
    raw.send(encode_frame(protocol.OPEN, 0, 3, 0, payload))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    assert error_of(frames[0]) == (
        1,
        f"control payload is not valid UTF-8 JSON: {problem}",
    )
    assert_serves(server)


def test_open_with_utf16_json(server, raw):
    raw.handshake()
    payload = '{"kind": "queue", "name": "utf16"}'.encode("utf-16-le")
    raw.send(encode_frame(protocol.OPEN, 0, 3, 0, payload))
    frames = raw.read_until_closed()
    assert len(frames) == 1
    code, text = error_of(frames[0])
    assert code == 1
    assert text.startswith("control payload is not JSON, or nested too deeply: ")
    assert_serves(server)


def test_open_with_bad_request(server, raw):
    raw.handshake()
    # A field of the wrong type is an invalid request (17), not a protocol
    # error: the connection stays open, with its deliveries.
    reply = raw.request(protocol.OPEN, 3, 0, encode_json({"kind": "queue"}))
    assert error_of(reply)[0] == 17
    reply = raw.request(protocol.PING, 4, 0, b"")
    assert reply[2] == 4
    assert_serves(server)
