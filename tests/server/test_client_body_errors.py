"""Both clients reject bodies that are not bytes-like as the broker does.

Each case runs against a real server on 127.0.0.1, with the blocking and
the asyncio client, and checks the exact message of the embedded broker
and that nothing was written.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pymq
import pymq.aio
from tests.server.helpers import ServerProcess

_names = itertools.count()

# (method, a function that makes its argument, the embedded broker's message)
CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("put", lambda: "text", "put(): body must be a bytes-like object, not str"),
    ("put", lambda: 7, "put(): body must be a bytes-like object, not int"),
    (
        "put_many",
        lambda: [b"a", bytearray(b"b"), "c"],
        "put_many(): item 2 of bodies must be a bytes-like object, not str",
    ),
    (
        "put_many",
        lambda: iter([b"a", None]),
        "put_many(): item 1 of bodies must be a bytes-like object, not NoneType",
    ),
    (
        "put_many",
        lambda: b"abc",
        "bodies must be an iterable of bytes-like objects (a list of bytes, "
        "say), not bytes; use put() for one message",
    ),
    (
        "put_many",
        lambda: "abc",
        "bodies must be an iterable of bytes-like objects (a list of bytes, "
        "say), not str; use put() for one message",
    ),
]
IDS = ["put str", "put int", "put_many str", "put_many None", "bytes", "str"]


@pytest.mark.parametrize("headers", [None, {"k": "v"}])
@pytest.mark.parametrize(("method", "make", "message"), CASES, ids=IDS)
def test_blocking_client_names_bad_body(
    shared_server: ServerProcess,
    method: str,
    make: Callable[[], Any],
    message: str,
    headers: dict[str, str] | None,
) -> None:
    name = f"body-errors-{next(_names)}"
    with pymq.connect(shared_server.url) as broker:
        queue = broker.queue(name)
        with pytest.raises(TypeError) as raised:
            getattr(queue, method)(make(), headers=headers)
        assert str(raised.value) == message
        assert queue.stats().depth == 0
        # The connection still serves requests.
        assert queue.put(b"after") == 0


@pytest.mark.parametrize(("method", "make", "message"), CASES, ids=IDS)
def test_asyncio_client_names_bad_body(
    shared_server: ServerProcess, method: str, make: Callable[[], Any], message: str
) -> None:
    name = f"body-errors-{next(_names)}"

    async def run() -> None:
        broker = await pymq.aio.connect(shared_server.url)
        try:
            queue = await broker.queue(name)
            with pytest.raises(TypeError) as raised:
                await getattr(queue, method)(make())
            assert str(raised.value) == message
            assert (await queue.stats()).depth == 0
            assert await queue.put(b"after") == 0
        finally:
            await broker.close()

    asyncio.run(asyncio.wait_for(run(), 30.0))


def test_embedded_broker_messages_match(tmp_path: Path) -> None:
    # The table above is the embedded broker's own wording.
    with pymq.open(tmp_path / "data") as broker:
        queue = broker.queue("jobs")
        for method, make, message in CASES:
            with pytest.raises(TypeError) as raised:
                getattr(queue, method)(make())
            assert str(raised.value) == message
        assert queue.stats().depth == 0
