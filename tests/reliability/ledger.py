"""What the workers of a torture run did, read back from their line logs.

The Ledger reads every log of a run (the formats are in records.py) and
keeps the puts by sequence number and the deliveries by queue or group and
offset, with the kills the harness made. The checks here need nothing but
the logs; those that compare the logs with a broker are in state.py.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.reliability.records import PUT_TARGET_OF, LineReader

# An ack that raised one of these was not applied. After any other error it
# may or may not have been.
NOT_APPLIED = frozenset({"StaleReceiptError"})
# Kills after which the broker releases every delivery: the server, or the
# embedded worker, which is the broker and all its consumers.
BROKER_ROLES = frozenset({"server", "embedded"})
# A consumer killed during a long poll can still be handed a message put
# just after its death, until the server has processed the closed
# connection. The server then releases the delivery, with its attempt
# counted. So a kill this long before a put can explain an unlogged delivery.
LONG_POLL_GRACE_NS = 1_000_000_000


@dataclass
class Put:
    """One message put by the producer, by sequence number."""

    seq: int
    target: str  # "queue" or "stream"
    pid: int
    tried_ns: int
    status: str = "pending"  # "returned", "failed" (raised) or "pending"
    offset: int = -1
    error: str = ""


@dataclass
class Delivery:
    """One delivery logged by a consumer, with what it did to settle it."""

    target: str  # "queue" or "group"
    offset: int
    seq: int
    attempt: int
    called_ns: int
    returned_ns: int
    pid: int
    log: str
    intact: bool
    # op ("ack", "nack", "reject") -> "sent", "returned" or an error class
    outcomes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Kill:
    """One SIGKILL of the harness."""

    ns: int
    role: str  # "server", "producer", "consumer" or "embedded"
    pid: int


class Ledger:
    """Puts, deliveries and kills of one run, updated by refresh()."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.puts: dict[int, Put] = {}
        self.deliveries: dict[tuple[str, int], list[Delivery]] = defaultdict(list)
        self.kills: list[Kill] = []
        self.malformed: list[str] = []
        self.roles: dict[int, str] = {}
        self._readers: dict[str, LineReader] = {}
        self._pids: dict[str, int] = {}
        self._open: dict[tuple[str, str, int, int], Delivery] = {}

    # Reading ----------------------------------------------------------------

    def refresh(self) -> None:
        """Read the lines appended to every log since the last refresh."""
        for path in sorted(self.log_dir.glob("*.log")):
            reader = self._readers.get(path.name)
            if reader is None:
                reader = self._readers[path.name] = LineReader(path)
            for fields in reader.read_new():
                try:
                    self._add(path.name, fields)
                except (ValueError, IndexError, KeyError) as exc:
                    self.malformed.append(f"{path.name}: {' '.join(fields)!r}: {exc}")

    def _add(self, log: str, fields: list[str]) -> None:
        kind = fields[0]
        if kind == "S":
            self._pids[log] = int(fields[2])
            self.roles[int(fields[2])] = fields[3]
        elif kind == "T":
            self._add_put(log, fields)
        elif kind in ("D", "E"):
            seq, count = int(fields[2]), int(fields[4])
            for index in range(count):
                put = self.puts[seq + index]
                if kind == "D":
                    put.status = "returned"
                    put.offset = int(fields[5]) + index
                else:
                    put.status = "failed"
                    put.error = fields[5]
        elif kind == "G":
            self._add_delivery(log, fields)
        elif kind in ("I", "O", "X"):
            op, target = fields[2], fields[3]
            key = (log, target, int(fields[4]), int(fields[5]))
            delivery = self._open[key]
            if kind == "I":
                delivery.outcomes[op] = "sent"
            elif kind == "O":
                delivery.outcomes[op] = "returned"
            else:
                delivery.outcomes[op] = fields[6]
        else:
            raise ValueError(f"unknown line kind {kind!r}")

    def _add_put(self, log: str, fields: list[str]) -> None:
        seq, target, count = int(fields[2]), fields[3], int(fields[4])
        for index in range(count):
            if seq + index in self.puts:
                raise ValueError(f"sequence number {seq + index} was put twice")
            self.puts[seq + index] = Put(
                seq + index, target, self._pids[log], int(fields[1])
            )

    def _add_delivery(self, log: str, fields: list[str]) -> None:
        delivery = Delivery(
            target=fields[3],
            offset=int(fields[4]),
            seq=int(fields[5]),
            attempt=int(fields[6]),
            called_ns=int(fields[1]),
            returned_ns=int(fields[2]),
            pid=self._pids[log],
            log=log,
            intact=fields[7] == "1",
        )
        self.deliveries[(delivery.target, delivery.offset)].append(delivery)
        self._open[(log, delivery.target, delivery.offset, delivery.attempt)] = delivery

    def add_kill(self, ns: int, role: str, pid: int) -> None:
        """Record a SIGKILL sent at ns (time.monotonic_ns()) to pid."""
        self.kills.append(Kill(ns, role, pid))

    # Views ----------------------------------------------------------------

    def returned_puts(self, target: str) -> dict[int, int]:
        """Return {seq: offset} of the returned puts to target ("queue" or "stream")."""
        return {
            put.seq: put.offset
            for put in self.puts.values()
            if put.target == target and put.status == "returned"
        }

    def maybe_puts(self, target: str) -> set[int]:
        """Return the sequence numbers of puts to target that did not return."""
        return {
            put.seq
            for put in self.puts.values()
            if put.target == target and put.status != "returned"
        }

    def delivered_seqs(self, target: str) -> dict[int, int]:
        """Return {offset: seq} of the delivered messages of "queue" or "group"."""
        return {
            offset: runs[0].seq
            for (name, offset), runs in self.deliveries.items()
            if name == target
        }

    def acked(self, target: str) -> set[int]:
        """Return the offsets of target with an ack that returned."""
        return self._offsets_with(target, lambda outcome: outcome == "returned")

    def ack_sent(self, target: str) -> set[int]:
        """Return the offsets of target with an ack that may have been applied."""
        return self._offsets_with(target, lambda outcome: outcome not in NOT_APPLIED)

    def _offsets_with(self, target: str, accept: Callable[[str], bool]) -> set[int]:
        found = set()
        for (name, offset), runs in self.deliveries.items():
            if name != target:
                continue
            for delivery in runs:
                outcome = delivery.outcomes.get("ack")
                if outcome is not None and accept(outcome):
                    found.add(offset)
                    break
        return found

    # Checks ---------------------------------------------------------------

    def check_origins(self) -> list[str]:
        """Check that every delivery is of a message the producer put there.

        The message's sequence number must have a T line of the delivery's
        stream, a put that returned must name the delivery's offset, and
        one offset must always carry the same sequence number.
        """
        problems = []
        for (target, offset), runs in sorted(self.deliveries.items()):
            stream = PUT_TARGET_OF[target]
            for delivery in runs:
                put = self.puts.get(delivery.seq)
                where = f"{target} offset {offset} attempt {delivery.attempt}"
                if put is None:
                    problems.append(
                        f"{where}: sequence number {delivery.seq} was never put"
                    )
                elif put.target != stream:
                    problems.append(
                        f"{where}: seq {delivery.seq} was put to the {put.target}"
                    )
                elif put.status == "returned" and put.offset != offset:
                    problems.append(
                        f"{where}: seq {delivery.seq} was put at offset {put.offset}"
                    )
                if delivery.seq != runs[0].seq:
                    problems.append(
                        f"{where}: carries seq {delivery.seq}, but seq {runs[0].seq} "
                        f"before"
                    )
        return problems

    def check_intact(self) -> list[str]:
        """Check that every delivered body and header matched its sequence number."""
        return [
            f"{delivery.target} offset {delivery.offset} attempt {delivery.attempt} "
            f"(seq {delivery.seq}) was delivered damaged"
            for runs in self.deliveries.values()
            for delivery in runs
            if not delivery.intact
        ]

    def check_attempts(self) -> list[str]:
        """Check that attempt numbers of one offset are distinct and rise with time.

        A delivery is journaled before it is handed out, so a kill never
        makes the broker hand out one attempt number twice.
        """
        problems = []
        for (target, offset), runs in sorted(self.deliveries.items()):
            counts = Counter(delivery.attempt for delivery in runs)
            for attempt, count in sorted(counts.items()):
                if count > 1:
                    problems.append(
                        f"{target} offset {offset}: attempt {attempt} was delivered "
                        f"{count} times"
                    )
            ordered = sorted(runs, key=lambda delivery: delivery.attempt)
            for earlier, later in itertools.pairwise(ordered):
                if (
                    later.attempt > earlier.attempt
                    and later.returned_ns < earlier.called_ns
                ):
                    problems.append(
                        f"{target} offset {offset}: attempt {later.attempt} was "
                        f"delivered before attempt {earlier.attempt}"
                    )
        return problems

    def check_acks_kept(self) -> list[str]:
        """Check that no offset is delivered again after an ack of it returned."""
        problems = []
        for (target, offset), runs in sorted(self.deliveries.items()):
            acked = [d.attempt for d in runs if d.outcomes.get("ack") == "returned"]
            if not acked:
                continue
            later = [d.attempt for d in runs if d.attempt > min(acked)]
            if later:
                problems.append(
                    f"{target} offset {offset}: acked at attempt {min(acked)}, "
                    f"delivered again at attempt {max(later)}"
                )
        return problems

    def classify_redeliveries(self) -> tuple[Counter[str], list[str]]:
        """Return the redeliveries counted by cause, and those with no cause.

        A redelivery is a delivery of an offset with an attempt above 1 or
        an offset logged before. Its causes, in order: "nack" (the attempt
        before was nacked), "consumer kill" (its consumer was killed before
        the redelivery returned), "broker kill" (the server or embedded
        worker was killed between the two), or "unlogged" (the attempt
        before was never logged, and a consumer of the same queue or group,
        or the broker, was killed between the last logged event of the
        message, less LONG_POLL_GRACE_NS, and this delivery).
        """
        causes: Counter[str] = Counter()
        problems = []
        broker_times = sorted(
            kill.ns for kill in self.kills if kill.role in BROKER_ROLES
        )
        takers = {
            target: sorted(
                kill.ns
                for kill in self.kills
                if kill.role in BROKER_ROLES
                or self.roles.get(kill.pid) == f"consumer-{target}"
            )
            for target in ("queue", "group")
        }
        killed_pids: dict[int, list[int]] = defaultdict(list)
        for kill in self.kills:
            killed_pids[kill.pid].append(kill.ns)
        for (target, offset), runs in sorted(self.deliveries.items()):
            ordered = sorted(
                runs, key=lambda delivery: (delivery.attempt, delivery.called_ns)
            )
            for index, delivery in enumerate(ordered):
                if index == 0 and delivery.attempt == 1:
                    continue
                before = ordered[index - 1] if index else None
                cause = self._cause(
                    delivery, before, broker_times, takers[target], killed_pids
                )
                if cause is None:
                    previous = (
                        "none logged"
                        if before is None
                        else (
                            f"attempt {before.attempt} by pid {before.pid}, "
                            f"outcomes {before.outcomes or 'none'}"
                        )
                    )
                    problems.append(
                        f"{target} offset {offset} (seq {delivery.seq}) delivered "
                        f"again at attempt {delivery.attempt} with no kill or nack "
                        f"before it; previous delivery: {previous}"
                    )
                    cause = "no cause"
                causes[cause] += 1
        return causes, problems

    def _cause(
        self,
        delivery: Delivery,
        before: Delivery | None,
        broker_times: list[int],
        takers: list[int],
        killed_pids: dict[int, list[int]],
    ) -> str | None:
        end = delivery.returned_ns
        if before is not None and before.attempt == delivery.attempt - 1:
            if "nack" in before.outcomes:
                return "nack"
            if any(
                before.called_ns < ns < end for ns in killed_pids.get(before.pid, [])
            ):
                return "consumer kill"
            if _any_between(broker_times, before.called_ns, end):
                return "broker kill"
            return None
        if before is not None:
            start = before.called_ns
        else:
            put = self.puts.get(delivery.seq)
            start = put.tried_ns if put is not None else 0
        if _any_between(takers, start - LONG_POLL_GRACE_NS, end):
            return "unlogged"
        return None


def _any_between(times: list[int], start: int, end: int) -> bool:
    """Return True when the sorted times hold one strictly between start and end."""
    index = bisect.bisect_right(times, start)
    return index < len(times) and times[index] < end
