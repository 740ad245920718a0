"""Unit tests of the segment store: every operation, its errors and its lock.

Records here are small on purpose. With segment_bytes=256 a 100-byte body
takes a 136-byte record, so every such record fills a segment of its own,
and tests can count segments and files exactly.
"""

from __future__ import annotations

import array
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pymq
from pymq import (
    BrokerLockedError,
    ClosedError,
    ConfigError,
    MessageTooLargeError,
    OffsetNotFoundError,
    SegmentStore,
    _core,
)
from tests.model import record_size, segment_file_names

# A 100-byte body in a 256-byte segment: one record per segment.
SMALL_SEGMENT = 256
LONE_BODY = 100

# Bound on every wait for another thread or process, in seconds.
WAIT_SECONDS = 60


def segment_files(folder: Path) -> list[str]:
    """Return the sorted names of the .log and .idx files in folder."""
    return sorted(
        path.name for path in folder.iterdir() if path.suffix in {".log", ".idx"}
    )


def expected_files(*bases: int) -> list[str]:
    """Return the sorted file names of segments starting at bases."""
    names: list[str] = []
    for base in bases:
        names.extend(segment_file_names(base))
    return sorted(names)


def lone_body(index: int) -> bytes:
    """Return a LONE_BODY-byte body that encodes index."""
    return b"%03d" % index * (LONE_BODY // 3) + b"."


@pytest.fixture
def store(segment_dir: Path) -> Iterator[SegmentStore]:
    """A store with 4 KiB segments and no background flusher."""
    opened = SegmentStore(segment_dir, segment_bytes=4096)
    yield opened
    opened.close()


@pytest.fixture
def small_store(segment_dir: Path) -> Iterator[SegmentStore]:
    """A store whose 256-byte segments contain one LONE_BODY record each."""
    opened = SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT)
    yield opened
    opened.close()


def fill_lone_segments(store: SegmentStore, count: int) -> list[bytes]:
    """Append count LONE_BODY records, one segment each, and return the bodies."""
    bodies = [lone_body(i) for i in range(count)]
    for body in bodies:
        store.append(body)
    return bodies


# append ---------------------------------------------------------------------


def test_record_crc_and_padding_on_disk(segment_dir: Path) -> None:
    # Lengths around the 8-byte words, and around 3 x 128 bytes, where the
    # CRC of a longer body runs in three lanes.
    lengths = [*range(20), 100, 383, 384, 385, 1000]
    bodies = [bytes((7 * n + i) % 251 for i in range(n)) for n in lengths]
    with SegmentStore(segment_dir, segment_bytes=65536, fsync="never") as store:
        for body in bodies[:10]:
            store.append(body, flags=3)
        store.append_many(bodies[10:], flags=3)
    data = (segment_dir / segment_file_names(0)[0]).read_bytes()
    position = 0
    for offset, body in enumerate(bodies):
        header = data[position : position + 32]
        magic, length, stored_offset, _, flags, crc = struct.unpack("<IIQqII", header)
        assert magic == 0x52514D50
        assert length == len(body)
        assert stored_offset == offset
        assert flags == 3
        assert data[position + 32 : position + 32 + length] == body
        expected_crc = _core.crc32c_portable(header[:28] + body)
        assert crc == expected_crc, offset
        size = record_size(length)
        assert data[position + 32 + length : position + size] == bytes(
            size - 32 - length
        )
        position += size


def test_append_returns_consecutive_offsets(store: SegmentStore) -> None:
    offsets = [store.append(b"m%d" % i) for i in range(5)]
    assert offsets == [0, 1, 2, 3, 4]


def test_append_bytes_round_trips(store: SegmentStore) -> None:
    offset = store.append(b"hello")
    assert store.read(offset) == b"hello"


def test_append_bytearray_round_trips(store: SegmentStore) -> None:
    offset = store.append(bytearray(b"from a bytearray"))
    assert store.read(offset) == b"from a bytearray"


def test_append_memoryview_slice_round_trips(store: SegmentStore) -> None:
    view = memoryview(b"0123456789")[3:7]
    offset = store.append(view)
    assert store.read(offset) == b"3456"


def test_append_numpy_array_stores_raw_bytes(store: SegmentStore) -> None:
    values = np.arange(4, dtype="<u4")
    offset = store.append(values)
    assert store.read(offset) == values.tobytes()


def test_append_empty_body_round_trips(store: SegmentStore) -> None:
    offset = store.append(b"")
    assert store.read(offset) == b""


def test_append_empty_body_takes_an_offset(store: SegmentStore) -> None:
    store.append(b"")
    assert store.next_offset == 1


def test_append_empty_bytearray_round_trips(store: SegmentStore) -> None:
    offset = store.append(bytearray())
    assert store.read(offset) == b""


def test_append_copies_the_body(store: SegmentStore) -> None:
    body = bytearray(b"before")
    offset = store.append(body)
    body[:] = b"after!"
    assert store.read(offset) == b"before"


@pytest.mark.parametrize(
    ("body", "type_name"),
    [("text", "str"), (5, "int"), (None, "NoneType"), ([b"a"], "list")],
)
def test_append_non_buffer_raises_type_error(
    store: SegmentStore, body: object, type_name: str
) -> None:
    with pytest.raises(
        TypeError, match=f"bytes-like object is required, not '{type_name}'"
    ):
        store.append(body)  # type: ignore[arg-type]
    assert store.next_offset == 0


def test_append_non_contiguous_view_raises(store: SegmentStore) -> None:
    with pytest.raises(BufferError, match="not contiguous"):
        store.append(memoryview(b"abcdef")[::2])
    assert store.next_offset == 0


def test_append_negative_flags_raise_overflow(store: SegmentStore) -> None:
    with pytest.raises(OverflowError, match="negative value to uint32_t"):
        store.append(b"x", flags=-1)
    assert store.next_offset == 0


def test_append_too_large_raises_before_write(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096, max_message_bytes=10) as store:
        store.append(b"first")
        with pytest.raises(MessageTooLargeError) as caught:
            store.append(b"x" * 11)
        assert caught.value.size == 11
        assert caught.value.limit == 10
        assert store.next_offset == 1
        assert store.stats()["bytes"] == record_size(5)


def test_append_too_large_message_names_limit(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096, max_message_bytes=10) as store:
        message = "message is 11 bytes; maximum is 10 (max_message_bytes)"
        with pytest.raises(MessageTooLargeError, match=re.escape(message)):
            store.append(b"x" * 11)


def test_message_too_large_error_is_value_error() -> None:
    assert issubclass(MessageTooLargeError, ValueError)


# append_many ----------------------------------------------------------------


def test_append_many_returns_first_offset(store: SegmentStore) -> None:
    store.append(b"before")
    assert store.append_many([b"a", b"b", b"c"]) == 1


def test_append_many_takes_consecutive_offsets(store: SegmentStore) -> None:
    store.append(b"before")
    store.append_many([b"a", b"b", b"c"], timestamp=5)
    assert store.read_records(1, 4) == [
        (1, 5, 0, b"a"),
        (2, 5, 0, b"b"),
        (3, 5, 0, b"c"),
    ]


