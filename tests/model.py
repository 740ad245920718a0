"""A plain-Python model of pymq's segment store, for model-based tests.

The model keeps every record in memory and places it in segments by the
store's rule. A record takes a 32-byte header plus its body rounded up to a
multiple of 8. It starts a new segment when it does not fit the rest of the
active one, and every segment has a capacity of segment_bytes.

It writes nothing to disk. reopen() resets what a reopened store counts
only since it was opened (written_bytes); records, offsets and segments are
kept.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

RECORD_HEADER_BYTES = 32
RECORD_ALIGN = 8
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


def record_size(length: int) -> int:
    """Return the bytes a record with a body of length bytes takes in a segment."""
    padded = (length + RECORD_ALIGN - 1) // RECORD_ALIGN * RECORD_ALIGN
    return RECORD_HEADER_BYTES + padded


def segment_file_names(base: int) -> tuple[str, str]:
    """Return the log and index file names of the segment whose first offset is base."""
    name = f"{base:020d}"
    return f"{name}.log", f"{name}.idx"


@dataclass(frozen=True)
class ModelRecord:
    """One record as read_records() returns it."""

    offset: int
    timestamp: int
    flags: int
    body: bytes

    def as_tuple(self) -> tuple[int, int, int, bytes]:
        return (self.offset, self.timestamp, self.flags, self.body)


@dataclass
class ModelSegment:
    """A segment: its first offset, its records in order and the bytes they use."""

    base: int
    records: list[ModelRecord] = field(default_factory=list)
    used_bytes: int = 0

    @property
    def end(self) -> int:
        """The offset after the segment's last record."""
        return self.base + len(self.records)


class StoreModel:
    """The expected state of a SegmentStore after a sequence of operations."""

    def __init__(self, segment_bytes: int, max_message_bytes: int | None = None):
        largest = segment_bytes - RECORD_HEADER_BYTES
        if max_message_bytes is None:
            max_message_bytes = min(DEFAULT_MAX_MESSAGE_BYTES, largest)
        self.segment_bytes = segment_bytes
        self.max_message_bytes = max_message_bytes
        self.segments: list[ModelSegment] = [ModelSegment(base=0)]
        self.written_bytes = 0

    @property
    def gap_offsets(self) -> int:
        """Offsets between segments: skipped, never written."""
        return sum(
            later.base - earlier.end
            for earlier, later in itertools.pairwise(self.segments)
        )

    @property
    def active(self) -> ModelSegment:
        return self.segments[-1]

    @property
    def first_offset(self) -> int:
        return self.segments[0].base

    @property
    def next_offset(self) -> int:
        return self.active.end

    def fits(self, bodies: list[bytes]) -> bool:
        """Return whether every body is within max_message_bytes."""
        return all(len(body) <= self.max_message_bytes for body in bodies)

    def append_many(self, bodies: list[bytes], timestamp: int, flags: int) -> int:
        """Append bodies at consecutive offsets and return the first offset.

        The caller checks fits() first: the store writes nothing when a
        body is too large, so the model has no partial state to undo.
        """
        if not self.fits(bodies):
            raise ValueError("a body is larger than max_message_bytes")
        first = self.next_offset
        for body in bodies:
            size = record_size(len(body))
            if size > self.segment_bytes - self.active.used_bytes:
                self.segments.append(ModelSegment(base=self.next_offset))
            segment = self.active
            segment.records.append(
                ModelRecord(segment.end, timestamp, flags, bytes(body))
            )
            segment.used_bytes += size
            self.written_bytes += size
        return first

    def ensure_next_offset(self, offset: int) -> int:
        """Move the next offset up to offset and return the offsets skipped.

        An empty active segment takes offset as its first offset; otherwise
        a new, empty segment starts at offset.
        """
        if offset <= self.next_offset:
            return 0
        skipped = offset - self.next_offset
        if self.active.records:
            self.segments.append(ModelSegment(base=offset))
        else:
            self.active.base = offset
        return skipped

    def delete_below(self, offset: int) -> int:
        """Drop the segments whose records are all below offset, and count them.

        The active segment always stays.
        """
        deleted = 0
        while len(self.segments) > 1 and self.segments[0].end <= offset:
            del self.segments[0]
            deleted += 1
        return deleted

    def reopen(self) -> None:
        """Forget the counters a store keeps only since it was opened."""
        self.written_bytes = 0

    def find(self, offset: int) -> ModelRecord | None:
        """Return the record at offset, or None when it has none."""
        for segment in self.segments:
            if segment.base <= offset < segment.end:
                return segment.records[offset - segment.base]
        return None

    def in_log(self, offset: int) -> bool:
        """Return whether offset lies from first_offset up to next_offset."""
        return self.first_offset <= offset < self.next_offset

    def records_between(self, start: int, stop: int) -> list[ModelRecord]:
        """Return the records of offsets start to stop - 1, gaps left out."""
        return [
            record
            for segment in self.segments
            for record in segment.records
            if start <= record.offset < stop
        ]

    def record_count(self) -> int:
        return sum(len(segment.records) for segment in self.segments)

    def file_names(self) -> set[str]:
        """Return the names of every segment file the store's folder must contain."""
        names = set()
        for segment in self.segments:
            names.update(segment_file_names(segment.base))
        return names

    def stats(self) -> dict[str, int]:
        """Return the counts SegmentStore.stats() must report, synced_bytes aside."""
        return {
            "segments": len(self.segments),
            "bytes": sum(segment.used_bytes for segment in self.segments),
            "first_offset": self.first_offset,
            "next_offset": self.next_offset,
            "damaged": 0,
            "gap_offsets": self.gap_offsets,
            "written_bytes": self.written_bytes,
        }
