"""CANCEL: a get that its caller abandons takes no message and spends no attempt.

Queues use max_deliveries=1 where a counted attempt would show: the second
delivery of such a message goes to the dead-letter queue. They use
visibility_timeout=3600, so that only a release by the client or the server
can make a message available again within a test. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pymq
import pymq.aio
from pymq import protocol
from pymq._core import encode_frame
from pymq.protocol import FLAG_ERROR, FLAG_NO_REPLY, FLAG_REPLY, decode_json
from tests.server.helpers import RawClient, ServerProcess, error_of

WAIT = 10.0  # bounds a get that must find a message; never reached when it does
RACE_ROUNDS = 30  # bounds the race tests in count
RACE_SECONDS = 60.0  # and in time
CANCELLED = 20


def run(coroutine: Any, bound: float = 60.0) -> Any:
    """Run coroutine on a new loop; fail if it takes over bound seconds."""
    return asyncio.run(asyncio.wait_for(coroutine, bound))


@pytest.fixture(params=["interval", "always"])
def server(
    request: pytest.FixtureRequest, servers: Callable[..., ServerProcess]
) -> ServerProcess:
    """A server of this test. With fsync="always", FETCH takes in a pool thread."""
    return servers(fsync=request.param).start()


class _Interrupted(Exception):
    """Raised by a SIGALRM handler, as Ctrl-C raises KeyboardInterrupt."""


@pytest.fixture
def alarm() -> Iterator[Callable[[float, Callable[[], None]], None]]:
    """Return a function that runs action in a SIGALRM handler after seconds.

    The handler raises what action raises, in the main thread, wherever
    that thread is, as Ctrl-C raises KeyboardInterrupt.
    """

    def arm(seconds: float, action: Callable[[], None]) -> None:
        def handler(signum: int, frame: object) -> None:
            action()

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, seconds)

    previous = signal.getsignal(signal.SIGALRM)
    try:
        yield arm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def keyboard_interrupt() -> None:
    raise KeyboardInterrupt


# The request on the wire --------------------------------------------------------


def test_hello_announces_cancel(shared_server):
    raw = RawClient(shared_server.port)
    try:
        raw.send(
            protocol.PREAMBLE
            + encode_frame(
                protocol.HELLO, 0, 1, 0, protocol.encode_json({"versions": [1, 1]})
            )
        )
        answer = decode_json(raw.next_frame()[4])
    finally:
        raw.close()
    assert answer["cancel"] is True


def test_cancel_stops_waiting_fetch(shared_server, name):
    raw = RawClient(shared_server.port)
    try:
        raw.handshake()
        handle = raw.open_queue(name)
        raw.send(encode_frame(protocol.FETCH, 0, 3, handle, struct.pack("<Ii", 1, -1)))
        raw.send(encode_frame(protocol.CANCEL, 0, 4, 0, struct.pack("<I", 3)))
        fetch_reply = raw.next_frame()
        cancel_reply = raw.next_frame()

        # An id that is not waiting, with and without a reply.
        unknown = raw.request(protocol.CANCEL, 5, 0, struct.pack("<I", 3))
        raw.send(encode_frame(protocol.CANCEL, FLAG_NO_REPLY, 6, 0, b"\x63\0\0\0"))
        ping = raw.request(protocol.PING, 7, 0, b"")
    finally:
        raw.close()

    assert fetch_reply[:4] == (protocol.FETCH, FLAG_REPLY | FLAG_ERROR, 3, handle)
    assert error_of(fetch_reply)[0] == CANCELLED
    assert cancel_reply[:3] == (protocol.CANCEL, FLAG_REPLY, 4)
    assert cancel_reply[4] == b""
    assert unknown[:3] == (protocol.CANCEL, FLAG_REPLY, 5)
    assert ping[:3] == (protocol.PING, FLAG_REPLY, 7)
    with pymq.connect(shared_server.url) as client:
        queue = client.queue(name)
        queue.put(b"after the cancel")
        message = queue.get(timeout=WAIT)
        assert message is not None
        assert message.attempt == 1


def test_cancel_with_short_payload_closes(shared_server):
    raw = RawClient(shared_server.port)
    try:
        raw.handshake()
        raw.send(encode_frame(protocol.CANCEL, 0, 2, 0, b"\x01\x00\x00"))
        frames = raw.read_until_closed()
    finally:
        raw.close()
    assert len(frames) == 1
    assert error_of(frames[0])[0] == 1


# Asyncio client ---------------------------------------------------------------------


def test_aio_cancelled_get_spends_no_attempt(server, name):
    async def body() -> None:
        broker = await pymq.aio.connect(server.url)
        try:
            queue = await broker.queue(name, max_deliveries=1)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(queue.get(timeout=5), 0.2)
            await queue.put(b"job")
            message = await queue.get(timeout=2)
            assert message is not None
            assert message.body == b"job"
            assert message.attempt == 1
            await message.ack()
            stats = await queue.stats()
            assert stats.dead_lettered == 0
            assert stats.acked == 1
        finally:
            await broker.close()

    run(body())


def put_and_wait(url: str, name: str, bodies: list[bytes]) -> None:
    """Put bodies from another connection, blocking the caller's event loop.

    The pause after the put lets the server deliver them to a waiting FETCH
    while the loop does not read them yet.
    """
    with pymq.connect(url) as other:
        other.queue(name).put_many(bodies)
    time.sleep(0.3)


async def cancel_after_put(get: Any, url: str, name: str, bodies: list[bytes]) -> None:
    """Cancel the coroutine get after the server delivered bodies to it.

    The deliveries are in the socket, unread, when the get is cancelled,
    so they arrive after it.
    """
    waiting = asyncio.ensure_future(get)
    await asyncio.sleep(0.2)
    put_and_wait(url, name, bodies)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


def test_aio_late_deliveries_go_to_next_get(shared_server, name):
    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            queue = await broker.queue(name, visibility_timeout=3600, max_deliveries=1)
            get = queue.get_many(3, timeout=5)
            await cancel_after_put(get, shared_server.url, name, [b"a", b"b", b"c"])

            first = await queue.get(timeout=0)
            assert first is not None
            batch = await queue.get_batch(10, timeout=0)
            assert (first.body, first.attempt) == (b"a", 1)
            assert batch.offsets.tolist() == [1, 2]
            assert batch.attempts.tolist() == [1, 1]
            await first.ack()
            await queue.ack_many(batch)
            stats = await queue.stats()
            assert (stats.acked, stats.in_flight, stats.dead_lettered) == (3, 0, 0)
        finally:
            await broker.close()

    run(body())


def test_aio_late_deliveries_go_back_on_close(shared_server, name):
    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            queue = await broker.queue(name, visibility_timeout=3600)
            get = queue.get(timeout=5)
            await cancel_after_put(get, shared_server.url, name, [b"kept"])
            # One turn of the loop reads the late delivery.
            await asyncio.sleep(0.1)
        finally:
            await broker.close()

    run(body())
    with pymq.connect(shared_server.url) as other:
        message = other.queue(name).get(timeout=1.0)
        assert message is not None
        # Given back with NACK, so available at once, its attempt counted.
        assert (message.body, message.attempt) == (b"kept", 2)


def test_aio_expired_late_delivery_is_dropped(shared_server, name):
    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            queue = await broker.queue(name, visibility_timeout=1.0)
            get = queue.get(timeout=5)
            await cancel_after_put(get, shared_server.url, name, [b"expires"])
            await asyncio.sleep(1.5)

            # The kept delivery expired: its receipt is stale, and the
            # server delivers the message again.
            message = await queue.get(timeout=WAIT)
            assert message is not None
            assert (message.body, message.attempt) == (b"expires", 2)
            await message.ack()
        finally:
            await broker.close()

    run(body())


def test_aio_cancel_race_loses_nothing(shared_server, name):
    async def body() -> int:
        broker = await pymq.aio.connect(shared_server.url)
        producer = await pymq.aio.connect(shared_server.url)
        received: list[tuple[bytes, int]] = []
        cancelled = 0
        try:
            queue = await broker.queue(name, visibility_timeout=3600, max_deliveries=1)
            other = await producer.queue(name)
            deadline = time.monotonic() + RACE_SECONDS
            for index in range(RACE_ROUNDS):
                if time.monotonic() > deadline:
                    break
                body = b"round %d" % index
                waiting = asyncio.ensure_future(queue.get(timeout=5))
                await asyncio.sleep(0.02)
                # The server may deliver before, while or after CANCEL arrives.
                putting = asyncio.ensure_future(other.put(body))
                await asyncio.sleep(0.001 * (index % 5))
                waiting.cancel()
                await putting
                try:
                    message = await waiting
                except asyncio.CancelledError:
                    cancelled += 1
                    message = await queue.get(timeout=WAIT)
                assert message is not None, f"round {index} lost its message"
                received.append((message.body, message.attempt))
                await message.ack()
            stats = await queue.stats()
            assert stats.dead_lettered == 0
            assert stats.depth == 0
        finally:
            await broker.close()
            await producer.close()
        assert received == [(b"round %d" % i, 1) for i in range(len(received))]
        return cancelled

    assert run(body(), bound=RACE_SECONDS + 30) > 0


# Blocking client ------------------------------------------------------------------


def test_interrupted_get_spends_no_attempt(server, name, alarm):
    with pymq.connect(server.url) as client:
        queue = client.queue(name, max_deliveries=1)
        alarm(0.2, keyboard_interrupt)
        with pytest.raises(KeyboardInterrupt):
            queue.get(timeout=3)
        # From another connection, so that nothing reads this one meanwhile.
        put_and_wait(server.url, name, [b"job"])
        message = queue.get(timeout=2)
        assert message is not None
        assert (message.body, message.attempt) == (b"job", 1)
        message.ack()
        stats = queue.stats()
        assert stats.dead_lettered == 0
        assert stats.acked == 1


def put_then_interrupt(url: str, name: str, bodies: list[bytes]) -> Callable[[], None]:
    """Return an alarm action that puts bodies, then raises _Interrupted.

    The deliveries reach the socket while the handler runs, so they arrive
    after the get was interrupted.
    """

    def action() -> None:
        put_and_wait(url, name, bodies)
        raise _Interrupted

    return action


def test_late_deliveries_go_to_next_get(shared_server, name, alarm):
    with pymq.connect(shared_server.url) as client:
        queue = client.queue(name, visibility_timeout=3600, max_deliveries=1)
        alarm(0.2, put_then_interrupt(shared_server.url, name, [b"a", b"b", b"c"]))
        with pytest.raises(_Interrupted):
            queue.get_many(3, timeout=5)

        first = queue.get(timeout=0)
        assert first is not None
        rest = queue.get_many(10, timeout=0)
        assert (first.body, first.attempt) == (b"a", 1)
        assert [(m.offset, m.attempt) for m in rest] == [(1, 1), (2, 1)]
        first.ack()
        queue.ack_many(rest)
        stats = queue.stats()
        assert (stats.acked, stats.in_flight, stats.dead_lettered) == (3, 0, 0)


def test_late_deliveries_go_back_on_close(shared_server, name, alarm):
    with pymq.connect(shared_server.url) as client:
        queue = client.queue(name, visibility_timeout=3600)
        alarm(0.2, put_then_interrupt(shared_server.url, name, [b"kept"]))
        with pytest.raises(_Interrupted):
            queue.get(timeout=5)
        # A PING reads the late delivery off the socket.
        client.ping()

    with pymq.connect(shared_server.url) as other:
        message = other.queue(name).get(timeout=1.0)
        assert message is not None
        # Given back with NACK, so available at once, its attempt counted.
        assert (message.body, message.attempt) == (b"kept", 2)


def test_interrupt_race_loses_nothing(shared_server, name, alarm):
    received: list[tuple[bytes, int]] = []
    interrupted = 0
    with (
        pymq.connect(shared_server.url) as client,
        pymq.connect(shared_server.url) as producer,
    ):
        queue = client.queue(name, visibility_timeout=3600, max_deliveries=1)
        other = producer.queue(name)
        deadline = time.monotonic() + RACE_SECONDS
        for index in range(RACE_ROUNDS):
            if time.monotonic() > deadline:
                break
            body = b"round %d" % index
            # The put and the interrupt come about together, so the server
            # may deliver before, while or after CANCEL arrives.
            delay = 0.05 + 0.001 * (index % 5)
            putter = threading.Timer(0.05, other.put, args=(body,))
            putter.start()
            alarm(delay, keyboard_interrupt)
            message = None
            try:
                message = queue.get(timeout=5)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                interrupted += 1
            putter.join(WAIT)
            if message is None:
                message = queue.get(timeout=WAIT)
            assert message is not None, f"round {index} lost its message"
            received.append((message.body, message.attempt))
            message.ack()
        stats = queue.stats()
        assert stats.dead_lettered == 0
        assert stats.depth == 0
    assert received == [(b"round %d" % i, 1) for i in range(len(received))]
    assert interrupted > 0
