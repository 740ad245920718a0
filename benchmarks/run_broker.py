"""Measure the embedded broker's queue beside in-process Python queues.

Run from the repository root, with nothing else benchmarking at the time:

    .venv/bin/python -m benchmarks.run_broker [--quick] [--skip-backlog]

A pymq queue ("jobs" in a broker opened with pymq.open) and the baselines
queue.Queue, queue.SimpleQueue, asyncio.Queue and collections.deque run in
this one process. The cases run in rounds: round 1 of every case, then
round 2, then round 3, so a burst of other work on the machine spreads over
the cases.
Each pymq round opens a fresh broker in a fresh temporary folder (under
$PYMQ_BENCH_DIR when set), deleted right after.

Two forms: "put, then get" puts N messages and then gets (and, for pymq,
acks) N; "interleaved" puts, gets and acks one message (or one batch) at a
time. A row shows the median of the rounds and the lowest and highest
figure. MB/s counts body bytes only, in units of 10^6 bytes. The ratios
divide medians taken in this run, and their spread divides the figures of
the same round.

The backlog case fills a queue with a large backlog in a child process and
reports that process's anonymous resident memory (RssAnon), which leaves
out the mapped segments and the page cache, and tracemalloc's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import queue
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from benchmarks.benchmarks.common import (
    BROKER_PAYLOAD_SIZES,
    QUEUE_BATCH,
    Scratch,
    backlog_heap,
    batches,
    call_threads,
    fsync_latencies,
    get_ack_batches,
    get_ack_each,
    open_broker,
    payloads,
    produce_consume,
    put_batches,
    put_each,
    put_get_ack_batches,
    put_get_ack_each,
    put_then_get,
    record_bytes,
)
from benchmarks.run_store import machine_lines, payload_name, si

ROUNDS = 3
GOAL_PAYLOAD = 100
PRODUCER_THREADS = 8
# The rows whose batches are read with get_batch rather than get_many.
COLUMNS_SYSTEM = "pymq get_batch"
BACKLOG_PAYLOAD = 1024
# The large backlog takes at most this share of the free disk space.
BACKLOG_DISK_SHARE = 4
BACKLOG_STEP = 64 << 20
# Seconds the parent waits for a backlog child before it raises TimeoutError.
# The child stops filling at its own deadline, well before this.
BACKLOG_TIMEOUT = 600.0
PUT_THEN_GET = "put, then get"
INTERLEAVED = "interleaved"


@dataclass(frozen=True)
class Budget:
    """How much each round of a case may do: counts, volume and time."""

    record_bytes: int  # record bytes a round puts, without fsync="always"
    max_messages: int  # and at most this many messages
    always_count: int  # messages a round puts with fsync="always"
    probe_count: int  # write + fsync pairs of the ceiling probe
    small_backlog: int  # record bytes of the small backlog
    large_backlog: int  # record bytes of the large backlog, at most
    seconds: float  # a round stops at its next check past this


FULL = Budget(
    record_bytes=128 << 20,
    max_messages=500_000,
    always_count=2000,
    probe_count=1000,
    small_backlog=64 << 20,
    large_backlog=2 << 30,
    seconds=30.0,
)
QUICK = Budget(
    record_bytes=16 << 20,
    max_messages=50_000,
    always_count=200,
    probe_count=200,
    small_backlog=16 << 20,
    large_backlog=256 << 20,
    seconds=10.0,
)


@dataclass(frozen=True)
class Sample:
    """One round: messages moved through the queue in seconds.

    For the "put, then get" form, put_rate and get_rate are the rates of
    the two phases on their own; seconds is the sum of both phases.
    """

    messages: int
    seconds: float
    put_rate: float | None = None
    get_rate: float | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


@dataclass
class Case:
    """One row of the table: one queue, form, payload, fsync and batch."""

    system: str
    form: str
    payload: int
    fsync: str  # the policy, or "-" where it plays no part
    batch: int  # messages per call
    run: Callable[[Scratch], Sample]
    samples: list[Sample] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [sample.rate for sample in self.samples]

    def median(self) -> float:
        return statistics.median(self.rates())

    def phase_median(self, phase: str) -> float | None:
        values = [getattr(sample, f"{phase}_rate") for sample in self.samples]
        if None in values:
            return None
        return statistics.median(values)


def two_phases(messages: int, put_seconds: float, get_seconds: float) -> Sample:
    return Sample(
        messages,
        put_seconds + get_seconds,
        put_rate=messages / put_seconds,
        get_rate=messages / get_seconds,
    )


def message_count(budget: Budget, payload: int, fsync: str) -> int:
    if fsync == "always":
        return budget.always_count
    return min(budget.max_messages, budget.record_bytes // record_bytes(payload))


# pymq cases -------------------------------------------------------------


def pymq_case(
    budget: Budget,
    payload: int,
    fsync: str,
    batch: int,
    form: str,
    columns: bool = False,
) -> Case:
    """Return a pymq case. With columns, batches are read with get_batch."""
    bodies = payloads(payload, message_count(budget, payload, fsync))
    chunks = batches(bodies, batch)

    def run(scratch: Scratch) -> Sample:
        broker, jobs = open_broker(scratch, fsync)
        try:
            deadline = time.perf_counter() + budget.seconds
            if form == INTERLEAVED:
                start = time.perf_counter()
                if batch == 1:
                    done = put_get_ack_each(jobs, bodies, deadline)
                else:
                    done = put_get_ack_batches(jobs, chunks, deadline, columns)
                return Sample(done, time.perf_counter() - start)
            start = time.perf_counter()
            if batch == 1:
                put = put_each(jobs, bodies, deadline)
            else:
                put = put_batches(jobs, chunks, deadline)
            middle = time.perf_counter()
            if batch == 1:
                done = get_ack_each(jobs, put, deadline + budget.seconds)
            else:
                done = get_ack_batches(
                    jobs, put, deadline + budget.seconds, batch, columns
                )
            end = time.perf_counter()
            if done != put:
                raise RuntimeError(f"drain timed out after {done} of {put} messages")
            return two_phases(done, middle - start, end - middle)
        finally:
            broker.close()

    return Case(COLUMNS_SYSTEM if columns else "pymq", form, payload, fsync, batch, run)


def producer_threads_case(budget: Budget, payload: int) -> Case:
    """fsync="always": PRODUCER_THREADS threads put, then one thread drains."""
    bodies = payloads(payload, budget.always_count)

    def run(scratch: Scratch) -> Sample:
        broker, jobs = open_broker(scratch, "always")
        try:
            put, put_seconds = call_threads(
                jobs.put, bodies, PRODUCER_THREADS, budget.seconds
            )
            start = time.perf_counter()
            done = get_ack_batches(jobs, put, start + budget.seconds)
            get_seconds = time.perf_counter() - start
            if done != put:
                raise RuntimeError(f"drain timed out after {done} of {put} messages")
            return two_phases(done, put_seconds, get_seconds)
        finally:
            broker.close()

    form = f"{PRODUCER_THREADS} producer threads, then get"
    return Case("pymq", form, payload, "always", 1, run)


# Baselines --------------------------------------------------------------


def run_baseline(
    make: Callable[[], tuple[Callable[[bytes], object], Callable[[], object]]],
    bodies: Sequence[bytes],
    form: str,
    deadline: float,
) -> Sample:
    put, get = make()
    if form == INTERLEAVED:
        start = time.perf_counter()
        done = put_then_get(put, get, bodies, deadline)
        return Sample(done, time.perf_counter() - start)
    return two_phases(*produce_consume(put, get, bodies, deadline))


def queue_queue() -> tuple[Callable[[bytes], object], Callable[[], object]]:
    jobs: queue.Queue[bytes] = queue.Queue()
    return jobs.put, jobs.get


def simple_queue() -> tuple[Callable[[bytes], object], Callable[[], object]]:
    jobs: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    return jobs.put, jobs.get


def deque() -> tuple[Callable[[bytes], object], Callable[[], object]]:
    jobs: collections.deque[bytes] = collections.deque()
    return jobs.append, jobs.popleft


BASELINES = {
    "queue.Queue": queue_queue,
    "queue.SimpleQueue": simple_queue,
    "collections.deque": deque,
}


def baseline_case(budget: Budget, system: str, payload: int, form: str) -> Case:
    bodies = payloads(payload, message_count(budget, payload, "never"))

    def run(scratch: Scratch) -> Sample:
        deadline = time.perf_counter() + budget.seconds
        if system != "asyncio.Queue":
            return run_baseline(BASELINES[system], bodies, form, deadline)

        async def in_loop() -> Sample:
            # Created inside the running loop, as asyncio.Queue expects.
            jobs: asyncio.Queue[bytes] = asyncio.Queue()
            return run_baseline(
                lambda: (jobs.put_nowait, jobs.get_nowait), bodies, form, deadline
            )

        return asyncio.run(in_loop())

    return Case(system, form, payload, "-", 1, run)


def ceiling_case(budget: Budget) -> Case:
    def run(scratch: Scratch) -> Sample:
        latencies = fsync_latencies(scratch.path, budget.probe_count, budget.seconds)
        return Sample(1, statistics.median(latencies))

    return Case("write+fsync 4 KiB (p50)", "-", 4096, "-", 1, run)


def build_cases(budget: Budget) -> list[Case]:
    cases = [ceiling_case(budget)]
    for payload in BROKER_PAYLOAD_SIZES:
        for fsync in ("never", "interval", "always"):
            for batch in (1, QUEUE_BATCH):
                for form in (PUT_THEN_GET, INTERLEAVED):
                    cases.append(pymq_case(budget, payload, fsync, batch, form))
            for form in (PUT_THEN_GET, INTERLEAVED):
                cases.append(
                    pymq_case(budget, payload, fsync, QUEUE_BATCH, form, columns=True)
                )
        cases.append(producer_threads_case(budget, payload))
        for system in (*BASELINES, "asyncio.Queue"):
            for form in (PUT_THEN_GET, INTERLEAVED):
                cases.append(baseline_case(budget, system, payload, form))
    return cases


# Backlog ----------------------------------------------------------------


def backlog_sizes(budget: Budget, parent: str) -> tuple[list[int], str]:
    """Return the backlogs to measure, scaled down to the free disk space."""
    free = shutil.disk_usage(parent).free
    large = min(budget.large_backlog, free // BACKLOG_DISK_SHARE)
    large -= large % BACKLOG_STEP
    note = f"free space in {parent}: {free / 2**30:.1f} GiB"
    if large < 2 * budget.small_backlog:
        return [budget.small_backlog], f"{note}; no room for the large backlog"
    return [budget.small_backlog, large], note


def measure_backlogs(
    budget: Budget, parent: str
) -> tuple[list[tuple[int, dict[str, float]]], str]:
    sizes, note = backlog_sizes(budget, parent)
    results = []
    # A fresh interpreter per backlog, so one figure does not carry the
    # memory of the one before.
    context = multiprocessing.get_context("spawn")
    for size in sizes:
        print(f"backlog: {size >> 20} MiB", file=sys.stderr, flush=True)
        with Scratch() as scratch, ProcessPoolExecutor(1, mp_context=context) as pool:
            future = pool.submit(
                backlog_heap,
                str(scratch.path / "broker"),
                BACKLOG_PAYLOAD,
                size,
                budget.seconds * 4,
            )
            results.append((size, future.result(timeout=BACKLOG_TIMEOUT)))
    return results, note


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def backlog_table(results: Sequence[tuple[int, dict[str, float]]]) -> list[str]:
    lines = [
        "| backlog (records) | messages | on disk | RssAnon before open "
        "| after fill | after reopen | traced after reopen | traced peak | reopen |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for _, result in results:
        records = result["messages"] * record_bytes(BACKLOG_PAYLOAD)
        lines.append(
            f"| {mib(records)} MiB | {si(result['messages'])} "
            f"| {mib(result['disk_bytes'])} MiB | {mib(result['rss_before'])} MiB "
            f"| {mib(result['rss_filled'])} MiB | {mib(result['rss_reopened'])} MiB "
            f"| {mib(result['traced_reopened'])} MiB "
            f"| {mib(result['traced_peak'])} MiB "
            f"| {result['open_seconds'] * 1000:.1f} ms |"
        )
    return lines


def backlog_goal(results: Sequence[tuple[int, dict[str, float]]]) -> str:
    """Compare the heap of the largest backlog with that of the smallest.

    The goal counts as met when the broker's share of RssAnon (after the
    reopen, minus before the open) grew by less than 1 MiB per GiB of
    backlog.
    """
    if len(results) < 2:
        return "only one backlog size measured; no comparison"
    small, large = results[0][1], results[-1][1]
    small_heap = small["rss_reopened"] - small["rss_before"]
    large_heap = large["rss_reopened"] - large["rss_before"]
    records = (large["messages"] - small["messages"]) * record_bytes(BACKLOG_PAYLOAD)
    growth = (large_heap - small_heap) / (records / 2**30)
    met = "met" if growth < 2**20 else "not met"
    return (
        f"broker heap (RssAnon after reopen minus before open): "
        f"{mib(small_heap)} MiB with the small backlog, {mib(large_heap)} MiB "
        f"with the large one, {growth / 2**10:+.0f} KiB per GiB of backlog: "
        f"goal {met} (under 1 MiB per GiB)"
    )


# Report -----------------------------------------------------------------


def find(cases: Sequence[Case], system: str, form: str, **key: object) -> Case:
    for case in cases:
        if (case.system, case.form) != (system, form):
            continue
        if all(getattr(case, name) == value for name, value in key.items()):
            return case
    raise LookupError(f"no case {system} {form} {key}")


def cell(value: float | None) -> str:
    return "" if value is None else si(value)


def table(cases: Sequence[Case]) -> list[str]:
    lines = [
        "| queue | form | payload | fsync | batch | msg/s | MB/s | min - max msg/s"
        " | put msg/s | get msg/s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        rates = case.rates()
        median = case.median()
        mb = si(median * case.payload / 1e6)
        spread = f"{si(min(rates))} - {si(max(rates))}"
        lines.append(
            f"| {case.system} | {case.form} | {payload_name(case.payload)} "
            f"| {case.fsync} | {case.batch} | {si(median)} | {mb} | {spread} "
            f"| {cell(case.phase_median('put'))} "
            f"| {cell(case.phase_median('get'))} |"
        )
    return lines


@dataclass(frozen=True)
class Ratio:
    """A goal: the figure of one case divided by another's, at least target."""

    name: str
    form: str
    target: float
    numerator: list[float]  # per round
    denominator: list[float]  # per round, same order

    def median(self) -> float:
        return statistics.median(self.numerator) / statistics.median(self.denominator)

    def spread(self) -> tuple[float, float]:
        per_round = [
            a / b for a, b in zip(self.numerator, self.denominator, strict=True)
        ]
        return min(per_round), max(per_round)


