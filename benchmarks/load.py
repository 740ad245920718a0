"""Load test of the pymq server: many connections, then an exactly-once check.

Run from the repository root:

    .venv/bin/python -m benchmarks.load [--connections 200] [--messages 1000000]
        [--queues 10] [--processes 2] [--client asyncio|threads] [--size 100]
        [--fetch 100] [--fsync POLICY] [--max-seconds 900] [--quick] [--json FILE]

The script starts its own pymq server in a child process, on 127.0.0.1 and
a free port, with its data in a temporary folder (under $PYMQ_BENCH_DIR
when set) that is deleted at the end. Client processes then open the
connections: half of them produce and half consume, spread over the queues.
Every producer puts its share of the messages one put() at a time, each
waiting for the server's reply. Every consumer calls get_many(fetch) and
acks what it got with ack_many(), which also waits for the reply.

Each body starts with a unique message id and the CLOCK_MONOTONIC time
taken just before its put. CLOCK_MONOTONIC is one clock for every process
of the machine, so the consumer's receive time minus that time is the
latency from put to delivery, even across processes. At the end the script
checks that every id whose put returned was delivered and acked exactly
once, and that stats() reports every queue empty. It exits 1 when a check
fails or the run hits --max-seconds.

A thread in this process samples VmRSS, VmHWM, RssAnon and RssFile of the
server every 0.5 s from /proc/PID/status.

The default client is the asyncio one (pymq.aio.connect), on uvloop when it
is installed, with every connection of a client process in one event loop
and two client processes. `--client threads` runs one blocking client
(pymq.connect) per thread instead. On 2 cores the asyncio client moved
about 3 times the messages a second, with about a quarter of the client
CPU time per message. A likely reason is that every blocking call costs
its thread a send, a receive and a GIL handoff. The section "Load" of
docs/reliability.md has the figures and the commands.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import dataclasses
import importlib
import json
import math
import multiprocessing
import os
import platform
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

import pymq
import pymq.aio
from benchmarks.benchmarks.bench_server import ServerProcess
from benchmarks.benchmarks.common import Scratch
from benchmarks.run_server import (
    Sources,
    load_average,
    package_version,
    read_sources,
)
from benchmarks.run_store import cpu_model, machine_lines, si
from pymq.client import RemoteQueue
from pymq.errors import PymqError
from pymq.types import QueueStats

# Every body starts with the message id and the put time in nanoseconds of
# CLOCK_MONOTONIC, and is padded with zero bytes to --size.
BODY_HEAD = struct.Struct("<Qq")
MAX_BODY_BYTES = 1 << 20  # the server's default max_message_bytes
QUEUE_PREFIX = "load"
# Seconds a consumer's get_many waits for a first message before it looks at
# the stop flag again, and a worker's poll interval of that flag.
POLL_SECONDS = 0.2
# Seconds the client processes may take to start and open their connections.
START_TIMEOUT = 120.0
# Seconds the parent waits for a worker to exit, and for its last report,
# after it asked the workers to stop.
STOP_TIMEOUT = 60.0
# Seconds without a new ack, after every producer has finished, before the
# run is declared stalled. It is longer than the default visibility timeout
# (30 s), so a delivery that a bug leaves unsettled is delivered again first.
STALL_SECONDS = 45.0
RSS_INTERVAL = 0.5
PROGRESS_INTERVAL = 5.0
# Error texts kept per connection; further errors are only counted.
KEPT_ERRORS = 5
CLIENTS = ("asyncio", "threads")


@dataclass(frozen=True)
class LoadConfig:
    """The parameters of one load run."""

    connections: int = 200
    messages: int = 1_000_000
    queues: int = 10
    processes: int = 2
    client: str = "asyncio"
    size: int = 100  # body bytes
    fetch: int = 100  # maximum messages per get_many
    fsync: str = "interval"
    max_seconds: float = 900.0  # the whole run, from the server's start

    @property
    def producers(self) -> int:
        return self.connections // 2

    @property
    def consumers(self) -> int:
        return self.connections - self.producers

    def check(self) -> None:
        """Raise ValueError when the parameters cannot make a run."""
        if self.connections < 2:
            raise ValueError(
                f"invalid connections {self.connections}: it must be 2 or more"
            )
        if not 1 <= self.queues <= self.producers:
            raise ValueError(
                f"invalid queues {self.queues}: it must be from 1 to "
                f"{self.producers} (the producers), so that every queue has a "
                f"producer and a consumer"
            )
        if not 1 <= self.processes <= self.connections:
            raise ValueError(
                f"invalid processes {self.processes}: it must be from 1 to "
                f"{self.connections} (the connections)"
            )
        if self.messages < 1:
            raise ValueError(f"invalid messages {self.messages}: it must be 1 or more")
        if not BODY_HEAD.size <= self.size <= MAX_BODY_BYTES:
            raise ValueError(
                f"invalid size {self.size}: it must be from {BODY_HEAD.size} to "
                f"{MAX_BODY_BYTES} bytes"
            )
        if self.fetch < 1:
            raise ValueError(f"invalid fetch {self.fetch}: it must be 1 or more")
        if self.client not in CLIENTS:
            raise ValueError(
                f"invalid client {self.client!r}: it must be one of {CLIENTS}"
            )
        if self.max_seconds <= 0:
            raise ValueError(
                f"invalid max_seconds {self.max_seconds}: it must be above 0"
            )


FULL = LoadConfig()
QUICK = LoadConfig(connections=50, messages=50_000, max_seconds=120.0)


def queue_name(index: int) -> str:
    return f"{QUEUE_PREFIX}.{index}"


# Work of the client processes ------------------------------------------


@dataclass(frozen=True)
class ProducerRole:
    """One producing connection: put the ids first_id to first_id + count - 1."""

    queue: str
    first_id: int
    count: int


@dataclass(frozen=True)
class WorkerJob:
    """The connections of one client process and the limits they share."""

    index: int
    url: str
    client: str
    producers: tuple[ProducerRole, ...]
    consumers: tuple[str, ...]  # the queue of each consuming connection
    size: int
    fetch: int
    deadline_ns: int  # CLOCK_MONOTONIC time at which every loop stops
    max_deliveries: int  # maximum deliveries one consumer takes before it stops


def plan_jobs(config: LoadConfig, url: str, deadline_ns: int) -> list[WorkerJob]:
    """Split the connections, the queues and the message ids over the workers.

    Producer i puts to queue i mod queues and runs in worker i mod processes.
    Consumer k reads queue k mod queues in worker (k + 1) mod processes. So
    every worker gets about as many connections as the others. When
    processes (2 or more) divides queues, the consumers of a queue also run
    in other processes than its producers. The ids 0 to messages - 1 are
    split into consecutive ranges, one per producer, that differ by at most
    one in length.
    """
    share, extra = divmod(config.messages, config.producers)
    producers: list[list[ProducerRole]] = [[] for _ in range(config.processes)]
    first_id = 0
    for index in range(config.producers):
        count = share + (1 if index < extra else 0)
        role = ProducerRole(queue_name(index % config.queues), first_id, count)
        producers[index % config.processes].append(role)
        first_id += count
    consumers: list[list[str]] = [[] for _ in range(config.processes)]
    for index in range(config.consumers):
        worker = (index + 1) % config.processes
        consumers[worker].append(queue_name(index % config.queues))
    return [
        WorkerJob(
            index=worker,
            url=url,
            client=config.client,
            producers=tuple(producers[worker]),
            consumers=tuple(consumers[worker]),
            size=config.size,
            fetch=config.fetch,
            deadline_ns=deadline_ns,
            max_deliveries=config.messages,
        )
        for worker in range(config.processes)
    ]


@dataclass
class Tally:
    """The record of one worker's connections, with ids in arrays of int64.

    `uncertain` contains the ids whose put raised: the server may or may not have
    stored them. Times are CLOCK_MONOTONIC nanoseconds, 0 when nothing
    happened.
    """

    put_ids: array.array[int] = field(default_factory=lambda: array.array("q"))
    uncertain: array.array[int] = field(default_factory=lambda: array.array("q"))
    delivered: array.array[int] = field(default_factory=lambda: array.array("q"))
    latencies_ns: array.array[int] = field(default_factory=lambda: array.array("q"))
    acked: array.array[int] = field(default_factory=lambda: array.array("q"))
    redelivered: int = 0  # deliveries with an attempt above 1
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    last_put_ns: int = 0
    last_ack_ns: int = 0
    producers_stopped: int = 0  # producers that stopped at deadline_ns
    consumers_stopped: int = 0  # and consumers

    def note_error(self, where: str, exc: BaseException) -> None:
        self.error_count += 1
        if len(self.errors) < KEPT_ERRORS:
            self.errors.append(f"{where}: {type(exc).__name__}: {exc}")

    def record_deliveries(self, messages: Sequence[Any], received_ns: int) -> list[int]:
        """Record the id, the latency and the attempt of each message.

        Returns the ids, for record_acks once the ack has returned.
        """
        unpack = BODY_HEAD.unpack_from
        ids = []
        for message in messages:
            message_id, put_ns = unpack(message.body)
            ids.append(message_id)
            self.latencies_ns.append(received_ns - put_ns)
            if message.attempt > 1:
                self.redelivered += 1
        self.delivered.extend(ids)
        return ids

    def record_acks(self, ids: list[int]) -> None:
        self.acked.extend(ids)
        self.last_ack_ns = time.monotonic_ns()

    def merge(self, other: Tally) -> None:
        self.put_ids.extend(other.put_ids)
        self.uncertain.extend(other.uncertain)
        self.delivered.extend(other.delivered)
        self.latencies_ns.extend(other.latencies_ns)
        self.acked.extend(other.acked)
        self.redelivered += other.redelivered
        self.errors.extend(other.errors[: max(0, KEPT_ERRORS - len(self.errors))])
        self.error_count += other.error_count
        self.last_put_ns = max(self.last_put_ns, other.last_put_ns)
        self.last_ack_ns = max(self.last_ack_ns, other.last_ack_ns)
        self.producers_stopped += other.producers_stopped
        self.consumers_stopped += other.consumers_stopped

    def produced_report(self) -> dict[str, Any]:
        return {
            "put_ids": self.put_ids,
            "uncertain": self.uncertain,
            "last_put_ns": self.last_put_ns,
            "errors": list(self.errors),
            "error_count": self.error_count,
            "stopped_at_deadline": self.producers_stopped,
        }

    def consumed_report(self, cpu_seconds: float) -> dict[str, Any]:
        """Return the consumers' figures and the worker's CPU seconds."""
        return {
            "cpu_seconds": cpu_seconds,
            "delivered": self.delivered,
            "latencies_ns": self.latencies_ns,
            "acked": self.acked,
            "redelivered": self.redelivered,
            "last_ack_ns": self.last_ack_ns,
            "errors": list(self.errors),
            "error_count": self.error_count,
            "stopped_at_deadline": self.consumers_stopped,
        }


def process_cpu_seconds() -> float:
    """Return the user and system CPU seconds of this process, all threads."""
    times = os.times()
    return times.user + times.system


def message_body(message_id: int, padding: bytes) -> bytes:
    """Build a body: the id, the put time now, then padding."""
    return BODY_HEAD.pack(message_id, time.monotonic_ns()) + padding


# The asyncio client -----------------------------------------------------


async def produce_async(
    queue: pymq.aio.AsyncQueue, role: ProducerRole, job: WorkerJob, tally: Tally
) -> None:
    """Put the ids of role one put() at a time, each waiting for the reply."""
    padding = bytes(job.size - BODY_HEAD.size)
    for message_id in range(role.first_id, role.first_id + role.count):
        if time.monotonic_ns() > job.deadline_ns:
            tally.producers_stopped += 1
            return
        try:
            await queue.put(message_body(message_id, padding))
        except (PymqError, OSError) as exc:
            tally.uncertain.append(message_id)
            tally.note_error(f"put to {role.queue}", exc)
            return
        tally.put_ids.append(message_id)
        tally.last_put_ns = time.monotonic_ns()


async def consume_async(
    queue: pymq.aio.AsyncQueue, job: WorkerJob, stop: asyncio.Event, tally: Tally
) -> None:
    """Get and ack messages until stop is set, the deadline or max_deliveries."""
    received = 0
    while not stop.is_set() and received < job.max_deliveries:
        if time.monotonic_ns() > job.deadline_ns:
            tally.consumers_stopped += 1
            return
        try:
            messages = await queue.get_many(job.fetch, timeout=POLL_SECONDS)
            ids = tally.record_deliveries(messages, time.monotonic_ns())
            received += len(messages)
            if messages:
                await queue.ack_many(messages)
                tally.record_acks(ids)
        except (PymqError, OSError) as exc:
            tally.note_error(f"get or ack on {queue.name}", exc)
            return


async def watch_stop(flag: Any, stop: asyncio.Event, deadline_ns: int) -> None:
    """Set stop once the parent sets flag, a multiprocessing Event."""
    while not flag.is_set() and time.monotonic_ns() < deadline_ns:
        await asyncio.sleep(POLL_SECONDS / 2)
    stop.set()


async def run_asyncio_worker(
    job: WorkerJob, start_line: Any, stop_flag: Any, sender: Connection
) -> None:
    """Open every connection of job, wait at start_line, then run them."""
    roles = list(job.producers)
    connections = len(roles) + len(job.consumers)
    brokers = await asyncio.gather(
        *[pymq.aio.connect(job.url) for _ in range(connections)]
    )
    try:
        producer_queues = [
            await broker.queue(role.queue)
            for broker, role in zip(brokers[: len(roles)], roles, strict=True)
        ]
        consumer_queues = [
            await broker.queue(name)
            for broker, name in zip(brokers[len(roles) :], job.consumers, strict=True)
        ]
        # Blocking here is fine, because no request of this loop is under way.
        start_line.wait(START_TIMEOUT)
        started_cpu = process_cpu_seconds()
        tally = Tally()
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_stop(stop_flag, stop, job.deadline_ns))
        consumers = [
            asyncio.create_task(consume_async(queue, job, stop, tally))
            for queue in consumer_queues
        ]
        await asyncio.gather(
            *[
                produce_async(queue, role, job, tally)
                for queue, role in zip(producer_queues, roles, strict=True)
            ]
        )
        sender.send(("produced", tally.produced_report()))
        await asyncio.gather(*consumers)
        watcher.cancel()
        cpu_seconds = process_cpu_seconds() - started_cpu
        sender.send(("consumed", tally.consumed_report(cpu_seconds)))
    finally:
        await asyncio.gather(
            *[broker.close() for broker in brokers], return_exceptions=True
        )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Return a uvloop loop when uvloop is installed, else asyncio's default."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


# The blocking client, one thread per connection ------------------------


def produce_blocking(
    url: str, role: ProducerRole, job: WorkerJob, start_line: Any, tally: Tally
) -> None:
    padding = bytes(job.size - BODY_HEAD.size)
    with pymq.connect(url) as broker:
        queue = broker.queue(role.queue)
        start_line.wait(START_TIMEOUT)
        for message_id in range(role.first_id, role.first_id + role.count):
            if time.monotonic_ns() > job.deadline_ns:
                tally.producers_stopped += 1
                return
            try:
                queue.put(message_body(message_id, padding))
            except (PymqError, OSError) as exc:
                tally.uncertain.append(message_id)
                tally.note_error(f"put to {role.queue}", exc)
                return
            tally.put_ids.append(message_id)
            tally.last_put_ns = time.monotonic_ns()


def consume_blocking(
    url: str,
    name: str,
    job: WorkerJob,
    stop: threading.Event,
    start_line: Any,
    tally: Tally,
) -> None:
    with pymq.connect(url) as broker:
        queue = broker.queue(name)
        start_line.wait(START_TIMEOUT)
        received = 0
        while not stop.is_set() and received < job.max_deliveries:
            if time.monotonic_ns() > job.deadline_ns:
                tally.consumers_stopped += 1
                return
            try:
                messages = queue.get_many(job.fetch, timeout=POLL_SECONDS)
                ids = tally.record_deliveries(messages, time.monotonic_ns())
                received += len(messages)
                if messages:
                    queue.ack_many(messages)
                    tally.record_acks(ids)
            except (PymqError, OSError) as exc:
                tally.note_error(f"get or ack on {name}", exc)
                return


def guarded(
    target: Callable[..., None], tally: Tally, start_line: Any, *args: Any
) -> Callable[[], None]:
    """Wrap target so that an error of a thread lands in its tally.

    The error also breaks start_line, so that a connection that fails to
    open stops the run at once instead of at START_TIMEOUT.
    """

    def run() -> None:
        try:
            target(*args, start_line, tally)
        except BaseException as exc:
            tally.note_error(f"thread {threading.current_thread().name}", exc)
            start_line.abort()

    return run


def run_threads_worker(
    job: WorkerJob, start_line: Any, stop_flag: Any, sender: Connection
) -> None:
    """Run one thread and one blocking connection per role of job.

    The threads and this thread wait at start_line, which has one party per
    thread of the run, one per worker and one for the parent. The threads
    are daemons, so a worker that fails exits without waiting for them.
    """
    stop = threading.Event()
    producers: list[tuple[threading.Thread, Tally]] = []
    for number, role in enumerate(job.producers):
        tally = Tally()
        run = guarded(produce_blocking, tally, start_line, job.url, role, job)
        producers.append(
            (threading.Thread(target=run, name=f"put-{number}", daemon=True), tally)
        )
    consumers: list[tuple[threading.Thread, Tally]] = []
    for number, name in enumerate(job.consumers):
        tally = Tally()
        run = guarded(consume_blocking, tally, start_line, job.url, name, job, stop)
        consumers.append(
            (threading.Thread(target=run, name=f"get-{number}", daemon=True), tally)
        )
    for thread, _ in producers + consumers:
        thread.start()
    start_line.wait(START_TIMEOUT)
    started_cpu = process_cpu_seconds()
    produced = Tally()
    for thread, tally in producers:
        thread.join(max(0.0, (job.deadline_ns - time.monotonic_ns()) / 1e9))
        produced.merge(tally)
    sender.send(("produced", produced.produced_report()))
    stop_flag.wait(max(0.0, (job.deadline_ns - time.monotonic_ns()) / 1e9))
    stop.set()
    consumed = Tally()
    for thread, tally in consumers:
        thread.join(STOP_TIMEOUT)
        consumed.merge(tally)
    cpu_seconds = process_cpu_seconds() - started_cpu
    sender.send(("consumed", consumed.consumed_report(cpu_seconds)))


def worker_main(
    job: WorkerJob, start_line: Any, stop_flag: Any, sender: Connection
) -> None:
    """Run one client process: its connections, then its two reports."""
    try:
        if job.client == "threads":
            run_threads_worker(job, start_line, stop_flag, sender)
        else:
            loop = new_event_loop()
            try:
                loop.run_until_complete(
                    run_asyncio_worker(job, start_line, stop_flag, sender)
                )
            finally:
                loop.close()
    except BaseException as exc:
        # Release the others from the barrier at once.
        start_line.abort()
        with contextlib.suppress(OSError):
            sender.send(("error", f"worker {job.index}: {type(exc).__name__}: {exc}"))
    finally:
        sender.close()


# Server memory and CPU --------------------------------------------------

RSS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def read_memory(pid: int) -> dict[str, int] | None:
    """Return the RSS_FIELDS of /proc/PID/status in KiB, None if PID is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    memory: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in RSS_FIELDS:
            memory[name] = int(value.split()[0])
    return memory


