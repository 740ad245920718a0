"""Damaged segment files: bytes patched at the offsets documented in segment.pxd.

Damage in "verified" data (covered by a checkpoint, after close) is found by
the CRC on read and by verify(). Damage in the "unverified" tail (written
after the last checkpoint, by a writer that exited without closing) is found
when the store opens and scans it. Either way only the damaged records are
lost, and every finding is logged at WARNING on the pymq.storage logger.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

import pymq
from pymq.errors import CorruptSegmentError, OffsetNotFoundError
from tests.recovery.writer import make_body, run_writer

SEGMENT_BYTES = 4096
# Records written by every test here. They fill 3 segments and part of a 4th.
COUNT = 100

# Record header fields (segment.pxd): byte offset in the 32-byte header.
RECORD_FIELDS = {
    "magic": 0,
    "length": 4,
    "offset": 8,
    "timestamp": 16,
    "flags": 24,
    "crc": 28,
    "body": 32,
}
# Index header fields (segment.pxd): byte offset in the 64-byte header.
INDEX_FIELDS = {
    "magic": 0,
    "version": 4,
    "base": 8,
    "count": 16,
    "length": 24,
    "flags": 32,
    "capacity": 36,
    "crc": 60,
}
REC_MAGIC = 0x52514D50
REC_HEADER_SIZE = 32


class Record(NamedTuple):
    position: int  # byte position of the header in the segment file
    offset: int
    size: int  # header, body and padding


def parse_records(path: Path) -> list[Record]:
    """Return the records of a log file, read by the layout in segment.pxd."""
    data = path.read_bytes()
    records = []
    position = 0
    while position + REC_HEADER_SIZE <= len(data):
        magic, length, offset = struct.unpack_from("<IIQ", data, position)
        if magic != REC_MAGIC:
            break
        size = REC_HEADER_SIZE + (length + 7) // 8 * 8
        records.append(Record(position, offset, size))
        position += size
    return records


def segment_logs(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log"))


def flip_byte(path: Path, position: int) -> None:
    with open(path, "r+b") as file:
        file.seek(position)
        value = file.read(1)[0]
        file.seek(position)
        file.write(bytes([value ^ 0xFF]))


def zero_bytes(path: Path, start: int, stop: int) -> None:
    with open(path, "r+b") as file:
        file.seek(start)
        file.write(bytes(stop - start))


BODIES = [make_body(0, index) for index in range(COUNT)]


def write_closed(directory: Path) -> None:
    """Write the known records and close the store: all of it is verified."""
    with pymq.SegmentStore(directory, segment_bytes=SEGMENT_BYTES) as store:
        for body in BODIES:
            store.append(body)


def write_unclosed(directory: Path) -> None:
    """Write the known records in a writer that exits without closing."""
    result = run_writer("tail", directory, SEGMENT_BYTES, COUNT)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def closed_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("closed") / "log"
    write_closed(directory)
    return directory


@pytest.fixture(scope="module")
def unclosed_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("unclosed") / "log"
    write_unclosed(directory)
    return directory


OpenStore = Callable[..., pymq.SegmentStore]


@pytest.fixture
def open_logged(caplog: pytest.LogCaptureFixture) -> Iterator[OpenStore]:
    """Return a function that opens a store with open_store, its log captured.

    Every store it opened is closed after the test.
    """
    caplog.set_level(logging.WARNING, logger="pymq.storage")
    stores: list[pymq.SegmentStore] = []

    def open_(directory: Path, segment_bytes: int = SEGMENT_BYTES) -> pymq.SegmentStore:
        store = pymq.open_store(directory, segment_bytes=segment_bytes)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.close()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "pymq.storage" and record.levelno == logging.WARNING
    ]


def names_position(messages: list[str], segment: Path, position: int) -> bool:
    """Tell whether a message names the segment file and the byte position.

    The position is "byte N", or either end of "bytes N to M".
    """
    pattern = re.compile(
        rf"\bbytes? (?:\d+ to )?{position}\b|\bbytes \d+ to {position}\b"
    )
    return any(
        segment.name in message and pattern.search(message) for message in messages
    )


# Truncation --------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_damage_cut_last_record_at_every_byte(
    closed_template: Path,
    tmp_path: Path,
    damage: str,
    open_logged: OpenStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    last_log = segment_logs(closed_template)[-1]
    last = parse_records(last_log)[-1]
    assert last.offset == COUNT - 1
    data = last_log.read_bytes()

    for cut in range(last.position, last.position + last.size):
        where = f"cut at byte {cut}"
        directory = tmp_path / f"cut{cut}"
        shutil.copytree(closed_template, directory)
        if damage == "truncate":
            os.truncate(directory / last_log.name, cut)
        else:
            zero_bytes(directory / last_log.name, cut, SEGMENT_BYTES)
        caplog.clear()
        store = open_logged(directory)
        try:
            if not any(data[cut : last.position + last.size]):
                # Only zero bytes (padding) were cut, and the open extends
                # the file with zeros again: the record is whole.
                assert store.next_offset == COUNT, where
                assert store.read(COUNT - 1) == BODIES[-1], where
                continue
            assert store.read_range(0, COUNT) == BODIES[:-1], where
            # The record was checkpointed: its offset stays taken, counted
            # as damaged, and the next append continues after it.
            assert store.next_offset == COUNT, where
            assert store.damaged == 1, where
            assert store.append(b"after the cut") == COUNT, where
            assert store.read(COUNT) == b"after the cut", where
            assert names_position(warnings(caplog), last_log, last.position), where
        finally:
            store.close()


def test_damage_cut_checkpointed_tail_keeps_offsets(
    segment_dir: Path, open_logged: OpenStore, caplog: pytest.LogCaptureFixture
) -> None:
    write_closed(segment_dir)
    with pymq.SegmentStore(segment_dir, segment_bytes=SEGMENT_BYTES) as store:
        store.append(b"one more")
        highest = store.next_offset
    last_log = segment_logs(segment_dir)[-1]
    last = parse_records(last_log)[-1]
    assert last.offset == highest - 1
    os.truncate(last_log, last.position + 1)

    store = open_logged(segment_dir)
    assert names_position(warnings(caplog), last_log, last.position)
    assert store.next_offset == highest
    assert store.ensure_next_offset(highest) == 0
    assert store.append(b"after the cut") == highest
    assert store.read(highest) == b"after the cut"
    with pytest.raises(OffsetNotFoundError):
        store.read(highest - 1)
    assert store.stats()["damaged"] == 1
    assert store.stats()["gap_offsets"] == 0
    assert store.read_range(0, COUNT) == BODIES


# Flipped bytes -----------------------------------------------------------


def middle_record(directory: Path, segment: int) -> tuple[Path, Record]:
    log = segment_logs(directory)[segment]
    records = parse_records(log)
    return log, records[len(records) // 2]


@pytest.mark.parametrize("segment", [0, -1], ids=["sealed", "last"])
@pytest.mark.parametrize("field", RECORD_FIELDS)
def test_damage_flipped_field_in_unverified_tail(
    unclosed_template: Path,
    tmp_path: Path,
    field: str,
    segment: int,
    open_logged: OpenStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "log"
    shutil.copytree(unclosed_template, directory)
    log, record = middle_record(directory, segment)
    following = parse_records(log)[parse_records(log).index(record) + 1]
    flip_byte(log, record.position + RECORD_FIELDS[field])

    store = open_logged(directory)
    assert store.damaged == 1
    with pytest.raises(OffsetNotFoundError):
        store.read(record.offset)
    assert store.read(record.offset + 1) == BODIES[record.offset + 1]
    survivors = BODIES[: record.offset] + BODIES[record.offset + 1 :]
    assert store.read_range(0, COUNT) == survivors
    assert store.next_offset == COUNT
    assert store.verify()["missing"] == 1
    assert names_position(warnings(caplog), log, record.position)
    assert names_position(warnings(caplog), log, following.position)


@pytest.mark.parametrize("segment", [0, -1], ids=["sealed", "last"])
@pytest.mark.parametrize("field", RECORD_FIELDS)
def test_damage_flipped_field_in_verified_data_read(
    closed_template: Path,
    tmp_path: Path,
    field: str,
    segment: int,
    open_logged: OpenStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "log"
    shutil.copytree(closed_template, directory)
    log, record = middle_record(directory, segment)
    flip_byte(log, record.position + RECORD_FIELDS[field])

    store = open_logged(directory)
    assert warnings(caplog) == []
    with pytest.raises(CorruptSegmentError) as caught:
        store.read(record.offset)
    assert caught.value.path == str(log)
    assert caught.value.offset == record.offset
    assert store.damaged == 1
    assert names_position(warnings(caplog), log, record.position)
    survivors = BODIES[: record.offset] + BODIES[record.offset + 1 :]
    assert store.read_range(0, COUNT) == survivors
    with pytest.raises(OffsetNotFoundError):
        store.read(record.offset)
    assert store.next_offset == COUNT


@pytest.mark.parametrize("field", RECORD_FIELDS)
def test_damage_flipped_field_found_by_verify(
    closed_template: Path,
    tmp_path: Path,
    field: str,
    open_logged: OpenStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "log"
    shutil.copytree(closed_template, directory)
    log, record = middle_record(directory, 1)
    flip_byte(log, record.position + RECORD_FIELDS[field])

    store = open_logged(directory)
    report = store.verify()
    assert report["damaged"] == [(str(log), record.offset)]
    assert report["records"] == COUNT - 1
    assert store.damaged == 1
    assert names_position(warnings(caplog), log, record.position)
    assert store.verify()["damaged"] == []


def test_damage_sealed_segment_last_record_counted(
    closed_template: Path,
    tmp_path: Path,
    open_logged: OpenStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The checkpoint of the sealed segment covers its last record, which
    # proves that this offset had a record before the damage.
    directory = tmp_path / "log"
    shutil.copytree(closed_template, directory)
    log = segment_logs(directory)[0]
    last = parse_records(log)[-1]
    flip_byte(log, last.position + RECORD_FIELDS["body"])

    store = open_logged(directory)
    assert names_position(warnings(caplog), log, last.position)
    with pytest.raises(OffsetNotFoundError):
        store.read(last.offset)
    assert store.read(last.offset + 1) == BODIES[last.offset + 1]
    assert store.damaged == 1
    assert store.verify()["missing"] == 1


# A zeroed 4 KiB hole -----------------------------------------------------

HOLE_SEGMENT_BYTES = 64 * 1024
HOLE_START = 16 * 1024
HOLE_STOP = HOLE_START + 4096
HOLE_COUNT = 600


def hole_hits(log: Path) -> tuple[list[int], Record]:
    """Return the offsets of the records the hole touches, and the next record."""
    records = parse_records(log)
    hits = [
        record.offset
        for record in records
        if record.position < HOLE_STOP and record.position + record.size > HOLE_START
    ]
    following = next(record for record in records if record.position >= HOLE_STOP)
    return hits, following


@pytest.mark.parametrize("closed", [True, False], ids=["verified", "unverified"])
def test_damage_zeroed_hole_loses_touched_records(
    segment_dir: Path,
    closed: bool,
    open_logged: OpenStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bodies = [make_body(0, index) for index in range(HOLE_COUNT)]
    if closed:
        with pymq.SegmentStore(segment_dir, segment_bytes=HOLE_SEGMENT_BYTES) as store:
            for body in bodies:
                store.append(body)
    else:
        result = run_writer("tail", segment_dir, HOLE_SEGMENT_BYTES, HOLE_COUNT)
        assert result.returncode == 0, result.stderr
    log = segment_logs(segment_dir)[0]
    hits, following = hole_hits(log)
    first_hit = parse_records(log)[hits[0]]
    assert len(hits) > 10
    zero_bytes(log, HOLE_START, HOLE_STOP)

    store = open_logged(segment_dir, HOLE_SEGMENT_BYTES)
    if closed:
        with pytest.raises(CorruptSegmentError) as caught:
            store.read(hits[0])
        assert caught.value.offset == hits[0]
        damaged = [offset for _, offset in store.verify()["damaged"]]
        assert damaged == hits[1:]
    else:
        assert names_position(warnings(caplog), log, following.position)
    assert names_position(warnings(caplog), log, first_hit.position)
    assert store.damaged == len(hits)
    for offset in hits:
        with pytest.raises(OffsetNotFoundError):
            store.read(offset)
    survivors = [body for index, body in enumerate(bodies) if index not in hits]
    assert store.read_range(0, HOLE_COUNT) == survivors
    assert store.next_offset == HOLE_COUNT


# The index ---------------------------------------------------------------


def assert_all_readable(store: pymq.SegmentStore) -> None:
    assert store.read_range(0, COUNT) == BODIES
    assert store.next_offset == COUNT
    assert store.append(b"after the rebuild") == COUNT
    assert store.read(COUNT) == b"after the rebuild"


@pytest.mark.parametrize("segment", [0, -1], ids=["sealed", "last"])
def test_damage_deleted_index_rebuilt_from_log(
    closed_template: Path,
    tmp_path: Path,
    segment: int,
    open_logged: OpenStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "log"
    shutil.copytree(closed_template, directory)
    log = segment_logs(directory)[segment]
    log.with_suffix(".idx").unlink()

    store = open_logged(directory)
    assert any(log.name in message for message in warnings(caplog))
    assert any("rebuilding" in message for message in warnings(caplog))
    assert_all_readable(store)
    store.close()

    # The rebuilt index was written back: a second open finds nothing.
    caplog.clear()
    store = open_logged(directory)
    assert warnings(caplog) == []
    assert store.read_range(0, COUNT + 1) == [*BODIES, b"after the rebuild"]


def test_damage_wrong_index_entry_fixed_on_read(
    closed_template: Path,
    tmp_path: Path,
    open_logged: OpenStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "log"
    shutil.copytree(closed_template, directory)
    log, record = middle_record(directory, 0)
    index = log.with_suffix(".idx")
    entry = 64 + (record.offset - parse_records(log)[0].offset) * 4
    with open(index, "r+b") as file:
        file.seek(entry)
        # Point into the middle of the record's body instead of its header.
        file.write((record.position + 40).to_bytes(4, "little"))

    store = open_logged(directory)
    assert store.read(record.offset) == BODIES[record.offset]
    assert store.damaged == 0
    assert any(
        f"offset {record.offset}" in message and "fixed" in message
        for message in warnings(caplog)
    )
    assert store.read_range(0, COUNT) == BODIES
    store.close()


@pytest.mark.parametrize("segment", [0, -1], ids=["sealed", "last"])
@pytest.mark.parametrize("field", INDEX_FIELDS)
def test_damage_garbled_index_header_rebuilt(
    closed_template: Path,
    tmp_path: Path,
    field: str,
    segment: int,
    open_logged: OpenStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "log"
    shutil.copytree(closed_template, directory)
    log = segment_logs(directory)[segment]
    flip_byte(log.with_suffix(".idx"), INDEX_FIELDS[field])

    store = open_logged(directory)
    assert any(log.name in message for message in warnings(caplog))
    assert any("rebuilding" in message for message in warnings(caplog))
    assert_all_readable(store)


# A next segment left empty or half created -------------------------------


@pytest.mark.parametrize(
    ("log_bytes", "index_bytes"),
    [
        (0, None),
        (SEGMENT_BYTES, None),
        (SEGMENT_BYTES // 2, 0),
        (SEGMENT_BYTES, 4096),
    ],
    ids=["empty-log", "zeroed-log", "short-log-empty-index", "zeroed-log-and-index"],
)
def test_damage_empty_next_segment_takes_appends(
    closed_template: Path,
    tmp_path: Path,
    log_bytes: int,
    index_bytes: int | None,
    open_logged: OpenStore,
) -> None:
    directory = tmp_path / "log"
    shutil.copytree(closed_template, directory)
    segments = len(segment_logs(directory))
    name = f"{COUNT:020d}"
    (directory / f"{name}.log").write_bytes(bytes(log_bytes))
    if index_bytes is not None:
        (directory / f"{name}.idx").write_bytes(bytes(index_bytes))

    store = open_logged(directory)
    assert store.next_offset == COUNT
    assert store.stats()["segments"] == segments + 1
    assert store.append(b"first of the new segment") == COUNT
    assert store.read(COUNT) == b"first of the new segment"
    assert store.read_range(0, COUNT) == BODIES
    store.close()
    new_records = parse_records(directory / f"{name}.log")
    assert [record.offset for record in new_records] == [COUNT]
    assert os.path.getsize(directory / f"{name}.log") == SEGMENT_BYTES
