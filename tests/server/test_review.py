"""Cases found in a review of the server and clients, each failing on its bug.

Most tests take the broker fixture, so they run against pymq.open() and
against a server through pymq.connect(): the embedded run shows the
expected behaviour, and the server run fails where the two differ. Every
wait on a thread or a socket is bounded, so a hang fails the test instead
of stalling the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import threading
import time
from typing import Any

import google_crc32c
import numpy as np
import pytest

import pymq
import pymq.aio
from pymq import protocol
from pymq._core import encode_frame
from pymq.errors import (
    ClosedError,
    ConfigError,
    MessageTooLargeError,
    StaleReceiptError,
)
from pymq.protocol import FLAG_ERROR
from pymq.server import Server, ServerLimits
from tests.server.helpers import RawClient, take

# Seconds a thread may take for a call that should return at once.
PROMPT_TIMEOUT = 3.0
MAX_MESSAGE_BYTES = 1 << 20


def run_bounded(function: Any, timeout: float) -> dict[str, Any]:
    """Run function in a daemon thread and return its result or its error.

    The dict is empty when the call is still running after timeout seconds.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    # A copy, so a call that ends later (when the test kills its server)
    # does not change what the test asserts on.
    return dict(outcome)


# Blocking client: threads and connection state ------------------------------


def test_close_wakes_blocked_getters(broker, name):
    queue = broker.queue(name)
    outcomes: list[dict[str, Any]] = [{} for _ in range(3)]

    def wait_forever(outcome: dict[str, Any]) -> None:
        try:
            outcome["result"] = queue.get(timeout=None)
        except BaseException as exc:
            outcome["error"] = exc

    threads = [
        threading.Thread(target=wait_forever, args=(outcome,), daemon=True)
        for outcome in outcomes
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    broker.close()
    deadline = time.monotonic() + PROMPT_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))

    for outcome in outcomes:
        assert "error" in outcome, outcome
        assert isinstance(outcome["error"], ClosedError), outcome