def server_cpu_seconds(pid: int) -> float | None:
    """Return the user and system CPU seconds of PID, None if PID is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name, in brackets, may contain spaces. utime and stime
    # are fields 14 and 15 (proc(5)), so 12 and 13 after the bracket.
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemorySampler:
    """A thread that reads the server's memory every RSS_INTERVAL seconds.

    It stops at stop(), when the server is gone, or after max_seconds.
    """

    def __init__(self, pid: int, max_seconds: float) -> None:
        self.pid = pid
        self.max_seconds = max_seconds
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def start(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> dict[str, int] | None:
        """Read the memory now and keep it as a sample."""
        memory = read_memory(self.pid)
        if memory is not None:
            self.samples.append(
                {"seconds": round(time.monotonic() - self._start, 3), **memory}
            )
        return memory

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            if time.monotonic() - self._start > self.max_seconds:
                return
            if self.sample() is None:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def peak(self, name: str) -> int:
        return max((int(sample[name]) for sample in self.samples), default=0)


# The parent -------------------------------------------------------------


@dataclass
class Progress:
    """The parent's view of the run while it supervises the workers."""

    started_ns: int
    produced: dict[int, dict[str, Any]] = field(default_factory=dict)
    consumed: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    outcome: str = ""  # why supervision ended

    def take(self, reports: Sequence[tuple[int, str, Any]]) -> None:
        """Keep each worker's report by its kind: produced, consumed or error."""
        for index, kind, payload in reports:
            if kind == "produced":
                self.produced[index] = payload
            elif kind == "consumed":
                self.consumed[index] = payload
            else:
                self.failures.append(str(payload))

    def put_count(self) -> int:
        return sum(len(report["put_ids"]) for report in self.produced.values())


