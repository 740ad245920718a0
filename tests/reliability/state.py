"""Broker states read by the torture harness, and their checks against the ledger.

A state is read either offline or online. Offline reads open a data
directory that no process owns with pymq.open: after a kill, at the end, or
on a power-cut copy. Online reads go through a fresh client of a running
server while the harness has stopped every producer and consumer with
SIGSTOP. Offline reads see every record
of the queue and the stream. Online reads see the stream through the audit
group, which the harness alone reads, and the queue only through its stats.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pymq
from pymq._core import SegmentStore, split_body
from tests.reliability.ledger import Ledger
from tests.reliability.records import (
    AUDIT_GROUP,
    AUDIT_OPTIONS,
    CONSUMER_OPTIONS,
    DLQ_OF,
    GROUP,
    MAX_DELIVERIES,
    PUT_TARGET_OF,
    QUEUE,
    STREAM,
    inspect_message,
    settlement_of,
)

# Check names, as the summary prints them.
PRESENT: Final = "returned puts present"
ORIGIN: Final = "no phantom or duplicated messages"
ACKS: Final = "acks not undone"
EXACTLY_ONE: Final = "each message acked, available or in the DLQ"
DLQ_ONCE: Final = "dead-letter moves happen once"
BOUNDS: Final = "unsettled counts within bounds"
CRC: Final = "CRC clean"
DUPLICATES: Final = "duplicates justified"
ATTEMPTS: Final = "attempts journaled"
POISON: Final = "failing messages in the DLQ"
PROCESSES: Final = "processes run and stop cleanly"
POWER_PRESENT: Final = "power cut keeps returned puts"
POWER_ACKS: Final = "power cut keeps returned acks"
POWER_CRC: Final = "power cut copy recovers clean"
CHECK_NAMES: Final = (
    PRESENT,
    ORIGIN,
    ACKS,
    EXACTLY_ONE,
    DLQ_ONCE,
    BOUNDS,
    CRC,
    DUPLICATES,
    ATTEMPTS,
    POISON,
    PROCESSES,
    POWER_PRESENT,
    POWER_ACKS,
    POWER_CRC,
)
# Messages taken per call while reading a queue or group to its end.
READ_BATCH: Final = 1000
MAX_READ_CALLS: Final = 100_000
STORE_NAME: Final = re.compile(r"^[0-9]{20}\.log$")


@dataclass
class DeadLetter:
    """One message of a dead-letter queue."""

    source_offset: int
    seq: int
    reason: str
    attempts: int
    intact: bool


@dataclass
class TargetState:
    """The queue, or the group of the stream, at one moment."""

    name: str  # "queue" or "group"
    # {offset: seq} of the records of its stream, or None when the state
    # cannot read them (the queue of a running server).
    records: dict[int, int] | None
    damaged_records: list[int]
    first_offset: int
    depth: int
    damaged: int
    skipped: int
    dead_letters: list[DeadLetter]
    # Offsets available to a get, when the state read them all.
    available: set[int] | None = None


@dataclass
class LedgerSnapshot:
    """Puts and acks that returned before a state was read."""

    returned: dict[str, dict[int, int]]  # put target -> {seq: offset}
    acked: dict[str, set[int]]  # "queue" or "group" -> offsets

    @classmethod
    def take(cls, ledger: Ledger) -> LedgerSnapshot:
        ledger.refresh()
        return cls(
            returned={name: ledger.returned_puts(name) for name in ("queue", "stream")},
            acked={name: ledger.acked(name) for name in ("queue", "group")},
        )


@dataclass
class Findings:
    """Problems found by the checks of a run, by check name.

    A problem that later rounds find again (a message dead-lettered twice
    stays so) is kept once, with the context of its first round and the
    number of rounds that found it.
    """

    found: dict[str, dict[str, tuple[str, int]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    rounds: Counter[str] = field(default_factory=Counter)

    def add(self, check: str, problems: list[str], context: str = "") -> None:
        """Count one round of check and keep its problems."""
        self.rounds[check] += 1
        known = self.found[check]
        for problem in problems:
            first, count = known.get(problem, (context, 0))
            known[problem] = (first, count + 1)

    def problems(self, check: str) -> list[str]:
        """Return the distinct problems of check, each with where it was first found."""
        listed = []
        for problem, (context, count) in self.found.get(check, {}).items():
            again = f" (found {count} times)" if count > 1 else ""
            listed.append(
                f"{context}: {problem}{again}" if context else problem + again
            )
        return listed


# Reading ----------------------------------------------------------------------


def read_stream_records(
    store: SegmentStore, body_seed: int
) -> tuple[dict[int, int], list[int]]:
    """Return {offset: seq} of every record of store, and the offsets not intact."""
    records: dict[int, int] = {}
    damaged: list[int] = []
    first, end = store.first_offset, store.next_offset
    for start in range(first, end, READ_BATCH):
        for offset, _, flags, body in store.read_records(
            start, min(end, start + READ_BATCH)
        ):
            headers, payload = split_body(flags, body)
            seq, intact = inspect_message(body_seed, payload, headers)
            records[offset] = seq
            if not intact:
                damaged.append(offset)
    return records, damaged


def dead_letter_of(
    payload: bytes, headers: dict[str, str], body_seed: int
) -> DeadLetter:
    """Return the DeadLetter of one DLQ message, from its x- headers."""
    own = {key: value for key, value in headers.items() if not key.startswith("x-")}
    seq, intact = inspect_message(body_seed, payload, own)
    return DeadLetter(
        source_offset=int(headers.get("x-offset", "-1")),
        seq=seq,
        reason=headers.get("x-reason", ""),
        attempts=int(headers.get("x-attempts", "0")),
        intact=intact,
    )


def take_all(consumer: Any) -> list[Any]:
    """Get every message available now from consumer, without settling any."""
    messages: list[Any] = []
    for _ in range(MAX_READ_CALLS):
        batch = consumer.get_many(READ_BATCH, timeout=0)
        if not batch:
            return messages
        messages.extend(batch)
    raise RuntimeError(f"{consumer!r} still had messages after {MAX_READ_CALLS} calls")


def read_offline(
    data: Path, body_seed: int, segment_bytes: int, *, drain: bool
) -> dict[str, TargetState]:
    """Open data with pymq.open and return the state of the queue and the group.

    With drain, every available message is taken first (and left unsettled),
    which changes the broker: only for a copy or after the final checks.
    """
    options = {"max_in_flight": 1 << 30} if drain else {}
    with pymq.open(data, segment_bytes=segment_bytes) as broker:
        consumers: dict[str, Any] = {
            "queue": broker.queue(QUEUE, **CONSUMER_OPTIONS, **options),
            "group": broker.stream(STREAM).group(GROUP, **CONSUMER_OPTIONS, **options),
        }
        available = {
            name: {message.offset for message in take_all(consumer)} if drain else None
            for name, consumer in consumers.items()
        }
        names = broker.names()
        states = {}
        for name, consumer in consumers.items():
            dead_letters = []
            if DLQ_OF[name] in names:
                dlq_store = broker.queue(DLQ_OF[name]).stream.store
                for _, _, flags, body in dlq_store.read_records(
                    dlq_store.first_offset, dlq_store.next_offset
                ):
                    headers, payload = split_body(flags, body)
                    dead_letters.append(dead_letter_of(payload, headers, body_seed))
            store = consumer.stream.store
            records, damaged_records = read_stream_records(store, body_seed)
            stats = consumer.stats()
            states[name] = TargetState(
                name=name,
                records=records,
                damaged_records=damaged_records,
                first_offset=store.first_offset,
                depth=stats.depth,
                damaged=stats.damaged,
                skipped=stats.skipped,
                dead_letters=dead_letters,
                available=available[name],
            )
    return states


class Audit:
    """The stream as the audit group has read it, over every online check."""

    def __init__(self) -> None:
        self.records: dict[int, int] = {}
        self.damaged: list[int] = []
        self.problems: list[str] = []

    def add(self, offset: int, seq: int, intact: bool) -> None:
        known = self.records.get(offset)
        if known is not None and known != seq:
            self.problems.append(
                f"stream offset {offset} held seq {known}, now seq {seq}"
            )
        self.records[offset] = seq
        if not intact:
            self.damaged.append(offset)


def read_online(url: str, body_seed: int, audit: Audit) -> dict[str, TargetState]:
    """Read the queue's and the group's state through a fresh client of url.

    The stats are read before and after the audit group and the DLQs, and
    the reading is repeated (at most 5 times) until both agree, so that a
    request still under way when the workers were stopped cannot skew it.
    """
    with pymq.connect(url, connect_timeout=10.0, reconnect_attempts=5) as client:
        queue = client.queue(QUEUE)
        stream = client.stream(STREAM)
        group = stream.group(GROUP)
        audit_group = stream.group(AUDIT_GROUP, **AUDIT_OPTIONS)
        for _ in range(5):
            before = [_counts(queue.stats()), _counts(group.stats())]
            messages = take_all(audit_group)
            for message in messages:
                seq, intact = inspect_message(body_seed, message.body, message.headers)
                audit.add(message.offset, seq, intact)
            if messages:
                audit_group.ack_many(messages)
            dead = {
                name: read_remote_dlq(url, DLQ_OF[name], body_seed) for name in DLQ_OF
            }
            stats = {"queue": queue.stats(), "group": group.stats()}
            if before == [_counts(stats["queue"]), _counts(stats["group"])]:
                break
    states = {}
    for name, consumer_stats in stats.items():
        states[name] = TargetState(
            name=name,
            records=None if name == "queue" else dict(audit.records),
            damaged_records=[] if name == "queue" else list(audit.damaged),
            first_offset=0,
            depth=consumer_stats.depth,
            damaged=consumer_stats.damaged,
            skipped=consumer_stats.skipped,
            dead_letters=dead[name],
        )
    return states


def _counts(stats: pymq.QueueStats) -> tuple[int, ...]:
    return (stats.depth, stats.in_flight, stats.waiting, stats.dead_lettered)


def read_remote_dlq(url: str, name: str, body_seed: int) -> list[DeadLetter]:
    """Return the messages of the DLQ name, on a connection of their own.

    The deliveries are released when that connection closes.
    """
    with pymq.connect(url, connect_timeout=10.0, reconnect_attempts=5) as client:
        return [
            dead_letter_of(message.body, message.headers, body_seed)
            for message in take_all(client.queue(name))
        ]


@dataclass
class StoreReport:
    """verify() and stats() of one segment store of a data directory."""

    path: str
    records: int
    missing: int
    damaged: int
    gap_offsets: int


def verify_stores(data: Path) -> list[StoreReport]:
    """Open every segment store under data/streams and return what verify() found.

    Each store is opened with the size of its last segment, so that
    opening extends nothing. No other process may own data.
    """
    reports = []
    for folder in sorted({path.parent for path in (data / "streams").rglob("*.log")}):
        logs = sorted(name for name in os.listdir(folder) if STORE_NAME.match(name))
        if not logs:
            continue
        segment_bytes = os.path.getsize(folder / logs[-1])
        with SegmentStore(folder, segment_bytes=segment_bytes) as store:
            report = store.verify()
            stats = store.stats()
        reports.append(
            StoreReport(
                path=str(folder.relative_to(data)),
                records=int(report["records"]),  # type: ignore[call-overload]
                missing=int(report["missing"]),  # type: ignore[call-overload]
                damaged=len(report["damaged"]),  # type: ignore[arg-type]
                gap_offsets=stats["gap_offsets"],
            )
        )
    return reports


# Checking -------------------------------------------------------------------


def check_states(
    states: dict[str, TargetState],
    ledger: Ledger,
    before: LedgerSnapshot,
    findings: Findings,
    context: str,
    *,
    strict_damage: bool = True,
    allow_skipped: bool = False,
    present_check: str = PRESENT,
    acks_check: str = ACKS,
    crc_check: str = CRC,
) -> None:
    """Check states against the ledger and add the problems to findings.

    before contains the puts and acks that returned before the states were
    read, and ledger must have been refreshed after reading them. With
    strict_damage, any damaged record is a problem. Without it (a power cut
    that kept pages past a torn one), only damage to a returned put is. A
    skipped offset (one the group saw whose record is gone) is a problem
    unless allow_skipped, because a power cut can remove a record that was
    delivered before it was synced.
    """
    for name, state in states.items():
        put_target = PUT_TARGET_OF[name]
        where = name
        dead_offsets = Counter(dead.source_offset for dead in state.dead_letters)
        ack_sent = ledger.ack_sent(name)
        acked = before.acked[name]

        present: list[str] = []
        origin: list[str] = []
        crc: list[str] = []
        if state.records is not None:
            for seq, offset in sorted(before.returned[put_target].items()):
                if offset < state.first_offset:
                    if offset not in ack_sent and offset not in dead_offsets:
                        present.append(
                            f"{where}: seq {seq} (offset {offset}) was deleted below "
                            f"the first offset {state.first_offset} but never acked "
                            f"nor dead-lettered"
                        )
                elif state.records.get(offset) != seq:
                    present.append(
                        f"{where}: returned seq {seq} missing at offset {offset} "
                        f"(found {state.records.get(offset)})"
                    )
            origin.extend(_check_record_origins(state, ledger, put_target))
        for offset in state.damaged_records:
            crc.append(f"{where}: record at offset {offset} does not match its seq")
        if (strict_damage and state.damaged) or (state.skipped and not allow_skipped):
            crc.append(
                f"{where}: stats damaged {state.damaged}, skipped {state.skipped}"
            )

        acks: list[str] = []
        exactly_one: list[str] = []
        dead_once: list[str] = []
        delivered = ledger.delivered_seqs(name)
        for dead in state.dead_letters:
            if not dead.intact:
                crc.append(
                    f"{where} DLQ: message of offset {dead.source_offset} damaged"
                )
            known = (
                None if state.records is None else state.records.get(dead.source_offset)
            )
            known = delivered.get(dead.source_offset, known)
            if known is not None and known != dead.seq:
                origin.append(
                    f"{where} DLQ: offset {dead.source_offset} carries seq {dead.seq}, "
                    f"the log seq {known}"
                )
            if dead.source_offset in acked:
                acks.append(f"{where}: acked offset {dead.source_offset} is in the DLQ")
        for offset, count in sorted(dead_offsets.items()):
            if count > 1:
                dead_once.append(
                    f"{where}: offset {offset} was moved to the DLQ {count} times"
                )

        if state.available is not None:
            _check_exactly_one(
                state, ledger, acked, ack_sent, dead_offsets, acks, exactly_one
            )
        else:
            findings.add(
                BOUNDS, _check_bounds(state, ledger, before, ack_sent), context
            )
        findings.add(present_check, present, context)
        findings.add(ORIGIN, origin, context)
        findings.add(crc_check, crc, context)
        findings.add(acks_check, acks, context)
        findings.add(EXACTLY_ONE, exactly_one, context)
        findings.add(DLQ_ONCE, dead_once, context)


def _check_record_origins(
    state: TargetState, ledger: Ledger, put_target: str
) -> list[str]:
    """Check that each record is a put of this target, at its offset, once."""
    problems = []
    assert state.records is not None
    offsets_of: dict[int, int] = {}
    for offset, seq in sorted(state.records.items()):
        put = ledger.puts.get(seq)
        if put is None:
            problems.append(f"{state.name}: offset {offset} holds seq {seq}, never put")
            continue
        if put.target != put_target:
            problems.append(
                f"{state.name}: offset {offset} holds seq {seq}, put to the "
                f"{put.target}"
            )
        if put.status == "returned" and put.offset != offset:
            problems.append(
                f"{state.name}: offset {offset} holds seq {seq}, put at {put.offset}"
            )
        if seq in offsets_of:
            problems.append(
                f"{state.name}: seq {seq} is at offsets {offsets_of[seq]} and {offset}"
            )
        offsets_of[seq] = offset
    return problems


def _check_exactly_one(
    state: TargetState,
    ledger: Ledger,
    acked: set[int],
    ack_sent: set[int],
    dead_offsets: Counter[int],
    acks: list[str],
    exactly_one: list[str],
) -> None:
    """Check that each message is exactly one of acked, available or dead-lettered."""
    assert state.available is not None
    messages = message_offsets(state, ledger)
    for offset in sorted(messages):
        in_dlq = offset in dead_offsets
        available = offset in state.available
        if in_dlq and available:
            exactly_one.append(
                f"{state.name}: offset {offset} is available and in the DLQ"
            )
        elif not in_dlq and not available and offset not in ack_sent:
            exactly_one.append(
                f"{state.name}: offset {offset} is settled, but no consumer acked it"
            )
        if (in_dlq or available) and offset in acked:
            acks.append(
                f"{state.name}: acked offset {offset} is "
                f"{'in the DLQ' if in_dlq else 'available again'}"
            )
    for offset in state.available:
        if offset not in messages:
            exactly_one.append(f"{state.name}: available offset {offset} has no record")


def message_offsets(state: TargetState, ledger: Ledger) -> set[int]:
    """Return the offsets of every message of the state's queue or group.

    A queue deletes its acked segments, so below its first offset the
    messages are those the logs name: returned puts and deliveries.
    """
    assert state.records is not None
    messages = set(state.records)
    below = set(ledger.delivered_seqs(state.name))
    if state.name == "queue":
        below.update(ledger.returned_puts("queue").values())
    messages.update(offset for offset in below if offset < state.first_offset)
    return messages


def final_counts(state: TargetState, ledger: Ledger) -> dict[str, int]:
    """Return the messages of a drained state: acked, dead-lettered and available."""
    messages = message_offsets(state, ledger)
    dead = {dead.source_offset for dead in state.dead_letters}
    available = state.available or set()
    return {
        "messages": len(messages),
        "acked": len(messages - dead - available),
        "dead-lettered": len(messages & dead),
        "available": len(messages & available),
    }


def _check_bounds(
    state: TargetState, ledger: Ledger, before: LedgerSnapshot, ack_sent: set[int]
) -> list[str]:
    """Check depth against the minimum and maximum unsettled messages the logs allow."""
    dead = {dead.source_offset for dead in state.dead_letters}
    if state.records is not None:
        present_low = present_high = {
            offset for offset in state.records if offset >= state.first_offset
        }
        settled_low = before.acked[state.name] | dead
        settled_high = ack_sent | dead
    else:
        # By sequence number: the queue's records are out of reach.
        seq_of = ledger.delivered_seqs(state.name)
        put_target = PUT_TARGET_OF[state.name]
        present_low = (
            set(before.returned[put_target])
            | set(seq_of.values())
            | {dead_letter.seq for dead_letter in state.dead_letters}
        )
        present_high = present_low | ledger.maybe_puts(put_target)
        dead_seqs = {dead_letter.seq for dead_letter in state.dead_letters}
        settled_low = {
            seq_of[offset] for offset in before.acked[state.name]
        } | dead_seqs
        settled_high = {
            seq_of[offset] for offset in ack_sent if offset in seq_of
        } | dead_seqs
    minimum = len(present_low - settled_high)
    maximum = len(present_high - settled_low)
    if minimum <= state.depth <= maximum:
        return []
    return [
        f"{state.name}: depth {state.depth} is outside [{minimum}, {maximum}], the "
        f"unsettled messages the logs allow"
    ]


def check_failing_messages(
    states: dict[str, TargetState], findings: Findings, context: str
) -> Counter[str]:
    """Check that nacked and rejected messages ended in the DLQ, and only with cause.

    Returns the DLQ messages counted by cause.
    """
    problems = []
    causes: Counter[str] = Counter()
    for name, state in states.items():
        assert state.records is not None
        dead = {dead.source_offset: dead for dead in state.dead_letters}
        for offset, seq in sorted(state.records.items()):
            expected = settlement_of(seq)
            if expected != "ack" and offset not in dead:
                problems.append(
                    f"{name}: offset {offset} (seq {seq}, {expected}) is not in the DLQ"
                )
        for dead_letter in state.dead_letters:
            expected = settlement_of(dead_letter.seq)
            if expected == "reject":
                causes["rejected"] += 1
            elif expected == "nack":
                causes["nacked"] += 1
                if dead_letter.attempts != MAX_DELIVERIES:
                    problems.append(
                        f"{name}: nacked seq {dead_letter.seq} moved to the DLQ after "
                        f"{dead_letter.attempts} attempts, not {MAX_DELIVERIES}"
                    )
            elif dead_letter.reason.startswith("consumer lost"):
                causes["lost with its consumer"] += 1
                if dead_letter.attempts != MAX_DELIVERIES:
                    problems.append(
                        f"{name}: seq {dead_letter.seq} lost with its consumer moved "
                        f"to the DLQ after {dead_letter.attempts} attempts, not "
                        f"{MAX_DELIVERIES}"
                    )
            else:
                problems.append(
                    f"{name}: seq {dead_letter.seq} (acked by consumers) moved to "
                    f"the DLQ: {dead_letter.reason}"
                )
    findings.add(POISON, problems, context)
    return causes