class _Interrupted(Exception):
    """Raised by a SIGALRM handler, as Ctrl-C raises KeyboardInterrupt."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted()


def test_interrupted_get_leaves_client_usable(broker, name):
    queue = broker.queue(name)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(_Interrupted):
            queue.get(timeout=None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    outcome = run_bounded(lambda: queue.put(b"after"), PROMPT_TIMEOUT)

    assert outcome == {"result": 0}


def test_open_with_int_name_raises_type_error(broker, name):
    queue = broker.queue(name, visibility_timeout=3600)
    queue.put(b"work")
    message = queue.get(timeout=5.0)

    with pytest.raises(TypeError):
        broker.queue(5)

    message.ack()
    assert queue.stats().acked == 1
    assert queue.get(timeout=0.2) is None


def test_ack_many_of_other_queue_raises(broker, name):
    first = broker.queue(f"{name}-a", visibility_timeout=3600)
    second = broker.queue(f"{name}-b", visibility_timeout=3600)
    first.put(b"a")
    second.put(b"b")
    from_first = first.get(timeout=5.0)
    second.get(timeout=5.0)

    with pytest.raises(StaleReceiptError):
        second.ack_many([from_first])

    assert second.stats().acked == 0
    assert second.stats().in_flight == 1
    assert first.stats().in_flight == 1


def test_get_nowait_on_empty_then_full(broker, name):
    queue = broker.queue(name)

    assert queue.get_nowait() is None
    queue.put(b"ready")
    assert queue.get_nowait().body == b"ready"


# Argument checks: the same error embedded and remote -------------------------


def test_put_negative_timeout_raises(broker, name):
    queue = broker.queue(name)

    with pytest.raises(ValueError):
        queue.put(b"x", timeout=-1)
    with pytest.raises(ValueError):
        queue.put(b"x", timeout=float("nan"))
    assert queue.stats().depth == 0


WRONG_TYPES = {
    "nack delay str": lambda queue, receipt: queue.nack(receipt, "1"),
    "extend seconds str": lambda queue, receipt: queue.extend(receipt, "1"),
    "reject reason int": lambda queue, receipt: queue.reject(receipt, 5),
    "get_many count float": lambda queue, receipt: queue.get_many(2.5),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_wrong_argument_type_raises_type_error(broker, name, case):
    queue = broker.queue(name, visibility_timeout=3600)
    queue.put(b"x")
    message = queue.get(timeout=5.0)

    with pytest.raises(TypeError):
        WRONG_TYPES[case](queue, message.receipt)

    assert queue.stats().in_flight == 1


BAD_VALUES = {
    "nack delay -1": (
        lambda queue, message: message.nack(-1),
        "nack(): delay is -1; it must be from 0 to 1e9 seconds",
    ),
    "nack delay nan": (
        lambda queue, message: queue.nack(message.receipt, float("nan")),
        "nack(): delay is nan; it must be from 0 to 1e9 seconds",
    ),
    "extend seconds 2e9": (
        lambda queue, message: message.extend(2e9),
        "extend(): seconds is 2000000000.0; it must be from 0 to 1e9 seconds",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_argument_value_raises_value_error(broker, name, case):
    queue = broker.queue(name, visibility_timeout=3600)
    queue.put(b"x")
    message = queue.get(timeout=5.0)
    call, text = BAD_VALUES[case]

    with pytest.raises(ValueError) as raised:
        call(queue, message)

    assert type(raised.value) is ValueError
    assert str(raised.value) == text
    assert queue.stats().in_flight == 1


# Sizes -----------------------------------------------------------------------


def test_put_over_frame_limit_raises_too_large(broker, name):
    queue = broker.queue(name)
    size = 17 << 20  # over max_frame_bytes (16 MiB) as well

    with pytest.raises(MessageTooLargeError) as raised:
        queue.put(b"x" * size)

    assert raised.value.size == size
    assert raised.value.limit == MAX_MESSAGE_BYTES
    assert queue.put(b"next") == 0


def test_put_many_of_arrays_splits_batches(broker, name):
    queue = broker.queue(name)
    # 2,500 bodies of 8,000 bytes: 20 MB, more than one 16 MiB frame holds.
    bodies = [np.arange(1000, dtype=np.float64) for _ in range(2500)]

    assert queue.put_many(bodies) == range(0, 2500)
    assert queue.stats().depth == 2500


def test_server_rejects_frame_limit_below_message_size(tmp_path):
    # The broker's max_message_bytes is its default, 1 MiB.
    with (
        pymq.open(tmp_path / "data") as broker,
        pytest.raises(ConfigError, match="max_message_bytes"),
    ):
        Server(broker, limits=ServerLimits(max_frame_bytes=65536))


# Server: state per connection ------------------------------------------------


def test_stream_reopened_often_keeps_handles(servers, name):
    server = servers(limits={"max_handles": 20}).start()
    with pymq.connect(server.url) as broker:
        for index in range(30):
            broker.stream(name).put(b"event %d" % index)
        stream = broker.stream(name)
        for _ in range(30):
            group = stream.group("billing")

        assert len(group.get_many(100, timeout=1.0)) == 30


def test_publish_with_bad_header_block_rejected(shared_server, name):
    raw = RawClient(shared_server.port)
    try:
        raw.handshake()
        handle = raw.open_queue(name)
        # Flag bit 0 marks records that start with a header block. This
        # block declares 5 headers and contains none.
        record = b"\x05\x00"
        records = struct.pack("<I", len(record)) + record
        head = struct.pack("<IIIi", 1, 1, google_crc32c.value(records), -1)
        reply = raw.request(protocol.PUBLISH, 3, handle, head + records)
    finally:
        raw.close()

    assert reply[1] & FLAG_ERROR
    with pymq.connect(shared_server.url) as broker:
        assert broker.queue(name).stats().depth == 0


def test_no_reply_ack_error_raised_by_later_call(shared_server, name):
    with pymq.connect(shared_server.url) as broker:
        queue = broker.queue(name)
        queue.put(b"x")
        message = queue.get(timeout=5.0)
        message.ack()

        queue.ack(message.receipt, wait=False)
        # The server replies in order, so the error has arrived by the time
        # this reply has, and the call that follows raises it.
        assert queue.stats().acked == 1

        with pytest.raises(StaleReceiptError):
            queue.stats()
        assert queue.stats().acked == 1


# Server: load from one connection --------------------------------------------


def server_cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time of process pid, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_parked_fetch_leaves_server_idle(servers, name):
    server = servers().start()
    assert server.process is not None
    with pymq.connect(server.url) as broker:
        queue = broker.queue(name)
        waiting = run_bounded(lambda: queue.get(timeout=2.0), 0.5)
        assert waiting == {}  # still parked on the server
        before = server_cpu_seconds(server.process.pid)
        time.sleep(1.0)
        spent = server_cpu_seconds(server.process.pid) - before

    # When this test was written, an idle server used about 0.01 s of CPU a
    # second and a server with one parked FETCH used 0.4 to 0.9 s.
    assert spent < 0.2


def test_parked_fetches_keep_server_responsive(servers, name):
    server = servers().start()
    raw = RawClient(server.port)
    try:
        raw.handshake()
        handle = raw.open_queue(name)
        fetch = struct.pack("<Ii", 1, -1)
        raw.send(
            b"".join(
                encode_frame(protocol.FETCH, 0, 10 + index, handle, fetch)
                for index in range(20_000)
            )
        )
        # Past max_waiting (1,024) each FETCH is refused with error 8, and
        # requests are read in order: the PING's reply comes after those.
        refused = 0
        reply = raw.request(protocol.PING, 5, 0, b"")
        while reply[0] != protocol.PING:
            assert reply[1] & FLAG_ERROR
            assert struct.unpack_from("<H", reply[4])[0] == 8
            refused += 1
            reply = raw.next_frame()
        assert refused == 20_000 - 1024

        def put_then_ping() -> int:
            with pymq.connect(server.url) as broker:
                offset = broker.queue(name).put(b"wake")
                broker.ping()
                return offset

        outcome = run_bounded(put_then_ping, 2.0)
    finally:
        raw.close()
        server.kill()

    assert outcome == {"result": 0}


def test_blocked_puts_leave_open_working(servers, name):
    server = servers().start()
    with pymq.connect(server.url) as owner:
        owner.queue(name, max_length=1, overflow="block").put(b"first")
    producers = [pymq.connect(server.url) for _ in range(32)]
    threads = []
    try:
        for producer in producers:
            queue = producer.queue(name)

            def put_blocked(queue: Any = queue) -> None:
                # Ended by an error when the test kills the server.
                with contextlib.suppress(Exception):
                    queue.put(b"waits for room", timeout=10.0)

            thread = threading.Thread(target=put_blocked, daemon=True)
            thread.start()
            threads.append(thread)
        time.sleep(1.0)

        def open_other_queue() -> int:
            with pymq.connect(server.url) as broker:
                return broker.queue(f"{name}-other").put(b"x")

        outcome = run_bounded(open_other_queue, PROMPT_TIMEOUT)
    finally:
        server.kill()
        for thread in threads:
            thread.join(PROMPT_TIMEOUT)
        for producer in producers:
            producer.close()

    assert outcome == {"result": 0}


# Asyncio client ----------------------------------------------------------------


def test_aio_cancelled_get_takes_no_message(shared_server, name):
    async def cancel_a_get() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            queue = await broker.queue(name, visibility_timeout=3600)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(queue.get(), 0.2)
            with pymq.connect(shared_server.url) as other:
                other_queue = other.queue(name)
                other_queue.put(b"for the other consumer")
                # Time for a FETCH still parked on the server to take it,
                # and for the client to give it back.
                await asyncio.sleep(0.3)
                message = other_queue.get(timeout=1.0)
                assert message is not None
                assert message.body == b"for the other consumer"
        finally:
            await broker.close()

    asyncio.run(cancel_a_get())


def test_aio_loop_exit_returns_prefetched(shared_server, name):
    async def leave_loop() -> int:
        with pymq.connect(shared_server.url) as producer:
            producer.queue(name).put_many([b"m%d" % i for i in range(300)])
        broker = await pymq.aio.connect(shared_server.url)
        try:
            queue = await broker.queue(name, visibility_timeout=3600)
            iterator = queue.__aiter__()
            # The 50th message queues CREDIT for 50 more before it is handed
            # out, and one turn of the loop sends it. Blocking the loop then
            # lets the server push the 50 while the client reads nothing.
            # So they arrive while the loop's exit drops the subscription.
            handed_out = [await iterator.__anext__() for _ in range(50)]
            await asyncio.sleep(0)
            time.sleep(0.5)
            await iterator.aclose()
            await queue.ack_many(handed_out)
            with pymq.connect(shared_server.url) as other:
                rest = take(other.queue(name), 250, bound=1.5)
                other.queue(name).ack_many(rest)
                return len(rest)
        finally:
            await broker.close()

    assert asyncio.run(leave_loop()) == 250