def put_rates(case: Case) -> list[float]:
    return [sample.put_rate or 0.0 for sample in case.samples]


def ratios(cases: Sequence[Case]) -> list[Ratio]:
    ceiling = cases[0].rates()
    result = []
    for form in (PUT_THEN_GET, INTERLEAVED):
        single = find(
            cases, "pymq", form, payload=GOAL_PAYLOAD, fsync="interval", batch=1
        )
        batched = find(
            cases, "pymq", form, payload=GOAL_PAYLOAD, fsync="interval", batch=100
        )
        columns = find(
            cases, COLUMNS_SYSTEM, form, payload=GOAL_PAYLOAD, fsync="interval"
        )
        standard = find(cases, "queue.Queue", form, payload=GOAL_PAYLOAD)
        deque_case = find(cases, "collections.deque", form, payload=GOAL_PAYLOAD)
        result.append(
            Ratio(
                "pymq one at a time (interval) / queue.Queue",
                form,
                3.0,
                single.rates(),
                standard.rates(),
            )
        )
        result.append(
            Ratio(
                "pymq batches of 100 (interval) / collections.deque",
                form,
                0.5,
                batched.rates(),
                deque_case.rates(),
            )
        )
        result.append(
            Ratio(
                "pymq get_batch of 100 (interval) / collections.deque",
                form,
                0.5,
                columns.rates(),
                deque_case.rates(),
            )
        )
    always = find(cases, "pymq", PUT_THEN_GET, payload=GOAL_PAYLOAD, fsync="always")
    threaded = find(
        cases,
        "pymq",
        f"{PRODUCER_THREADS} producer threads, then get",
        payload=GOAL_PAYLOAD,
    )
    result.append(
        Ratio(
            "pymq put, fsync always, 1 producer / fsync ceiling",
            "put phase",
            0.8,
            put_rates(always),
            ceiling,
        )
    )
    result.append(
        Ratio(
            f"pymq put, fsync always, {PRODUCER_THREADS} producer threads "
            f"/ fsync ceiling",
            "put phase",
            5.0,
            put_rates(threaded),
            ceiling,
        )
    )
    return result