def test_append_many_advances_next_offset(store: SegmentStore) -> None:
    store.append_many([b"a", b"b", b"c"])
    assert store.next_offset == 3


def test_append_many_accepts_generator(store: SegmentStore) -> None:
    first = store.append_many(b"g%d" % i for i in range(4))
    assert first == 0
    assert store.read_range(0, 4) == [b"g0", b"g1", b"g2", b"g3"]


def test_append_many_accepts_mixed_buffer_types(store: SegmentStore) -> None:
    bodies: list[Any] = [
        b"bytes",
        bytearray(b"bytearray"),
        memoryview(b"a memoryview")[2:],
        array.array("B", b"array"),
        np.frombuffer(b"numpy", dtype=np.uint8),
        b"",
        bytearray(),
    ]
    store.append_many(bodies)
    assert store.read_range(0, 7) == [
        b"bytes",
        b"bytearray",
        b"memoryview",
        b"array",
        b"numpy",
        b"",
        b"",
    ]


def test_append_many_record_crcs_match_their_bytes(segment_dir: Path) -> None:
    # Bodies of 0 to 299 bytes in one batch: every length modulo 8, so
    # every padding, and each record's CRC checked against its own bytes.
    bodies = [bytes([i % 251]) * ((i * 37) % 300) for i in range(203)]
    with SegmentStore(segment_dir, segment_bytes=1 << 20) as opened:
        assert opened.append_many(bodies) == 0
        assert opened.read_range(0, len(bodies)) == bodies
    log = (segment_dir / f"{0:020d}.log").read_bytes()
    position = 0
    for body in bodies:
        header = log[position : position + 32]
        (stored_crc,) = struct.unpack_from("<I", header, 28)
        assert stored_crc == _core.crc32c_portable(header[:28] + body)
        assert log[position + 32 : position + 32 + len(body)] == body
        position += record_size(len(body))
    with SegmentStore(segment_dir, segment_bytes=1 << 20) as reopened:
        assert reopened.verify() == {"records": 203, "missing": 0, "damaged": []}


def test_append_many_casts_wide_items_to_bytes(store: SegmentStore) -> None:
    wide = array.array("I", [1, 2])
    store.append_many([wide])
    assert store.read(0) == wide.tobytes()


def test_append_many_empty_list_returns_next_offset(store: SegmentStore) -> None:
    store.append(b"x")
    assert store.append_many([]) == 1
    assert store.next_offset == 1


def test_append_many_shares_timestamp_and_flags(store: SegmentStore) -> None:
    store.append_many([b"a", b"b"], timestamp=1234, flags=7)
    assert store.read_records(0, 2) == [(0, 1234, 7, b"a"), (1, 1234, 7, b"b")]


def test_append_many_str_item_writes_nothing(store: SegmentStore) -> None:
    with pytest.raises(TypeError, match="bytes-like object is required, not 'str'"):
        store.append_many([b"ok", "text"])  # type: ignore[list-item]
    assert store.next_offset == 0


def test_append_many_non_iterable_raises_type_error(store: SegmentStore) -> None:
    with pytest.raises(TypeError, match="'int' object is not iterable"):
        store.append_many(5)  # type: ignore[arg-type]


def test_append_many_too_large_writes_nothing(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096, max_message_bytes=8) as store:
        with pytest.raises(MessageTooLargeError) as caught:
            store.append_many([b"ok", b"also ok", b"x" * 9])
        assert caught.value.size == 9
        assert caught.value.limit == 8
        assert store.next_offset == 0
        assert store.stats()["bytes"] == 0


def test_append_many_spans_segments(small_store: SegmentStore) -> None:
    bodies = [lone_body(i) for i in range(3)]
    assert small_store.append_many(bodies) == 0
    assert small_store.stats()["segments"] == 3
    assert small_store.read_range(0, 3) == bodies


# append_buffer --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint32, np.uint64])
def test_append_buffer_numpy_lengths(store: SegmentStore, dtype: type) -> None:
    lengths = np.array([3, 0, 5, 1], dtype=dtype)
    first = store.append_buffer(b"abcdefghi", lengths)
    assert first == 0
    assert store.read_range(0, 4) == [b"abc", b"", b"defgh", b"i"]


@pytest.mark.parametrize("typecode", ["i", "I", "l", "L", "q", "Q"])
def test_append_buffer_array_lengths(store: SegmentStore, typecode: str) -> None:
    lengths = array.array(typecode, [2, 2, 1])
    store.append_buffer(bytearray(b"aabbc"), lengths)
    assert store.read_range(0, 3) == [b"aa", b"bb", b"c"]


def test_append_buffer_returns_first_offset(store: SegmentStore) -> None:
    store.append(b"before")
    assert store.append_buffer(b"xy", np.array([1, 1])) == 1
    assert store.next_offset == 3


def test_append_buffer_accepts_memoryview_buffer(store: SegmentStore) -> None:
    store.append_buffer(memoryview(b"--abcd")[2:], np.array([2, 2]))
    assert store.read_range(0, 2) == [b"ab", b"cd"]


def test_append_buffer_copies_the_buffer(store: SegmentStore) -> None:
    buffer = bytearray(b"abcd")
    store.append_buffer(buffer, np.array([2, 2]))
    buffer[:] = b"wxyz"
    assert store.read_range(0, 2) == [b"ab", b"cd"]


def test_append_buffer_passes_timestamp_and_flags(store: SegmentStore) -> None:
    store.append_buffer(b"ab", np.array([1, 1]), timestamp=99, flags=3)
    assert store.read_records(0, 2) == [(0, 99, 3, b"a"), (1, 99, 3, b"b")]


def test_append_buffer_spans_segments(small_store: SegmentStore) -> None:
    bodies = [lone_body(i) for i in range(3)]
    lengths = np.array([len(body) for body in bodies])
    small_store.append_buffer(b"".join(bodies), lengths)
    assert small_store.stats()["segments"] == 3
    assert small_store.read_range(0, 3) == bodies


def test_append_buffer_empty_lengths_empty_buffer(store: SegmentStore) -> None:
    store.append(b"x")
    assert store.append_buffer(b"", np.array([], dtype=np.int64)) == 1
    assert store.next_offset == 1


def test_append_buffer_empty_lengths_with_bytes_raise(store: SegmentStore) -> None:
    message = "lengths is empty but buffer has 3 bytes"
    with pytest.raises(ValueError, match=message):
        store.append_buffer(b"abc", np.array([], dtype=np.int64))
    assert store.next_offset == 0


def test_append_buffer_negative_length_raises(store: SegmentStore) -> None:
    message = "lengths[1] is -2; lengths must not be negative"
    with pytest.raises(ValueError, match=re.escape(message)):
        store.append_buffer(b"abc", np.array([3, -2, 2]))
    assert store.next_offset == 0


def test_append_buffer_huge_unsigned_length_raises(store: SegmentStore) -> None:
    lengths = np.array([1, 2**63], dtype=np.uint64)
    message = "lengths add up past the end of buffer (3 bytes) at lengths[1]"
    with pytest.raises(ValueError, match=re.escape(message)):
        store.append_buffer(b"abc", lengths)
    assert store.next_offset == 0


