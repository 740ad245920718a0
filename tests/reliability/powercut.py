"""Simulated power cuts, on a copy of a data directory taken while its owner is stopped.

After a power cut, the bytes a store synced are intact, and any byte past
them may be what was written (the page was written back), zero (the write
never reached the disk) or garbage (a torn write). damage_copy() applies one
of these to every byte past the synced length of each segment file, and
past the checkpointed entries of each index file, as
tests/recovery/test_power_cut.py does for a single store.

A cut must never go below a byte that was synced when the copy was taken:
the copy would then hold a state no power cut can leave. A journal could
keep the record of a move to a dead-letter queue, written after the DLQ's
put was synced, while the put itself is cut away. So the cut keeps the
longest of:

- the synced length, read from the owner after the copy, when it has gone
  on: the stores synced at least that much when the copy was taken;
- the length a sound checkpoint covers, because the log was synced that far
  before the checkpoint was written;
- the end of the segment's last record when the owner started
  (indexed_lengths()). An owner started after a kill reports as synced only
  what its checkpoints cover and what it synced itself, while the killed
  owner may have synced more and returned those puts.

A cut past what was synced keeps bytes that may not have reached the disk,
which is one outcome of a power cut, so it is always sound. But it cannot
show a store that returned from a put before syncing its record, if the
sync came before the lengths were read. unsynced_records() checks that
directly, against lengths read before the copy.
"""

from __future__ import annotations

import bisect
import os
import random
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from pymq._core import crc32c

PAGE_BYTES: Final = 4096
CHUNK_BYTES: Final = 1 << 20
SEGMENT_NAME: Final = re.compile(r"^[0-9]{20}\.(log|idx)$")
# The 64-byte index header (docs/storage.md): magic, version, base, count,
# length, then the CRC32C of bytes 0-59 at byte 60.
INDEX_HEADER: Final = struct.Struct("<IIQQQ")
INDEX_MAGIC: Final = 0x58514D50
INDEX_HEADER_BYTES: Final = 64
INDEX_ENTRY_BYTES: Final = 4
# An index entry whose offset has no record (lost to damage, or a gap).
INDEX_MISSING: Final = 0xFFFFFFFF
# The first 16 bytes of a record's 32-byte header (src/core/segment.pxd):
# magic, body length, offset. Bodies are padded to a multiple of 8 bytes.
RECORD_START: Final = struct.Struct("<IIQ")
RECORD_OFFSET_END: Final = RECORD_START.size
RECORD_MAGIC: Final = 0x52514D50
RECORD_HEADER_BYTES: Final = 32
RECORD_ALIGN: Final = 8
MODES: Final = ("zero", "garble", "pages")


def copy_sparse(source: Path, copy: Path) -> dict[str, int]:
    """Copy the folder tree source to copy, leaving all-zero chunks as holes.

    Segment files are preallocated and mostly zero, so this writes only
    what the stores wrote. Returns {path relative to copy: data end}, where
    data end is one past the file's last non-zero byte.
    """
    ends: dict[str, int] = {}
    for folder, _, names in os.walk(source):
        relative = os.path.relpath(folder, source)
        (copy / relative).mkdir(parents=True, exist_ok=True)
        for name in names:
            path = os.path.join(relative, name)
            ends[os.path.normpath(path)] = _copy_file(source / path, copy / path)
    return ends


def _copy_file(source: Path, target: Path) -> int:
    data_end = 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        size = os.fstat(reader.fileno()).st_size
        writer.truncate(size)
        position = 0
        while True:
            chunk = reader.read(CHUNK_BYTES)
            if not chunk:
                break
            used = chunk.rstrip(b"\0")
            if used:
                writer.seek(position)
                writer.write(used)
                data_end = position + len(used)
            position += len(chunk)
    return data_end


def read_checkpoint(index: Path, base: int) -> tuple[int, int] | None:
    """Return (count, length) of the index header of the segment at base.

    Returns None when the header is missing or fails its checks.
    """
    try:
        with open(index, "rb") as file:
            header = file.read(INDEX_HEADER_BYTES)
    except FileNotFoundError:
        return None
    if len(header) < INDEX_HEADER_BYTES:
        return None
    magic, version, header_base, count, length = INDEX_HEADER.unpack_from(header)
    (crc,) = struct.unpack_from("<I", header, 60)
    if (magic, version, header_base) != (INDEX_MAGIC, 1, base) or crc != crc32c(
        header[:60]
    ):
        return None
    return count, length


