"""Measure the pymq server over TCP beside a bare round trip and Redis Streams.

Run from the repository root, with nothing else benchmarking at the time:

    .venv/bin/python -m benchmarks.run_server [--quick] [--json FILE]
        [--fsync POLICY] [--sizes BYTES,...] [--redis-port PORT]

The script starts its own pymq server (a child process, with its data in a
temporary folder under $PYMQ_BENCH_DIR when set) and its own echo server,
both on 127.0.0.1. Redis Streams, the baseline, is the server already on
127.0.0.1:6379 (or --redis-port). The Redis rows are skipped, with the
reason, when redis-py is missing or no server responds. Every Redis key
has a name unique to the run and is deleted after each round.

All systems are measured in the same run. The cases run in rounds: round 1
of every case, then round 2, then round 3, so that a burst of other work on
the machine spreads over the cases. The pymq cases run on one server, and
every round drains its queue empty again. A row shows the median
of the rounds and the lowest and highest figure. Latencies are the median
over the rounds of each round's p50 and p99. MB/s counts body bytes only,
in units of 10^6 bytes. The goals divide medians taken in this run, and
their spread divides the figures of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import secrets
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pymq
import pymq.aio
from benchmarks.benchmarks.bench_server import GET_TIMEOUT, ServerProcess
from benchmarks.benchmarks.common import (
    BROKER_PAYLOAD_SIZES,
    QUEUE_MAX_IN_FLIGHT,
    Scratch,
    batches,
    payloads,
)
from benchmarks.run_store import (
    build_time,
    command_output,
    cpu_model,
    machine_lines,
    payload_name,
    si,
    source_state,
)
from pymq.client import RemoteQueue

# The smallest pymq frame is 16 bytes (a 4-byte length and a 12-byte
# header), so a 16-byte echo is the bare round trip of the smallest request.
UNIT_ROUND_TRIP = 16
ECHO_SIZES = (1, UNIT_ROUND_TRIP)
# Concurrent puts per asyncio.gather in the pipelined case, and messages
# per get_many there.
WINDOW = 100
BATCH_SIZES = (100, 1000)
GOAL_BATCH = 100
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_GROUP = "bench"
REDIS_CONSUMER = "bench-1"
# Seconds a barrier of the client processes waits for the others, and the
# parent for each process's result. Starting a process under load can take
# seconds.
BARRIER_TIMEOUT = 120.0
# SIGALRM ends the echo server this many seconds after it starts, even when
# the process that started it never stops it.
ECHO_LIFETIME = 3600
# The largest body --sizes accepts: the server's default max_message_bytes.
MAX_BODY_BYTES = 1 << 20

ECHO = "echo"
PYMQ = "pymq"
REDIS = "Redis Streams"
ROUND_TRIP = "send, then receive"
ONE_AT_A_TIME = "put, get, ack"
ACK_NO_WAIT = "put, get, ack(wait=False)"
GATHER = f"gather {WINDOW} puts, then get_many + ack_many"
BATCHED = "put_many, then get_many + ack_many"
REDIS_ONE = "XADD, XREADGROUP, XACK"
REDIS_PIPELINED = "pipelined XADD, then XREADGROUP + XACK"


@dataclass(frozen=True)
class Budget:
    """How much each round of a case may do: counts, volume and time."""

    rounds: int
    sizes: tuple[int, ...]  # body sizes of the pymq and Redis cases
    round_trips: int  # echo round trips per round
    single_messages: int  # messages of the one-at-a-time cases
    pipelined_bytes: int  # body bytes of the asyncio pipelined case
    pipelined_messages: int  # and at most this many messages
    batched_bytes: int  # body bytes of the batched and multi-client cases
    batched_messages: int  # and at most this many messages
    clients: int  # client processes of the multi-client cases
    seconds: float  # a timed phase stops at its next check past this

    def pipelined_count(self, payload: int) -> int:
        return min(self.pipelined_messages, self.pipelined_bytes // payload)

    def batched_count(self, payload: int) -> int:
        return min(self.batched_messages, self.batched_bytes // payload)


FULL = Budget(
    rounds=3,
    sizes=BROKER_PAYLOAD_SIZES,
    round_trips=20_000,
    single_messages=10_000,
    pipelined_bytes=64 << 20,
    pipelined_messages=50_000,
    batched_bytes=256 << 20,
    batched_messages=200_000,
    clients=4,
    seconds=20.0,
)
QUICK = Budget(
    rounds=3,
    sizes=BROKER_PAYLOAD_SIZES,
    round_trips=2_000,
    single_messages=1_000,
    pipelined_bytes=8 << 20,
    pipelined_messages=5_000,
    batched_bytes=16 << 20,
    batched_messages=20_000,
    clients=4,
    seconds=5.0,
)


@dataclass(frozen=True)
class Sample:
    """One round of a case: messages (or echo round trips) moved in seconds.

    put_seconds and get_seconds are the two phases of the forms that
    produce every message and then consume them. p50 and p99 are seconds
    per message (or round trip) of the one-at-a-time forms, by the
    nearest-rank method.
    """

    produced: int
    consumed: int
    seconds: float
    put_seconds: float | None = None
    get_seconds: float | None = None
    p50: float | None = None
    p99: float | None = None

    @property
    def rate(self) -> float:
        return self.consumed / self.seconds


@dataclass
class Case:
    """One row of the table: one system, client, form, payload and batch."""

    system: str
    client: str
    form: str
    payload: int
    batch: int
    run: Callable[[], Sample]
    samples: list[Sample] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [sample.rate for sample in self.samples]

    def median(self) -> float:
        return statistics.median(self.rates())

    def phase_rates(self, phase: str) -> list[float] | None:
        seconds = [getattr(sample, f"{phase}_seconds") for sample in self.samples]
        if None in seconds:
            return None
        return [s.consumed / t for s, t in zip(self.samples, seconds, strict=True)]

    def latencies(self, name: str) -> list[float] | None:
        values = [getattr(sample, name) for sample in self.samples]
        return None if None in values else values


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of values sorted in ascending order."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def latency_sample(latencies: list[float], seconds: float) -> Sample:
    """Build the Sample of a one-at-a-time loop from its per-message seconds."""
    ordered = sorted(latencies)
    return Sample(
        produced=len(ordered),
        consumed=len(ordered),
        seconds=seconds,
        p50=percentile(ordered, 0.50),
        p99=percentile(ordered, 0.99),
    )


def check_drained(produced: int, consumed: int, form: str) -> None:
    if consumed != produced:
        raise RuntimeError(f"{form}: consumed {consumed} of {produced} messages")


# Bare round trip --------------------------------------------------------


def serve_echo(port_sender: Connection, lifetime: int) -> None:
    """Echo every byte back to one connection at a time, on 127.0.0.1.

    Runs in a child process and sends its port through port_sender. The
    sockets block without a timeout, so the echo adds no poll call per
    recv. SIGALRM ends the process after lifetime seconds.
    """
    signal.alarm(lifetime)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port_sender.send(listener.getsockname()[1])
        port_sender.close()
        while True:
            connection, _ = listener.accept()
            with connection:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := connection.recv(65536):
                    connection.sendall(data)


class EchoServer:
    """The echo server of serve_echo in a spawned child process."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(
            target=serve_echo,
            args=(sender, ECHO_LIFETIME),
            name="bench-echo",
            daemon=True,
        )
        self.process.start()
        sender.close()
        try:
            if not receiver.poll(BARRIER_TIMEOUT):
                raise TimeoutError(
                    f"the echo server sent no port within {BARRIER_TIMEOUT} s"
                )
            self.port: int = receiver.recv()
        except BaseException:
            self.stop()
            raise
        finally:
            receiver.close()

    def stop(self) -> None:
        """Send SIGTERM to the echo server's PID and wait for it."""
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def echo_round_trips(port: int, size: int, count: int, max_seconds: float) -> Sample:
    """Send size bytes to the echo server and read them back, count times.

    Stops early past max_seconds. The socket blocks without a timeout, as
    the blocking pymq client's does after its handshake.
    """
    message = payloads(size, 1)[0]
    buffer = bytearray(size)
    view = memoryview(buffer)
    latencies: list[float] = []
    clock = time.perf_counter
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        start = clock()
        deadline = start + max_seconds
        for _ in range(count):
            begin = clock()
            sock.sendall(message)
            received = 0
            while received < size:
                got = sock.recv_into(view[received:], size - received)
                if got == 0:
                    raise ConnectionError("the echo server closed the connection")
                received += got
            end = clock()
            latencies.append(end - begin)
            if end > deadline:
                break
        seconds = clock() - start
    if bytes(buffer) != message:
        raise RuntimeError("the echo server sent back other bytes")
    return latency_sample(latencies, seconds)


