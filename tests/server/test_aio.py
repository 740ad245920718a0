"""The asyncio client: get_batch, and reconnecting after the server restarts.

Every wait is bounded by asyncio.wait_for or a get timeout, so a hang fails
the test instead of stalling the run.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import pymq
import pymq.aio
from pymq import MessageBatch, StaleReceiptError

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
