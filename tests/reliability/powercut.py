"""Simulated power cuts, on a copy of a data directory taken while its owner is stopped.

After a power cut, the bytes a store synced are intact, and any byte past
them may be what was written (the page was written back), zero (the write
never reached the disk) or garbage (a torn write). damage_copy() applies one
of these to every byte past the synced length of each segment file, and
past the checkpointed entries of each index file, as
tests/recovery/test_power_cut.py does for a single store.

The synced lengths come from the owner before it is stopped, so more may
have been synced by the time of the copy. The cut is then deeper than a
real power cut could make, which a store must survive too, with two
exceptions, because a cut must never go below a byte that was synced:

- a checkpoint written since promises that its log is synced up to its
  length, so the cut never goes below a sound checkpoint's length;
- an owner started after a kill reports as synced only what its
  checkpoints cover and what it synced itself (a reopened store cannot
  know more), while the killed owner may have synced records past them and
  returned their puts. indexed_lengths(), read before the owner starts,
  gives for each segment the end of its last record, so the cut keeps at
  least what any earlier owner wrote.
"""

from __future__ import annotations

import os
import random
import re
import struct
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
# The first 8 bytes of a record's 32-byte header (src/core/segment.pxd):
# magic, body length. Bodies are padded to a multiple of 8 bytes.
RECORD_START: Final = struct.Struct("<II")
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
        file.seek(position)
        start_bytes = file.read(RECORD_START.size)
    if len(start_bytes) < RECORD_START.size:
        return position
    magic, length = RECORD_START.unpack(start_bytes)
    if magic != RECORD_MAGIC:
        return position
    padded = -(-length // RECORD_ALIGN) * RECORD_ALIGN
    return position + RECORD_HEADER_BYTES + padded


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
    SegmentStore.synced_lengths() returns it. earlier_synced is
    {segment path relative to source: bytes an earlier owner may have
    synced}, the indexed_lengths() of source before the owner started. A
    log keeps the largest of its synced length, its earlier synced length
    and its checkpoint's length. A segment missing from synced (one created
    after the lengths were taken) keeps only its checkpoint. A store
    with no segment in it was not open in the owner: the owner appended
    nothing to it, and it is left whole, which is one outcome of a power
    cut. mode is "zero", "garble" or "pages" (each page past the kept length
    is kept, zeroed or garbled at random). Returns {relative path: bytes
    damaged}.
    """
    if mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {', '.join(MODES)}")
    kept_lengths = {
        os.path.normpath(os.path.relpath(path, source)): length
        for path, length in synced.items()
    }
    open_stores = {os.path.dirname(relative) for relative in kept_lengths}
    damaged: dict[str, int] = {}
    for relative, data_end in sorted(data_ends.items()):
        name = os.path.basename(relative)
        if not SEGMENT_NAME.match(name) or os.path.dirname(relative) not in open_stores:
            continue
        base = int(name[:20])
        checkpoint = read_checkpoint(copy / (relative[:-4] + ".idx"), base)
        if name.endswith(".log"):
            keep = max(
                kept_lengths.get(relative, 0),
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