def test_append_buffer_lengths_past_buffer_raise(store: SegmentStore) -> None:
    message = "lengths add up past the end of buffer (5 bytes) at lengths[1]"
    with pytest.raises(ValueError, match=re.escape(message)):
        store.append_buffer(b"abcde", np.array([3, 3]))
    assert store.next_offset == 0


def test_append_buffer_lengths_short_of_buffer_raise(store: SegmentStore) -> None:
    message = "lengths add up to 4 bytes but buffer has 5"
    with pytest.raises(ValueError, match=message):
        store.append_buffer(b"abcde", np.array([2, 2]))
    assert store.next_offset == 0


def test_append_buffer_two_dimensional_lengths_raise(store: SegmentStore) -> None:
    message = "lengths must be a 1-D array of 32- or 64-bit integers, not format "
    with pytest.raises(TypeError, match=re.escape(message) + "'l' with 2 dimensions"):
        store.append_buffer(b"abcd", np.array([[1, 1], [1, 1]], dtype=np.int64))
    assert store.next_offset == 0


def test_append_buffer_float_lengths_raise(store: SegmentStore) -> None:
    with pytest.raises(TypeError, match="not format 'd' with 1 dimensions"):
        store.append_buffer(b"abc", np.array([1.0, 2.0]))
    assert store.next_offset == 0


def test_append_buffer_int16_lengths_raise(store: SegmentStore) -> None:
    with pytest.raises(TypeError, match="not format 'h' with 1 dimensions"):
        store.append_buffer(b"abc", np.array([1, 2], dtype=np.int16))
    assert store.next_offset == 0


def test_append_buffer_list_lengths_raise(store: SegmentStore) -> None:
    with pytest.raises(TypeError, match="bytes-like object is required, not 'list'"):
        store.append_buffer(b"abc", [1, 2])  # type: ignore[arg-type]
    assert store.next_offset == 0


def test_append_buffer_strided_lengths_raise(store: SegmentStore) -> None:
    lengths = np.array([1, 9, 1, 9, 1, 9], dtype=np.int64)[::2]
    with pytest.raises(ValueError, match="ndarray is not contiguous"):
        store.append_buffer(b"abc", lengths)
    assert store.next_offset == 0


def test_append_buffer_strided_view_lengths_raise(store: SegmentStore) -> None:
    lengths = memoryview(array.array("q", [1, 9, 1, 9, 1, 9]))[::2]
    with pytest.raises(BufferError, match="not contiguous"):
        store.append_buffer(b"abc", lengths)
    assert store.next_offset == 0


def test_append_buffer_too_large_writes_nothing(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096, max_message_bytes=4) as store:
        with pytest.raises(MessageTooLargeError) as caught:
            store.append_buffer(b"abcdefgh", np.array([2, 6]))
        assert caught.value.size == 6
        assert caught.value.limit == 4
        assert store.next_offset == 0


# read and read_record -------------------------------------------------------


def test_read_record_returns_given_timestamp(store: SegmentStore) -> None:
    store.append(b"body", timestamp=1_700_000_000_123_456_789, flags=5)
    assert store.read_record(0) == (0, 1_700_000_000_123_456_789, 5, b"body")


def test_read_record_default_timestamp_is_now(store: SegmentStore) -> None:
    before = time.time_ns()
    store.append(b"body")
    after = time.time_ns()
    _, timestamp, _, _ = store.read_record(0)
    assert before <= timestamp
    assert timestamp <= after


def test_read_record_default_flags_are_zero(store: SegmentStore) -> None:
    store.append(b"body")
    assert store.read_record(0)[2] == 0


def test_read_record_negative_timestamp_round_trips(store: SegmentStore) -> None:
    store.append(b"old", timestamp=-5)
    assert store.read_record(0) == (0, -5, 0, b"old")


def test_read_record_extreme_values_round_trip(store: SegmentStore) -> None:
    store.append(b"a", timestamp=2**63 - 1, flags=0xFFFF)
    store.append(b"b", timestamp=-(2**63))
    assert store.read_record(0) == (0, 2**63 - 1, 0xFFFF, b"a")
    assert store.read_record(1) == (1, -(2**63), 0, b"b")


def test_read_returns_bytes(store: SegmentStore) -> None:
    store.append(bytearray(b"abc"))
    assert type(store.read(0)) is bytes


# read_view and read_views ---------------------------------------------------


def test_read_view_equals_body(store: SegmentStore) -> None:
    store.append(b"zero copy")
    view = store.read_view(0)
    assert bytes(view) == b"zero copy"
    view.release()


def test_read_view_is_read_only(store: SegmentStore) -> None:
    store.append(b"zero copy")
    view = store.read_view(0)
    assert view.readonly is True
    with pytest.raises(TypeError, match="read-only"):
        view[0] = 0
    view.release()


def test_read_view_empty_body_is_empty(store: SegmentStore) -> None:
    store.append(b"")
    view = store.read_view(0)
    assert view.nbytes == 0
    view.release()


def test_read_view_survives_delete_below(
    small_store: SegmentStore, segment_dir: Path
) -> None:
    bodies = fill_lone_segments(small_store, 2)
    view = small_store.read_view(0)
    assert small_store.delete_below(1) == 1
    assert not (segment_dir / segment_file_names(0)[0]).exists()
    assert bytes(view) == bodies[0]
    view.release()


def test_read_view_survives_close(segment_dir: Path) -> None:
    store = SegmentStore(segment_dir, segment_bytes=4096)
    store.append(b"outlives the store")
    view = store.read_view(0)
    store.close()
    assert bytes(view) == b"outlives the store"
    view.release()


def test_read_views_returns_each_body(store: SegmentStore) -> None:
    store.append_many([b"a", b"bb", b"", b"ccc"])
    views = store.read_views(0, 4)
    assert [bytes(view) for view in views] == [b"a", b"bb", b"", b"ccc"]
    assert all(view.readonly for view in views)
    for view in views:
        view.release()


def test_read_views_span_segments_and_survive_close(segment_dir: Path) -> None:
    store = SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT)
    bodies = fill_lone_segments(store, 3)
    views = store.read_views(0, 3)
    store.delete_below(2)
    store.close()
    assert [bytes(view) for view in views] == bodies
    for view in views:
        view.release()


# read_range and read_records ------------------------------------------------


def test_read_range_returns_bodies_in_order(store: SegmentStore) -> None:
    store.append_many([b"a", b"b", b"c", b"d"])
    assert store.read_range(1, 3) == [b"b", b"c"]


def test_read_range_clamps_to_the_log(store: SegmentStore) -> None:
    store.append_many([b"a", b"b"])
    assert store.read_range(0, 2**64 - 1) == [b"a", b"b"]


def test_read_range_empty_when_start_after_stop(store: SegmentStore) -> None:
    store.append_many([b"a", b"b"])
    assert store.read_range(2, 1) == []


def test_read_range_past_the_end_is_empty(store: SegmentStore) -> None:
    store.append_many([b"a", b"b"])
    assert store.read_range(2, 100) == []


