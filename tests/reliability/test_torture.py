"""The crash torture harness: its checks on made-up logs, then two short real runs.

The first tests write logs and broker states by hand, to show that each
check reports the fault it is for. The last ones run the harness itself
with real server, client and embedded processes killed with SIGKILL, once
per fsync policy, and require every check to pass.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pymq
from pymq._core import SegmentStore
from tests.reliability import probe_serve
from tests.reliability.ledger import Ledger
from tests.reliability.powercut import (
    copy_sparse,
    damage_copy,
    indexed_lengths,
    relative_lengths,
    unsynced_records,
)
from tests.reliability.records import (
    CONSUMER_OPTIONS,
    MAX_DELIVERIES,
    QUEUE,
    QUEUE_DLQ,
    LineLog,
    inspect_message,
    make_payload,
)
from tests.reliability.state import (
    ACKS,
    BOUNDS,
    CHECK_NAMES,
    DLQ_ONCE,
    EXACTLY_ONE,
    ORIGIN,
    POWER_ACKS,
    POWER_CRC,
    POWER_PRESENT,
    PRESENT,
    DeadLetter,
    Findings,
    LedgerSnapshot,
    TargetState,
    check_states,
    read_offline,
)
from tests.reliability.torture import TortureConfig, format_summary, run_torture

POWER_CHECKS = (POWER_PRESENT, POWER_ACKS, POWER_CRC)
CONSUMER_PID = 200


def write_logs(folder: Path, producer: list[str], consumer: list[str]) -> Ledger:
    """Write a producer and a queue consumer log and return their ledger."""
    folder.mkdir(exist_ok=True)
    producer_log = LineLog(folder / "producer.log")
    producer_log.write("S 1 100 producer")
    for line in producer:
        producer_log.write(line)
    consumer_log = LineLog(folder / "consumer-queue-0.log")
    consumer_log.write(f"S 2 {CONSUMER_PID} consumer-queue")
    for line in consumer:
        consumer_log.write(line)
    ledger = Ledger(folder)
    ledger.refresh()
    return ledger


def queue_state(
    records: dict[int, int] | None,
    *,
    depth: int = 0,
    available: set[int] | None = None,
    dead_letters: list[DeadLetter] | None = None,
) -> dict[str, TargetState]:
    return {
        "queue": TargetState(
            name="queue",
            records=records,
            damaged_records=[],
            first_offset=0,
            depth=depth,
            damaged=0,
            skipped=0,
            dead_letters=dead_letters or [],
            available=available,
        )
    }


def check(ledger: Ledger, states: dict[str, TargetState]) -> Findings:
    findings = Findings()
    check_states(states, ledger, LedgerSnapshot.take(ledger), findings, "test")
    return findings


# Logs ---------------------------------------------------------------------------


def test_ledger_flags_redelivery_after_ack(tmp_path: Path) -> None:
    ledger = write_logs(
        tmp_path,
        ["T 10 0 queue 1", "D 11 0 queue 1 0"],
        [
            "G 20 21 queue 0 0 1 1",
            "I 22 ack queue 0 1",
            "O 23 ack queue 0 1",
            "G 30 31 queue 0 0 2 1",
        ],
    )
    assert ledger.check_acks_kept() == [
        "queue offset 0: acked at attempt 1, delivered again at attempt 2"
    ]
    causes, problems = ledger.classify_redeliveries()
    assert causes == {"no cause": 1}
    assert len(problems) == 1


def test_ledger_justifies_redelivery_after_consumer_kill(tmp_path: Path) -> None:
    ledger = write_logs(
        tmp_path,
        ["T 10 0 queue 1", "D 11 0 queue 1 0"],
        ["G 20 21 queue 0 0 1 1", "G 30 31 queue 0 0 2 1"],
    )
    ledger.add_kill(25, "consumer", CONSUMER_PID)
    causes, problems = ledger.classify_redeliveries()
    assert causes == {"consumer kill": 1}
    assert problems == []
    assert ledger.check_acks_kept() == []


def test_ledger_flags_attempt_delivered_twice(tmp_path: Path) -> None:
    ledger = write_logs(
        tmp_path,
        ["T 10 0 queue 1", "D 11 0 queue 1 0"],
        ["G 20 21 queue 0 0 1 1", "G 30 31 queue 0 0 1 1"],
    )
    assert ledger.check_attempts() == [
        "queue offset 0: attempt 1 was delivered 2 times"
    ]


def test_ledger_flags_delivery_never_put(tmp_path: Path) -> None:
    ledger = write_logs(tmp_path, ["T 10 0 queue 1"], ["G 20 21 queue 0 9 1 1"])
    assert ledger.check_origins() == [
        "queue offset 0 attempt 1: sequence number 9 was never put"
    ]


def test_ledger_flags_damaged_delivery(tmp_path: Path) -> None:
    ledger = write_logs(tmp_path, ["T 10 0 queue 1"], ["G 20 21 queue 0 0 1 0"])
    assert ledger.check_intact() == [
        "queue offset 0 attempt 1 (seq 0) was delivered damaged"
    ]


# Broker states ------------------------------------------------------------------


def test_states_flag_missing_returned_put(tmp_path: Path) -> None:
    ledger = write_logs(tmp_path, ["T 10 0 queue 1", "D 11 0 queue 1 0"], [])
    findings = check(ledger, queue_state({}, available=set()))
    assert findings.problems(PRESENT) == [
        "test: queue: returned seq 0 missing at offset 0 (found None)"
    ]


def test_states_flag_record_never_put(tmp_path: Path) -> None:
    ledger = write_logs(tmp_path, [], [])
    findings = check(ledger, queue_state({0: 5}, depth=1))
    assert findings.problems(ORIGIN) == ["test: queue: offset 0 holds seq 5, never put"]


def test_states_flag_settled_message_never_acked(tmp_path: Path) -> None:
    ledger = write_logs(
        tmp_path, ["T 10 0 queue 1", "D 11 0 queue 1 0"], ["G 20 21 queue 0 0 1 1"]
    )
    findings = check(ledger, queue_state({0: 0}, available=set()))
    assert findings.problems(EXACTLY_ONE) == [
        "test: queue: offset 0 is settled, but no consumer acked it"
    ]


def test_states_flag_acked_message_available(tmp_path: Path) -> None:
    ledger = write_logs(
        tmp_path,
        ["T 10 0 queue 1", "D 11 0 queue 1 0"],
        ["G 20 21 queue 0 0 1 1", "I 22 ack queue 0 1", "O 23 ack queue 0 1"],
    )
    findings = check(ledger, queue_state({0: 0}, depth=1, available={0}))
    assert findings.problems(ACKS) == ["test: queue: acked offset 0 is available again"]


def test_states_flag_message_dead_lettered_twice(tmp_path: Path) -> None:
    ledger = write_logs(tmp_path, ["T 10 0 queue 1", "D 11 0 queue 1 0"], [])
    dead = DeadLetter(source_offset=0, seq=0, reason="nack", attempts=4, intact=True)
    findings = check(
        ledger, queue_state({0: 0}, available=set(), dead_letters=[dead, dead])
    )
    assert findings.problems(DLQ_ONCE) == [
        "test: queue: offset 0 was moved to the DLQ 2 times"
    ]


def test_states_flag_depth_outside_bounds(tmp_path: Path) -> None:
    # A returned put that no consumer acked must still be unsettled.
    ledger = write_logs(tmp_path, ["T 10 0 queue 1", "D 11 0 queue 1 0"], [])
    findings = check(ledger, queue_state(None, depth=0))
    assert findings.problems(BOUNDS) == [
        "test: queue: depth 0 is outside [1, 1], the unsettled messages the logs allow"
    ]


def test_states_pass_consistent_queue(tmp_path: Path) -> None:
    ledger = write_logs(
        tmp_path,
        ["T 10 0 queue 1", "D 11 0 queue 1 0", "T 12 1 queue 1", "D 13 1 queue 1 1"],
        ["G 20 21 queue 0 0 1 1", "I 22 ack queue 0 1", "O 23 ack queue 0 1"],
    )
    findings = check(ledger, queue_state({0: 0, 1: 1}, depth=1, available={1}))
    problems = [problem for name in CHECK_NAMES for problem in findings.problems(name)]
    assert problems == []


# Power cuts ---------------------------------------------------------------------


def copy_live_store(
    tmp_path: Path,
) -> tuple[Path, Path, dict[str, int], dict[str, int]]:
    """Append 200 bodies with fsync="always" and copy the open store's folder.

    Returns the folders, the synced lengths and the data ends of the copy.
    """
    source, copy = tmp_path / "live", tmp_path / "copy"
    with SegmentStore(source, segment_bytes=1 << 20, fsync="always") as store:
        for seq in range(200):
            store.append(make_payload(7, seq))
        synced = store.synced_lengths()
        data_ends = copy_sparse(source, copy)
    return source, copy, synced, data_ends


def read_copy(copy: Path) -> list[bytes]:
    with SegmentStore(copy, segment_bytes=1 << 20) as store:
        return store.read_range(store.first_offset, store.next_offset)


@pytest.mark.parametrize("mode", ["zero", "garble", "pages"])
def test_power_cut_spares_synced_records(tmp_path: Path, mode: str) -> None:
    source, copy, synced, data_ends = copy_live_store(tmp_path)
    damaged = damage_copy(copy, source, synced, data_ends, mode, random.Random(1))
    # Appends do not checkpoint, so only the index entries are past what a
    # power cut keeps.
    assert list(damaged) == ["00000000000000000000.idx"]
    assert read_copy(copy) == [make_payload(7, seq) for seq in range(200)]


@pytest.mark.parametrize("mode", ["zero", "garble"])
def test_power_cut_cuts_unsynced_records(tmp_path: Path, mode: str) -> None:
    source, copy, synced, data_ends = copy_live_store(tmp_path)
    nothing_synced = dict.fromkeys(synced, 0)
    damaged = damage_copy(
        copy, source, nothing_synced, data_ends, mode, random.Random(2)
    )
    log = "00000000000000000000.log"
    assert damaged[log] == data_ends[log]
    assert read_copy(copy) == []


def test_power_cut_pages_leave_only_sound_records(tmp_path: Path) -> None:
    source, copy, synced, data_ends = copy_live_store(tmp_path)
    nothing_synced = dict.fromkeys(synced, 0)
    damage_copy(copy, source, nothing_synced, data_ends, "pages", random.Random(3))
    records = read_copy(copy)
    assert len(records) < 200
    for body in records:
        assert inspect_message(7, body, {})[1]


def test_unsynced_records_flags_records_past_claims(tmp_path: Path) -> None:
    source, copy, synced, _ = copy_live_store(tmp_path)
    returned = {seq: seq for seq in range(200)}
    claimed = relative_lengths(synced, source)
    assert unsynced_records(copy, ".", returned, claimed, {}) == []

    nothing = dict.fromkeys(claimed, 0)
    problems = unsynced_records(copy, ".", returned, nothing, {})
    assert len(problems) == 200
    assert problems[0].startswith("00000000000000000000.log: seq 0 (offset 0) returned")
    # An earlier owner may have synced every record the segment had.
    assert unsynced_records(copy, ".", returned, nothing, indexed_lengths(copy)) == []


# Power cuts during a move to a dead-letter queue -------------------------------

MOVE_BODY_SEED = 11


def copy_during_move(
    tmp_path: Path,
) -> tuple[Path, Path, dict[str, int], dict[str, int], dict[str, int]]:
    """Move message 1 of the queue to its DLQ between two readings of synced lengths.

    Message 0 is moved first, so the DLQ's store is open before. The copy
    is taken once the move returned. Returns the folders, the lengths read
    before the move and after the copy, and the data ends of the copy.
    """
    data, copy = tmp_path / "data", tmp_path / "copy"
    # No background flush: a checkpoint written meanwhile would cover the move.
    with pymq.open(
        data, fsync="always", segment_bytes=1 << 20, flush_interval=3600
    ) as broker:
        queue = broker.queue(QUEUE, **CONSUMER_OPTIONS)
        for seq in range(2):
            queue.put(make_payload(MOVE_BODY_SEED, seq), headers={"seq": str(seq)})
        for _ in range(MAX_DELIVERIES):
            message = queue.get(timeout=1.0)
            assert message is not None
            assert message.offset == 0
            message.nack()
        for _ in range(MAX_DELIVERIES - 1):
            message = queue.get(timeout=1.0)
            assert message is not None
            message.nack()
        last = queue.get(timeout=1.0)
        assert last is not None
        assert (last.offset, last.attempt) == (1, MAX_DELIVERIES)
        before = probe_serve.synced_lengths()
        last.nack()
        data_ends = copy_sparse(data, copy)
        after = probe_serve.synced_lengths()
    return data, copy, before, after, data_ends


def dead_lettered_and_available(copy: Path) -> tuple[list[int], set[int]]:
    """Return the source offsets in the copy's DLQ and its available offsets."""
    states = read_offline(copy, MOVE_BODY_SEED, 1 << 20, drain=True)
    queue = states["queue"]
    assert queue.available is not None
    offsets = sorted(dead.source_offset for dead in queue.dead_letters)
    return offsets, queue.available