# pymq, blocking client --------------------------------------------------


def put_get_ack(
    queue: RemoteQueue, bodies: Sequence[bytes], max_seconds: float
) -> Sample:
    """Put, get and ack one message at a time, each waiting for its reply."""
    latencies: list[float] = []
    put, get = queue.put, queue.get
    clock = time.perf_counter
    start = clock()
    deadline = start + max_seconds
    message = None
    for body in bodies:
        begin = clock()
        put(body)
        message = get(timeout=GET_TIMEOUT)
        if message is None:
            raise RuntimeError(f"get timed out right after put {len(latencies) + 1}")
        message.ack()
        end = clock()
        latencies.append(end - begin)
        if end > deadline:
            break
    seconds = clock() - start
    if message is not None and message.body != bodies[len(latencies) - 1]:
        raise RuntimeError("the last message came back with another body")
    return latency_sample(latencies, seconds)


def put_get_ack_no_wait(
    queue: RemoteQueue, bodies: Sequence[bytes], max_seconds: float
) -> Sample:
    """Put and get one message at a time, and ack it without waiting.

    The latencies cover put, get and sending the ack. The total time ends
    after a stats() call, whose reply comes after every ack is applied.
    """
    latencies: list[float] = []
    put, get, ack = queue.put, queue.get, queue.ack
    clock = time.perf_counter
    start = clock()
    deadline = start + max_seconds
    for body in bodies:
        begin = clock()
        put(body)
        message = get(timeout=GET_TIMEOUT)
        if message is None:
            raise RuntimeError(f"get timed out right after put {len(latencies) + 1}")
        ack(message.receipt, wait=False)
        end = clock()
        latencies.append(end - begin)
        if end > deadline:
            break
    depth = queue.stats().depth
    seconds = clock() - start
    if depth != 0:
        raise RuntimeError(f"{depth} messages left unsettled after the acks")
    return latency_sample(latencies, seconds)


