"""Measure the segment store and print a table of messages and bytes per second.

Run from the repository root, with nothing else benchmarking at the time:

    .venv/bin/python -m benchmarks.run_store [--quick] [--only OPERATION]

Every case runs in rounds: round 1 of every case, then round 2, then round 3,
so that a burst of other work on the machine spreads over the cases. Each
round uses a fresh store in a fresh temporary folder (under $PYMQ_BENCH_DIR
when set), deleted right after. A row shows the median of the rounds and the
lowest and highest figure. MB/s counts payload bytes only, in units of 10^6
bytes. Garbage collection stays on, as in an application, so read_views
pays for collecting the memoryviews it creates.

Appends go through pymq.open_store, so "interval" has its background flush
thread. Batch appends write 2.5 default 64 MiB segments (1.25 with --quick),
so every round rolls over into fresh segments. Reads read a store filled just
before, so the records come from the page cache, not the disk.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pymq
from benchmarks.benchmarks.common import (
    FSYNC_POLICIES,
    PAYLOAD_SIZES,
    Scratch,
    append_each,
    append_threads,
    batch_size,
    call_batches,
    fill_store,
    fsync_latencies,
    open_store,
    packed_payloads,
    payloads,
    record_bytes,
    rollover_calls,
)
from pymq import _core
from pymq._core import CRC32C_IMPLEMENTATION

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3
GOAL_PAYLOAD = 100
GROUP_THREADS = 8


@dataclass(frozen=True)
class Budget:
    """How much each round of a case may do: counts, volume and time."""

    single_bytes: int  # record bytes written by single appends
    single_max: int  # and at most this many appends
    always_count: int  # single appends with fsync="always", one thread
    threads_count: int  # appends with fsync="always", over all threads
    batch_segments: float  # default segments filled by batch appends
    read_bytes: int  # record bytes in the store that reads read
    read_max: int  # and at most this many records
    probe_count: int  # write + fsync pairs of the ceiling probe
    seconds: float  # a round stops at its next check past this


FULL = Budget(
    single_bytes=128 << 20,
    single_max=1_000_000,
    always_count=2000,
    threads_count=8000,
    batch_segments=2.5,
    read_bytes=128 << 20,
    read_max=1_000_000,
    probe_count=1000,
    seconds=30.0,
)
QUICK = Budget(
    single_bytes=32 << 20,
    single_max=250_000,
    always_count=400,
    threads_count=1600,
    batch_segments=1.25,
    read_bytes=32 << 20,
    read_max=250_000,
    probe_count=200,
    seconds=10.0,
)


@dataclass(frozen=True)
class Sample:
    """One round: messages handled in seconds."""

    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


@dataclass
class Case:
    """One row of the table: an operation at one payload and fsync policy."""

    operation: str
    payload: int
    fsync: str  # the policy, or "-" where it plays no part
    batch: int  # messages per call
    run: Callable[[Scratch], Sample]
    samples: list[Sample] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [sample.rate for sample in self.samples]

    def median(self) -> float:
        return statistics.median(self.rates())


def timed(body: Callable[[], int]) -> Sample:
    """Time body, which returns the messages it handled."""
    gc.collect()
    start = time.perf_counter()
    messages = body()
    return Sample(messages, time.perf_counter() - start)


# Cases ------------------------------------------------------------------


def ceiling_case(budget: Budget) -> Case:
    def run(scratch: Scratch) -> Sample:
        latencies = fsync_latencies(scratch.path, budget.probe_count, budget.seconds)
        return Sample(1, statistics.median(latencies))

    return Case("write+fsync 4 KiB (p50)", 4096, "-", 1, run)


def single_append_case(budget: Budget, payload: int, fsync: str) -> Case:
    if fsync == "always":
        count = budget.always_count
    else:
        count = min(budget.single_max, budget.single_bytes // record_bytes(payload))
    bodies = payloads(payload, count)

    def run(scratch: Scratch) -> Sample:
        with open_store(scratch, fsync) as store:
            deadline = time.perf_counter() + budget.seconds
            return timed(lambda: append_each(store, bodies, deadline))

    return Case("append", payload, fsync, 1, run)


def threaded_append_case(budget: Budget, payload: int) -> Case:
    bodies = payloads(payload, budget.threads_count)

    def run(scratch: Scratch) -> Sample:
        with open_store(scratch, "always") as store:
            messages, seconds = append_threads(
                store, bodies, GROUP_THREADS, budget.seconds
            )
        return Sample(messages, seconds)

    return Case(f"append, {GROUP_THREADS} threads", payload, "always", 1, run)


def check_rolled(store: pymq.SegmentStore) -> None:
    segments = store.stats()["segments"]
    if segments < 2:
        raise RuntimeError(
            f"batch appends stayed in {segments} segment; they must roll over"
        )


def append_many_case(budget: Budget, payload: int, fsync: str) -> Case:
    batch = batch_size(payload)
    bodies = payloads(payload, batch)
    calls = rollover_calls(payload, batch, budget.batch_segments)

    def run(scratch: Scratch) -> Sample:
        with open_store(scratch, fsync) as store:
            deadline = time.perf_counter() + budget.seconds
            sample = timed(
                lambda: (
                    batch
                    * call_batches(lambda: store.append_many(bodies), calls, deadline)
                )
            )
            check_rolled(store)
        return sample

    return Case("append_many", payload, fsync, batch, run)


def append_buffer_case(budget: Budget, payload: int, fsync: str) -> Case:
    batch = batch_size(payload)
    buffer, lengths = packed_payloads(payload, batch)
    calls = rollover_calls(payload, batch, budget.batch_segments)

    def run(scratch: Scratch) -> Sample:
        with open_store(scratch, fsync) as store:
            deadline = time.perf_counter() + budget.seconds
            sample = timed(
                lambda: (
                    batch
                    * call_batches(
                        lambda: store.append_buffer(buffer, lengths), calls, deadline
                    )
                )
            )
            check_rolled(store)
        return sample

    return Case("append_buffer", payload, fsync, batch, run)


def read_case(budget: Budget, payload: int, operation: str) -> Case:
    count = min(budget.read_max, budget.read_bytes // record_bytes(payload))
    batch = 1 if operation in ("read", "read_view") else batch_size(payload)

    def run(scratch: Scratch) -> Sample:
        with open_store(scratch, "never") as store:
            fill_store(store, payload, count)
            deadline = time.perf_counter() + budget.seconds
            reader = getattr(store, operation)
            if batch == 1:
                sample = timed(lambda: read_each(reader, count, deadline))
            else:
                sample = timed(lambda: read_ranges(reader, count, batch, deadline))
        return sample

    return Case(operation, payload, "-", batch, run)


def read_each(reader: Callable[[int], object], count: int, deadline: float) -> int:
    """Read offsets 0 to count - 1 one call each; return the reads done."""
    done = 0
    for start in range(0, count, 1024):
        stop = min(start + 1024, count)
        for offset in range(start, stop):
            reader(offset)
        done = stop
        if time.perf_counter() > deadline:
            break
    return done


def read_ranges(
    reader: Callable[[int, int], Sequence[object]],
    count: int,
    batch: int,
    deadline: float,
) -> int:
    """Read offsets 0 to count - 1 in ranges of batch; return records read."""
    done = 0
    for start in range(0, count, batch):
        got = len(reader(start, min(start + batch, count)))
        if got != min(batch, count - start):
            raise RuntimeError(f"range from {start} returned {got} records")
        done += got
        if time.perf_counter() > deadline:
            break
    return done


def build_cases(budget: Budget) -> list[Case]:
    cases = [ceiling_case(budget)]
    for payload in PAYLOAD_SIZES:
        for fsync in FSYNC_POLICIES:
            cases.append(single_append_case(budget, payload, fsync))
        cases.append(threaded_append_case(budget, payload))
    for payload in PAYLOAD_SIZES:
        for fsync in FSYNC_POLICIES:
            cases.append(append_many_case(budget, payload, fsync))
            cases.append(append_buffer_case(budget, payload, fsync))
    for payload in PAYLOAD_SIZES:
        for operation in ("read", "read_view", "read_range", "read_views"):
            cases.append(read_case(budget, payload, operation))
    return cases


# Report -----------------------------------------------------------------


def si(value: float) -> str:
    """Format value with 3 significant digits and a k or M suffix."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def payload_name(size: int) -> str:
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


