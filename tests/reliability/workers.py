"""Worker processes of the crash torture harness.

Usage: python -m tests.reliability.workers ROLE CONFIG_JSON

ROLE is one of:

    producer   puts messages to the queue and the stream of a server
    consumer   consumes the queue, or the group of the stream, of a server
    embedded   one process with pymq.open: a producer thread and consumer
               threads of the queue and the group, which replies to
               "synced" lines on stdin like probe_serve
    dead-letter-crash
               puts one message to the queue "jobs" of "data", rejects it,
               and SIGKILLs itself once the message is in "jobs.dlq",
               before the queue's journal records the move

CONFIG_JSON is an object with "log_dir", "seed", "body_seed", "seconds"
(the time bound) and, by role, "url", "target" ("queue" or "group"),
"log_name", "rate" (puts per second), "data", "fsync", "segment_bytes",
"consumers" (threads per target) and "drain_seconds". Each role writes the
lines of records.py to its own log in log_dir. SIGTERM stops a worker
cleanly: the producer after its current put, a consumer after settling its
current batch, the embedded worker once its consumers drained the queue and
the group (at most drain_seconds), after which it closes the broker.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Final

import pymq
from tests.reliability import probe_serve
from tests.reliability.records import (
    CONSUMER_OPTIONS,
    CORRUPT_REASON,
    GROUP,
    QUEUE,
    REJECT_REASON,
    STREAM,
    LineLog,
    inspect_message,
    make_payload,
    next_sequence,
    now,
    settlement_of,
)

# Bounds of the worker loops in count. The bound in time is config["seconds"].
MAX_PUTS: Final = 5_000_000
MAX_GETS: Final = 5_000_000
# Errors a request to a server may raise while the server is killed and
# restarted. Anything else stops the worker with a traceback, and the
# harness reports the exit.
CLIENT_ERRORS: Final = (pymq.PymqError, OSError)
# Connection attempts of a client whose server is down, 0.1 s apart.
CONNECT_ATTEMPTS: Final = 600


class Stopping:
    """The SIGTERM flag of a worker."""

    def __init__(self) -> None:
        self.event = threading.Event()
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def connect(url: str, stopping: Stopping) -> pymq.RemoteBroker | None:
    """Connect to the server at url, retrying while it is down.

    Returns None when SIGTERM came first.
    """
    for _ in range(CONNECT_ATTEMPTS):
        if stopping.is_set():
            return None
        try:
            return pymq.connect(url, connect_timeout=5.0, reconnect_attempts=5)
        except CLIENT_ERRORS:
            time.sleep(0.1)
    raise ConnectionError(f"could not connect to {url} in {CONNECT_ATTEMPTS} attempts")


def open_with_retries(opener: Any, stopping: Stopping) -> Any:
    """Call opener() until it stops raising client errors; None after SIGTERM."""
    for _ in range(CONNECT_ATTEMPTS):
        if stopping.is_set():
            return None
        try:
            return opener()
        except CLIENT_ERRORS:
            time.sleep(0.1)
    raise ConnectionError(f"could not open {opener!r} in {CONNECT_ATTEMPTS} attempts")


# Producing ----------------------------------------------------------------


def produce(
    targets: dict[str, Any],
    log: LineLog,
    config: dict[str, Any],
    stopping: Stopping,
    errors: tuple[type[BaseException], ...],
) -> None:
    """Put messages with rising sequence numbers until stopped or out of time.

    A put that raises one of errors is logged as E and its sequence numbers
    are never used again, so every message in the broker has its own.
    """
    rng = random.Random(config["seed"] * 7919 + os.getpid())
    body_seed = config["body_seed"]
    seq = next_sequence(log.path)
    interval = 1.0 / config["rate"]
    deadline = time.monotonic() + config["seconds"]
    due = time.monotonic()
    for _ in range(MAX_PUTS):
        if stopping.is_set() or time.monotonic() > deadline:
            break
        name = "queue" if rng.random() < 0.5 else "stream"
        count = rng.randint(2, 5) if rng.random() < 0.1 else 1
        payloads = [make_payload(body_seed, seq + i) for i in range(count)]
        log.write("T", now(), seq, name, count)
        try:
            if count == 1:
                offsets: Any = [
                    targets[name].put(payloads[0], headers={"seq": str(seq)})
                ]
            else:
                offsets = targets[name].put_many(payloads)
        except errors as exc:
            log.write("E", now(), seq, name, count, type(exc).__name__)
            time.sleep(rng.uniform(0.02, 0.1))
        else:
            write_done(log, seq, name, list(offsets))
        seq += count
        due += interval * count
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        elif pause < -1.0:
            # Far behind (the server was down): do not burst to catch up.
            due = time.monotonic()


def write_done(log: LineLog, seq: int, name: str, offsets: list[int]) -> None:
    """Log a returned put: one D line per run of consecutive offsets."""
    start = 0
    for index in range(1, len(offsets) + 1):
        if index == len(offsets) or offsets[index] != offsets[index - 1] + 1:
            log.write("D", now(), seq + start, name, index - start, offsets[start])
            start = index


def run_producer(config: dict[str, Any]) -> None:
    stopping = Stopping()
    log = LineLog(Path(config["log_dir"]) / config["log_name"])
    log.write("S", now(), os.getpid(), "producer")
    broker = connect(config["url"], stopping)
    if broker is None:
        return
    with broker:
        queue = open_with_retries(
            lambda: broker.queue(QUEUE, **CONSUMER_OPTIONS), stopping
        )
        stream = open_with_retries(lambda: broker.stream(STREAM), stopping)
        if queue is None or stream is None:
            return
        targets = {"queue": queue, "stream": stream}
        produce(targets, log, config, stopping, CLIENT_ERRORS)


# Consuming ----------------------------------------------------------------


def consume(
    consumer: Any,
    name: str,
    log: LineLog,
    config: dict[str, Any],
    stopping: Any,
    errors: tuple[type[BaseException], ...],
) -> None:
    """Get, log and settle messages until stopped or out of time.

    Each message is logged (G) once delivered, then settled as
    settlement_of() returns, with an I line before and an O or X line after
    the call. Three batches in ten are acked with one ack_many.
    """
    rng = random.Random(
        config["seed"] * 6007 + os.getpid() + zlib.crc32(log.path.name.encode())
    )
    body_seed = config["body_seed"]
    deadline = time.monotonic() + config["seconds"]
    for _ in range(MAX_GETS):
        if stopping.is_set() or time.monotonic() > deadline:
            break
        called = now()
        try:
            messages = consumer.get_many(rng.randint(1, 16), timeout=0.2)
        except errors:
            time.sleep(rng.uniform(0.02, 0.1))
            continue
        returned = now()
        verdicts = []
        for message in messages:
            seq, intact = inspect_message(body_seed, message.body, message.headers)
            log.write(
                "G",
                called,
                returned,
                name,
                message.offset,
                seq,
                message.attempt,
                int(intact),
            )
            verdicts.append(settlement_of(seq) if intact else "corrupt")
        if messages and rng.random() < 0.05:
            # Slow work, so that more kills land between a get and its ack.
            time.sleep(rng.uniform(0, 0.02))
        settle(messages, verdicts, consumer, name, log, rng, errors)


def settle(
    messages: list[Any],
    verdicts: list[str],
    consumer: Any,
    name: str,
    log: LineLog,
    rng: random.Random,
    errors: tuple[type[BaseException], ...],
) -> None:
    """Nack, reject and ack one batch, logging each call before and after."""
    acks = []
    for message, verdict in zip(messages, verdicts, strict=True):
        if verdict == "ack":
            acks.append(message)
            continue
        op = "nack" if verdict == "nack" else "reject"
        log.write("I", now(), op, name, message.offset, message.attempt)
        try:
            if op == "nack":
                message.nack()
            else:
                message.reject(REJECT_REASON if verdict == "reject" else CORRUPT_REASON)
        except errors as exc:
            log.write(
                "X",
                now(),
                op,
                name,
                message.offset,
                message.attempt,
                type(exc).__name__,
            )
            if isinstance(exc, pymq.ConnectionLostError):
                # The server released every delivery of the connection.
                return
        else:
            log.write("O", now(), op, name, message.offset, message.attempt)
    if len(acks) > 1 and rng.random() < 0.3:
        for message in acks:
            log.write("I", now(), "ack", name, message.offset, message.attempt)
        try:
            consumer.ack_many(acks)
        except errors as exc:
            for message in acks:
                log.write(
                    "X",
                    now(),
                    "ack",
                    name,
                    message.offset,
                    message.attempt,
                    type(exc).__name__,
                )
        else:
            for message in acks:
                log.write("O", now(), "ack", name, message.offset, message.attempt)
        return
    for message in acks:
        log.write("I", now(), "ack", name, message.offset, message.attempt)
        try:
            message.ack()
        except errors as exc:
            log.write(
                "X",
                now(),
                "ack",
                name,
                message.offset,
                message.attempt,
                type(exc).__name__,
            )
            if isinstance(exc, pymq.ConnectionLostError):
                return
        else:
            log.write("O", now(), "ack", name, message.offset, message.attempt)


def run_consumer(config: dict[str, Any]) -> None:
    stopping = Stopping()
    target = config["target"]
    log = LineLog(Path(config["log_dir"]) / config["log_name"])
    log.write("S", now(), os.getpid(), f"consumer-{target}")
    broker = connect(config["url"], stopping)
    if broker is None:
        return
    with broker:
        if target == "queue":
            consumer = open_with_retries(
                lambda: broker.queue(QUEUE, **CONSUMER_OPTIONS), stopping
            )
        else:
            consumer = open_with_retries(
                lambda: broker.stream(STREAM).group(GROUP, **CONSUMER_OPTIONS), stopping
            )
        if consumer is None:
            return
        consume(consumer, target, log, config, stopping, CLIENT_ERRORS)


# The embedded broker ---------------------------------------------------------


def run_embedded(config: dict[str, Any]) -> None:
    """Run a producer and consumers as threads of one process on pymq.open.

    On SIGTERM the producer stops, the consumers go on until the queue and
    the group are drained (at most drain_seconds), and the broker is closed.
    """
    stopping = Stopping()
    log_dir = Path(config["log_dir"])
    broker = pymq.open(
        config["data"], fsync=config["fsync"], segment_bytes=config["segment_bytes"]
    )
    queue = broker.queue(QUEUE, **CONSUMER_OPTIONS)
    stream = broker.stream(STREAM)
    group = stream.group(GROUP, **CONSUMER_OPTIONS)
    probe_serve.start_probe_thread()

    producer_log = LineLog(log_dir / "producer.log")
    producer_log.write("S", now(), os.getpid(), "producer")
    producer = threading.Thread(
        target=produce,
        args=({"queue": queue, "stream": stream}, producer_log, config, stopping, ()),
        name="producer",
    )
    consumers_done = threading.Event()
    threads = [producer]
    for index in range(config["consumers"]):
        for name, consumer in (("queue", queue), ("group", group)):
            log = LineLog(log_dir / f"consumer-{name}-{index}.log")
            log.write("S", now(), os.getpid(), f"consumer-{name}")
            threads.append(
                threading.Thread(
                    target=consume,
                    args=(consumer, name, log, config, consumers_done, ()),
                    name=f"consumer-{name}-{index}",
                )
            )
    for thread in threads:
        thread.start()

    stopping.event.wait(config["seconds"])
    stopping.event.set()
    producer.join()
    deadline = time.monotonic() + config["drain_seconds"]
    while time.monotonic() < deadline:
        if queue.stats().depth == 0 and group.stats().depth == 0:
            break
        time.sleep(0.05)
    consumers_done.set()
    for thread in threads:
        thread.join()
    broker.close()


def run_dead_letter_crash(config: dict[str, Any]) -> None:
    broker = pymq.open(config["data"], fsync="always")
    queue = broker.queue("jobs")
    queue.put(b"rejected once")
    message = queue.get(timeout=10.0)
    assert message is not None
    move = queue._on_dead
    assert move is not None

    def move_then_crash(*arguments: Any) -> object:
        # With "before", the crash comes after the move was journaled but
        # before the message reached the DLQ.
        moved = None if config.get("crash") == "before" else move(*arguments)
        os.kill(os.getpid(), signal.SIGKILL)
        return moved

    queue._on_dead = move_then_crash
    message.reject("rejected by the test")


ROLES: Final = {
    "producer": run_producer,
    "consumer": run_consumer,
    "embedded": run_embedded,
    "dead-letter-crash": run_dead_letter_crash,
}


def main(argv: list[str]) -> None:
    role, config = argv[0], json.loads(argv[1])
    if role not in ROLES:
        raise SystemExit(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    ROLES[role](config)


if __name__ == "__main__":
    main(sys.argv[1:])