def test_read_range_skips_gap(store: SegmentStore) -> None:
    store.append_many([b"a", b"b"])
    store.ensure_next_offset(5)
    store.append(b"f")
    assert store.read_range(0, 6) == [b"a", b"b", b"f"]


def test_read_records_skip_gap_offsets(store: SegmentStore) -> None:
    store.append(b"a", timestamp=10)
    store.ensure_next_offset(4)
    store.append(b"e", timestamp=20, flags=1)
    assert store.read_records(0, 10) == [(0, 10, 0, b"a"), (4, 20, 1, b"e")]


def test_read_range_starts_at_first_offset(small_store: SegmentStore) -> None:
    bodies = fill_lone_segments(small_store, 4)
    small_store.delete_below(2)
    assert small_store.read_range(0, 4) == bodies[2:]


def test_read_range_spans_segments(small_store: SegmentStore) -> None:
    bodies = fill_lone_segments(small_store, 5)
    assert small_store.read_range(1, 4) == bodies[1:4]


# first_offset and next_offset -----------------------------------------------


def test_first_offset_of_new_store_is_zero(store: SegmentStore) -> None:
    assert store.first_offset == 0


def test_next_offset_of_new_store_is_zero(store: SegmentStore) -> None:
    assert store.next_offset == 0


def test_first_offset_stays_zero_after_appends(store: SegmentStore) -> None:
    store.append_many([b"a", b"b"])
    assert store.first_offset == 0


def test_next_offset_counts_every_record(store: SegmentStore) -> None:
    store.append(b"a")
    store.append_many([b"b", b"c"])
    store.append_buffer(b"de", np.array([1, 1]))
    assert store.next_offset == 5


# delete_below ---------------------------------------------------------------


def test_delete_below_returns_segments_deleted(small_store: SegmentStore) -> None:
    fill_lone_segments(small_store, 5)
    assert small_store.delete_below(3) == 3


def test_delete_below_moves_first_offset(small_store: SegmentStore) -> None:
    fill_lone_segments(small_store, 5)
    small_store.delete_below(3)
    assert small_store.first_offset == 3


def test_delete_below_removes_files(
    small_store: SegmentStore, segment_dir: Path
) -> None:
    fill_lone_segments(small_store, 5)
    small_store.delete_below(3)
    assert segment_files(segment_dir) == expected_files(3, 4)


def test_delete_below_keeps_active_segment(
    small_store: SegmentStore, segment_dir: Path
) -> None:
    fill_lone_segments(small_store, 3)
    assert small_store.delete_below(100) == 2
    assert segment_files(segment_dir) == expected_files(2)
    assert small_store.first_offset == 2
    assert small_store.next_offset == 3


def test_delete_below_keeps_partly_newer_segment(segment_dir: Path) -> None:
    # 8-byte bodies take 40 bytes: six records fill 240 of 256 bytes.
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        store.append_many([b"%08d" % i for i in range(8)])
        assert store.delete_below(5) == 0
        assert store.delete_below(6) == 1
        assert store.first_offset == 6


def test_delete_below_zero_deletes_nothing(small_store: SegmentStore) -> None:
    fill_lone_segments(small_store, 3)
    assert small_store.delete_below(0) == 0
    assert small_store.stats()["segments"] == 3


def test_delete_below_single_segment_deletes_nothing(store: SegmentStore) -> None:
    store.append_many([b"a", b"b"])
    assert store.delete_below(2**64 - 1) == 0
    assert store.read_range(0, 2) == [b"a", b"b"]


def test_delete_below_then_read_deleted_raises(small_store: SegmentStore) -> None:
    fill_lone_segments(small_store, 3)
    small_store.delete_below(2)
    with pytest.raises(OffsetNotFoundError) as caught:
        small_store.read(1)
    assert caught.value.offset == 1
    assert caught.value.first_offset == 2
    assert caught.value.next_offset == 3


