"""A broker in a child process, driven over a pipe, so that a test can SIGKILL it.

BrokerHost starts the child with multiprocessing's forkserver method: each
child is forked from a server process that has pymq imported and runs no
threads, so a start costs a fork, not a new interpreter. The child opens
the broker in a folder, with queues and stream groups as a layout names
them, and runs one command per request. Every request carries the time of
the test's fake clock, which the child sets on each queue, group and DLQ
before it runs the command.

Consumers are named as their dead-letter queues are, less ".dlq": "jobs"
for the queue jobs, "events.billing" for the group billing of the stream
events.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import tempfile
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pymq
from pymq import StaleReceiptError

# Seconds a request may take before the test fails: far above what any
# command needs, so only a hung child reaches it.
REPLY_TIMEOUT = 60.0

# A layout: {"queues": {name: options}, "streams": {name: {group: options}}}.
# Options are those to declare on the first open, or None to open the queue
# or group as it was declared.
Layout = dict[str, dict[str, Any]]
# One delivery as the child returns it.
Delivered = tuple[int, int, int, bytes, dict[str, str]]


class FakeClock:
    """A clock in integer ns that moves only when a test sets it."""

    def __init__(self, start: int) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now


def scratch_folder(prefix: str) -> Path:
    """Make a temporary folder, in memory where /dev/shm is writable.

    The broker syncs its option files and journals, which on a busy disk
    takes most of a model test's time. These tests crash only processes,
    never the machine, so tmpfs keeps all that a disk would.
    """
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


# The child ---------------------------------------------------------------


class _Child:
    """The broker and its consumers, in the child process."""

    def __init__(self, folder: str, layout: Layout, segment_bytes: int) -> None:
        self.clock = FakeClock(0)
        self.broker = pymq.open(folder, segment_bytes=segment_bytes)
        # The queues and streams that take puts, and their stores.
        self.logs: dict[str, Any] = {}
        self.stores: dict[str, Any] = {}
        self.consumers: dict[str, Any] = {}
        for name, options in layout.get("queues", {}).items():
            queue = self.broker.queue(name, **(options or {}))
            self.logs[name] = queue
            self.stores[name] = queue.stream.store
            self.consumers[name] = queue
        for name, groups in layout.get("streams", {}).items():
            stream = self.broker.stream(name)
            self.logs[name] = stream
            self.stores[name] = stream.store
            for group, options in groups.items():
                opened = stream.group(group, **(options or {}))
                self.consumers[f"{name}.{group}"] = opened
        for consumer in list(self.consumers.values()):
            consumer._clock = self.clock
            consumer.dlq._clock = self.clock

    def put(self, log: str, body: bytes, headers: dict[str, str]) -> int:
        offset: int = self.logs[log].put(body, headers=headers or None)
        return offset

    def put_many(
        self, log: str, bodies: list[bytes], headers: dict[str, str]
    ) -> list[int]:
        return list(self.logs[log].put_many(bodies, headers=headers or None))

    def get(self, consumer: str, count: int) -> list[Delivered]:
        """Deliver with get_nowait (count 0) or get_many_nowait(count)."""
        if count == 0:
            message = self.consumers[consumer].get_nowait()
            messages = [] if message is None else [message]
        else:
            messages = self.consumers[consumer].get_many_nowait(count)
        return [_delivered(message) for message in messages]

    def ack(self, consumer: str, receipt: int) -> None:
        self.consumers[consumer].ack(receipt)

    def ack_many(self, consumer: str, receipts: list[int]) -> None:
        self.consumers[consumer].ack_many(receipts)

    def nack(self, consumer: str, receipt: int, delay: float) -> None:
        self.consumers[consumer].nack(receipt, delay)

    def extend(self, consumer: str, receipt: int, seconds: float) -> None:
        self.consumers[consumer].extend(receipt, seconds)

    def reject(self, consumer: str, receipt: int, reason: str) -> None:
        self.consumers[consumer].reject(receipt, reason)

    def read_dlq(self, consumer: str) -> Delivered | None:
        """Deliver the next message of the consumer's DLQ and ack it."""
        message = self.consumers[consumer].dlq.get_nowait()
        if message is None:
            return None
        message.ack()
        return _delivered(message)

    def redrive(self, consumer: str) -> int:
        return self.broker.redrive(f"{consumer}.dlq")

    def snapshot(self) -> dict[str, Any]:
        """Return counts, stats and DLQ depth per consumer, and each log's end."""
        found: dict[str, Any] = {}
        for name, consumer in self.consumers.items():
            counts = consumer._counts()
            stats = consumer.stats()
            found[name] = {
                "in_flight": counts["in_flight"],
                "waiting": counts["waiting"],
                "backlog": counts["backlog"],
                "acked": stats.acked,
                "dead_lettered": stats.dead_lettered,
                "dlq_depth": consumer.dlq.stats().depth,
            }
        ends = {name: store.next_offset for name, store in self.stores.items()}
        return {"consumers": found, "ends": ends}

    def crash_in_move(
        self, consumer: str, receipt: int, reason: str, after_put: bool
    ) -> None:
        """Reject a delivery and SIGKILL this process during its move to the DLQ.

        With after_put the message is put in the DLQ first, and without it
        the process dies before the put. Either way the journal record that
        ends the move is never written.
        """
        group = self.consumers[consumer]
        move = group._on_dead

        def die_in_move(core: Any, offset: int, attempt: int, cause: str) -> bool:
            if after_put:
                move(core, offset, attempt, cause)
            os.kill(os.getpid(), signal.SIGKILL)
            return False  # not reached

        group._on_dead = die_in_move
        group.reject(receipt, reason)
        raise AssertionError("the child outlived its SIGKILL")