class Workers:
    """The client processes of one run, their pipes and shared flags."""

    def __init__(self, jobs: Sequence[WorkerJob]) -> None:
        context = multiprocessing.get_context("spawn")
        threads = sum(len(job.producers) + len(job.consumers) for job in jobs)
        parties = 1 + len(jobs) + (threads if jobs[0].client == "threads" else 0)
        self.start_line = context.Barrier(parties)
        self.stop_flag = context.Event()
        self.pipes: dict[int, Connection] = {}
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for job in jobs:
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=worker_main,
                args=(job, self.start_line, self.stop_flag, sender),
                name=f"load-worker-{job.index}",
            )
            process.start()
            sender.close()
            self.pipes[job.index] = receiver
            self.processes.append(process)

    def start(self) -> int:
        """Wait until every connection is open; return the start time in ns.

        Raises RuntimeError, with the workers' errors, when one fails to start.
        """
        try:
            self.start_line.wait(START_TIMEOUT)
        except threading.BrokenBarrierError:
            errors = [
                str(payload)
                for _, kind, payload in self.reports(POLL_SECONDS)
                if kind == "error"
            ]
            raise RuntimeError(
                f"opening the client connections failed or timed out (after "
                f"{START_TIMEOUT} s): {'; '.join(errors) or 'no worker sent an error'}"
            ) from None
        return time.monotonic_ns()

    def reports(self, timeout: float) -> list[tuple[int, str, Any]]:
        """Return the reports that arrive within timeout seconds.

        A worker whose pipe closed without a report yields an "error".
        """
        found: list[tuple[int, str, Any]] = []
        ready = wait(list(self.pipes.values()), timeout)
        for index, pipe in list(self.pipes.items()):
            if pipe not in ready:
                continue
            try:
                kind, payload = pipe.recv()
            except EOFError:
                del self.pipes[index]
                pipe.close()
                found.append((index, "error", f"worker {index} exited early"))
                continue
            found.append((index, kind, payload))
            if kind != "produced":
                del self.pipes[index]
                pipe.close()
        return found

    def stop(self) -> None:
        """Ask the workers to stop, and end by PID any that does not exit."""
        self.stop_flag.set()
        self.start_line.abort()
        for process in self.processes:
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.terminate()
                process.join(10)
        for pipe in self.pipes.values():
            pipe.close()
        self.pipes.clear()