def produce_batches(
    queue: RemoteQueue, chunks: Sequence[list[bytes]], deadline: float
) -> int:
    """Call put_many once per chunk until done or past deadline; return count."""
    produced = 0
    for chunk in chunks:
        queue.put_many(chunk)
        produced += len(chunk)
        if time.perf_counter() > deadline:
            break
    return produced


def drain_batches(queue: RemoteQueue, count: int, batch: int, deadline: float) -> int:
    """Get and ack count messages with get_many(batch) and ack_many.

    Returns the messages acked, fewer than count when past deadline.
    Raises RuntimeError when a get_many waits GET_TIMEOUT for nothing.
    """
    consumed = 0
    while consumed < count:
        messages = queue.get_many(min(batch, count - consumed), timeout=GET_TIMEOUT)
        if not messages:
            raise RuntimeError(f"queue empty after {consumed} of {count} messages")
        queue.ack_many(messages)
        consumed += len(messages)
        if time.perf_counter() > deadline:
            break
    return consumed


def put_many_then_drain(
    queue: RemoteQueue,
    bodies: Sequence[bytes],
    batch: int,
    max_seconds: float,
) -> Sample:
    """Put every body with put_many(batch), then drain as many in batches."""
    chunks = batches(bodies, batch)
    start = time.perf_counter()
    produced = produce_batches(queue, chunks, start + max_seconds)
    middle = time.perf_counter()
    consumed = drain_batches(queue, produced, batch, middle + max_seconds)
    end = time.perf_counter()
    check_drained(produced, consumed, "put_many, then get_many")
    return Sample(produced, consumed, end - start, middle - start, end - middle)


# pymq, asyncio client ---------------------------------------------------


async def gather_then_drain_async(
    url: str, name: str, bodies: Sequence[bytes], window: int, max_seconds: float
) -> Sample:
    broker = await pymq.aio.connect(url)
    try:
        queue = await broker.queue(name, max_in_flight=QUEUE_MAX_IN_FLIGHT)
        clock = time.perf_counter
        start = clock()
        deadline = start + max_seconds
        produced = 0
        for first in range(0, len(bodies), window):
            chunk = bodies[first : first + window]
            await asyncio.gather(*[queue.put(body) for body in chunk])
            produced += len(chunk)
            if clock() > deadline:
                break
        middle = clock()
        deadline = middle + max_seconds
        consumed = 0
        while consumed < produced:
            count = min(window, produced - consumed)
            messages = await queue.get_many(count, timeout=GET_TIMEOUT)
            if not messages:
                break
            await queue.ack_many(messages)
            consumed += len(messages)
            if clock() > deadline:
                break
        end = clock()
    finally:
        await broker.close()
    check_drained(produced, consumed, GATHER)
    return Sample(produced, consumed, end - start, middle - start, end - middle)


def gather_then_drain(
    url: str, name: str, bodies: Sequence[bytes], window: int, max_seconds: float
) -> Sample:
    """Put bodies window at a time with asyncio.gather, then drain them.

    The drain calls get_many(window) and ack_many. It runs in a fresh
    event loop of asyncio's default kind, with its own connection.
    """
    return asyncio.run(gather_then_drain_async(url, name, bodies, window, max_seconds))


# pymq, client processes -------------------------------------------------


@dataclass(frozen=True)
class ClientJob:
    """The work of one client process: put count bodies, then drain as many."""

    url: str
    queue_name: str
    payload: int
    count: int
    batch: int
    max_seconds: float