def _delivered(message: pymq.Message) -> Delivered:
    return (
        message.offset,
        message.attempt,
        message.receipt,
        message.body,
        dict(message.headers),
    )


def _serve(conn: Connection, folder: str, layout: Layout, segment_bytes: int) -> None:
    """Run requests from conn until a close request, in the child process."""
    # The broker logs each crash recovery and DLQ move at WARNING. A failing
    # command's traceback goes to the test, so the log would only be noise.
    logging.getLogger("pymq").addHandler(logging.NullHandler())
    try:
        child = _Child(folder, layout, segment_bytes)
    except BaseException:
        conn.send(("error", "OpenError", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        now, command, args = conn.recv()
        child.clock.now = now
        if command == "close":
            child.broker.close()
            conn.send(("ok", None))
            return
        try:
            value = getattr(child, command)(*args)
        except StaleReceiptError as exc:
            conn.send(("error", "StaleReceiptError", str(exc)))
        except BaseException:
            conn.send(("error", "Error", traceback.format_exc()))
        else:
            conn.send(("ok", value))


# The test's side -----------------------------------------------------------


def _context() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "tests.broker_host"])
    return context


class ChildError(Exception):
    """A command that failed in the child, with the child's traceback as message."""


class BrokerHost:
    """One child process that owns the broker in folder until it is closed or killed."""

    def __init__(self, folder: Path, layout: Layout, segment_bytes: int) -> None:
        context = _context()
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=_serve,
            args=(child_conn, str(folder), layout, segment_bytes),
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self._reply()

    def _reply(self) -> Any:
        if not self.conn.poll(REPLY_TIMEOUT):
            self.kill()
            raise TimeoutError(f"the broker child sent no reply in {REPLY_TIMEOUT} s")
        reply = self.conn.recv()
        if reply[0] == "ok":
            return reply[1]
        if reply[1] == "StaleReceiptError":
            raise StaleReceiptError(reply[2])
        raise ChildError(reply[2])

    def call(self, now: int, command: str, *args: Any) -> Any:
        """Run command(*args) in the child at clock time now, and return the value."""
        self.conn.send((now, command, args))
        return self._reply()

    def close(self) -> None:
        """Close the broker cleanly and wait for the child to exit."""
        self.call(0, "close")
        self.process.join(REPLY_TIMEOUT)
        assert self.process.exitcode == 0
        self.conn.close()

    def kill(self) -> None:
        """SIGKILL the child by its pid and wait for it to exit."""
        if self.process.exitcode is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(REPLY_TIMEOUT)
        self.conn.close()

    def crash_in_move(
        self, now: int, consumer: str, receipt: int, reason: str, after_put: bool
    ) -> None:
        """Reject receipt in the child, which SIGKILLs itself during the move."""
        self.conn.send((now, "crash_in_move", (consumer, receipt, reason, after_put)))
        if self.conn.poll(REPLY_TIMEOUT):
            try:
                reply = self.conn.recv()
            except EOFError:
                reply = None
            assert reply is None, f"the child replied instead of dying: {reply!r}"
        self.process.join(REPLY_TIMEOUT)
        assert self.process.exitcode == -signal.SIGKILL
        self.conn.close()