def queue_stats(queues: Sequence[RemoteQueue]) -> list[QueueStats]:
    return [queue.stats() for queue in queues]


def supervise(
    workers: Workers,
    queues: Sequence[RemoteQueue],
    config: LoadConfig,
    progress: Progress,
    deadline: float,
) -> None:
    """Keep the workers' reports until every put is acked, a stall or failure.

    Sets progress.outcome to "drained", "stalled", "deadline" or "failed".
    Prints the acked count to stderr every PROGRESS_INTERVAL seconds.
    """
    last_acked, last_change = -1, time.monotonic()
    next_print = time.monotonic() + PROGRESS_INTERVAL
    while not progress.outcome:
        progress.take(workers.reports(POLL_SECONDS))
        stats = queue_stats(queues)
        acked = sum(stat.acked for stat in stats)
        depth = sum(stat.depth for stat in stats)
        now = time.monotonic()
        if acked != last_acked:
            last_acked, last_change = acked, now
        all_produced = len(progress.produced) == config.processes
        if progress.failures:
            progress.outcome = "failed"
        elif all_produced and depth == 0 and acked >= progress.put_count():
            progress.outcome = "drained"
        elif all_produced and now - last_change > STALL_SECONDS:
            progress.outcome = "stalled"
        elif now > deadline:
            progress.outcome = "deadline"
        if now >= next_print:
            seconds = (time.monotonic_ns() - progress.started_ns) / 1e9
            print(
                f"{seconds:.0f} s: {acked} of {config.messages} messages acked, "
                f"{depth} in the queues",
                file=sys.stderr,
                flush=True,
            )
            next_print = now + PROGRESS_INTERVAL


