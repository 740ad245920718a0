"""Properties of the frame codec: FrameReader splitting and the publish path."""

from __future__ import annotations

import array
import itertools
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pymq
from pymq import CorruptBatchError, FrameTooLargeError, ProtocolError, protocol
from pymq._core import (
    FrameReader,
    crc32c,
    decode_batch,
    decode_deliveries,
    encode_frame,
    encode_publish,
    measure_bodies,
    publish_into,
    split_body,
)

MAX_FRAME_BYTES = 64
Frame = tuple[int, int, int, int, bytes]

_streams = itertools.count()


def split_reference(data: bytes, max_frame_bytes: int) -> tuple[list[Frame], str, int]:
    """Split data by the frame layout: return frames, the error, leftover bytes.

    The error is "" when every length was valid, "small" for a length under
    12, "large" for one over max_frame_bytes and "version" for a version
    byte other than 1.
    """
    frames: list[Frame] = []
    position = 0
    while len(data) - position >= 4:
        (length,) = struct.unpack_from("<I", data, position)
        if length < 12:
            return frames, "small", len(data) - position
        if length > max_frame_bytes:
            return frames, "large", len(data) - position
        if len(data) - position >= 6 and data[position + 5] != 1:
            return frames, "version", len(data) - position
        if len(data) - position < 4 + length:
            break
        opcode, _, flags, request_id, handle = struct.unpack_from(
            "<BBHII", data, position + 4
        )
        payload = data[position + 16 : position + 4 + length]
        frames.append((opcode, flags, request_id, handle, payload))
        position += 4 + length
    return frames, "", len(data) - position


valid_frames = st.builds(
    encode_frame,
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=MAX_FRAME_BYTES - 12),
)
frame_streams = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda frames, tail: b"".join(frames) + tail,
        st.lists(valid_frames, max_size=8),
        st.binary(max_size=20),
    ),
)


@st.composite
def split_points(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))
    bounds = [0, *cuts, len(data)]
    return [data[start:stop] for start, stop in itertools.pairwise(bounds)]


@settings(max_examples=150, deadline=None)
@given(data=frame_streams)
def test_frame_reader_whole_matches_reference(data):
    frames, error, leftover = split_reference(data, MAX_FRAME_BYTES)
    reader = FrameReader(MAX_FRAME_BYTES)
    if error == "large":
        with pytest.raises(FrameTooLargeError):
            reader.feed(data)
    elif error in ("small", "version"):
        with pytest.raises(ProtocolError):
            reader.feed(data)
    else:
        assert reader.feed(data) == frames
        assert reader.buffered == leftover


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_frame_reader_split_matches_whole(data):
    stream = data.draw(frame_streams)
    chunks = data.draw(split_points(stream))
    frames, error, leftover = split_reference(stream, MAX_FRAME_BYTES)

    reader = FrameReader(MAX_FRAME_BYTES)
    received: list[Frame] = []
    raised: ProtocolError | None = None
    for chunk in chunks:
        try:
            received.extend(reader.feed(chunk))
        except ProtocolError as exc:
            raised = exc
            break

    if error:
        assert raised is not None
        # Frames completed in earlier chunks came out before the bad length.
        assert received == frames[: len(received)]
    else:
        assert raised is None
        assert received == frames
        assert reader.buffered == leftover


def test_frame_reader_rejects_other_version():
    frame = bytearray(encode_frame(protocol.PING, 0, 7, 0, b""))
    frame[5] = 9
    reader = FrameReader(1 << 20)
    with pytest.raises(ProtocolError) as raised:
        reader.feed(bytes(frame))
    assert str(raised.value) == "frame version is 9; it must be 1"
    # Checked as soon as the byte arrives, before the rest of the frame.
    reader = FrameReader(1 << 20)
    with pytest.raises(ProtocolError):
        reader.feed(struct.pack("<IBB", 1000, protocol.PUBLISH, 0))


def test_frame_reader_checks_length_first():
    reader = FrameReader(1 << 20)
    with pytest.raises(FrameTooLargeError):
        reader.feed(struct.pack("<I", 0xFFFFFFFF))
    reader = FrameReader(1 << 20)
    assert reader.feed(struct.pack("<I", 100) + b"\x20") == []
    assert reader.buffered == 5