def test_cut_before_move_can_lose_dead_letter(tmp_path: Path) -> None:
    # Lengths read before the copy may be shorter than what was synced when
    # it was taken. Here the DLQ's put was synced before the journal wrote
    # that the move ended. A cut of the DLQ at the earlier length, with the
    # journal's last page written back, leaves a state no power cut can:
    # the message is settled, and in no queue.
    data, copy, before, after, data_ends = copy_during_move(tmp_path)
    dlq_log = data / "streams" / QUEUE_DLQ / "log" / "00000000000000000000.log"
    assert before[str(dlq_log)] < after[str(dlq_log)]
    damage_copy(
        copy,
        data,
        {str(dlq_log): before[str(dlq_log)]},
        data_ends,
        "zero",
        random.Random(6),
    )
    dead_lettered, available = dead_lettered_and_available(copy)
    assert dead_lettered == [0]
    assert available == set()


@pytest.mark.parametrize(
    ("mode", "seed"), [("zero", 7), ("garble", 8), ("pages", 9), ("pages", 10)]
)
def test_cut_after_copy_keeps_move_whole(tmp_path: Path, mode: str, seed: int) -> None:
    data, copy, _, after, data_ends = copy_during_move(tmp_path)
    damage_copy(copy, data, after, data_ends, mode, random.Random(seed))
    dead_lettered, available = dead_lettered_and_available(copy)
    assert dead_lettered == [0, 1]
    assert available == set()