def collect(workers: Workers, progress: Progress) -> None:
    """Set the stop flag and keep the last reports, for up to STOP_TIMEOUT s."""
    workers.stop_flag.set()
    final = time.monotonic() + STOP_TIMEOUT
    while workers.pipes and time.monotonic() < final:
        progress.take(workers.reports(POLL_SECONDS))
    for index in workers.pipes:
        progress.failures.append(f"worker {index} sent no last report")


# Checks and figures -----------------------------------------------------


def int64s(parts: Sequence[Any]) -> np.ndarray:
    """Concatenate arrays of int64 (array.array("q") or numpy) into one."""
    arrays = [np.frombuffer(part, dtype=np.int64) for part in parts if len(part)]
    if not arrays:
        return np.empty(0, dtype=np.int64)
    return np.concatenate(arrays)


@dataclass(frozen=True)
class Verdict:
    """The counts behind the exactly-once checks of one run."""

    put: int  # ids whose put returned
    uncertain: int  # ids whose put raised
    delivered: int  # deliveries, counting repeats
    acked: int  # acks that returned, counting repeats
    lost: int  # ids put but never acked
    delivered_twice: int  # ids delivered more than once
    acked_twice: int  # ids acked more than once
    unknown: int  # ids delivered that no put sent
    left_in_queues: int  # the sum of stats().depth at the end
    in_flight: int  # the sum of stats().in_flight at the end
    server_acked: int  # the sum of stats().acked at the end

    def failures(self) -> list[str]:
        problems = []
        if self.lost:
            problems.append(f"{self.lost} ids put but never acked")
        if self.delivered_twice:
            problems.append(f"{self.delivered_twice} ids delivered more than once")
        if self.acked_twice:
            problems.append(f"{self.acked_twice} ids acked more than once")
        if self.unknown:
            problems.append(f"{self.unknown} ids delivered that no put sent")
        if self.left_in_queues:
            problems.append(f"{self.left_in_queues} messages left in the queues")
        if self.in_flight:
            problems.append(f"{self.in_flight} deliveries still in flight")
        if self.server_acked != self.acked:
            problems.append(
                f"the server counted {self.server_acked} acks, the consumers "
                f"{self.acked}"
            )
        return problems

    def ok(self) -> bool:
        return not self.failures()


