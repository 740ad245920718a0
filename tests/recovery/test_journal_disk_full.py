"""A full disk during group-journal writes: gets and acks go on, puts fail.

Each group's journal keeps its next segment reserved (the spare, created at
open and after each rollover) and its indexes preallocated, so the records
of gets and acks need no new disk space. A rollover into the spare is
followed by a checkpoint, and the older segment becomes the spare again.
Puts, which need new data segments, raise OSError(ENOSPC) naming the file.

The tests mount a small tmpfs (as root; skipped with the reason otherwise)
and keep it full with filler files, topped up as acks free data segments.
After the episode every store is opened offline: no damage, no recovery
message, every record passes its CRC.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pymq
from pymq import _core
from tests.recovery.tmpfs import Fillers, mounted_tmpfs
from tests.server.helpers import ServerProcess

pytestmark = pytest.mark.root

# Data segments of 1 MiB give journals of 1 MiB (pymq.broker), which a few
# thousand gets and acks fill.
SEGMENT_BYTES = 1 << 20
# One get and one ack journal 56 + 48 bytes: about 10,000 of each fill a
# journal segment, so this many roll each journal twice.
MESSAGES = 25_000
BIG_BODY = b"b" * 100_000


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tmpfs", "48m") as mount_point:
        yield mount_point


def body(index: int) -> bytes:
    return b"m%07d" % index


def journal_folder(data: Path, stream: str, group: str = ".queue") -> Path:
    return data / "streams" / stream / "groups" / group


def segment_names(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("*.log") if path.name[0].isdigit()}


def put_until_full(
    producer: Any, fillers: Fillers, error: type[Exception] = OSError
) -> tuple[Any, int]:
    """Fill the disk, put large bodies until a put raises error.

    Returns the error and the number of puts that fitted first, in the
    data segments reserved before.
    """
    fillers.take_all()
    for fitted in range(200):
        try:
            producer.put(BIG_BODY)
        except error as exc:
            return exc, fitted
    raise AssertionError("200 puts of 100 kB fitted on the full disk")


def ack_all(consumer: Any, count: int) -> None:
    for _ in range(count):
        message = consumer.get_nowait()
        assert message is not None
        message.ack()
    assert consumer.get_nowait() is None


def check_enospc(exc: OSError, folder: Path) -> None:
    """The error is ENOSPC and names a file in folder and what failed."""
    assert exc.errno == errno.ENOSPC, exc
    assert exc.filename is not None
    assert Path(exc.filename).parent == folder, exc
    assert "cannot reserve" in str(exc) and exc.filename in str(exc)


def store_folders(data: Path) -> list[Path]:
    """Every store of a broker: stream logs and group journals."""
    return sorted(
        path.parent for path in data.glob("streams/**/LOCK") if path.parent != data
    )


def check_stores_sound(data: Path) -> None:
    """Open every store offline: nothing to recover, every CRC sound.

    A journal keeps its spare over a close; a stream's log does not.
    """
    for folder in store_folders(data):
        journal = folder.parent.name == "groups"
        spares = sorted(name for name in os.listdir(folder) if "spare" in name)
        assert spares == (["spare.idx", "spare.log"] if journal else []), folder
        messages: list[str] = []
        with _core.SegmentStore(
            folder,
            segment_bytes=SEGMENT_BYTES,
            on_damage=messages.append,
            reserve_ahead=journal,
        ) as store:
            assert store.reserved == journal
            report = store.verify()
            assert report["damaged"] == [], folder
            assert report["missing"] == 0, folder
            assert store.damaged == 0, folder
        assert messages == [], (folder, messages)


def drain(
    consumer: Any,
    count: int,
    fillers: Fillers,
    journal: Path,
    keep: set[int],
    held: dict[int, Any],
) -> set[str]:
    """Get and ack count messages one by one; hold back those in keep.

    Returns the journal segment names seen, so the caller can count the
    rollovers. The disk is topped up every 500 messages, because a queue's
    acks free its data segments.
    """
    seen = segment_names(journal)
    done = 0
    while done < count:
        message = consumer.get_nowait()
        assert message is not None, f"only {done} of {count} messages"
        if message.offset in keep:
            held[message.offset] = message
            continue
        message.ack()
        done += 1
        if done % 500 == 0:
            fillers.take_all()
            seen |= segment_names(journal)
    return seen | segment_names(journal)


@pytest.mark.parametrize("fsync", ["interval", "always"])
def test_full_disk_keeps_gets_and_acks(tmpfs: Path, fsync: str) -> None:
    data = tmpfs / "data"
    fillers = Fillers(tmpfs)
    queue_journal = journal_folder(data, "jobs")
    group_journal = journal_folder(data, "events", "billing")
    half = MESSAGES // 2
    held: dict[int, Any] = {}
    with pymq.open(data, segment_bytes=SEGMENT_BYTES, fsync=fsync) as broker:
        queue = broker.queue("jobs")
        stream = broker.stream("events")
        group = stream.group("billing")
        queue.put_many([body(i) for i in range(MESSAGES)])
        stream.put_many([body(i) for i in range(MESSAGES)])
        # Held in flight over the whole episode, across two restarts.
        kept = queue.get(timeout=0)
        assert kept is not None and kept.attempt == 1
        group_kept = group.get(timeout=0)
        assert group_kept is not None
        for journal in (queue_journal, group_journal):
            assert (journal / "spare.log").exists()

        # The large bodies that fit come after the others.
        error, queue_fitted = put_until_full(queue, fillers)
        check_enospc(error, data / "streams" / "jobs" / "log")
        error, stream_fitted = put_until_full(stream, fillers)
        check_enospc(error, data / "streams" / "events" / "log")

        seen_queue = drain(queue, half, fillers, queue_journal, set(), held)
        seen_group = drain(group, half, fillers, group_journal, set(), held)
        group_kept.ack()

    # A restart while the disk is still full: each journal gives its spare
    # back and takes it again at once.
    fillers.take_all()
    with pymq.open(data, segment_bytes=SEGMENT_BYTES, fsync=fsync) as broker:
        queue = broker.queue("jobs")
        group = broker.stream("events").group("billing")
        rest = MESSAGES - 1 - half
        seen_queue |= drain(queue, rest, fillers, queue_journal, {kept.offset}, held)
        seen_group |= drain(group, rest, fillers, group_journal, set(), held)
        ack_all(queue, queue_fitted)
        ack_all(group, stream_fitted)
        assert held[kept.offset].attempt == 2
        # Each journal rolled over at least twice while the disk was full.
        assert len(seen_queue) >= 3, seen_queue
        assert len(seen_group) >= 3, seen_group
        for journal in (queue_journal, group_journal):
            assert len(segment_names(journal)) <= 2
            assert (journal / "spare.log").exists()

        # Still full: puts fail; once space is freed, they work again.
        error, fitted = put_until_full(queue, fillers)
        check_enospc(error, data / "streams" / "jobs" / "log")
        fillers.free()
        ack_all(queue, fitted)
        after = queue.put_many([b"after 1", b"after 2"])
        message = queue.get(timeout=0)
        assert message is not None and message.offset == after[0]
        message.ack()
        assert queue.stats().depth == 2

    with pymq.open(data, segment_bytes=SEGMENT_BYTES, fsync=fsync) as broker:
        queue = broker.queue("jobs")
        # Acks kept; the held delivery is back with its attempts counted.
        messages = queue.get_many(10, timeout=0)
        assert [(m.offset, m.attempt) for m in messages] == [
            (kept.offset, 3),
            (after[1], 1),
        ]
        assert broker.stream("events").group("billing").get_nowait() is None
    check_stores_sound(data)


def test_full_disk_journal_without_reserve_fails_cleanly(tmpfs: Path) -> None:
    """When the reserve runs out, a get or ack raises and changes nothing.

    A checkpoint lists the unsettled offsets in one journal record, which
    is at most 1 MiB here: with 85,000 deliveries in flight it does not
    fit, so older journal segments cannot be dropped (docs/reliability.md).
    The journal rolls into its spare, cannot make a new one on the full
    disk, and the next rollover fails.
    """
    held_count = 85_000
    data = tmpfs / "data"
    journal = journal_folder(data, "jobs")
    fillers = Fillers(tmpfs)
    with pymq.open(data, segment_bytes=SEGMENT_BYTES) as broker:
        queue = broker.queue("jobs", max_in_flight=200_000, max_deliveries=0)
        queue.put_many([body(i) for i in range(held_count + 30_000)])
        held = []
        while len(held) < held_count:
            held += queue.get_many(min(10_000, held_count - len(held)), timeout=0)
        fillers.take_all()

        failed_get: OSError | None = None
        failed_ack: OSError | None = None
        unacked: Any = None
        acked = 0
        while failed_get is None and failed_ack is None:
            assert acked < 30_000, "the journal never ran out of space"
            try:
                message = queue.get_nowait()
            except OSError as exc:
                failed_get = exc
                break
            assert message is not None
            try:
                message.ack()
            except OSError as exc:
                failed_ack, unacked = exc, message
            else:
                acked += 1
        if failed_get is None:
            # Less than an ack's record is left: a get's does not fit.
            with pytest.raises(OSError) as raised:
                queue.get_nowait()
            failed_get = raised.value
        else:
            # What is left may fit one ack's record, not two.
            for message in held[:2]:
                try:
                    message.ack()
                except OSError as exc:
                    failed_ack, unacked = exc, message
                    break
        assert failed_ack is not None
        for exc in (failed_get, failed_ack):
            check_enospc(exc, journal)
        stats = queue.stats()

        # The failed get handed nothing out and counted no attempt; the
        # failed ack settled nothing: its receipt still works.
        fillers.free()
        again = queue.get_nowait()
        assert again is not None and again.attempt == 1
        assert again.offset == held_count + acked + (unacked.offset >= held_count)
        assert queue.stats().in_flight == stats.in_flight + 1
        unacked.ack()
        again.ack()
        for message in held[:100]:
            if message is not unacked:
                # Acked already, if its ack fitted after the failed get.
                with contextlib.suppress(pymq.StaleReceiptError):
                    message.ack()
        settled = {message.offset for message in held[:100]}
    with pymq.open(data, segment_bytes=SEGMENT_BYTES) as broker:
        queue = broker.queue("jobs")
        first = queue.get_nowait()
        assert first is not None
        assert first.offset == min(set(range(held_count)) - settled)
        assert first.attempt == 2
    check_stores_sound(data)


# Through a server -------------------------------------------------------------

# A server like `pymq serve`, with segment_bytes, which the command line does
# not take. argv[1] is a JSON object with "data", "port_file" and
# "segment_bytes".


def test_full_disk_through_server(tmpfs: Path, tmp_path: Path) -> None:
    data = tmpfs / "data"
    # The log and the port file go outside the full tmpfs.
    server = ServerProcess(tmp_path, data=data, segment_bytes=SEGMENT_BYTES)
    fillers = Fillers(tmpfs)
    count = 22_000
    server.start()
    try:
        url = server.url
        with pymq.connect(url, reconnect_attempts=0) as client:
            queue = client.queue("jobs")
            for start in range(0, count, 1000):
                queue.put_many([body(i) for i in range(start, start + 1000)])
            kept = queue.get(timeout=1.0)
            assert kept is not None
            seen = segment_names(journal_folder(data, "jobs"))

            error, fitted = put_until_full(queue, fillers, pymq.ServerError)
            # STORAGE, retriable, with the errno text and the file.
            assert error.code == 15
            assert "No space left on device" in str(error)
            assert str(data / "streams" / "jobs" / "log") in str(error)

            # The same connection gets and acks every stored message.
            for index in range(count - 1 + fitted):
                message = queue.get(timeout=1.0)
                assert message is not None, index
                message.ack()
                if index % 500 == 0:
                    fillers.take_all()
                    seen |= segment_names(journal_folder(data, "jobs"))
            assert queue.get(timeout=0) is None
            assert len(seen | segment_names(journal_folder(data, "jobs"))) >= 3
            kept.ack()
            assert queue.stats().depth == 0

            # The drained queue kept an acked segment as its spare, so puts
            # fit in it before the full disk stops them.
            error, fitted = put_until_full(queue, fillers, pymq.ServerError)
            assert "No space left on device" in str(error)
            assert fitted * len(BIG_BODY) <= 2 * SEGMENT_BYTES
            fillers.free()
            for _ in range(fitted):
                message = queue.get(timeout=1.0)
                assert message is not None and message.body == BIG_BODY
                message.ack()
            queue.put(b"after")
        assert server.stop() == 0, server.log()
    finally:
        server.kill()
    # Each failed put is logged for the operator, with the peer and the file.
    failed_put = re.compile(
        r"^ERROR:pymq.server:request [0-9]+ \(opcode 0x20\) from "
        r"127\.0\.0\.1:[0-9]+ failed: \[Errno 28\] cannot reserve [0-9]+ bytes "
        r"on disk for a new segment \(No space left on device\): '"
        + re.escape(str(data / "streams" / "jobs" / "log")),
        re.MULTILINE,
    )
    assert failed_put.search(server.log()), server.log()
    check_stores_sound(data)
    with pymq.open(data, segment_bytes=SEGMENT_BYTES) as broker:
        message = broker.queue("jobs").get_nowait()
        assert message is not None and message.body == b"after"