# Power cuts after a restart ---------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
RESTART_SEGMENT_BYTES = 1 << 17
RESTART_RECORDS = 200
# argv: folder. Appends RESTART_RECORDS payloads with fsync="always", in
# segments of RESTART_SEGMENT_BYTES, then dies by SIGKILL: no checkpoint
# covers any of them, but every append returned, so every one was synced.
KILLED_WRITER = textwrap.dedent(
    f"""
    import os, signal, sys
    from pymq._core import SegmentStore
    from tests.reliability.records import make_payload

    store = SegmentStore(
        sys.argv[1], segment_bytes={RESTART_SEGMENT_BYTES}, fsync="always"
    )
    for seq in range({RESTART_RECORDS}):
        store.append(make_payload(7, seq))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_killed_writer(folder: Path) -> None:
    writer = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(folder)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert writer.returncode == -signal.SIGKILL, writer.stderr


def copy_restarted_store(
    tmp_path: Path,
) -> tuple[Path, Path, dict[str, int], dict[str, int], dict[str, int]]:
    """Kill a writer of 200 synced records, reopen its store and copy it idle.

    Returns the folders, the indexed lengths read before the reopen, the
    synced lengths of the reopened store and the data ends of the copy.
    """
    source, copy = tmp_path / "live", tmp_path / "copy"
    run_killed_writer(source)
    earlier = indexed_lengths(source)
    with SegmentStore(
        source, segment_bytes=RESTART_SEGMENT_BYTES, fsync="always"
    ) as store:
        synced = store.synced_lengths()
        data_ends = copy_sparse(source, copy)
    return source, copy, earlier, synced, data_ends


def read_restarted_copy(copy: Path) -> list[bytes]:
    with SegmentStore(copy, segment_bytes=RESTART_SEGMENT_BYTES) as store:
        return store.read_range(store.first_offset, store.next_offset)


@pytest.mark.parametrize("count", [0, 1, 2, 200])
def test_indexed_lengths_end_at_last_record(tmp_path: Path, count: int) -> None:
    with SegmentStore(tmp_path, segment_bytes=RESTART_SEGMENT_BYTES) as store:
        for seq in range(count):
            store.append(make_payload(7, seq))
        ranges = store.segment_ranges()
    expected = {f"{base:020d}.log": length for base, _, length in ranges}
    assert indexed_lengths(tmp_path) == expected
    assert len(expected) == (4 if count == 200 else 1)


def test_restarted_owner_reports_only_checkpoints(tmp_path: Path) -> None:
    # A restarted owner's synced lengths are not what a power cut keeps: the
    # killed writer synced every record, but the reopened store reports as
    # synced only what its checkpoints cover, and the writer made none.
    source, _, earlier, synced, _ = copy_restarted_store(tmp_path)
    assert len(earlier) == 4
    assert sum(earlier.values()) > 0
    relative = {
        os.path.relpath(path, source): length for path, length in synced.items()
    }
    assert relative == dict.fromkeys(earlier, 0)


def test_restarted_owner_counts_records_once_synced(tmp_path: Path) -> None:
    run_killed_writer(tmp_path)
    earlier = indexed_lengths(tmp_path)
    with SegmentStore(
        tmp_path, segment_bytes=RESTART_SEGMENT_BYTES, fsync="always"
    ) as store:
        offset = store.append(b"after the restart")
        synced = store.synced_lengths()
        ranges = store.segment_ranges()
    assert offset == RESTART_RECORDS
    relative = {
        os.path.relpath(path, tmp_path): length for path, length in synced.items()
    }
    assert relative == {f"{base:020d}.log": length for base, _, length in ranges}
    for name, length in earlier.items():
        assert relative[name] >= length, name


@pytest.mark.parametrize("mode", ["zero", "garble", "pages"])
def test_power_cut_after_restart_keeps_records(tmp_path: Path, mode: str) -> None:
    source, copy, earlier, synced, data_ends = copy_restarted_store(tmp_path)
    damaged = damage_copy(
        copy, source, synced, data_ends, mode, random.Random(4), earlier_synced=earlier
    )
    assert all(name.endswith(".idx") for name in damaged)
    expected = [make_payload(7, seq) for seq in range(RESTART_RECORDS)]
    assert read_restarted_copy(copy) == expected


def test_cut_at_restarted_synced_loses_records(tmp_path: Path) -> None:
    # Cut at the restarted owner's synced lengths alone, the copy loses every
    # append that the killed owner returned.
    source, copy, _, synced, data_ends = copy_restarted_store(tmp_path)
    damage_copy(copy, source, synced, data_ends, "zero", random.Random(5))
    assert read_restarted_copy(copy) == []


# Real runs ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fsync", "kills", "seed"), [("interval", 18, 5), ("always", 20, 6)]
)
def test_torture_short_run_passes(
    tmp_path: Path, fsync: str, kills: int, seed: int
) -> None:
    folder = tmp_path / "run"
    config = TortureConfig(
        kills=kills,
        # Only a bound: the run ends once it made its kills.
        seconds=120.0,
        fsync=fsync,
        seed=seed,
        keep=folder,
        consumers=1,
        rate=150.0,
        drain_seconds=30.0,
    )
    result = run_torture(config)
    summary = format_summary(result)
    print(summary)
    assert result.kills == kills, summary
    if fsync == "always":
        # The seeded choices of this seed make a power cut in each phase.
        # The embedded phase's second one comes right after a kill and a
        # restart, so its cut must keep what the killed owner synced.
        cuts = [sum(phase.power_cuts.values()) > 0 for phase in result.phases]
        assert cuts == [True, True], summary
    for check_name in CHECK_NAMES:
        if fsync == "interval" and check_name in POWER_CHECKS:
            assert result.rounds(check_name) == 0
            continue
        assert result.rounds(check_name) > 0, f"{check_name} never ran:\n{summary}"
        assert result.problems(check_name) == [], summary
    # About 300 MB of preallocated segments; a failed run keeps them.
    shutil.rmtree(folder)
