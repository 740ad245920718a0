"""Records whose header block cannot be read, though their CRC is sound.

Publish checks header blocks now, but records stored before it did may
still be in a data directory. Such a record is damaged like one failing its
CRC: counted in the stream's damaged, skipped by every group, and logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import pymq

REC_FLAG_HEADERS = 1  # group.pxd: the record starts with a header block
# A block that declares 5 headers and holds none.
TRUNCATED = b"\x05\x00"
# One header whose name is the byte 0xff, which is not UTF-8.
NOT_UTF8 = b"\x01\x00\x01\x00\xff\x00\x00\x00\x00" + b"body"


def fill(target) -> None:
    """Put 4 records: sound, two unreadable header blocks, sound with headers."""
    assert target.put(b"good0") == 0
    assert target.stream.store.append(TRUNCATED, flags=REC_FLAG_HEADERS) == 1
    assert target.stream.store.append(NOT_UTF8, flags=REC_FLAG_HEADERS) == 2
    assert target.put(b"good3", headers={"k": "v"}) == 3


def skipped_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if "header block cannot be read" in record.getMessage()
    ]


def test_get_many_skips_and_counts_unreadable_header_blocks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs", visibility_timeout=3600)
        fill(jobs)
        messages = jobs.get_many(10, timeout=0)
        assert [(m.offset, m.body, m.headers) for m in messages] == [
            (0, b"good0", {}),
            (3, b"good3", {"k": "v"}),
        ]
        stats = jobs.stats()
        assert (stats.depth, stats.in_flight, stats.damaged, stats.skipped) == (
            2,
            2,
            2,
            2,
        )
        warnings = skipped_warnings(caplog)
        assert len(warnings) == 2
        assert "(offset 1); record skipped" in warnings[0]
        assert "(offset 2); record skipped" in warnings[1]
        jobs.ack_many(messages)
        assert jobs.get(timeout=0) is None
        assert jobs.stats().depth == 0

    # The skips were journaled: nothing comes back after a reopen.
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs")
        assert jobs.get(timeout=0) is None
        assert jobs.stats().depth == 0


def test_get_and_get_batch_skip_unreadable_header_blocks(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        one = broker.queue("one", visibility_timeout=3600)
        fill(one)
        first, second = one.get(timeout=0), one.get(timeout=0)
        assert (first.offset, first.body) == (0, b"good0")
        assert (second.offset, second.body, second.headers) == (3, b"good3", {"k": "v"})
        assert one.get(timeout=0) is None
        assert (one.stats().damaged, one.stats().skipped) == (2, 2)

        batched = broker.queue("batched", visibility_timeout=3600)
        fill(batched)
        batch = batched.get_batch(10, timeout=0)
        assert batch.offsets.tolist() == [0, 3]
        assert batch.data == b"good0good3"
        assert batch.headers == [None, {"k": "v"}]
        batched.ack_many(batch)
        stats = batched.stats()
        assert (stats.depth, stats.acked, stats.damaged, stats.skipped) == (0, 2, 2, 2)


def test_every_group_skips_a_damaged_record_counted_once(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        events = broker.stream("events")
        billing = events.group("billing")
        audit = events.group("audit")
        events.put(b"a")
        events.store.append(TRUNCATED, flags=REC_FLAG_HEADERS)
        events.put(b"c")
        for group in (billing, audit):
            assert [m.offset for m in group.get_many(10, timeout=0)] == [0, 2]
            stats = group.stats()
            assert (stats.damaged, stats.skipped) == (1, 1)