def indexed_lengths(data: Path) -> dict[str, int]:
    """Return {segment log path relative to data: end of its last indexed record}.

    No process may be writing to data. A store writes a record's index
    entry in the same locked step as the record, before any sync can cover
    it, so every record that an owner synced ends at or before this length.
    """
    lengths: dict[str, int] = {}
    for folder, _, names in os.walk(data):
        for name in names:
            if SEGMENT_NAME.match(name) and name.endswith(".log"):
                log = Path(folder) / name
                relative = os.path.normpath(os.path.relpath(log, data))
                lengths[relative] = _indexed_length(log, log.with_suffix(".idx"))
    return lengths


def _indexed_length(log: Path, index: Path) -> int:
    try:
        entries = index.read_bytes()[INDEX_HEADER_BYTES:]
    except FileNotFoundError:
        return 0
    # Entries past the last record are zero, and positions grow with the
    # offset, so the last record has the last entry that is neither zero nor
    # missing. Only the first record, at byte 0, has a zero entry.
    used = entries.rstrip(b"\0")
    end = -(-len(used) // INDEX_ENTRY_BYTES) * INDEX_ENTRY_BYTES
    position = 0
    for start in range(end - INDEX_ENTRY_BYTES, -1, -INDEX_ENTRY_BYTES):
        (entry,) = struct.unpack_from("<I", entries, start)
        if entry != INDEX_MISSING:
            position = entry
            break
    with open(log, "rb") as file:
        end = _record_end(file.fileno(), position, None)
    return position if end is None else end


def _record_end(descriptor: int, position: int, offset: int | None) -> int | None:
    """Return where the record at position ends; None when there is none.

    With offset, the record must also carry that offset.
    """
    header = os.pread(descriptor, RECORD_OFFSET_END, position)
    if len(header) < RECORD_OFFSET_END:
        return None
    magic, length, record_offset = RECORD_START.unpack(header)
    if magic != RECORD_MAGIC or offset not in (None, record_offset):
        return None
    padded = -(-length // RECORD_ALIGN) * RECORD_ALIGN
    return position + RECORD_HEADER_BYTES + padded


def record_ends(store: Path, offsets: Iterable[int]) -> dict[int, tuple[str, int]]:
    """Return {offset: (log file name, end of its record)} of the store in store.

    Offsets with no segment (deleted) or no indexed record are left out.
    """
    if not store.is_dir():
        return {}
    bases = sorted(
        int(name[:20])
        for name in os.listdir(store)
        if SEGMENT_NAME.match(name) and name.endswith(".log")
    )
    entries: dict[int, memoryview] = {}
    descriptors: dict[int, int] = {}
    ends: dict[int, tuple[str, int]] = {}
    try:
        for offset in offsets:
            slot = bisect.bisect_right(bases, offset) - 1
            if slot < 0:
                continue
            base = bases[slot]
            name = f"{base:020d}"
            if base not in entries:
                raw = (store / f"{name}.idx").read_bytes()[INDEX_HEADER_BYTES:]
                usable = len(raw) - len(raw) % INDEX_ENTRY_BYTES
                # The build of pymq refuses big-endian hosts, so the
                # little-endian entries read as native integers.
                entries[base] = memoryview(raw[:usable]).cast("I")
                descriptors[base] = os.open(store / f"{name}.log", os.O_RDONLY)
            index = offset - base
            if index >= len(entries[base]):
                continue
            position = entries[base][index]
            if position == INDEX_MISSING:
                continue
            end = _record_end(descriptors[base], position, offset)
            if end is not None:
                ends[offset] = (f"{name}.log", end)
    finally:
        for descriptor in descriptors.values():
            os.close(descriptor)
    return ends


def unsynced_records(
    copy: Path,
    store: str,
    returned: dict[int, int],
    claimed: dict[str, int],
    earlier_synced: dict[str, int],
) -> list[str]:
    """Return a problem for each returned record past what was reported synced.

    store is the folder of a store relative to copy. returned is {seq:
    offset} of the puts that returned before the owner reported claimed,
    {segment path relative to the data directory: synced length}. A record
    counts as synced below the longest of its segment's claimed length, its
    earlier synced length and its checkpoint's length in copy.
    """
    problems = []
    ends = record_ends(copy / store, returned.values())
    for seq, offset in sorted(returned.items()):
        if offset not in ends:
            continue
        name, end = ends[offset]
        relative = os.path.normpath(os.path.join(store, name))
        bound = max(
            claimed.get(relative, 0),
            earlier_synced.get(relative, 0),
            checkpoint_length(copy, relative),
        )
        if end > bound:
            problems.append(
                f"{relative}: seq {seq} (offset {offset}) returned, but its "
                f"record ends at byte {end}, past the {bound} bytes reported "
                f"synced after it returned"
            )
    return problems


def relative_lengths(lengths: dict[str, int], source: Path) -> dict[str, int]:
    """Return lengths keyed by path relative to source, as data_ends are."""
    return {
        os.path.normpath(os.path.relpath(path, source)): length
        for path, length in lengths.items()
    }


def checkpoint_length(copy: Path, relative: str) -> int:
    """Return the log length the checkpoint of the segment at relative covers."""
    base = int(os.path.basename(relative)[:20])
    checkpoint = read_checkpoint(copy / (relative[:-4] + ".idx"), base)
    return 0 if checkpoint is None else checkpoint[1]


def damage_copy(
    copy: Path,
    source: Path,
    synced: dict[str, int],
    data_ends: dict[str, int],
    mode: str,
    rng: random.Random,
    earlier_synced: dict[str, int] | None = None,
) -> dict[str, int]:
    """Damage every segment and index file of copy past what a power cut keeps.

    synced is {segment path under source: synced length}, as
    SegmentStore.synced_lengths() returns it after the copy was taken.
    earlier_synced is {segment path relative to source: bytes an earlier
    owner may have synced}, the indexed_lengths() of source before the owner
    started. A log keeps the longest of its synced length, its earlier
    synced length and its checkpoint's length. A segment missing from synced
    was deleted or renamed after the copy, and a store with no segment in it
    was not open in the owner, so the owner appended nothing to it. Both
    are left whole, which is one outcome of a power cut. mode is "zero",
    "garble" or "pages" (each page past the kept length is kept, zeroed or
    garbled at random). Returns {relative path: bytes damaged}.
    """
    if mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {', '.join(MODES)}")
    kept_lengths = relative_lengths(synced, source)
    damaged: dict[str, int] = {}
    for relative, data_end in sorted(data_ends.items()):
        name = os.path.basename(relative)
        log = relative[:-4] + ".log"
        if not SEGMENT_NAME.match(name) or log not in kept_lengths:
            continue
        base = int(name[:20])
        checkpoint = read_checkpoint(copy / (relative[:-4] + ".idx"), base)
        if name.endswith(".log"):
            keep = max(
                kept_lengths[relative],
                (earlier_synced or {}).get(relative, 0),
                0 if checkpoint is None else checkpoint[1],
            )
        else:
            count = 0 if checkpoint is None else checkpoint[0]
            keep = INDEX_HEADER_BYTES + count * INDEX_ENTRY_BYTES
        if data_end > keep:
            damaged[relative] = _damage_range(
                copy / relative, keep, data_end, mode, rng
            )
    return damaged


def _damage_range(
    path: Path, start: int, end: int, mode: str, rng: random.Random
) -> int:
    """Apply mode to the bytes from start to end of path, page by page."""
    changed = 0
    with open(path, "r+b") as file:
        position = start
        while position < end:
            stop = min(end, (position // PAGE_BYTES + 1) * PAGE_BYTES)
            action = mode if mode != "pages" else rng.choice(("keep", "zero", "garble"))
            if action == "zero":
                file.seek(position)
                file.write(bytes(stop - position))
                changed += stop - position
            elif action == "garble":
                file.seek(position)
                file.write(rng.randbytes(stop - position))
                changed += stop - position
            position = stop
    return changed
