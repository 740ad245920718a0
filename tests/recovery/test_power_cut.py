"""Power cuts, simulated on a copy of a live store's folder.

Whatever synced_lengths() reports is on stable storage, and a power cut may
leave anything past it. The copy is taken while the store is open and idle,
then every log file in it is cut or filled with random bytes past its synced
length, and the index files past what their checkpoint covers. Every record
whose append returned under fsync="always", or that a flush() covered under
fsync="interval", must read back byte for byte from the copy.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
from pathlib import Path

import pytest

from pymq import _core

SEGMENT_BYTES = 4096
# Byte position of the count field in the 64-byte index header (segment.pxd).
IDX_OFF_COUNT = 16
IDX_HEADER_SIZE = 64
IDX_ENTRY_SIZE = 4


def make_records(seed: int, count: int) -> list[tuple[bytes, int]]:
    """Return count (body, flags) pairs, with bodies of 0 to 300 bytes."""
    rng = random.Random(seed)
    return [
        (rng.randbytes(rng.randrange(301)), rng.randrange(1 << 16))
        for _ in range(count)
    ]


def append_all(
    store: _core.SegmentStore, records: list[tuple[bytes, int]]
) -> list[int]:
    return [store.append(body, flags=flags) for body, flags in records]


def cut_past_synced(
    source: Path, copy: Path, synced: dict[str, int], damage: str, rng: random.Random
) -> None:
    """Damage each log in copy past the length synced in source."""
    for name in sorted(os.listdir(copy)):
        if not name.endswith(".log"):
            continue
        path = copy / name
        start = synced[str(source / name)]
        size = path.stat().st_size
        if damage == "truncate":
            os.truncate(path, start)
            continue
        with open(path, "r+b") as file:
            file.seek(start)
            file.write(rng.randbytes(size - start))


def garble_index_past_checkpoint(copy: Path, rng: random.Random) -> None:
    """Fill each index in copy with random bytes past its checkpointed entries."""
    for path in sorted(copy.glob("*.idx")):
        data = path.read_bytes()
        (count,) = struct.unpack_from("<Q", data, IDX_OFF_COUNT)
        start = IDX_HEADER_SIZE + count * IDX_ENTRY_SIZE
        with open(path, "r+b") as file:
            file.seek(start)
            file.write(rng.randbytes(len(data) - start))


def copy_idle_store(
    store: _core.SegmentStore, source: Path, copy: Path
) -> dict[str, int]:
    """Copy the folder of an open, idle store and return its synced lengths."""
    synced = store.synced_lengths()
    shutil.copytree(source, copy)
    logs = {name for name in os.listdir(copy) if name.endswith(".log")}
    assert {os.path.basename(path) for path in synced} == logs
    return synced


@pytest.mark.parametrize("damage", ["truncate", "garble"])
@pytest.mark.parametrize("count", [1, 29, 500])
def test_power_cut_always_keeps_returned_appends(
    tmp_path: Path, count: int, damage: str
) -> None:
    rng = random.Random(count)
    source, copy = tmp_path / "live", tmp_path / "copy"
    records = make_records(count, count)
    with _core.SegmentStore(
        source, segment_bytes=SEGMENT_BYTES, fsync="always"
    ) as store:
        offsets = append_all(store, records[: count // 2])
        offsets.append(store.append_many([body for body, _ in records[count // 2 :]]))
        synced = copy_idle_store(store, source, copy)
        stats = store.stats()
    assert stats["synced_bytes"] == stats["written_bytes"]
    cut_past_synced(source, copy, synced, damage, rng)
    garble_index_past_checkpoint(copy, rng)

    with _core.SegmentStore(copy, segment_bytes=SEGMENT_BYTES) as store:
        assert store.next_offset == count
        assert store.damaged == 0
        for offset, (body, flags) in enumerate(records[: count // 2]):
            assert store.read_record(offset)[2:] == (flags, body), offset
        bodies = [body for body, _ in records]
        assert store.read_range(0, count) == bodies


@pytest.mark.parametrize("damage", ["truncate", "garble"])
@pytest.mark.parametrize(("flushed", "unflushed"), [(40, 1), (40, 100), (200, 7)])
def test_power_cut_interval_keeps_flushed_records(
    tmp_path: Path, flushed: int, unflushed: int, damage: str
) -> None:
    rng = random.Random(flushed * 1000 + unflushed)
    source, copy = tmp_path / "live", tmp_path / "copy"
    records = make_records(flushed, flushed + unflushed)
    with _core.SegmentStore(
        source, segment_bytes=SEGMENT_BYTES, fsync="interval"
    ) as store:
        append_all(store, records[:flushed])
        store.flush()
        append_all(store, records[flushed:])
        synced = copy_idle_store(store, source, copy)
    cut_past_synced(source, copy, synced, damage, rng)
    garble_index_past_checkpoint(copy, rng)

    with _core.SegmentStore(copy, segment_bytes=SEGMENT_BYTES) as store:
        for offset, (body, flags) in enumerate(records[:flushed]):
            assert store.read_record(offset)[2:] == (flags, body), offset
        assert store.next_offset >= flushed
        # Whatever else survived the cut is what was appended there.
        for offset, _, flags, body in store.read_records(flushed, store.next_offset):
            assert (body, flags) == records[offset], offset
        assert store.verify()["damaged"] == []