def client_process(
    job: ClientJob,
    start_line: Any,
    produced_line: Any,
    results: Any,
) -> None:
    """Run one ClientJob in a child process and put its figures on results.

    Every process waits at start_line before it puts and at produced_line
    before it drains, so the put phases and the drain phases of all the
    processes overlap. Times are time.perf_counter(), which is the
    system-wide CLOCK_MONOTONIC on Linux, so the parent can compare them.
    """
    try:
        chunks = batches(payloads(job.payload, job.count), job.batch)
        with pymq.connect(job.url) as broker:
            queue = broker.queue(job.queue_name, max_in_flight=QUEUE_MAX_IN_FLIGHT)
            start_line.wait(BARRIER_TIMEOUT)
            start = time.perf_counter()
            produced = produce_batches(queue, chunks, start + job.max_seconds)
            middle = time.perf_counter()
            produced_line.wait(BARRIER_TIMEOUT)
            deadline = time.perf_counter() + job.max_seconds
            consumed = drain_batches(queue, produced, job.batch, deadline)
            end = time.perf_counter()
        results.put(
            {
                "produced": produced,
                "consumed": consumed,
                "start": start,
                "middle": middle,
                "end": end,
            }
        )
    except BaseException as exc:
        # Release the other processes from the barriers at once.
        start_line.abort()
        produced_line.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def client_processes(
    url: str,
    queue_names: Sequence[str],
    payload: int,
    count: int,
    batch: int,
    max_seconds: float,
) -> Sample:
    """Run one client process per queue name, each with count messages.

    A name may repeat, for processes that share a queue. The phases run
    from the first process's start to the last process's end of putting,
    and from there to the last process's end of draining.
    """
    context = multiprocessing.get_context("spawn")
    start_line = context.Barrier(len(queue_names))
    produced_line = context.Barrier(len(queue_names))
    results = context.Queue()
    processes = [
        context.Process(
            target=client_process,
            args=(
                ClientJob(url, name, payload, count, batch, max_seconds),
                start_line,
                produced_line,
                results,
            ),
            name=f"bench-client-{index}",
        )
        for index, name in enumerate(queue_names)
    ]
    for process in processes:
        process.start()
    try:
        figures = [results.get(timeout=BARRIER_TIMEOUT) for _ in processes]
    finally:
        for process in processes:
            process.join(BARRIER_TIMEOUT)
            if process.is_alive():
                process.terminate()
                process.join(10)
        results.close()
        results.join_thread()
    failures = [figure["error"] for figure in figures if "error" in figure]
    if failures:
        raise RuntimeError(f"a client process failed: {failures[0]}")
    produced = sum(figure["produced"] for figure in figures)
    consumed = sum(figure["consumed"] for figure in figures)
    check_drained(produced, consumed, f"{len(processes)} client processes")
    start = min(figure["start"] for figure in figures)
    middle = max(figure["middle"] for figure in figures)
    end = max(figure["end"] for figure in figures)
    return Sample(produced, consumed, end - start, middle - start, end - middle)


# Redis Streams ----------------------------------------------------------


def stream_entries(reply: Any) -> list[Any]:
    """Return the (id, fields) entries of an XREADGROUP reply for one stream.

    redis-py returns a list of [stream, entries] pairs with RESP2 and a
    dict of stream to entries with RESP3.
    """
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values()))[0])
    return list(reply[0][1])


def redis_one_at_a_time(
    client: Any, key: str, bodies: Sequence[bytes], max_seconds: float
) -> Sample:
    """XADD, XREADGROUP COUNT 1 and XACK one message at a time.

    The group REDIS_GROUP must exist on key.
    """
    latencies: list[float] = []
    streams = {key: ">"}
    clock = time.perf_counter
    start = clock()
    deadline = start + max_seconds
    for body in bodies:
        begin = clock()
        client.xadd(key, {"body": body})
        entries = stream_entries(
            client.xreadgroup(REDIS_GROUP, REDIS_CONSUMER, streams, count=1)
        )
        if len(entries) != 1:
            raise RuntimeError(f"XREADGROUP returned {len(entries)} entries, not 1")
        client.xack(key, REDIS_GROUP, entries[0][0])
        end = clock()
        latencies.append(end - begin)
        if end > deadline:
            break
    return latency_sample(latencies, clock() - start)


def redis_pipelined(
    client: Any, key: str, bodies: Sequence[bytes], batch: int, max_seconds: float
) -> Sample:
    """XADD batch bodies per pipeline, then XREADGROUP COUNT batch + XACK.

    The pipelines have transaction=False, so they send the commands
    without MULTI and EXEC. The group REDIS_GROUP must exist on key.
    """
    chunks = batches(bodies, batch)
    streams = {key: ">"}
    pipeline = client.pipeline(transaction=False)
    clock = time.perf_counter
    start = clock()
    deadline = start + max_seconds
    produced = 0
    for chunk in chunks:
        for body in chunk:
            pipeline.xadd(key, {"body": body})
        pipeline.execute()
        produced += len(chunk)
        if clock() > deadline:
            break
    middle = clock()
    deadline = middle + max_seconds
    consumed = 0
    while consumed < produced:
        count = min(batch, produced - consumed)
        entries = stream_entries(
            client.xreadgroup(REDIS_GROUP, REDIS_CONSUMER, streams, count=count)
        )
        if not entries:
            break
        client.xack(key, REDIS_GROUP, *[entry[0] for entry in entries])
        consumed += len(entries)
        if clock() > deadline:
            break
    end = clock()
    check_drained(produced, consumed, REDIS_PIPELINED)
    return Sample(produced, consumed, end - start, middle - start, end - middle)


