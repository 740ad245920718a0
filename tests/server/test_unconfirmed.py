"""Acks sent without waiting whose outcome is unknown are reported.

The server is stopped with SIGSTOP before the ack goes out, so it never
reads it, then killed with SIGKILL and started again on the same port.
Queues use visibility_timeout=3600, so that a message comes again within
a test only because the ack was lost with the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import pytest

import pymq
import pymq.aio
from pymq import UnconfirmedSettleError
from tests.server.helpers import ServerProcess, free_port

WAIT = 10.0  # bounds a get that must find a message; never reached when it does


def run(coroutine: Any, bound: float = 60.0) -> Any:
    """Run coroutine on a new loop; fail if it takes over bound seconds."""
    return asyncio.run(asyncio.wait_for(coroutine, bound))


def stop(server: ServerProcess) -> None:
    """Stop the server process with SIGSTOP: it reads nothing from then on."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)


def restart(server: ServerProcess) -> None:
    """Kill the stopped server with SIGKILL and start it on the same port."""
    server.kill()
    server.start()


def test_lost_ack_is_reported(servers, name, caplog):
    server = servers(port=free_port()).start()
    with pymq.connect(server.url, reconnect_attempts=10) as client:
        queue = client.queue(name, visibility_timeout=3600)
        queue.put_many([b"a", b"b"])
        first, second = queue.get_many(2, timeout=WAIT)
        stop(server)
        queue.ack(first.receipt, wait=False)
        queue.ack_many([second], wait=False)
        restart(server)

        with (
            caplog.at_level(logging.WARNING, logger="pymq.client"),
            pytest.raises(UnconfirmedSettleError) as raised,
        ):
            queue.stats()
        error = raised.value
        assert error.requests == 2
        assert error.messages == 2
        assert "2 acks" in str(error)
        assert "may not have been applied" in str(error)
        assert str(error) in caplog.text

        # Reported once; the acks never reached the server, so the
        # messages come again.
        again = queue.get_many(2, timeout=WAIT)
        assert [(m.body, m.attempt) for m in again] == [(b"a", 2), (b"b", 2)]
        queue.ack_many(again)
        assert queue.stats().acked == 2


def test_confirmed_ack_is_not_reported(servers, name):
    server = servers(port=free_port()).start()
    with pymq.connect(server.url, reconnect_attempts=10) as client:
        queue = client.queue(name, visibility_timeout=3600)
        queue.put(b"a")
        message = queue.get(timeout=WAIT)
        queue.ack(message.receipt, wait=False)
        # Its reply comes after the server processed the ack before it.
        assert queue.stats().acked == 1
        stop(server)
        restart(server)

        stats = queue.stats()
        assert (stats.depth, stats.acked) == (0, 0)
        assert queue.get(timeout=0) is None


def test_aio_lost_ack_is_reported(servers, name, caplog):
    server = servers(port=free_port()).start()

    async def body() -> None:
        broker = await pymq.aio.connect(server.url, reconnect_attempts=10)
        try:
            queue = await broker.queue(name, visibility_timeout=3600)
            await queue.put(b"a")
            message = await queue.get(timeout=WAIT)
            stop(server)
            await queue.ack(message.receipt, wait=False)
            # One turn of the loop writes the ack.
            await asyncio.sleep(0.1)
            await asyncio.to_thread(restart, server)

            with (
                caplog.at_level(logging.WARNING, logger="pymq.aio"),
                pytest.raises(UnconfirmedSettleError) as raised,
            ):
                await queue.stats()
            error = raised.value
            assert error.requests == 1
            assert error.messages == 1
            assert "1 ack " in str(error)
            assert str(error) in caplog.text

            again = await queue.get(timeout=WAIT)
            assert (again.body, again.attempt) == (b"a", 2)
            await again.ack()
        finally:
            await broker.close()

    run(body())


def test_aio_confirmed_ack_is_not_reported(servers, name):
    server = servers(port=free_port()).start()

    async def body() -> None:
        broker = await pymq.aio.connect(server.url, reconnect_attempts=10)
        try:
            queue = await broker.queue(name, visibility_timeout=3600)
            await queue.put(b"a")
            message = await queue.get(timeout=WAIT)
            await queue.ack(message.receipt, wait=False)
            assert (await queue.stats()).acked == 1
            stop(server)
            await asyncio.to_thread(restart, server)

            stats = await queue.stats()
            assert (stats.depth, stats.acked) == (0, 0)
        finally:
            await broker.close()

    run(body())