def repeated(ids: np.ndarray) -> int:
    """Return how many distinct values occur more than once in ids."""
    _, counts = np.unique(ids, return_counts=True)
    return int(np.count_nonzero(counts > 1))


def verify(
    put_ids: np.ndarray,
    uncertain: np.ndarray,
    delivered: np.ndarray,
    acked: np.ndarray,
    stats: Sequence[QueueStats],
) -> Verdict:
    """Check that every put id was delivered and acked exactly once.

    An id whose put raised may be delivered or not, but only once.
    """
    sent = np.union1d(put_ids, uncertain)
    return Verdict(
        put=len(put_ids),
        uncertain=len(uncertain),
        delivered=len(delivered),
        acked=len(acked),
        lost=len(np.setdiff1d(put_ids, acked)),
        delivered_twice=repeated(delivered),
        acked_twice=repeated(acked),
        unknown=len(np.setdiff1d(delivered, sent)),
        left_in_queues=sum(stat.depth for stat in stats),
        in_flight=sum(stat.in_flight for stat in stats),
        server_acked=sum(stat.acked for stat in stats),
    )


@dataclass(frozen=True)
class Latency:
    """Milliseconds from just before a put to the consumer's receipt."""

    count: int
    p50: float
    p99: float
    p999: float
    max: float


def latency_figures(latencies_ns: np.ndarray) -> Latency | None:
    """Return the nearest-rank percentiles of latencies_ns, None if empty."""
    if not len(latencies_ns):
        return None
    ordered = np.sort(latencies_ns) / 1e6

    def rank(fraction: float) -> float:
        return float(ordered[max(1, math.ceil(fraction * len(ordered))) - 1])

    return Latency(
        count=len(ordered),
        p50=rank(0.50),
        p99=rank(0.99),
        p999=rank(0.999),
        max=float(ordered[-1]),
    )


@dataclass
class Timing:
    """Seconds of the phases of a run, and the server's CPU seconds."""

    connect: float = 0.0  # from spawning the workers to every connection open
    loaded: float = 0.0  # from then until supervise() saw the outcome
    server_cpu: float | None = None  # CPU seconds of the server over `loaded`
    total: float = 0.0  # the whole run, server start and stop included


@dataclass
class LoadResult:
    """The figures and checks of one run."""

    config: LoadConfig
    outcome: str
    verdict: Verdict
    latency: Latency | None
    failures: list[str]  # worker failures and client errors
    timing: Timing
    seconds: float  # from the start (every connection open) to the last ack
    put_seconds: float  # from the start to the last put
    client_cpu: float  # CPU seconds of the client processes while loaded
    redelivered: int
    stopped_at_deadline: int
    memory: dict[str, dict[str, int] | None]  # start, peak and end, in KiB
    memory_samples: list[dict[str, float]]
    loads: dict[str, list[float]]
    sources: dict[str, Sources]
    loop: str

    @property
    def rate_in(self) -> float:
        return self.verdict.put / self.put_seconds if self.put_seconds else 0.0

    @property
    def rate_out(self) -> float:
        return self.verdict.acked / self.seconds if self.seconds else 0.0

    def ok(self) -> bool:
        return self.outcome == "drained" and not self.failures and self.verdict.ok()


def client_loop(config: LoadConfig) -> str:
    if config.client == "threads":
        return "threads, blocking client"
    version = package_version("uvloop")
    return f"uvloop {version}" if version else "asyncio default loop"


def summarize(
    config: LoadConfig,
    progress: Progress,
    stats: Sequence[QueueStats],
    timing: Timing,
    sampler: MemorySampler,
    memory: dict[str, dict[str, int] | None],
    loads: dict[str, list[float]],
    sources: dict[str, Sources],
) -> LoadResult:
    produced = list(progress.produced.values())
    consumed = list(progress.consumed.values())
    failures = list(progress.failures)
    for report in produced + consumed:
        failures.extend(report["errors"])
        hidden = report["error_count"] - len(report["errors"])
        if hidden > 0:
            failures.append(f"{hidden} more client errors")
    verdict = verify(
        int64s([report["put_ids"] for report in produced]),
        int64s([report["uncertain"] for report in produced]),
        int64s([report["delivered"] for report in consumed]),
        int64s([report["acked"] for report in consumed]),
        stats,
    )
    stopped = sum(report["stopped_at_deadline"] for report in produced + consumed)
    if verdict.put < config.messages:
        failures.append(
            f"{verdict.put} of {config.messages} puts returned; {stopped} "
            f"connections stopped at the deadline (--max-seconds)"
        )
    started = progress.started_ns
    last_put = max((report["last_put_ns"] for report in produced), default=started)
    last_ack = max((report["last_ack_ns"] for report in consumed), default=started)
    return LoadResult(
        config=config,
        outcome=progress.outcome,
        verdict=verdict,
        latency=latency_figures(int64s([r["latencies_ns"] for r in consumed])),
        failures=failures,
        timing=timing,
        seconds=max(0, last_ack - started) / 1e9,
        put_seconds=max(0, last_put - started) / 1e9,
        client_cpu=sum(report["cpu_seconds"] for report in consumed),
        redelivered=sum(report["redelivered"] for report in consumed),
        stopped_at_deadline=stopped,
        memory=memory,
        memory_samples=sampler.samples,
        loads=loads,
        sources=sources,
        loop=client_loop(config),
    )