class RedisBaseline:
    """The Redis server on 127.0.0.1, with the keys this run creates.

    Every key starts with a prefix unique to the run. redis_round deletes
    its key, and cleanup() deletes any key still left.
    """

    def __init__(self, client: Any, port: int) -> None:
        self.client = client
        self.port = port
        self.prefix = f"pymq-bench:{os.getpid()}:{secrets.token_hex(6)}"
        self.keys: set[str] = set()
        info = client.info("server")
        self.server_version = str(info.get("redis_version", "unknown"))
        self.persistence = redis_persistence(client)

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def redis_round(self, key: str, run: Callable[[], Sample]) -> Sample:
        """Create key with its group, run one round, check it, delete key."""
        self.keys.add(key)
        self.client.delete(key)
        self.client.xgroup_create(key, REDIS_GROUP, id="0", mkstream=True)
        try:
            sample = run()
            pending = self.client.xpending(key, REDIS_GROUP)["pending"]
            length = self.client.xlen(key)
        finally:
            self.client.delete(key)
        if pending != 0:
            raise RuntimeError(f"{key}: {pending} entries left pending")
        if length != sample.produced:
            raise RuntimeError(f"{key}: {length} entries, {sample.produced} added")
        return sample

    def cleanup(self) -> None:
        if self.keys:
            self.client.delete(*self.keys)
        self.client.close()


def redis_persistence(client: Any) -> str:
    """Return the server's persistence settings as text, read with CONFIG GET."""
    import redis

    try:
        config = client.config_get("appendonly")
        config.update(client.config_get("appendfsync"))
        config.update(client.config_get("save"))
    except redis.RedisError as exc:
        return f"unknown (CONFIG GET failed: {exc})"
    return ", ".join(f"{name} {value!r}" for name, value in sorted(config.items()))


def connect_redis(port: int) -> tuple[RedisBaseline | None, str]:
    """Connect to Redis on 127.0.0.1:port.

    Returns the baseline and "", or None and the reason it is missing.
    """
    try:
        import redis
    except ImportError:
        return None, "redis-py is not installed (pip install 'redis[hiredis]')"
    client = redis.Redis(
        host=REDIS_HOST, port=port, socket_connect_timeout=1.0, socket_timeout=60.0
    )
    try:
        client.ping()
        return RedisBaseline(client, port), ""
    except redis.RedisError as exc:
        client.close()
        return None, f"no Redis server answered on {REDIS_HOST}:{port}: {exc}"


def redis_parser() -> str:
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return "none"
    return "hiredis" if HIREDIS_AVAILABLE else "pure Python (hiredis missing)"


# Cases ------------------------------------------------------------------


class Servers:
    """The pymq server, the echo server and Redis that one run measures.

    The blocking connection `checker` reads each queue's stats before and
    after a round, outside the timing.
    """

    def __init__(self, fsync: str, redis_port: int) -> None:
        self._stack = ExitStack()
        try:
            self.pymq = self._stack.enter_context(ServerProcess(fsync))
            self.echo = self._stack.enter_context(EchoServer())
            self.checker = pymq.connect(self.pymq.url)
            self._stack.callback(self.checker.close)
            self.redis, self.redis_reason = connect_redis(redis_port)
            if self.redis is not None:
                self._stack.callback(self.redis.cleanup)
        except BaseException:
            self._stack.close()
            raise

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def pymq_round(
    servers: Servers, names: Sequence[str], run: Callable[[], Sample]
) -> Sample:
    """Run one round on the named queues and check the server's counts.

    Raises RuntimeError unless the queues are empty after the round and
    acked exactly the messages the round consumed.
    """
    queues = [
        servers.checker.queue(name, max_in_flight=QUEUE_MAX_IN_FLIGHT)
        for name in dict.fromkeys(names)
    ]
    before = sum(queue.stats().acked for queue in queues)
    sample = run()
    stats = [queue.stats() for queue in queues]
    left = sum(stat.depth for stat in stats)
    acked = sum(stat.acked for stat in stats) - before
    if left != 0:
        raise RuntimeError(f"queues {list(names)}: {left} messages left")
    if acked != sample.consumed:
        raise RuntimeError(
            f"queues {list(names)}: the server acked {acked}, the round "
            f"consumed {sample.consumed}"
        )
    return sample


# Queues of the cases. Every round drains its queue, so the cases of one
# connection share a queue, and so do the client processes with the same
# index. Each queue keeps a 64 MiB segment and a prefaulted spare on disk.
SINGLE_QUEUE = "bench.jobs"
SHARED_QUEUE = "bench.shared"


def client_queue(index: int) -> str:
    return f"bench.client.{index}"


def echo_cases(budget: Budget, servers: Servers) -> list[Case]:
    cases = []
    for size in ECHO_SIZES:

        def run(size: int = size) -> Sample:
            port = servers.echo.port
            return echo_round_trips(port, size, budget.round_trips, budget.seconds)

        cases.append(Case(ECHO, "socket", ROUND_TRIP, size, 1, run))
    return cases