# The publish path ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stream_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The compiled stream of one queue, which publish_into appends to."""
    with pymq.open(tmp_path_factory.mktemp("codec") / "data") as broker:
        yield broker.queue("published").stream


bodies = st.lists(
    st.one_of(st.binary(max_size=300), st.binary(max_size=50).map(bytearray)),
    min_size=1,
    max_size=20,
)
headers = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=5),
)


@settings(max_examples=100, deadline=None)
@given(bodies=bodies, headers=headers, request_id=st.integers(0, 0xFFFFFFFF))
def test_publish_round_trip(stream_core, bodies, headers, request_id):
    frame = encode_publish(request_id, 3, bodies, headers, -1)
    assert struct.unpack_from("<IBBHII", frame) == (
        len(frame) - 4,
        protocol.PUBLISH,
        1,
        0,
        request_id,
        3,
    )
    store = stream_core.store
    expected_first = store.next_offset

    first, count = publish_into(stream_core, frame[16:], 10_000)
    assert (first, count) == (expected_first, len(bodies))
    assert store.next_offset == first + count
    for index, body in enumerate(bodies):
        _, _, flags, stored = store.read_record(first + index)
        assert split_body(flags, stored) == (headers or {}, bytes(body))


@pytest.mark.parametrize(
    ("count", "noun"), [(1, "1 message"), (2, "2 messages")], ids=["one", "two"]
)
def test_publish_crc_error_counts_messages(stream_core, count, noun):
    payload = bytearray(encode_publish(1, 1, [b"body"] * count, None, 0)[16:])
    payload[8] ^= 0xFF
    before = stream_core.store.next_offset
    with pytest.raises(CorruptBatchError) as raised:
        publish_into(stream_core, bytes(payload), 10_000)
    assert str(raised.value) == (
        f"publish batch of {noun} failed its CRC32C check; nothing was written"
    )
    assert stream_core.store.next_offset == before


@pytest.mark.parametrize(
    ("count", "noun"), [(1, "1 delivery"), (3, "3 deliveries")], ids=["one", "three"]
)
def test_deliver_crc_error_counts_deliveries(count, noun):
    # A DELIVER head whose CRC32C cannot match: the count, then zeros.
    payload = struct.pack("<II", count, crc32c(b"") ^ 1)
    with pytest.raises(CorruptBatchError) as raised:
        decode_deliveries(payload, None)
    assert str(raised.value) == f"batch of {noun} failed its CRC32C check"


@settings(max_examples=100, deadline=None)
@given(bodies=bodies, headers=headers, data=st.data())
def test_publish_flipped_bit_writes_nothing(stream_core, bodies, headers, data):
    payload = bytearray(encode_publish(1, 1, bodies, headers, 0)[16:])
    # Bytes 8-11 of the payload are the CRC32C; the records follow byte 16.
    # The timeout (bytes 12-15) is not covered by the CRC.
    index = data.draw(
        st.one_of(st.integers(8, 11), st.integers(16, len(payload) - 1))
        if len(payload) > 16
        else st.integers(8, 11)
    )
    payload[index] ^= 1 << data.draw(st.integers(0, 7))
    before = stream_core.store.next_offset

    with pytest.raises(CorruptBatchError):
        publish_into(stream_core, bytes(payload), 10_000)
    assert stream_core.store.next_offset == before


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "head alone"),
        (struct.pack("<IIII", 0, 0, 0, 0), "1 to 10000"),
        (struct.pack("<IIII", 2, 1, 0, 0), "flags"),
        (struct.pack("<IIII", 0, 3, 0, 0) + bytes(8), "cannot hold"),
    ],
    ids=["empty", "count-0", "unknown-flags", "count-too-large"],
)
def test_publish_malformed_head_raises(stream_core, payload, message):
    before = stream_core.store.next_offset
    with pytest.raises(ProtocolError, match=message):
        publish_into(stream_core, payload, 10_000)
    assert stream_core.store.next_offset == before


# Deliveries: decode_batch against decode_deliveries -------------------------


def encode_header_block(headers: dict[str, str]) -> bytes:
    parts = [struct.pack("<H", len(headers))]
    for key, value in headers.items():
        raw_key, raw_value = key.encode(), value.encode()
        parts += [struct.pack("<H", len(raw_key)), raw_key]
        parts += [struct.pack("<I", len(raw_value)), raw_value]
    return b"".join(parts)