def peak_memory(sampler: MemorySampler, end: dict[str, int] | None) -> dict[str, int]:
    """Return the highest VmRSS, RssAnon and RssFile sampled, and VmHWM.

    VmHWM is the kernel's peak of VmRSS, read at the end, so it also
    covers the moments between samples.
    """
    peak = {name: sampler.peak(name) for name in ("VmRSS", "RssAnon", "RssFile")}
    peak["VmHWM"] = end["VmHWM"] if end else sampler.peak("VmHWM")
    return peak


def drive(
    config: LoadConfig,
    url: str,
    queues: Sequence[RemoteQueue],
    deadline: float,
    server_pid: int,
) -> tuple[Progress, Timing]:
    """Start the workers, supervise them until the end, and stop them."""
    workers = Workers(plan_jobs(config, url, int(deadline * 1e9)))
    timing = Timing()
    try:
        spawned = time.monotonic()
        progress = Progress(started_ns=workers.start())
        loaded = time.monotonic()
        timing.connect = loaded - spawned
        cpu_before = server_cpu_seconds(server_pid)
        supervise(workers, queues, config, progress, deadline)
        cpu_after = server_cpu_seconds(server_pid)
        timing.loaded = time.monotonic() - loaded
        if cpu_before is not None and cpu_after is not None:
            timing.server_cpu = cpu_after - cpu_before
        collect(workers, progress)
    finally:
        workers.stop()
    return progress, timing


def run_load(config: LoadConfig) -> LoadResult:
    """Start a server, run the load of config against it, stop it, check."""
    config.check()
    begin = time.monotonic()
    deadline = begin + config.max_seconds
    loads = {"start": load_average()}
    sources = {"start": read_sources()}
    with ServerProcess(config.fsync) as server:
        assert server.process is not None
        pid = server.process.pid
        sampler = MemorySampler(pid, config.max_seconds + STOP_TIMEOUT).start()
        memory: dict[str, dict[str, int] | None] = {"start": read_memory(pid)}
        try:
            with pymq.connect(server.url) as checker:
                queues = [
                    checker.queue(queue_name(index)) for index in range(config.queues)
                ]
                progress, timing = drive(config, server.url, queues, deadline, pid)
                stats = queue_stats(queues)
            memory["end"] = sampler.sample()
            memory["peak"] = peak_memory(sampler, memory["end"])
        finally:
            sampler.stop()
    loads["end"] = load_average()
    sources["end"] = read_sources()
    timing.total = time.monotonic() - begin
    return summarize(config, progress, stats, timing, sampler, memory, loads, sources)


# Report -----------------------------------------------------------------


def mebibytes(memory: dict[str, int] | None, name: str) -> str:
    """Format the field name of memory, in KiB, as MiB; "?" when missing."""
    if memory is None or name not in memory:
        return "?"
    return f"{memory[name] / 1024:.1f}"


def header_lines(config: LoadConfig, scratch_parent: Path) -> list[str]:
    """Return what the run is, on which machine and code, before it starts."""
    return [
        f"load: {config.connections} connections ({config.producers} producing, "
        f"{config.consumers} consuming) in {config.processes} client processes "
        f"({client_loop(config)}), {config.queues} queues, {config.messages} "
        f"messages of {config.size} B, get_many({config.fetch}), server "
        f"fsync={config.fsync}",
        *machine_lines(scratch_parent),
    ]


def cpu_line(result: LoadResult) -> str:
    timing = result.timing
    server = "unknown"
    if timing.server_cpu is not None and timing.loaded > 0:
        share = timing.server_cpu / timing.loaded
        server = f"{timing.server_cpu:.1f} s ({share:.0%} of one core)"
    return (
        f"CPU while loaded ({timing.loaded:.1f} s): server {server}, client "
        f"processes {result.client_cpu:.1f} s"
    )