def test_delete_below_survives_reopen(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        bodies = fill_lone_segments(store, 4)
        store.delete_below(2)
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        assert store.first_offset == 2
        assert store.read_range(0, 4) == bodies[2:]


def test_delete_below_lowers_segment_count(small_store: SegmentStore) -> None:
    fill_lone_segments(small_store, 4)
    small_store.delete_below(2)
    assert small_store.stats()["segments"] == 2
    assert small_store.stats()["bytes"] == 2 * record_size(LONE_BODY)


# ensure_next_offset ---------------------------------------------------------


def test_ensure_next_offset_returns_offsets_skipped(store: SegmentStore) -> None:
    store.append_many([b"a", b"b"])
    assert store.ensure_next_offset(10) == 8


def test_ensure_next_offset_counts_gap_offsets(store: SegmentStore) -> None:
    store.append_many([b"a", b"b"])
    store.ensure_next_offset(10)
    assert store.gap_offsets == 8
    assert store.stats()["gap_offsets"] == 8


def test_ensure_next_offset_next_append_takes_it(store: SegmentStore) -> None:
    store.append(b"a")
    store.ensure_next_offset(7)
    assert store.next_offset == 7
    assert store.append(b"h") == 7
    assert store.read(7) == b"h"


def test_ensure_next_offset_lower_offset_does_nothing(store: SegmentStore) -> None:
    store.append_many([b"a", b"b", b"c"])
    assert store.ensure_next_offset(2) == 0
    assert store.ensure_next_offset(3) == 0
    assert store.next_offset == 3
    assert store.gap_offsets == 0


def test_ensure_next_offset_adds_up_gaps(store: SegmentStore) -> None:
    store.append(b"a")
    store.ensure_next_offset(5)
    store.ensure_next_offset(9)
    assert store.gap_offsets == 8
    assert store.next_offset == 9


def test_ensure_next_offset_on_empty_store_moves_first(
    store: SegmentStore, segment_dir: Path
) -> None:
    assert store.ensure_next_offset(42) == 42
    assert store.first_offset == 42
    assert store.next_offset == 42
    assert segment_files(segment_dir) == expected_files(42)


def test_ensure_next_offset_starts_new_segment(
    store: SegmentStore, segment_dir: Path
) -> None:
    store.append(b"a")
    store.ensure_next_offset(100)
    assert segment_files(segment_dir) == expected_files(0, 100)
    assert store.stats()["segments"] == 2


def test_ensure_next_offset_survives_reopen(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        store.append(b"a")
        store.ensure_next_offset(50)
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        assert store.next_offset == 50
        assert store.append(b"b") == 50
        assert store.read_range(0, 51) == [b"a", b"b"]


def test_ensure_next_offset_empty_store_survives_reopen(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        store.ensure_next_offset(50)
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        assert store.first_offset == 50
        assert store.next_offset == 50


def test_ensure_next_offset_gap_read_raises(store: SegmentStore) -> None:
    store.append(b"a")
    store.ensure_next_offset(5)
    store.append(b"f")
    message = f"offset 3 in {store.path} has no record: it was lost to damage"
    with pytest.raises(OffsetNotFoundError, match=re.escape(message)) as caught:
        store.read(3)
    assert caught.value.offset == 3
    assert caught.value.first_offset == 0
    assert caught.value.next_offset == 6


def test_ensure_next_offset_gap_not_counted_damaged(store: SegmentStore) -> None:
    store.append(b"a")
    store.ensure_next_offset(5)
    assert store.damaged == 0
    assert store.stats()["damaged"] == 0


def test_min_next_offset_sets_next_offset(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, min_next_offset=30) as store:
        assert store.next_offset == 30
        assert store.append(b"x") == 30


def test_min_next_offset_below_next_does_nothing(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        store.append_many([b"a", b"b", b"c"])
    with SegmentStore(segment_dir, segment_bytes=4096, min_next_offset=2) as store:
        assert store.next_offset == 3
        assert store.gap_offsets == 0


def test_min_next_offset_skips_on_reopen(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        store.append_many([b"a", b"b", b"c"])
    with SegmentStore(segment_dir, segment_bytes=4096, min_next_offset=10) as store:
        assert store.next_offset == 10
        assert store.gap_offsets == 7
        assert store.read_range(0, 10) == [b"a", b"b", b"c"]


# flush, synced_lengths and stats --------------------------------------------


def test_synced_lengths_zero_before_flush(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096, fsync="never") as store:
        store.append(b"12345")
        active = str(segment_dir / segment_file_names(0)[0])
        assert store.synced_lengths() == {active: 0}


def test_flush_syncs_every_segment(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT, fsync="never") as store:
        fill_lone_segments(store, 3)
        store.append(b"1234567")
        store.flush()
        size = record_size(LONE_BODY)
        assert store.synced_lengths() == {
            str(segment_dir / segment_file_names(0)[0]): size,
            str(segment_dir / segment_file_names(1)[0]): size,
            str(segment_dir / segment_file_names(2)[0]): size + record_size(7),
        }


def test_flush_counts_synced_bytes(store: SegmentStore) -> None:
    store.append_many([b"a", b"bb"])
    assert store.stats()["synced_bytes"] == 0
    store.flush()
    assert store.stats()["synced_bytes"] == 2 * record_size(1)


def test_large_flush_keeps_records_readable(segment_dir: Path) -> None:
    """A sync of 256 KiB or more of whole pages unmaps them before the msync.

    Reads, a view taken before the flush and appends after it still see
    every record, and so does a reopen.
    """
    bodies = [bytes([index % 251]) * 1000 for index in range(1000)]
    with SegmentStore(segment_dir, segment_bytes=4 << 20) as store:
        store.append_many(bodies[:500])
        view = store.read_view(10)
        store.flush()
        assert bytes(view) == bodies[10]
        store.append_many(bodies[500:])
        store.flush()
        assert store.read_range(0, 1000) == bodies
        assert bytes(view) == bodies[10]
        view.release()
    with SegmentStore(segment_dir, segment_bytes=4 << 20) as store:
        assert store.read_range(0, 1000) == bodies


def test_fsync_always_syncs_each_append(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096, fsync="always") as store:
        for i in range(5):
            store.append(b"x" * i)
            stats = store.stats()
            assert stats["synced_bytes"] == stats["written_bytes"], i


def test_stats_of_new_store(store: SegmentStore) -> None:
    assert store.stats() == {
        "segments": 1,
        "bytes": 0,
        "first_offset": 0,
        "next_offset": 0,
        "damaged": 0,
        "gap_offsets": 0,
        "written_bytes": 0,
        "synced_bytes": 0,
    }


def test_stats_count_appends(small_store: SegmentStore) -> None:
    fill_lone_segments(small_store, 2)
    small_store.append(b"")
    size = record_size(LONE_BODY)
    assert small_store.stats() == {
        "segments": 2,
        "bytes": 2 * size + record_size(0),
        "first_offset": 0,
        "next_offset": 3,
        "damaged": 0,
        "gap_offsets": 0,
        "written_bytes": 2 * size + record_size(0),
        "synced_bytes": 0,
    }


def test_stats_written_bytes_restart_on_reopen(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        store.append(b"abc")
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        stats = store.stats()
        assert stats["written_bytes"] == 0
        assert stats["bytes"] == record_size(3)


def test_fsync_property_names_policy(segment_dir: Path) -> None:
    for policy in ("never", "interval", "always"):
        with SegmentStore(segment_dir, segment_bytes=4096, fsync=policy) as store:
            assert store.fsync == policy


# verify ---------------------------------------------------------------------


def test_verify_counts_sound_records(small_store: SegmentStore) -> None:
    fill_lone_segments(small_store, 3)
    small_store.append(b"")
    assert small_store.verify() == {"records": 4, "missing": 0, "damaged": []}


def test_verify_of_new_store_finds_nothing(store: SegmentStore) -> None:
    assert store.verify() == {"records": 0, "missing": 0, "damaged": []}


def test_batch_checksums_mixed_lengths(segment_dir: Path) -> None:
    # A batch is checksummed three records at a time, on shared lengths
    # first: these lengths cover empty bodies, every remainder of 8, and
    # bodies long enough for the lanes beside short ones.
    lengths = [0, 1, 7, 8, 9, 27, 100, 129, 383, 384, 385, 1000, 4095, 3, 5, 64]
    bodies = [bytes((n * 31 + i) % 256 for i in range(n)) for n in lengths]
    with SegmentStore(segment_dir, segment_bytes=1 << 20) as store:
        first = store.append_many(bodies)
        assert store.verify() == {
            "records": len(bodies),
            "missing": 0,
            "damaged": [],
        }
        assert store.read_range(first, first + len(bodies)) == bodies
    with SegmentStore(segment_dir, segment_bytes=1 << 20) as reopened:
        assert reopened.verify()["damaged"] == []


# close and the context manager ----------------------------------------------


def test_close_sets_closed(segment_dir: Path) -> None:
    store = SegmentStore(segment_dir)
    assert store.closed is False
    store.close()
    assert store.closed is True


def test_close_twice_does_nothing(segment_dir: Path) -> None:
    store = SegmentStore(segment_dir)
    store.append(b"a")
    store.close()
    store.close()
    assert store.closed is True


CLOSED_OPERATIONS: dict[str, Callable[[SegmentStore], object]] = {
    "append": lambda store: store.append(b"x"),
    "append_many": lambda store: store.append_many([b"x"]),
    "append_many_empty": lambda store: store.append_many([]),
    "append_buffer": lambda store: store.append_buffer(b"x", np.array([1])),
    "read": lambda store: store.read(0),
    "read_record": lambda store: store.read_record(0),
    "read_view": lambda store: store.read_view(0),
    "read_range": lambda store: store.read_range(0, 1),
    "read_records": lambda store: store.read_records(0, 1),
    "read_views": lambda store: store.read_views(0, 1),
    "delete_below": lambda store: store.delete_below(1),
    "ensure_next_offset": lambda store: store.ensure_next_offset(5),
    "flush": lambda store: store.flush(),
    "synced_lengths": lambda store: store.synced_lengths(),
    "stats": lambda store: store.stats(),
    "verify": lambda store: store.verify(),
    "first_offset": lambda store: store.first_offset,
    "next_offset": lambda store: store.next_offset,
    "damaged": lambda store: store.damaged,
}


@pytest.mark.parametrize("operation", CLOSED_OPERATIONS)
def test_close_then_operation_raises_closed_error(
    segment_dir: Path, operation: str
) -> None:
    store = SegmentStore(segment_dir)
    store.append(b"x")
    store.close()
    message = f"segment store {store.path} is closed"
    with pytest.raises(ClosedError, match=re.escape(message)):
        CLOSED_OPERATIONS[operation](store)


def test_close_releases_folder_lock(segment_dir: Path) -> None:
    first = SegmentStore(segment_dir)
    first.close()
    with SegmentStore(segment_dir) as second:
        assert second.closed is False


def test_context_manager_returns_the_store(segment_dir: Path) -> None:
    store = SegmentStore(segment_dir)
    with store as entered:
        assert entered is store


def test_context_manager_closes_store(segment_dir: Path) -> None:
    with SegmentStore(segment_dir) as store:
        store.append(b"a")
    assert store.closed is True


def test_context_manager_closes_on_error(segment_dir: Path) -> None:
    store = SegmentStore(segment_dir)
    with pytest.raises(RuntimeError, match="inside the block"), store:
        raise RuntimeError("inside the block")
    assert store.closed is True


def test_repr_names_path_and_state(segment_dir: Path) -> None:
    store = SegmentStore(segment_dir)
    assert repr(store) == f"<SegmentStore {str(segment_dir)!r} open>"
    store.close()
    assert repr(store) == f"<SegmentStore {str(segment_dir)!r} closed>"


# reopen ---------------------------------------------------------------------


def test_reopen_keeps_records(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        store.append(lone_body(0), timestamp=11, flags=1)
        store.append_many([b"a", b""], timestamp=22, flags=2)
        store.append_buffer(lone_body(1), np.array([LONE_BODY]), timestamp=33)
        written = store.read_records(0, store.next_offset)
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        assert store.read_records(0, store.next_offset) == written
        assert store.next_offset == 4


def test_reopen_keeps_every_written_value(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        store.append(lone_body(0), timestamp=11, flags=1)
        store.append_many([b"a", b""], timestamp=22, flags=2)
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        assert store.read_records(0, 3) == [
            (0, 11, 1, lone_body(0)),
            (1, 22, 2, b"a"),
            (2, 22, 2, b""),
        ]


def test_reopen_continues_offsets(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        fill_lone_segments(store, 3)
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        assert store.append(b"next") == 3
        assert store.stats()["segments"] == 3


def test_reopen_keeps_segment_files(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        fill_lone_segments(store, 3)
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        assert segment_files(segment_dir) == expected_files(0, 1, 2)
        assert store.verify() == {"records": 3, "missing": 0, "damaged": []}


def test_reopen_reports_no_damage(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT) as store:
        fill_lone_segments(store, 3)
    messages: list[str] = []
    with SegmentStore(
        segment_dir, segment_bytes=SMALL_SEGMENT, on_damage=messages.append
    ) as store:
        assert store.damaged == 0
    assert messages == []


def test_store_accepts_path_object(segment_dir: Path) -> None:
    with SegmentStore(segment_dir) as store:
        assert store.path == str(segment_dir)


def test_store_accepts_bytes_path(segment_dir: Path) -> None:
    with SegmentStore(os.fsencode(segment_dir)) as store:
        assert store.path == str(segment_dir)


def test_store_makes_relative_path_absolute(
    segment_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(segment_dir.parent)
    with SegmentStore(segment_dir.name) as store:
        assert store.path == str(segment_dir)


# open_store -----------------------------------------------------------------


def test_open_store_creates_missing_folders(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b" / "log"
    with pymq.open_store(folder, segment_bytes=4096) as store:
        assert folder.is_dir()
        assert store.path == str(folder)


def test_open_store_passes_options(segment_dir: Path) -> None:
    with pymq.open_store(
        segment_dir, segment_bytes=4096, max_message_bytes=100, fsync="never"
    ) as store:
        assert store.segment_bytes == 4096
        assert store.max_message_bytes == 100
        assert store.fsync == "never"


def test_open_store_defaults(segment_dir: Path) -> None:
    with pymq.open_store(segment_dir) as store:
        assert store.segment_bytes == 64 * 1024 * 1024
        assert store.max_message_bytes == 1024 * 1024
        assert store.fsync == "interval"


def test_open_store_flushes_in_background(segment_dir: Path) -> None:
    with pymq.open_store(segment_dir, segment_bytes=4096, flush_interval=0.01) as store:
        store.append(b"12345")
        deadline = time.monotonic() + WAIT_SECONDS
        while store.stats()["synced_bytes"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.stats()["synced_bytes"] == record_size(5)


# configuration errors -------------------------------------------------------


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"segment_bytes": 56},
            "segment_bytes is 56; it must be from 64 to 2147483648",
        ),
        (
            {"segment_bytes": 0},
            "segment_bytes is 0; it must be from 64 to 2147483648",
        ),
        (
            {"segment_bytes": -4096},
            "segment_bytes is -4096; it must be from 64 to 2147483648",
        ),
        (
            {"segment_bytes": 2**31 + 8},
            f"segment_bytes is {2**31 + 8}; it must be from 64 to 2147483648",
        ),
        (
            {"segment_bytes": 100},
            "segment_bytes is 100; it must be a multiple of 8",
        ),
        (
            {"segment_bytes": 256, "max_message_bytes": -1},
            "max_message_bytes is -1; it must be from 0 to 224 (segment_bytes "
            "minus the 32-byte record header)",
        ),
        (
            {"segment_bytes": 256, "max_message_bytes": 225},
            "max_message_bytes is 225; it must be from 0 to 224",
        ),
        (
            {"fsync": "sometimes"},
            "fsync is 'sometimes'; it must be one of 'never', 'interval', 'always'",
        ),
        ({"fsync": "ALWAYS"}, "fsync is 'ALWAYS'; it must be one of"),
        ({"fsync": 1}, "fsync is 1; it must be one of"),
        (
            {"flush_interval": 0},
            "flush_interval is 0 seconds; it must be from 0.001 to 3600",
        ),
        (
            {"flush_interval": -1.0},
            "flush_interval is -1.0 seconds; it must be from 0.001 to 3600",
        ),
        (
            {"flush_interval": 3601},
            "flush_interval is 3601 seconds; it must be from 0.001 to 3600",
        ),
        (
            {"flush_interval": float("nan")},
            "flush_interval is nan seconds",
        ),
    ],
)
def test_open_store_bad_option_raises_config_error(
    segment_dir: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        pymq.open_store(segment_dir, **options)
    assert not segment_dir.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"segment_bytes": "4096"}, "segment_bytes must be an int, not str"),
        ({"segment_bytes": 4096.0}, "segment_bytes must be an int, not float"),
        ({"segment_bytes": True}, "segment_bytes must be an int, not bool"),
        ({"max_message_bytes": "10"}, "max_message_bytes must be an int, not str"),
        ({"max_message_bytes": 1.5}, "max_message_bytes must be an int, not float"),
        ({"flush_interval": "0.1"}, "flush_interval must be a number, not str"),
        ({"flush_interval": True}, "flush_interval must be a number, not bool"),
        ({"flush_interval": None}, "flush_interval must be a number, not NoneType"),
    ],
)
def test_open_store_wrong_option_type_raises(
    segment_dir: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=re.escape(message)):
        pymq.open_store(segment_dir, **options)
    assert not segment_dir.exists()


def test_store_non_callable_on_damage_raises(segment_dir: Path) -> None:
    with pytest.raises(TypeError, match="on_damage must be callable or None"):
        SegmentStore(segment_dir, on_damage=5)  # type: ignore[arg-type]


def test_store_negative_min_next_offset_raises(segment_dir: Path) -> None:
    with pytest.raises(OverflowError, match="negative value"):
        SegmentStore(segment_dir, min_next_offset=-1)


def test_store_positional_option_raises(segment_dir: Path) -> None:
    with pytest.raises(TypeError, match="positional argument"):
        SegmentStore(segment_dir, 4096)  # type: ignore[misc]


# offset lookups -------------------------------------------------------------


def test_offset_not_found_error_is_lookup_error() -> None:
    assert issubclass(OffsetNotFoundError, LookupError)


def test_read_empty_log_raises_offset_not_found(store: SegmentStore) -> None:
    message = f"offset 0 is not in {store.path}: the log is empty"
    with pytest.raises(OffsetNotFoundError, match=re.escape(message)) as caught:
        store.read(0)
    assert caught.value.offset == 0
    assert caught.value.first_offset == 0
    assert caught.value.next_offset == 0


def test_read_at_next_offset_raises(store: SegmentStore) -> None:
    store.append_many([b"a", b"b", b"c"])
    message = f"offset 3 is not in {store.path}: the log has offsets 0 to 2"
    with pytest.raises(OffsetNotFoundError, match=re.escape(message)) as caught:
        store.read(3)
    assert caught.value.offset == 3
    assert caught.value.first_offset == 0
    assert caught.value.next_offset == 3


def test_read_beyond_end_raises(store: SegmentStore) -> None:
    store.append_many([b"a", b"b", b"c"])
    with pytest.raises(
        OffsetNotFoundError, match="the log has offsets 0 to 2"
    ) as caught:
        store.read(2**64 - 1)
    assert caught.value.offset == 2**64 - 1
    assert caught.value.next_offset == 3


def test_read_below_first_offset_raises(small_store: SegmentStore) -> None:
    fill_lone_segments(small_store, 4)
    small_store.delete_below(2)
    message = f"offset 0 is not in {small_store.path}: the log has offsets 2 to 3"
    with pytest.raises(OffsetNotFoundError, match=re.escape(message)) as caught:
        small_store.read(0)
    assert caught.value.offset == 0
    assert caught.value.first_offset == 2
    assert caught.value.next_offset == 4


@pytest.mark.parametrize("method", ["read", "read_record", "read_view"])
def test_read_methods_raise_same_not_found(store: SegmentStore, method: str) -> None:
    store.append(b"a")
    with pytest.raises(
        OffsetNotFoundError, match="the log has offsets 0 to 0"
    ) as caught:
        getattr(store, method)(1)
    assert caught.value.offset == 1


def test_read_negative_offset_raises_overflow(store: SegmentStore) -> None:
    with pytest.raises(OverflowError, match="negative value"):
        store.read(-1)


def test_offset_not_found_error_pickles() -> None:
    error = OffsetNotFoundError("offset 9 is not in x", 9, 2, 5)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.offset == 9
    assert copy.first_offset == 2
    assert copy.next_offset == 5
    assert str(copy) == "offset 9 is not in x"


# the folder lock ------------------------------------------------------------

LOCK_HOLDER = """
import sys, time
from pymq import SegmentStore
store = SegmentStore(sys.argv[1])
print("ready", flush=True)
time.sleep(float(sys.argv[2]))
"""

LOCK_PROBE = """
import sys
from pymq import BrokerLockedError, SegmentStore
try:
    SegmentStore(sys.argv[1])
except BrokerLockedError as error:
    print(error.pid)
    sys.exit(3)
"""


def test_second_open_in_process_raises_locked(segment_dir: Path) -> None:
    with SegmentStore(segment_dir):
        message = (
            f"data directory {segment_dir} is locked by process {os.getpid()}; "
            "close that broker or store first"
        )
        with pytest.raises(BrokerLockedError, match=re.escape(message)) as caught:
            SegmentStore(segment_dir)
        assert caught.value.pid == os.getpid()
        assert caught.value.path == str(segment_dir)


def test_failed_second_open_keeps_lock(segment_dir: Path) -> None:
    with SegmentStore(segment_dir) as store:
        with pytest.raises(BrokerLockedError):
            SegmentStore(segment_dir)
        with pytest.raises(BrokerLockedError):
            pymq.open_store(segment_dir)
        store.append(b"still works")
        assert store.read(0) == b"still works"


def test_lock_file_names_owner_pid(segment_dir: Path) -> None:
    with SegmentStore(segment_dir):
        assert (segment_dir / "LOCK").read_text() == f"{os.getpid()}\n"


def test_open_in_subprocess_raises_locked(segment_dir: Path) -> None:
    with SegmentStore(segment_dir):
        probe = subprocess.run(
            [sys.executable, "-c", LOCK_PROBE, str(segment_dir)],
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
        )
    assert probe.returncode == 3, probe.stderr
    assert probe.stdout == f"{os.getpid()}\n"


def test_lock_free_after_owner_killed(segment_dir: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(segment_dir), str(WAIT_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(BrokerLockedError) as caught:
            SegmentStore(segment_dir)
        assert caught.value.pid == holder.pid

        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=WAIT_SECONDS) == -signal.SIGKILL
        with SegmentStore(segment_dir) as store:
            assert store.closed is False
            assert (segment_dir / "LOCK").read_text() == f"{os.getpid()}\n"
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=WAIT_SECONDS)
        if holder.stdout is not None:
            holder.stdout.close()


def test_broker_locked_error_pickles() -> None:
    copy = pickle.loads(pickle.dumps(BrokerLockedError("/data", 42)))
    assert copy.path == "/data"
    assert copy.pid == 42


def test_broker_locked_error_without_pid() -> None:
    error = BrokerLockedError("/data", None)
    assert str(error).startswith("data directory /data is locked by another process;")


# threads --------------------------------------------------------------------


def run_threads(count: int, work: Callable[[int], None]) -> list[BaseException]:
    """Run work(0) to work(count - 1) in threads at once, and return their errors."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=WAIT_SECONDS)
            work(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS)
    errors.extend(
        TimeoutError(f"thread {i} still running")
        for i, thread in enumerate(threads)
        if thread.is_alive()
    )
    return errors


def test_append_from_threads_keeps_every_record(segment_dir: Path) -> None:
    thread_count, per_thread = 4, 2000
    offsets: list[list[int]] = [[] for _ in range(thread_count)]

    def work(index: int) -> None:
        for i in range(per_thread):
            offsets[index].append(store.append(b"%d:%05d" % (index, i)))

    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        assert run_threads(thread_count, work) == []
        records = store.read_records(0, store.next_offset)
        assert store.next_offset == thread_count * per_thread

    assert [record[0] for record in records] == list(range(thread_count * per_thread))
    assert sorted(offset for mine in offsets for offset in mine) == list(
        range(thread_count * per_thread)
    )
    for index in range(thread_count):
        mine = [body for _, _, _, body in records if body.startswith(b"%d:" % index)]
        assert mine == [b"%d:%05d" % (index, i) for i in range(per_thread)], index
        assert offsets[index] == sorted(offsets[index]), index
        assert all(
            records[offset][3] == mine[i] for i, offset in enumerate(offsets[index])
        )


def test_large_appends_from_threads_share_lock(segment_dir: Path) -> None:
    # Bodies of 16 KiB and more are copied with the GIL released while the
    # store's lock is held, so the other threads wait for that lock.
    thread_count, per_thread, size = 4, 100, 20_000
    offsets: list[list[int]] = [[] for _ in range(thread_count)]

    def body(index: int, i: int) -> bytes:
        return (b"%d:%05d:" % (index, i)) * (size // 8)

    def work(index: int) -> None:
        for i in range(per_thread):
            offsets[index].append(store.append(body(index, i)))
            if i % 10 == 0:
                store.read_range(max(0, store.next_offset - 5), store.next_offset)

    with SegmentStore(segment_dir, segment_bytes=1 << 20) as store:
        assert run_threads(thread_count, work) == []
        for index in range(thread_count):
            for i, offset in enumerate(offsets[index]):
                assert store.read(offset) == body(index, i), (index, i)
        assert store.next_offset == thread_count * per_thread
        assert store.damaged == 0


def test_append_many_from_threads_keeps_batches_whole(segment_dir: Path) -> None:
    thread_count, batches, batch_size = 4, 200, 10
    firsts: list[list[int]] = [[] for _ in range(thread_count)]

    def work(index: int) -> None:
        for batch in range(batches):
            bodies = [b"%d:%03d:%d" % (index, batch, i) for i in range(batch_size)]
            firsts[index].append(store.append_many(bodies))

    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        assert run_threads(thread_count, work) == []
        for index in range(thread_count):
            for batch, first in enumerate(firsts[index]):
                expected = [
                    b"%d:%03d:%d" % (index, batch, i) for i in range(batch_size)
                ]
                assert store.read_range(first, first + batch_size) == expected
        assert store.next_offset == thread_count * batches * batch_size


def test_fsync_always_threads_sync_every_record(segment_dir: Path) -> None:
    thread_count, per_thread = 4, 200
    body_length = len(b"0:00000")

    def work(index: int) -> None:
        for i in range(per_thread):
            store.append(b"%d:%05d" % (index, i))

    with SegmentStore(segment_dir, segment_bytes=4096, fsync="always") as store:
        assert run_threads(thread_count, work) == []
        stats = store.stats()
        assert stats["next_offset"] == thread_count * per_thread
        assert stats["synced_bytes"] == stats["written_bytes"]
        assert stats["written_bytes"] == thread_count * per_thread * record_size(
            body_length
        )
        bodies = store.read_range(0, store.next_offset)
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        assert store.read_range(0, store.next_offset) == bodies
    assert sorted(bodies) == sorted(
        b"%d:%05d" % (index, i)
        for index in range(thread_count)
        for i in range(per_thread)
    )


def test_fsync_always_threads_sync_every_segment(segment_dir: Path) -> None:
    thread_count, per_thread = 4, 100

    def work(index: int) -> None:
        for i in range(per_thread):
            store.append(b"%d:%05d" % (index, i))

    with SegmentStore(segment_dir, segment_bytes=4096, fsync="always") as store:
        assert run_threads(thread_count, work) == []
        per_segment = 4096 // record_size(7)
        full, rest = divmod(thread_count * per_thread, per_segment)
        lengths = {
            str(segment_dir / segment_file_names(base * per_segment)[0]): (
                per_segment * record_size(7)
            )
            for base in range(full)
        }
        lengths[str(segment_dir / segment_file_names(full * per_segment)[0])] = (
            rest * record_size(7)
        )
        assert store.synced_lengths() == lengths


def test_read_while_appending_sees_whole_records(segment_dir: Path) -> None:
    appends = 3000
    seen: list[int] = []

    def work(index: int) -> None:
        if index == 0:
            for i in range(appends):
                store.append(b"%06d" % i)
            return
        deadline = time.monotonic() + WAIT_SECONDS
        while store.next_offset < appends and time.monotonic() < deadline:
            records = store.read_range(0, store.next_offset)
            bad = [i for i, body in enumerate(records) if body != b"%06d" % i]
            seen.append(len(records))
            assert bad == []

    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        assert run_threads(2, work) == []
        assert store.read_range(0, appends) == [b"%06d" % i for i in range(appends)]
    assert seen == sorted(seen)


def test_close_during_appends_keeps_returned_records(segment_dir: Path) -> None:
    thread_count, max_appends = 4, 20_000
    returned: list[list[tuple[int, bytes]]] = [[] for _ in range(thread_count)]

    def work(index: int) -> None:
        if index == thread_count:
            deadline = time.monotonic() + WAIT_SECONDS
            while store.next_offset < 100 and time.monotonic() < deadline:
                time.sleep(0.001)
            store.close()
            return
        for i in range(max_appends):
            body = b"%d:%05d" % (index, i)
            try:
                returned[index].append((store.append(body), body))
            except ClosedError:
                return

    store = SegmentStore(segment_dir, segment_bytes=512, fsync="always")
    assert run_threads(thread_count + 1, work) == []
    assert store.closed is True
    written = [pair for pairs in returned for pair in pairs]
    with SegmentStore(segment_dir, segment_bytes=512) as reopened:
        assert reopened.next_offset == len(written)
        assert all(reopened.read(offset) == body for offset, body in written)


def test_background_flush_never_syncs_sealed_only(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=SMALL_SEGMENT, fsync="never") as store:
        fill_lone_segments(store, 2)
        store.background_flush()
        assert store.synced_lengths() == {
            str(segment_dir / segment_file_names(0)[0]): record_size(LONE_BODY),
            str(segment_dir / segment_file_names(1)[0]): 0,
        }


def test_background_flush_interval_syncs_everything(segment_dir: Path) -> None:
    with SegmentStore(
        segment_dir, segment_bytes=SMALL_SEGMENT, fsync="interval"
    ) as store:
        fill_lone_segments(store, 2)
        store.background_flush()
        assert store.synced_lengths() == {
            str(segment_dir / segment_file_names(0)[0]): record_size(LONE_BODY),
            str(segment_dir / segment_file_names(1)[0]): record_size(LONE_BODY),
        }


def test_background_flush_after_close_does_nothing(segment_dir: Path) -> None:
    store = SegmentStore(segment_dir)
    store.close()
    assert store.background_flush() is None
    assert store.closed is True


def test_read_timestamp_matches_record(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        offset = store.append(b"body", timestamp=123_456_789)
        assert store.read_timestamp(offset) == 123_456_789
        assert store.read_timestamp(offset) == store.read_record(offset)[1]