def command_output(args: Sequence[str]) -> str:
    try:
        result = subprocess.run(
            args, capture_output=True, text=True, check=True, timeout=10, cwd=REPO
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def filesystem_type(folder: Path) -> str:
    lines = command_output(["df", "-T", str(folder)]).splitlines()
    if len(lines) < 2:
        return "unknown"
    return lines[-1].split()[1]


def build_time() -> str:
    """Return the modification time of the compiled core, in UTC."""
    built = os.stat(_core.__file__).st_mtime
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(built))


def source_state() -> str:
    changed = command_output(["git", "status", "--porcelain", "--", "src"])
    if changed == "unknown":
        return ""
    if changed:
        return f", {len(changed.splitlines())} files changed or new under src/"
    return ", src/ clean"


def machine_lines(scratch_parent: Path) -> list[str]:
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"commit: {command_output(['git', 'rev-parse', '--short', 'HEAD'])}"
        f"{source_state()}",
        f"pymq: {pymq.__version__}, CRC32C: {CRC32C_IMPLEMENTATION}, "
        f"pymq._core built {build_time()}",
        f"CPU: {cpu_model()}, {os.cpu_count()} cores",
        f"Python: {platform.python_version()}, kernel {platform.release()}",
        f"folder: {scratch_parent} ({filesystem_type(scratch_parent)})",
        f"load average at start: {load}",
    ]