def result_lines(result: LoadResult) -> list[str]:
    """Return the figures and the checks of a finished run as text lines."""
    verdict = result.verdict

    load_end = " ".join(f"{value:.2f}" for value in result.loads["end"])
    lines = [f"# load average at end: {load_end}"]
    if result.sources["end"] != result.sources["start"]:
        changed = result.sources["end"]
        lines.append(
            f"# warning: the code changed during the run; at the end: commit "
            f"{changed.commit}, {changed.state}, pymq._core built "
            f"{changed.core_built}"
        )
    lines += [
        "",
        f"outcome: {result.outcome}",
        f"connections opened in {result.timing.connect:.2f} s",
        f"wall time, start to last ack: {result.seconds:.2f} s "
        f"(whole run {result.timing.total:.1f} s)",
        f"in: {verdict.put} messages put in {result.put_seconds:.2f} s, "
        f"{si(result.rate_in)} msg/s",
        f"out: {verdict.acked} acked in {result.seconds:.2f} s, "
        f"{si(result.rate_out)} msg/s",
    ]

    latency = result.latency
    if latency is not None:
        lines.append(
            f"latency, put to receipt, ms: p50 {latency.p50:.2f}, p99 {latency.p99:.2f}"
            f", p99.9 {latency.p999:.2f}, max {latency.max:.2f} "
            f"({latency.count} deliveries)"
        )

    start, peak, end = (result.memory.get(when) for when in ("start", "peak", "end"))
    lines += [
        f"server RSS, MiB: {mebibytes(start, 'VmRSS')} at start, peak "
        f"{mebibytes(peak, 'VmHWM')} (VmHWM; highest VmRSS sampled "
        f"{mebibytes(peak, 'VmRSS')}), {mebibytes(end, 'VmRSS')} at end "
        f"(anonymous {mebibytes(end, 'RssAnon')}, file {mebibytes(end, 'RssFile')})",
        cpu_line(result),
        "",
        f"ids put: {verdict.put}, put raised: {verdict.uncertain}, deliveries: "
        f"{verdict.delivered}, acks: {verdict.acked} (server: {verdict.server_acked})"
        f", redelivered: {result.redelivered}",
        f"lost: {verdict.lost}, delivered twice: {verdict.delivered_twice}, acked "
        f"twice: {verdict.acked_twice}, unknown: {verdict.unknown}, left in queues: "
        f"{verdict.left_in_queues}, in flight: {verdict.in_flight}",
    ]

    lines += [f"failure: {failure}" for failure in result.failures]
    lines += [f"check failed: {problem}" for problem in verdict.failures()]
    lines.append(f"result: {'passed' if result.ok() else 'FAILED'}")
    return lines


def json_report(result: LoadResult, argv: Sequence[str]) -> dict[str, Any]:
    return {
        "command": [sys.executable, "-m", "benchmarks.load", *argv],
        "commit": result.sources["start"].commit,
        "sources": {when: asdict(state) for when, state in result.sources.items()},
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "load_average": result.loads,
        },
        "versions": {
            "pymq": pymq.__version__,
            "python": platform.python_version(),
            "uvloop": package_version("uvloop"),
        },
        "config": asdict(result.config),
        "client_loop": result.loop,
        "outcome": result.outcome,
        "passed": result.ok(),
        "checks": asdict(result.verdict),
        "failures": result.failures,
        "seconds": {
            "connect": result.timing.connect,
            "start_to_last_put": result.put_seconds,
            "start_to_last_ack": result.seconds,
            "loaded": result.timing.loaded,
            "total": result.timing.total,
        },
        "cpu_seconds": {
            "server": result.timing.server_cpu,
            "client_processes": result.client_cpu,
        },
        "msg_per_s": {"in": result.rate_in, "out": result.rate_out},
        "latency_ms": None if result.latency is None else asdict(result.latency),
        "redelivered": result.redelivered,
        "stopped_at_deadline": result.stopped_at_deadline,
        "server_memory_kib": result.memory,
        "server_memory_samples_kib": result.memory_samples,
    }


def parse_args(argv: Sequence[str]) -> tuple[LoadConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Load a pymq server with many producing and consuming "
        "connections, then check that every message came out exactly once.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK.connections} connections and {QUICK.messages} messages, "
        f"at most {QUICK.max_seconds:g} s, unless set below",
    )

    parser.add_argument(
        "--connections",
        type=int,
        help=f"client connections (default {FULL.connections})",
    )
    parser.add_argument(
        "--messages", type=int, help=f"messages put in all (default {FULL.messages})"
    )
    parser.add_argument(
        "--queues", type=int, help=f"queues to spread them over (default {FULL.queues})"
    )
    parser.add_argument(
        "--processes",
        type=int,
        help=f"client processes the connections run in (default {FULL.processes})",
    )

    parser.add_argument(
        "--client",
        choices=CLIENTS,
        help="asyncio: one event loop per process; threads: one blocking client "
        "per thread (default asyncio)",
    )
    parser.add_argument(
        "--size", type=int, help=f"body bytes per message (default {FULL.size})"
    )
    parser.add_argument(
        "--fetch",
        type=int,
        help=f"maximum messages per get_many of a consumer (default {FULL.fetch})",
    )

    parser.add_argument(
        "--fsync",
        choices=("never", "interval", "always"),
        help="fsync policy of the server (default interval)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        help=f"stop the run after this many seconds and fail (default "
        f"{FULL.max_seconds:g}, {QUICK.max_seconds:g} with --quick)",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        type=Path,
        help="also write the figures, checks, machine and commit to FILE",
    )
    args = parser.parse_args(argv)

    base = QUICK if args.quick else FULL
    chosen = {
        name: value
        for name in (item.name for item in dataclasses.fields(LoadConfig))
        if (value := getattr(args, name, None)) is not None
    }
    config = dataclasses.replace(base, **chosen)
    try:
        config.check()
    except ValueError as exc:
        parser.error(str(exc))
    return config, args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config, args = parse_args(argv)
    with Scratch() as probe:
        scratch_parent = probe.path.parent
    print("\n".join(f"# {line}" for line in header_lines(config, scratch_parent)))
    sys.stdout.flush()
    result = run_load(config)
    print("\n".join(result_lines(result)))
    if args.json is not None:
        args.json.write_text(json.dumps(json_report(result, argv), indent=2) + "\n")
    return 0 if result.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