def blocking_cases(budget: Budget, servers: Servers, payload: int) -> list[Case]:
    """Build the one-at-a-time and batched cases of the blocking client."""
    single = payloads(payload, budget.single_messages)
    bodies = payloads(payload, budget.batched_count(payload))

    def on_new_connection(
        loop: Callable[[RemoteQueue], Sample],
    ) -> Callable[[], Sample]:
        def run() -> Sample:
            with pymq.connect(servers.pymq.url) as broker:
                queue = broker.queue(SINGLE_QUEUE, max_in_flight=QUEUE_MAX_IN_FLIGHT)
                return pymq_round(servers, [SINGLE_QUEUE], lambda: loop(queue))

        return run

    cases = [
        Case(
            PYMQ,
            "blocking",
            ONE_AT_A_TIME,
            payload,
            1,
            on_new_connection(lambda queue: put_get_ack(queue, single, budget.seconds)),
        ),
        Case(
            PYMQ,
            "blocking",
            ACK_NO_WAIT,
            payload,
            1,
            on_new_connection(
                lambda queue: put_get_ack_no_wait(queue, single, budget.seconds)
            ),
        ),
    ]
    for batch in BATCH_SIZES:

        def drain(queue: RemoteQueue, batch: int = batch) -> Sample:
            return put_many_then_drain(queue, bodies, batch, budget.seconds)

        cases.append(
            Case(PYMQ, "blocking", BATCHED, payload, batch, on_new_connection(drain))
        )
    return cases


def asyncio_case(budget: Budget, servers: Servers, payload: int) -> Case:
    bodies = payloads(payload, budget.pipelined_count(payload))

    def run() -> Sample:
        url = servers.pymq.url
        return pymq_round(
            servers,
            [SINGLE_QUEUE],
            lambda: gather_then_drain(
                url, SINGLE_QUEUE, bodies, WINDOW, budget.seconds
            ),
        )

    return Case(PYMQ, "asyncio", GATHER, payload, WINDOW, run)


def clients_form(clients: int, shared: bool) -> str:
    if clients == 1:
        return "1 client process, put_many then get_many"
    queues = "one shared queue" if shared else "a queue each"
    return f"{clients} client processes, {queues}, put_many then get_many"


def process_cases(budget: Budget, servers: Servers, payload: int) -> list[Case]:
    """Build the cases of one client process and of budget.clients processes.

    The budget.clients processes run once with a queue each and once on one
    shared queue.
    """
    total = budget.batched_count(payload)
    layouts = [(1, False), (budget.clients, False), (budget.clients, True)]
    cases = []
    for clients, shared in layouts:
        if shared:
            names = [SHARED_QUEUE] * clients
        else:
            names = [client_queue(index) for index in range(clients)]

        def run(names: list[str] = names) -> Sample:
            url = servers.pymq.url
            count = total // len(names)
            return pymq_round(
                servers,
                names,
                lambda: client_processes(
                    url, names, payload, count, GOAL_BATCH, budget.seconds
                ),
            )

        form = clients_form(clients, shared)
        cases.append(Case(PYMQ, "blocking", form, payload, GOAL_BATCH, run))
    return cases


def redis_cases(budget: Budget, redis: RedisBaseline, payload: int) -> list[Case]:
    client = redis.client
    single = payloads(payload, budget.single_messages)
    bodies = payloads(payload, budget.batched_count(payload))
    one_key = redis.key(f"single:{payload}")
    batch_key = redis.key(f"pipelined:{payload}")

    def one_at_a_time() -> Sample:
        return redis.redis_round(
            one_key,
            lambda: redis_one_at_a_time(client, one_key, single, budget.seconds),
        )

    def pipelined() -> Sample:
        return redis.redis_round(
            batch_key,
            lambda: redis_pipelined(
                client, batch_key, bodies, GOAL_BATCH, budget.seconds
            ),
        )

    return [
        Case(REDIS, "redis-py", REDIS_ONE, payload, 1, one_at_a_time),
        Case(REDIS, "redis-py", REDIS_PIPELINED, payload, GOAL_BATCH, pipelined),
    ]


def build_cases(budget: Budget, servers: Servers) -> list[Case]:
    cases = echo_cases(budget, servers)
    for payload in budget.sizes:
        cases.extend(blocking_cases(budget, servers, payload))
        cases.append(asyncio_case(budget, servers, payload))
        cases.extend(process_cases(budget, servers, payload))
        if servers.redis is not None:
            cases.extend(redis_cases(budget, servers.redis, payload))
    return cases


def run_rounds(cases: Sequence[Case], rounds: int) -> None:
    """Run round 1 of every case, then round 2, and so on."""
    for round_number in range(1, rounds + 1):
        for index, case in enumerate(cases, 1):
            print(
                f"round {round_number}/{rounds}, case {index}/{len(cases)}: "
                f"{case.system} {case.client} {case.form} "
                f"{payload_name(case.payload)} batch {case.batch}",
                file=sys.stderr,
                flush=True,
            )
            case.samples.append(case.run())