deliveries = st.lists(
    st.tuples(
        st.integers(0, 2**64 - 1),  # offset
        st.integers(0, 2**64 - 1),  # receipt
        st.integers(-(2**63), 2**63 - 1),  # timestamp
        st.integers(0, 2**32 - 1),  # attempt
        st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
        st.binary(max_size=40),
    ),
    max_size=6,
)


def deliver_payload(items: list[tuple]) -> bytes:
    """Return a DELIVER payload, laid out as docs/protocol.md says."""
    records = []
    for offset, receipt, timestamp, attempt, headers, body in items:
        block = b"" if headers is None else encode_header_block(headers)
        flags = 0 if headers is None else 1
        records.append(
            struct.pack(
                "<QQqIII",
                offset,
                receipt,
                timestamp,
                attempt,
                flags,
                len(block) + len(body),
            )
            + block
            + body
        )
    tail = b"".join(records)
    return struct.pack("<II", len(items), crc32c(tail)) + tail


def decoded_either_way(payloads: list[bytes]) -> tuple[object, object]:
    """Return what decode_deliveries and decode_batch make of payloads.

    Each is a list of per-message tuples, or the class of the error raised.
    """
    try:
        messages = [m for p in payloads for m in decode_deliveries(p, None)]
        one = [(m.offset, m.receipt, m.timestamp, m.attempt, m.body) for m in messages]
        one_headers = [m.headers for m in messages]
    except Exception as exc:
        one, one_headers = type(exc), None
    try:
        batch = decode_batch(payloads, None)
        two = [
            (o, r, t, a, bytes(batch.body(i)))
            for i, (o, r, t, a) in enumerate(
                zip(
                    batch.offsets.tolist(),
                    batch.receipts.tolist(),
                    batch.timestamps.tolist(),
                    batch.attempts.tolist(),
                    strict=True,
                )
            )
        ]
        # A message without a header block has {} as headers, None in a batch.
        two_headers = [h or {} for h in batch.headers]
        assert batch.data == b"".join(item[4] for item in two)
    except Exception as exc:
        two, two_headers = type(exc), None
    return (one, one_headers), (two, two_headers)


@settings(max_examples=150, deadline=None)
@given(st.lists(deliveries, max_size=3))
def test_decode_batch_matches_decode_deliveries(frames):
    payloads = [deliver_payload(items) for items in frames]
    one, two = decoded_either_way(payloads)
    assert one == two
    expected = [
        (offset, receipt, timestamp, attempt, body)
        for items in frames
        for offset, receipt, timestamp, attempt, _, body in items
    ]
    assert two[0] == expected
    batch = decode_batch(payloads, None)
    assert batch.headers == [item[4] for items in frames for item in items]


@settings(max_examples=300, deadline=None)
@given(items=deliveries, data=st.data())
def test_decode_batch_damaged_payload_fails_as_deliveries_do(items, data):
    payload = bytearray(deliver_payload(items))
    position = data.draw(st.integers(0, len(payload) - 1))
    payload[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    damaged = bytes(payload[:cut])
    one, two = decoded_either_way([deliver_payload(items), damaged])
    assert one == two


def test_measure_bodies_counts_bytes() -> None:
    words = array.array("I", [1, 2, 3])
    bodies = [b"abc", bytearray(b"hello"), memoryview(words), b""]
    # A memoryview of 4-byte items counts its bytes, not its items.
    assert measure_bodies(bodies) == (12, 20)
    assert measure_bodies([]) == (0, 0)
    assert measure_bodies(iter([b"x", b"yz"])) == (2, 3)


def test_measure_bodies_rejects_non_bytes() -> None:
    with pytest.raises(TypeError, match="bytes-like object is required, not 'int'"):
        measure_bodies([b"ok", 7])


def test_measure_bodies_names_bad_item() -> None:
    with pytest.raises(
        TypeError,
        match=r"^put_many\(\): item 1 of bodies must be a bytes-like "
        r"object, not int$",
    ):
        measure_bodies([b"ok", 7], "put_many")
    with pytest.raises(
        TypeError, match=r"^put\(\): body must be a bytes-like object, not str$"
    ):
        measure_bodies(["text"], "put")
