"""The asyncio client: get_batch, and reconnecting after the server restarts.

Every wait is bounded by asyncio.wait_for or a get timeout, so a hang fails
the test instead of stalling the run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import time

import pytest

import pymq
import pymq.aio
from pymq import ClosedError, ConnectionLostError, MessageBatch, StaleReceiptError
from tests.server.helpers import free_port

WAIT = 10.0  # bounds a get that must find a message; never reached when it does


def run(coroutine, bound: float = 60.0):
    """Run coroutine on a new loop; fail if it takes over bound seconds."""
    return asyncio.run(asyncio.wait_for(coroutine, bound))


# get_batch -----------------------------------------------------------------------


def test_aio_get_batch_exact_columns(shared_server, name):
    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            q = await broker.queue(name, visibility_timeout=3600)
            before = time.time_ns()
            assert await q.put_many([b"a", b"bb", b""]) == range(3)
            assert await q.put(b"dddd", headers={"kind": "demo"}) == 3
            after = time.time_ns()

            batch = await q.get_batch(10, timeout=WAIT)
            assert isinstance(batch, MessageBatch)
            assert batch.offsets.tolist() == [0, 1, 2, 3]
            assert batch.attempts.tolist() == [1, 1, 1, 1]
            assert batch.lengths.tolist() == [1, 2, 0, 4]
            assert batch.starts.tolist() == [0, 1, 3, 3]
            assert batch.data == b"abbdddd"
            assert batch.headers == [None, None, None, {"kind": "demo"}]
            assert all(before <= t <= after for t in batch.timestamps.tolist())

            await q.nack(int(batch.receipts[1]))
            with pytest.raises(StaleReceiptError):
                await q.ack_many(batch)
            again = await q.get_batch(10, timeout=WAIT)
            assert again.offsets.tolist() == [1]
            assert again.attempts.tolist() == [2]
            await q.ack_many(again)
            for receipt in batch.receipts.tolist()[::2]:
                await q.ack(receipt)
            await q.ack(int(batch.receipts[3]))
            stats = await q.stats()
            assert (stats.depth, stats.in_flight, stats.acked) == (0, 0, 4)

            empty = await q.get_batch(10, timeout=0.1)
            assert (len(empty), empty.data, empty.headers) == (0, b"", [])
            with pytest.raises(ValueError):
                await q.get_batch(0)
            with pytest.raises(TypeError):
                await q.get_batch("3")  # type: ignore[arg-type]
        finally:
            await broker.close()

    run(body())


def test_aio_get_batch_of_group(shared_server, name):
    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            stream = await broker.stream(name)
            group = await stream.group("billing", visibility_timeout=3600)
            await stream.put_many([b"x", b"yy"], headers={"n": "1"})
            batch = await group.get_batch(10, timeout=WAIT)
            assert batch.offsets.tolist() == [0, 1]
            assert batch.data == b"xyy"
            assert batch.headers == [{"n": "1"}, {"n": "1"}]
            await group.ack_many(batch)
            assert (await group.stats()).acked == 2
        finally:
            await broker.close()

    run(body())


def test_aio_redrive_reports_progress(shared_server, name):
    async def body() -> list[int]:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            await broker.queue(name)
            dlq = await broker.queue(f"{name}.dlq")
            headers = {"x-source": name, "x-group": ""}
            await dlq.put_many([b"m"] * 2500, headers=headers)
            reports: list[int] = []
            assert await broker.redrive(dlq.name, progress=reports.append) == 2500
            assert (await (await broker.queue(name)).stats()).depth == 2500
            return reports
        finally:
            await broker.close()

    assert run(body()) == [1000, 2000, 2500]


def test_aio_reserved_header_raises_value_error(shared_server, name):
    expected = (
        "header 'x-reason' is reserved for the headers that pymq writes when it "
        "moves a message to a dead-letter queue and back (x-attempts, x-dead-at, "
        "x-for-group, x-group, x-offset, x-reason, x-source); use another name"
    )

    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            q = await broker.queue(name)
            stream = await broker.stream(f"{name}-stream")
            for target in (q, stream):
                with pytest.raises(ValueError) as raised:
                    await target.put(b"x", headers={"x-reason": "mine"})
                assert str(raised.value) == expected
                with pytest.raises(ValueError) as raised:
                    await target.put_many([b"x"], headers={"x-reason": "mine"})
                assert str(raised.value) == expected
            # Nothing was written, so the first good put takes offset 0.
            assert await q.put(b"x") == 0
            assert await stream.put(b"x") == 0
            dlq = await broker.queue(f"{name}.dlq")
            assert await dlq.put(b"x", headers={"x-reason": "imported"}) == 0
        finally:
            await broker.close()

    run(body())


# Reconnecting ---------------------------------------------------------------------


async def restart(server) -> None:
    """SIGKILL the server, then start it again on its port and data directory."""
    await asyncio.to_thread(server.kill)
    await asyncio.to_thread(server.start)


def test_aio_reconnects_after_sigkill(servers, name):
    server = servers(port=free_port()).start()

    async def body() -> None:
        broker = await pymq.aio.connect(server.url, reconnect_attempts=10)
        try:
            q = await broker.queue(name, visibility_timeout=3600)
            stream = await broker.stream(f"{name}-s")
            group = await stream.group("g")
            assert await q.put(b"before") == 0
            assert await stream.put(b"event") == 0
            await restart(server)

            # STATS is safe to repeat: sent again on the new connection, with
            # the queue opened again under its new handle.
            stats = await q.stats()
            assert (stats.depth, stats.in_flight) == (1, 0)
            message = await q.get(timeout=WAIT)
            assert (message.body, message.offset, message.attempt) == (
                b"before",
                0,
                1,
            )
            await message.ack()
            assert (await q.stats()).acked == 1
            assert await q.put(b"after") == 1
            event = await group.get(timeout=WAIT)
            assert (event.body, event.offset) == (b"event", 0)
            await event.ack()
        finally:
            await broker.close()

    run(body())


def test_aio_requests_in_flight_at_sigkill(servers, name):
    """A FETCH in flight is repeated; a put or an ack in flight is reported."""
    server = servers(port=free_port()).start()
    assert server.process is not None

    async def body() -> None:
        broker = await pymq.aio.connect(server.url, reconnect_attempts=10)
        try:
            q = await broker.queue(name, visibility_timeout=3600)
            waiting = await broker.queue(f"{name}-waiting")
            await q.put_many([b"held", b"kept"])
            held = await q.get(timeout=WAIT)
            assert held.offset == 0
            # Stopped, the server reads nothing: the requests below are all
            # sent and unanswered when it dies.
            os.kill(server.process.pid, signal.SIGSTOP)
            fetch = asyncio.ensure_future(waiting.get(timeout=30.0))
            put = asyncio.ensure_future(q.put(b"maybe"))
            ack = asyncio.ensure_future(held.ack())
            await asyncio.sleep(0.3)
            assert not (fetch.done() or put.done() or ack.done())
            await restart(server)

            with pytest.raises(ConnectionLostError):
                await put
            with pytest.raises(ConnectionLostError):
                await ack
            with pymq.connect(server.url) as other:
                other.queue(f"{name}-waiting").put(b"for the fetch")
            fetched = await fetch
            assert fetched is not None
            assert fetched.body == b"for the fetch"
            await fetched.ack()

            # The server never read the put nor the ack: the held message is
            # delivered again, with its attempt counted.
            stats = await q.stats()
            assert (stats.depth, stats.acked) == (2, 0)
            again = await q.get_many(10, timeout=WAIT)
            assert [(m.body, m.offset, m.attempt) for m in again] == [
                (b"held", 0, 2),
                (b"kept", 1, 1),
            ]
            await q.ack_many(again)
        finally:
            await broker.close()

    run(body())


def test_aio_ack_after_restart_is_reported(servers, name):
    server = servers(port=free_port()).start()

    async def body() -> None:
        broker = await pymq.aio.connect(server.url, reconnect_attempts=10)
        try:
            q = await broker.queue(name, visibility_timeout=3600)
            await q.put_many([b"a", b"b"])
            a, b = await q.get_many(2, timeout=WAIT)
            await restart(server)

            # The deliveries went with the server; their acks reach the new
            # one, which reports them stale, waiting or not.
            with pytest.raises(StaleReceiptError):
                await a.ack()
            await q.ack(b.receipt, wait=False)
            # Replies come in order: the ack's error has come with this
            # call's reply, and the next call raises it.
            assert (await q.stats()).in_flight == 0
            with pytest.raises(StaleReceiptError):
                await q.stats()
            again = await q.get_many(10, timeout=WAIT)
            assert [(m.body, m.attempt) for m in again] == [(b"a", 2), (b"b", 2)]
            await q.ack_many(again)
            assert (await q.stats()).acked == 2
        finally:
            await broker.close()

    run(body())


def test_aio_unsent_ack_is_reported(shared_server, name):
    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            q = await broker.queue(name, visibility_timeout=3600)
            await q.put(b"x")
            message = await q.get(timeout=WAIT)
            # The socket closes under the client before the ack is written.
            link = broker._connection._link
            link.writer.transport.abort()
            await q.ack(message.receipt, wait=False)
            await asyncio.sleep(0.1)
            with pytest.raises(ConnectionLostError, match=r"ack of .* was not sent"):
                await q.stats()
            # The next call reconnects; the delivery was released.
            again = await q.get(timeout=WAIT)
            assert (again.body, again.attempt) == (b"x", 2)
            await again.ack()
        finally:
            await broker.close()

    run(body())


def test_aio_subscription_resumes_after_sigkill(servers, name):
    server = servers(port=free_port()).start()

    async def body() -> list[tuple[bytes, int]]:
        broker = await pymq.aio.connect(server.url, reconnect_attempts=10)
        seen: list[tuple[bytes, int]] = []
        try:
            q = await broker.queue(name, visibility_timeout=3600)
            await q.put_many([b"0", b"1"])
            async for message in q:
                seen.append((message.body, message.attempt))
                if (message.body, message.attempt) == (b"1", 1):
                    # Held, not acked, when the server dies.
                    await restart(server)
                    with pymq.connect(server.url) as other:
                        other.queue(name).put(b"2")
                    continue
                await message.ack()
                if message.body == b"2":
                    break
            assert (await q.stats()).in_flight == 0
            return seen
        finally:
            await broker.close()

    assert run(body()) == [(b"0", 1), (b"1", 1), (b"1", 2), (b"2", 1)]


def test_aio_reconnect_gives_up_then_recovers(servers, name):
    server = servers(port=free_port()).start()

    async def body() -> None:
        broker = await pymq.aio.connect(server.url, reconnect_attempts=2)
        try:
            q = await broker.queue(name)
            await q.put(b"kept")
            await asyncio.to_thread(server.kill)
            with pytest.raises(ConnectionLostError, match="after 3 attempts"):
                await q.stats()
            await asyncio.to_thread(server.start)
            assert (await q.stats()).depth == 1
        finally:
            await broker.close()

    run(body())


def test_aio_closed_broker_does_not_reconnect(servers, name):
    server = servers(port=free_port()).start()

    async def body() -> None:
        broker = await pymq.aio.connect(server.url)
        q = await broker.queue(name)
        await broker.close()
        with pytest.raises(ClosedError):
            await q.put(b"x")

    run(body())


def test_aio_connection_error_not_raised_later(shared_server, name, caplog):
    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            q = await broker.queue(name)
            await q.put(b"x")
            # A frame header whose length is over max_frame_bytes: the
            # server replies with an error for request 0 and closes.
            await broker._connection.send(
                lambda request_id, handle: struct.pack("<I", 0x7FFFFFFF),
                None,
                "a frame that is too large",
            )
            # STATS is sent again after the reconnect, and the error of the
            # connection is not raised by the next call either.
            assert (await q.stats()).depth == 1
            assert (await q.stats()).depth == 1
        finally:
            await broker.close()

    run(body())
    messages = [record.getMessage() for record in caplog.records]
    assert not [text for text in messages if "sent without waiting" in text]
    assert [
        text
        for text in messages
        if text.startswith("connection to")
        and "broke: the server closed the connection: frame length is" in text
    ]


def test_aio_reject_long_reason_keeps_connection(shared_server, name):
    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            q = await broker.queue(name, visibility_timeout=3600)
            await q.put_many([b"poison", b"held"])
            poison, held = await q.get_many(2, timeout=WAIT)
            await poison.reject("\U0001f600" * (5 << 20))
            dead = await (await q.dlq()).get(timeout=WAIT)
            assert dead.headers["x-reason"] == "\U0001f600" * 250 + "..."
            await held.ack()
            assert (await q.stats()).acked == 1
        finally:
            await broker.close()

    run(body())


def test_aio_dlq_of_long_names_opens(shared_server, name):
    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            long_name = (name + "-" + "L" * 128)[:128]
            q = await broker.queue(long_name, max_deliveries=1)
            await q.put(b"poison")
            await (await q.get(timeout=WAIT)).reject("bad")
            dlq = await q.dlq()
            assert dlq.name == f"{long_name}.dlq"
            assert (await dlq.stats()).depth == 1
            stream = await broker.stream((name + "-s-" + "a" * 60)[:68])
            group = await stream.group("billing-" + "b" * 60)
            assert len(group.dlq_name) == 141
            assert (await (await group.dlq()).stats()).depth == 0
        finally:
            await broker.close()

    run(body())


def test_aio_extend_names_its_argument(shared_server, name):
    async def body() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            q = await broker.queue(name, visibility_timeout=3600)
            await q.put(b"x")
            message = await q.get(timeout=WAIT)
            with pytest.raises(TypeError) as raised:
                await message.extend("1")
            assert str(raised.value) == (
                "extend(): seconds must be a number of seconds, not '1'"
            )
            with pytest.raises(ValueError) as out_of_range:
                await message.nack(-1)
            assert str(out_of_range.value) == (
                "nack(): delay is -1; it must be from 0 to 1e9 seconds"
            )
            await message.ack()
        finally:
            await broker.close()

    run(body())
    with pytest.raises(pymq.ConfigError) as raised:
        run(pymq.aio.connect("pymq://127.0.0.1:1", connect_timeout=-1))
    assert str(raised.value) == (
        "connect_timeout is -1 seconds; it must be more than 0 and at most 1e+09"
    )