def ratio_table(cases: Sequence[Case]) -> list[str]:
    lines = [
        "| ratio (100 B) | form | goal | median | per round | met |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for ratio in ratios(cases):
        median = ratio.median()
        low, high = ratio.spread()
        met = (
            "yes"
            if median >= ratio.target
            else f"no ({median / ratio.target:.0%} of it)"
        )
        lines.append(
            f"| {ratio.name} | {ratio.form} | {ratio.target:g} x | {median:.2f} x "
            f"| {low:.2f} - {high:.2f} | {met} |"
        )
    return lines


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run_broker",
        description="Measure the pymq queue beside in-process queues; print tables.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller counts and backlogs, for a check that every case runs",
    )
    parser.add_argument(
        "--skip-backlog",
        action="store_true",
        help="leave out the backlog memory case",
    )
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    cases = build_cases(budget)

    with Scratch() as probe:
        scratch_parent = probe.path.parent
    print(f"# run_broker{' --quick' if args.quick else ''}, {ROUNDS} rounds")
    for line in machine_lines(scratch_parent):
        print(f"# {line}")
    sys.stdout.flush()

    for round_number in range(1, ROUNDS + 1):
        for index, case in enumerate(cases, 1):
            print(
                f"round {round_number}/{ROUNDS}, case {index}/{len(cases)}: "
                f"{case.system} {case.form} {payload_name(case.payload)} "
                f"{case.fsync} batch {case.batch}",
                file=sys.stderr,
                flush=True,
            )
            with Scratch() as scratch:
                case.samples.append(case.run(scratch))
    print(f"# load average after the throughput rounds: {load_average()}")
    print()
    print("\n".join(table(cases)))
    print()
    print("\n".join(ratio_table(cases)))
    sys.stdout.flush()

    if not args.skip_backlog:
        results, note = measure_backlogs(budget, str(scratch_parent))
        print()
        print(f"# backlog: {note}, {payload_name(BACKLOG_PAYLOAD)} bodies")
        print(f"# load average at end: {load_average()}")
        print()
        print("\n".join(backlog_table(results)))
        print()
        print(backlog_goal(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
