"""Boundary tests of the segment store: sizes at their limits, segment rolls.

A record takes a 32-byte header plus its body padded to a multiple of 8
(tests.model.record_size). The sizes below are chosen from that rule so
that records fill a segment exactly, or miss by one byte.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pymq import ConfigError, MessageTooLargeError, OffsetNotFoundError, SegmentStore
from tests.model import record_size, segment_file_names

WAIT_SECONDS = 60
MEBIBYTE = 1024 * 1024
SEGMENT_FILE = re.compile(r"^[0-9]{20}\.(log|idx)$")

# A child script that appends and exits without closing the store, as a
# crash would. No clean checkpoint is written, so the next open scans.
UNCLEAN_WRITER = """
import os, sys
from pymq import SegmentStore
store = SegmentStore(sys.argv[1], segment_bytes=int(sys.argv[2]), fsync="never")
for _ in range(int(sys.argv[3])):
    store.append(b"x" * int(sys.argv[4]))
os._exit(0)
"""


def segment_files(folder: Path) -> list[str]:
    """Return the sorted names of the .log and .idx files in folder."""
    return sorted(
        path.name for path in folder.iterdir() if path.suffix in {".log", ".idx"}
    )


def expected_files(*bases: int) -> list[str]:
    names: list[str] = []
    for base in bases:
        names.extend(segment_file_names(base))
    return sorted(names)


def write_without_close(
    folder: Path, segment_bytes: int, count: int, body: int
) -> None:
    """Append count bodies of body bytes in a child that skips close()."""
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            UNCLEAN_WRITER,
            str(folder),
            str(segment_bytes),
            str(count),
            str(body),
        ],
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    assert child.returncode == 0, child.stderr


# record sizes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "size"), [(0, 32), (1, 40), (7, 40), (8, 40), (9, 48), (224, 256)]
)
def test_record_size_pads_to_eight(segment_dir: Path, length: int, size: int) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096) as store:
        store.append(b"x" * length)
        assert store.stats()["bytes"] == size
        assert record_size(length) == size


# segments filled exactly ----------------------------------------------------


def test_segment_exact_fill_stays_in_one_segment(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        assert store.append(b"f" * 224) == 0
        assert store.stats()["segments"] == 1
        assert store.stats()["bytes"] == 256
        assert segment_files(segment_dir) == expected_files(0)


def test_segment_exact_fill_next_record_rolls(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.append(b"f" * 224)
        assert store.append(b"") == 1
        assert segment_files(segment_dir) == expected_files(0, 1)
        assert store.read_range(0, 2) == [b"f" * 224, b""]


def test_segment_exact_fill_survives_reopen(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.append(b"f" * 224)
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        assert store.read(0) == b"f" * 224
        assert store.append(b"g") == 1
        assert store.stats()["segments"] == 2


def test_segment_filled_by_two_records_exactly(segment_dir: Path) -> None:
    # 136 + 120 bytes: the second record fits the rest of the segment exactly.
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.append(b"a" * 100)
        store.append(b"b" * 88)
        assert store.stats()["segments"] == 1
        assert store.stats()["bytes"] == 256


def test_record_one_byte_too_long_rolls(segment_dir: Path) -> None:
    # An 89-byte body pads to 96: its 128-byte record misses the 120 left.
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.append(b"a" * 100)
        assert store.append(b"b" * 89) == 1
        assert segment_files(segment_dir) == expected_files(0, 1)
        assert store.stats()["bytes"] == 136 + 128


def test_empty_bodies_fill_segment_then_roll(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.append_many([b""] * 8)
        assert store.stats()["segments"] == 1
        store.append(b"")
        assert segment_files(segment_dir) == expected_files(0, 8)


def test_minimum_segment_holds_one_max_record(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=64) as store:
        assert store.max_message_bytes == 32
        store.append(b"m" * 32)
        store.append(b"n" * 32)
        assert segment_files(segment_dir) == expected_files(0, 1)
        assert store.read_range(0, 2) == [b"m" * 32, b"n" * 32]


# message size limits --------------------------------------------------------


def test_max_message_bytes_default_fits_segment(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        assert store.max_message_bytes == 224


def test_max_message_bytes_default_caps_at_mebibyte(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=2 * MEBIBYTE) as store:
        assert store.max_message_bytes == MEBIBYTE


def test_append_at_max_message_bytes_succeeds(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096, max_message_bytes=100) as store:
        store.append(b"x" * 100)
        assert store.read(0) == b"x" * 100


def test_append_one_byte_over_max_raises(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=4096, max_message_bytes=100) as store:
        with pytest.raises(MessageTooLargeError) as caught:
            store.append(b"x" * 101)
        assert caught.value.size == 101
        assert caught.value.limit == 100
        assert store.next_offset == 0
        assert store.stats()["written_bytes"] == 0


def test_append_largest_record_segment_allows(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256, max_message_bytes=224) as store:
        store.append(b"x" * 224)
        with pytest.raises(MessageTooLargeError, match="message is 225 bytes"):
            store.append(b"x" * 225)
        assert store.next_offset == 1


def test_default_limit_one_mebibyte_body_round_trips(segment_dir: Path) -> None:
    body = bytes(range(256)) * (MEBIBYTE // 256)
    with SegmentStore(segment_dir, segment_bytes=2 * MEBIBYTE) as store:
        store.append(body)
        with pytest.raises(MessageTooLargeError) as caught:
            store.append(body + b"!")
        assert caught.value.size == MEBIBYTE + 1
        assert store.read(0) == body


def test_max_message_bytes_zero_allows_only_empty(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256, max_message_bytes=0) as store:
        store.append(b"")
        with pytest.raises(MessageTooLargeError) as caught:
            store.append(b"x")
        assert caught.value.limit == 0
        assert store.next_offset == 1


def test_segment_bytes_below_minimum_rejected(segment_dir: Path) -> None:
    with pytest.raises(ConfigError, match="segment_bytes is 56; it must be from 64"):
        SegmentStore(segment_dir, segment_bytes=56)


def test_segment_bytes_above_maximum_rejected(segment_dir: Path) -> None:
    message = f"segment_bytes is {2**31 + 8}; it must be from 64 to {2**31}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        SegmentStore(segment_dir, segment_bytes=2**31 + 8)


def test_max_message_bytes_one_past_largest_rejected(segment_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match="max_message_bytes is 33; it must be from 0 to 32"
    ):
        SegmentStore(segment_dir, segment_bytes=64, max_message_bytes=33)


# segment rolls and files ----------------------------------------------------


def test_segment_files_are_named_by_first_offset(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.append_many([b"%08d" % i for i in range(6)])  # 6 x 40 = 240 bytes
        store.append(b"a" * 100)
        store.append(b"b" * 100)
        names = segment_files(segment_dir)
    assert names == [
        "00000000000000000000.idx",
        "00000000000000000000.log",
        "00000000000000000006.idx",
        "00000000000000000006.log",
        "00000000000000000007.idx",
        "00000000000000000007.log",
    ]
    assert all(SEGMENT_FILE.match(name) for name in names)


def test_segment_name_of_large_offset(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.ensure_next_offset(10**15)
        store.append(b"far")
        assert segment_files(segment_dir) == [
            "00001000000000000000.idx",
            "00001000000000000000.log",
        ]
        assert store.read(10**15) == b"far"


def test_segment_log_files_are_preallocated(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        for i in range(3):
            store.append(b"%d" % i * 100)
        sizes = {path.name: path.stat().st_size for path in segment_dir.glob("*.log")}
    assert sizes == {
        "00000000000000000000.log": 256,
        "00000000000000000001.log": 256,
        "00000000000000000002.log": 256,
    }


def test_append_many_batch_rolls_mid_batch(segment_dir: Path) -> None:
    # Records of 136 bytes: one per 256-byte segment, five in one call.
    bodies = [b"%d" % i * 100 for i in range(5)]
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.append(b"a" * 100)
        assert store.append_many(bodies) == 1
        assert segment_files(segment_dir) == expected_files(0, 1, 2, 3, 4, 5)
        assert store.read_range(1, 6) == bodies


def test_append_buffer_batch_rolls_mid_batch(segment_dir: Path) -> None:
    bodies = [b"%d" % i * 100 for i in range(4)]
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.append_buffer(b"".join(bodies), np.full(4, 100, dtype=np.uint32))
        assert store.stats()["segments"] == 4
        assert store.read_range(0, 4) == bodies


@pytest.mark.parametrize("large", [0, 2, 4])
def test_batch_with_large_body_verifies(segment_dir: Path, large: int) -> None:
    # Bodies of 16 KiB and more are copied without the GIL, one at a time;
    # the others of the batch go in one pass.
    bodies = [b"%d" % i * 9 for i in range(5)]
    bodies[large] = bytes(range(256)) * 64
    with SegmentStore(segment_dir, segment_bytes=1 << 20) as store:
        assert store.append_many(bodies) == 0
        assert store.append_many(bodies[:2]) == 5
        assert store.read_range(0, 7) == bodies + bodies[:2]
    with SegmentStore(segment_dir, segment_bytes=1 << 20) as store:
        assert store.read_range(0, 7) == bodies + bodies[:2]
        assert store.verify() == {"records": 7, "missing": 0, "damaged": []}


def test_batch_filling_segment_exactly(segment_dir: Path) -> None:
    # Eight records of 32 bytes fill a 256-byte segment to its last byte.
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        assert store.append_many([b""] * 8) == 0
        assert store.stats()["segments"] == 1
        assert store.append_many([b"", b"x"]) == 8
        assert store.stats()["segments"] == 2
        assert store.read_range(0, 10) == [b""] * 9 + [b"x"]
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        assert store.verify() == {"records": 10, "missing": 0, "damaged": []}


def test_index_growth_keeps_every_offset(segment_dir: Path) -> None:
    # 2,048 empty bodies fill a 64 KiB segment, and its index grows past
    # its first 4 KiB on the way.
    count = 65536 // record_size(0)
    with SegmentStore(segment_dir, segment_bytes=65536) as store:
        for _ in range(count // 2):
            store.append(b"")
        store.append_many([b""] * (count - count // 2))
        assert store.stats()["segments"] == 1
        assert store.stats()["bytes"] == 65536
    with SegmentStore(segment_dir, segment_bytes=65536) as store:
        assert store.read_records(0, count)[-1][0] == count - 1
        assert len(store.read_range(0, count)) == count
        assert store.verify() == {"records": count, "missing": 0, "damaged": []}


@pytest.mark.slow
def test_rollover_ten_thousand_segments_then_reopen(segment_dir: Path) -> None:
    # An 8-byte body takes 40 bytes, so every 64-byte segment contains one.
    # close() syncs each segment and its index on its own, which takes most
    # of the run time.
    count = 10_000
    bodies = [b"%08d" % i for i in range(count)]
    with SegmentStore(segment_dir, segment_bytes=64) as store:
        for body in bodies:
            store.append(body)
        assert store.stats()["segments"] == count
    assert len(segment_files(segment_dir)) == 2 * count
    with SegmentStore(segment_dir, segment_bytes=64) as store:
        assert store.next_offset == count
        assert store.stats()["segments"] == count
        assert store.read_range(0, count) == bodies
        assert store.read(count - 1) == bodies[-1]


def test_reopen_with_larger_segment_bytes_keeps_records(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        for i in range(3):
            store.append(b"%d" % i * 100)
    with SegmentStore(segment_dir, segment_bytes=512) as store:
        assert store.read_range(0, 3) == [b"0" * 100, b"1" * 100, b"2" * 100]
        # The last segment grows to the new size and takes more records.
        store.append(b"3" * 100)
        assert store.stats()["segments"] == 3
        assert store.read(3) == b"3" * 100


# reading at the ends --------------------------------------------------------


def test_read_range_at_next_offset_is_empty(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.append(b"f" * 224)
        assert store.read_range(1, 2**64 - 1) == []
        assert store.read_records(1, 10) == []


def test_read_views_of_full_segment_end_at_capacity(segment_dir: Path) -> None:
    with SegmentStore(segment_dir, segment_bytes=256) as store:
        store.append(b"f" * 224)
        (view,) = store.read_views(0, 5)
        assert view.nbytes == 224
        assert bytes(view[-1:]) == b"f"
        view.release()


def test_read_offset_past_uint64_raises_overflow(segment_dir: Path) -> None:
    with (
        SegmentStore(segment_dir) as store,
        pytest.raises(OverflowError, match="too large to convert"),
    ):
        store.read(2**64)


def test_read_last_uint64_offset_not_found(segment_dir: Path) -> None:
    with SegmentStore(segment_dir) as store:
        store.append(b"a")
        with pytest.raises(OffsetNotFoundError) as caught:
            store.read(2**64 - 1)
        assert caught.value.offset == 2**64 - 1


def test_reopen_full_segment_after_unclean_exit(segment_dir: Path) -> None:
    write_without_close(segment_dir, 256, 1, 224)
    messages: list[str] = []
    with SegmentStore(
        segment_dir, segment_bytes=256, on_damage=messages.append
    ) as store:
        assert store.next_offset == 1
        assert store.read(0) == b"x" * 224
        assert store.append(b"next") == 1
    assert messages == []


def test_reopen_full_sealed_segments_after_unclean_exit(segment_dir: Path) -> None:
    write_without_close(segment_dir, 64, 5, 32)
    messages: list[str] = []
    with SegmentStore(
        segment_dir, segment_bytes=64, on_damage=messages.append
    ) as store:
        assert store.next_offset == 5
        assert store.read_range(0, 5) == [b"x" * 32] * 5
        assert store.verify() == {"records": 5, "missing": 0, "damaged": []}
    assert messages == []


# offset limits --------------------------------------------------------------


def test_ensure_next_offset_largest_allowed(segment_dir: Path) -> None:
    with SegmentStore(segment_dir) as store:
        store.ensure_next_offset(2**63 - 1)
        assert store.append(b"last") == 2**63 - 1
        assert store.next_offset == 2**63
        assert store.read(2**63 - 1) == b"last"


@pytest.mark.parametrize("offset", [2**63, 2**64 - 1])
def test_ensure_next_offset_past_limit_raises(segment_dir: Path, offset: int) -> None:
    with SegmentStore(segment_dir) as store:
        store.append(b"a")
        message = f"offset is {offset}; it must be at most {2**63 - 1}"
        with pytest.raises(ValueError, match=re.escape(message)):
            store.ensure_next_offset(offset)
        assert store.next_offset == 1
        assert store.append(b"b") == 1


def test_min_next_offset_past_limit_raises(segment_dir: Path) -> None:
    message = f"min_next_offset is {2**63}; it must be at most {2**63 - 1}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        SegmentStore(segment_dir, min_next_offset=2**63)


# the spare segment ----------------------------------------------------------


def test_spare_segment_takes_next_roll(segment_dir: Path) -> None:
    # Past half of a 1 MiB segment the store creates a spare segment, and
    # the next roll renames it to the new segment's name.
    body = b"s" * (256 * 1024)
    with SegmentStore(segment_dir, segment_bytes=MEBIBYTE) as store:
        store.append_many([body, body, body])
        assert sorted(p.name for p in segment_dir.glob("spare.*")) == [
            "spare.idx",
            "spare.log",
        ]
        store.append(body)
        assert segment_files(segment_dir) == expected_files(0, 3)
        assert (segment_dir / segment_file_names(3)[0]).stat().st_size == MEBIBYTE
        assert store.read_range(0, 4) == [body] * 4
    assert list(segment_dir.glob("spare.*")) == []


def test_spare_segment_not_listed_after_reopen(segment_dir: Path) -> None:
    body = b"s" * (256 * 1024)
    with SegmentStore(segment_dir, segment_bytes=MEBIBYTE) as store:
        store.append_many([body, body, body])
    with SegmentStore(segment_dir, segment_bytes=MEBIBYTE) as store:
        assert store.stats()["segments"] == 1
        assert store.read_range(0, 3) == [body] * 3
        assert store.append(body) == 3


def test_spare_segment_takes_ensure_next_offset(segment_dir: Path) -> None:
    body = b"s" * (256 * 1024)
    with SegmentStore(segment_dir, segment_bytes=MEBIBYTE) as store:
        store.append_many([body, body, body])
        store.ensure_next_offset(100)
        assert segment_files(segment_dir) == expected_files(0, 100)
        assert store.append(b"after") == 100
        assert store.read(100) == b"after"
    assert os.listdir(segment_dir).count("spare.log") == 0