# Goals ------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """A goal: one case's figure divided by another's, per round.

    With at_most the ratio must be at or below target, else at or above.
    missing gives the reason when a case of the ratio was not measured.
    """

    name: str
    payload: int
    target: float
    at_most: bool
    numerator: list[float]
    denominator: list[float]
    missing: str = ""

    def median(self) -> float:
        return statistics.median(self.numerator) / statistics.median(self.denominator)

    def spread(self) -> tuple[float, float]:
        per_round = [
            a / b for a, b in zip(self.numerator, self.denominator, strict=True)
        ]
        return min(per_round), max(per_round)

    def met(self) -> bool:
        if self.at_most:
            return self.median() <= self.target
        return self.median() >= self.target

    def verdict(self) -> str:
        if self.missing:
            return f"not measured: {self.missing}"
        if self.met():
            return "yes"
        share = self.median() / self.target
        if self.at_most:
            return f"no ({share:.0%} of the limit)"
        return f"no ({share:.0%} of it)"


def find(cases: Sequence[Case], system: str, form: str, **key: object) -> Case | None:
    for case in cases:
        if (case.system, case.form) != (system, form):
            continue
        if all(getattr(case, name) == value for name, value in key.items()):
            return case
    return None


def p50s(case: Case | None) -> list[float]:
    if case is None:
        return []
    return case.latencies("p50") or []


def goals(cases: Sequence[Case], sizes: Sequence[int], redis_reason: str) -> list[Goal]:
    """Compare the figures with the server's goals, per body size.

    (a) pymq batches of 100 move at least 5 x the messages per second of
    Redis Streams pipelined in 100s. (b) The p50 of one put, get and ack
    is at most 5 bare round trips of 16 bytes, and at most half the p50
    of one XADD, XREADGROUP and XACK.
    """
    echo = find(cases, ECHO, ROUND_TRIP, payload=UNIT_ROUND_TRIP)
    result = []
    for payload in sizes:
        batched = find(cases, PYMQ, BATCHED, payload=payload, batch=GOAL_BATCH)
        pipelined = find(cases, REDIS, REDIS_PIPELINED, payload=payload)
        single = find(cases, PYMQ, ONE_AT_A_TIME, payload=payload)
        redis_single = find(cases, REDIS, REDIS_ONE, payload=payload)
        assert batched is not None and single is not None
        missing = "" if pipelined is not None else redis_reason
        result.append(
            Goal(
                "pymq batches of 100 / Redis Streams pipelined, msg/s",
                payload,
                5.0,
                False,
                batched.rates(),
                pipelined.rates() if pipelined is not None else [],
                missing,
            )
        )
        result.append(
            Goal(
                f"pymq put+get+ack p50 / bare round trip p50 ({UNIT_ROUND_TRIP} B)",
                payload,
                5.0,
                True,
                p50s(single),
                p50s(echo),
            )
        )
        result.append(
            Goal(
                "pymq put+get+ack p50 / Redis XADD+XREADGROUP+XACK p50",
                payload,
                0.5,
                True,
                p50s(single),
                p50s(redis_single),
                "" if redis_single is not None else redis_reason,
            )
        )
    return result


# Report -----------------------------------------------------------------


def microseconds(values: list[float] | None) -> str:
    return "" if values is None else f"{statistics.median(values) * 1e6:.0f}"


def phase_cell(case: Case, phase: str) -> str:
    rates = case.phase_rates(phase)
    return "" if rates is None else si(statistics.median(rates))


def table(cases: Sequence[Case]) -> list[str]:
    lines = [
        "| system | client | form | payload | batch | msg/s | MB/s | min - max msg/s"
        " | p50 µs | p99 µs | put msg/s | get msg/s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for case in cases:
        rates = case.rates()
        median = case.median()
        lines.append(
            f"| {case.system} | {case.client} | {case.form} "
            f"| {payload_name(case.payload)} | {case.batch} | {si(median)} "
            f"| {si(median * case.payload / 1e6)} "
            f"| {si(min(rates))} - {si(max(rates))} "
            f"| {microseconds(case.latencies('p50'))} "
            f"| {microseconds(case.latencies('p99'))} "
            f"| {phase_cell(case, 'put')} | {phase_cell(case, 'get')} |"
        )
    return lines


def goal_table(goal_list: Sequence[Goal]) -> list[str]:
    lines = [
        "| goal | payload | target | median | per round | met |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for goal in goal_list:
        bound = "at most" if goal.at_most else "at least"
        if goal.missing:
            figure, spread = "", ""
        else:
            low, high = goal.spread()
            figure, spread = f"{goal.median():.2f} x", f"{low:.2f} - {high:.2f}"
        lines.append(
            f"| {goal.name} | {payload_name(goal.payload)} "
            f"| {bound} {goal.target:g} x | {figure} | {spread} | {goal.verdict()} |"
        )
    return lines


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(servers: Servers) -> dict[str, str | None]:
    redis = servers.redis
    return {
        "pymq": pymq.__version__,
        "python": platform.python_version(),
        "uvloop": package_version("uvloop"),
        "redis-py": package_version("redis"),
        "hiredis": package_version("hiredis"),
        "redis-py parser": redis_parser(),
        "redis server": redis.server_version if redis is not None else None,
    }


def header_lines(
    args: argparse.Namespace, budget: Budget, servers: Servers, scratch_parent: Path
) -> list[str]:
    lines = [
        f"run_server{' --quick' if args.quick else ''}, {budget.rounds} rounds, "
        f"pymq server fsync={args.fsync}, sizes {','.join(map(str, budget.sizes))}",
        *machine_lines(scratch_parent),
        ", ".join(f"{name} {value}" for name, value in versions(servers).items()),
    ]
    if servers.redis is not None:
        lines.append(
            f"Redis on {REDIS_HOST}:{servers.redis.port}: {servers.redis.persistence}"
        )
    else:
        lines.append(f"Redis rows skipped: {servers.redis_reason}")
    return lines


@dataclass(frozen=True)
class Sources:
    """The code a run measures: the commit, changes under src/, the core's build."""

    commit: str
    state: str
    core_built: str