def ceiling_rate(cases: Sequence[Case]) -> float:
    return cases[0].median()


def table(cases: Sequence[Case]) -> list[str]:
    ceiling = ceiling_rate(cases)
    lines = [
        "| operation | payload | fsync | batch | msg/s | MB/s | min - max msg/s"
        " | x ceiling |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        rates = case.rates()
        median = case.median()
        mb = si(median * case.payload / 1e6)
        spread = f"{si(min(rates))} - {si(max(rates))}"
        single_always = case.fsync == "always" and case.batch == 1
        ratio = f"{median / ceiling:.2f}" if single_always else ""
        lines.append(
            f"| {case.operation} | {payload_name(case.payload)} | {case.fsync} "
            f"| {case.batch} | {si(median)} | {mb} | {spread} | {ratio} |"
        )
    return lines


def find(cases: Sequence[Case], operation: str, fsync: str) -> Case | None:
    for case in cases:
        if (case.operation, case.payload, case.fsync) == (
            operation,
            GOAL_PAYLOAD,
            fsync,
        ):
            return case
    return None


def goal_lines(cases: Sequence[Case]) -> list[str]:
    """Compare the 100 B figures with the goals of docs/benchmarks.md."""
    ceiling = ceiling_rate(cases)
    threaded = f"append, {GROUP_THREADS} threads"
    goals = [
        ("append", "interval", 3e6, "msg/s"),
        ("append", "never", 3e6, "msg/s"),
        ("append_many", "interval", 10e6, "msg/s"),
        ("append_many", "never", 10e6, "msg/s"),
        ("append_buffer", "interval", 10e6, "msg/s"),
        ("append_buffer", "never", 10e6, "msg/s"),
        ("read", "-", 3e6, "msg/s"),
        ("read_view", "-", 3e6, "msg/s"),
        ("read_range", "-", 10e6, "msg/s"),
        ("read_views", "-", 10e6, "msg/s"),
        ("append", "always", 0.8, "x ceiling"),
        (threaded, "always", 5.0, "x ceiling"),
    ]
    lines = [
        "| goal (100 B) | fsync | target | figure | met |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for operation, fsync, target, unit in goals:
        case = find(cases, operation, fsync)
        if case is None or not case.samples:
            continue
        figure = case.median()
        if unit == "x ceiling":
            figure /= ceiling
            figure_text, target_text = f"{figure:.2f}", f"{target:g}"
        else:
            figure_text, target_text = si(figure), si(target)
        met = "yes" if figure >= target else f"no ({figure / target:.1%} of it)"
        lines.append(
            f"| {operation} | {fsync} | {target_text} {unit} "
            f"| {figure_text} {unit} | {met} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run_store",
        description="Measure the pymq segment store and print a table.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller counts and volumes, for a check that every case runs",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="OPERATION",
        help="run only cases whose operation starts with this (repeatable); "
        "the fsync ceiling always runs",
    )
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL

    cases = build_cases(budget)
    if args.only:
        cases = [cases[0]] + [
            case
            for case in cases[1:]
            if any(case.operation.startswith(name) for name in args.only)
        ]

    with Scratch() as probe:
        scratch_parent = probe.path.parent
    print(f"# run_store{' --quick' if args.quick else ''}, {ROUNDS} rounds")
    for line in machine_lines(scratch_parent):
        print(f"# {line}")
    sys.stdout.flush()

    for round_number in range(1, ROUNDS + 1):
        for index, case in enumerate(cases, 1):
            print(
                f"round {round_number}/{ROUNDS}, case {index}/{len(cases)}: "
                f"{case.operation} {payload_name(case.payload)} {case.fsync}",
                file=sys.stderr,
                flush=True,
            )
            with Scratch() as scratch:
                case.samples.append(case.run(scratch))

    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"# load average at end: {load}")
    print()
    print("\n".join(table(cases)))
    print()
    print("\n".join(goal_lines(cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