def read_sources() -> Sources:
    return Sources(
        commit=command_output(["git", "rev-parse", "--short", "HEAD"]),
        state=source_state().removeprefix(", ") or "unknown",
        core_built=build_time(),
    )


def json_report(
    args: argparse.Namespace,
    argv: Sequence[str],
    budget: Budget,
    servers: Servers,
    cases: Sequence[Case],
    goal_list: Sequence[Goal],
    loads: dict[str, list[float]],
    sources: dict[str, Sources],
) -> dict[str, Any]:
    redis = servers.redis
    return {
        "command": [sys.executable, "-m", "benchmarks.run_server", *argv],
        "commit": sources["start"].commit,
        "sources": {when: asdict(state) for when, state in sources.items()},
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "load_average": loads,
        },
        "versions": versions(servers),
        "fsync": args.fsync,
        "budget": asdict(budget),
        "redis": {
            "measured": redis is not None,
            "skipped_because": servers.redis_reason or None,
            "address": f"{REDIS_HOST}:{redis.port}" if redis is not None else None,
            "persistence": redis.persistence if redis is not None else None,
        },
        "cases": [
            {
                "system": case.system,
                "client": case.client,
                "form": case.form,
                "payload": case.payload,
                "batch": case.batch,
                "median_msg_per_s": case.median(),
                "samples": [asdict(sample) for sample in case.samples],
            }
            for case in cases
        ],
        "goals": [
            {
                "name": goal.name,
                "payload": goal.payload,
                "target": goal.target,
                "at_most": goal.at_most,
                "median": None if goal.missing else goal.median(),
                "per_round": None if goal.missing else list(goal.spread()),
                "verdict": goal.verdict(),
            }
            for goal in goal_list
        ],
    }


def sizes_argument(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid sizes {text!r}: give byte counts separated by commas"
        ) from None
    if not all(1 <= size <= MAX_BODY_BYTES for size in sizes):
        raise argparse.ArgumentTypeError(
            f"invalid sizes {text!r}: each must be from 1 to {MAX_BODY_BYTES}"
        )
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run_server",
        description="Measure the pymq server beside a bare round trip and Redis "
        "Streams; print tables.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller counts, for a check that every case runs",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        type=Path,
        help="also write the figures, machine, versions and commit to FILE",
    )
    parser.add_argument(
        "--fsync",
        choices=("never", "interval", "always"),
        default="interval",
        help="fsync policy of the pymq server (default: interval)",
    )
    parser.add_argument(
        "--sizes",
        type=sizes_argument,
        default=BROKER_PAYLOAD_SIZES,
        metavar="BYTES,...",
        help="body sizes in bytes of the pymq and Redis cases "
        "(default: 100,1024,65536)",
    )
    parser.add_argument(
        "--redis-port",
        type=int,
        default=REDIS_PORT,
        help=f"port of the Redis server on {REDIS_HOST} (default: {REDIS_PORT})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    budget = dataclasses.replace(QUICK if args.quick else FULL, sizes=args.sizes)
    with Scratch() as probe:
        scratch_parent = probe.path.parent
    loads = {"start": load_average()}
    sources = {"start": read_sources()}
    with Servers(args.fsync, args.redis_port) as servers:
        for line in header_lines(args, budget, servers, scratch_parent):
            print(f"# {line}")
        sys.stdout.flush()
        cases = build_cases(budget, servers)
        run_rounds(cases, budget.rounds)
        loads["end"] = load_average()
        sources["end"] = read_sources()
        goal_list = goals(cases, budget.sizes, servers.redis_reason)
        print(f"# load average at end: {' '.join(map(str, loads['end']))}")
        if sources["end"] != sources["start"]:
            # Client processes start during the run and import the code then.
            end = sources["end"]
            print(
                f"# warning: the code changed during the run; at the end: "
                f"commit {end.commit}, {end.state}, pymq._core built {end.core_built}"
            )
        print()
        print("\n".join(table(cases)))
        print()
        print("\n".join(goal_table(goal_list)))
        if args.json is not None:
            report = json_report(
                args, argv, budget, servers, cases, goal_list, loads, sources
            )
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
