"""max_unacked: the deliveries one connection may hold unsettled at once.

Each test starts its own server process with a small limit. A FETCH takes
at most the room left, and gets error 19 with no room at all. Acks, nacks,
rejects, expiries and closes free room. Subscriptions pause at the limit
and resume once room is freed.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

import pymq
import pymq.aio
from pymq import ConfigError, ServerError, StaleReceiptError, protocol
from pymq._core import decode_deliveries, encode_frame, encode_receipts
from pymq.client import apply_hello
from pymq.protocol import FLAG_ERROR, FLAG_NO_REPLY, FLAG_PUSH, PREAMBLE, encode_json
from pymq.server import ServerLimits
from tests.server.helpers import RawClient, ServerProcess
from tests.server.test_slow_consumers import pushed_offsets, subscribe

LIMIT = 5
# Bounds a wait for something that must happen; never reached when it does.
BOUND = 10.0


def full_text(held: int, limit: int = LIMIT) -> str:
    return (
        f"this connection holds {held} unsettled deliveries, max_unacked "
        f"({limit}); ack, nack or reject some of them before fetching more"
    )


@pytest.fixture
def server(servers: Callable[..., ServerProcess]) -> ServerProcess:
    return servers(limits={"max_unacked": LIMIT}).start()


def fill(url: str, name: str, count: int, **options: float) -> None:
    """Put count messages b"0", b"1", ... into the queue name."""
    with pymq.connect(url) as producer:
        queue = producer.queue(name, **options)
        queue.put_many([b"%d" % index for index in range(count)])


def get_when_room(queue: pymq.RemoteQueue, count: int) -> list[pymq.RemoteMessage]:
    """Fetch up to count messages, retrying error 19 for up to BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while True:
        try:
            return queue.get_many(count, timeout=0)
        except ServerError as exc:
            if exc.code != 19 or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Fetching at the limit -----------------------------------------------------------


def test_fetch_is_cut_to_room_left(server: ServerProcess) -> None:
    fill(server.url, "jobs", 20)
    with pymq.connect(server.url) as client:
        assert client.max_unacked == LIMIT
        jobs = client.queue("jobs")
        first = jobs.get_many(3, timeout=0)
        assert [message.offset for message in first] == [0, 1, 2]
        second = jobs.get_many(10, timeout=0)
        assert [message.offset for message in second] == [3, 4]

        with pytest.raises(ServerError) as full:
            jobs.get_many(1, timeout=0)
        assert full.value.code == 19
        assert full.value.retriable is True
        assert str(full.value) == full_text(5)
        assert jobs.stats().in_flight == 5


def test_fetch_with_wait_fails_at_once_when_full(server: ServerProcess) -> None:
    fill(server.url, "jobs", 6)
    with pymq.connect(server.url) as client:
        jobs = client.queue("jobs")
        assert len(jobs.get_many(5, timeout=0)) == 5
        # A FETCH that would wait gets the error too: with no room, its wait
        # could only end once this caller acked.
        with pytest.raises(ServerError) as full:
            jobs.get(timeout=BOUND)
        assert full.value.code == 19
        assert str(full.value) == full_text(5)


def test_limit_spans_queues_and_groups(server: ServerProcess) -> None:
    fill(server.url, "jobs", 10)
    with pymq.connect(server.url) as client:
        events = client.stream("events")
        events.put_many([b"a", b"b", b"c"])
        group = events.group("audit")
        jobs = client.queue("jobs")
        assert len(jobs.get_many(3, timeout=0)) == 3
        assert [message.offset for message in group.get_many(10, timeout=0)] == [
            0,
            1,
        ]
        with pytest.raises(ServerError) as full:
            client.queue("other").get(timeout=0)
        assert full.value.code == 19
        assert str(full.value) == full_text(5)


def test_hello_reply_carries_max_unacked(server: ServerProcess) -> None:
    raw = RawClient(server.port)
    try:
        hello = encode_json({"versions": [1, 1], "token": None, "client": "raw"})
        raw.send(PREAMBLE + encode_frame(protocol.HELLO, 0, 1, 0, hello))
        reply = raw.next_frame()
    finally:
        raw.close()
    assert not reply[1] & FLAG_ERROR
    answer = json.loads(reply[4])
    assert answer["max_unacked"] == LIMIT
    assert answer["max_batch"] == 10_000


def test_client_reads_hello_without_limit() -> None:
    # A server older than max_unacked leaves the field out of its reply.
    connection = SimpleNamespace(max_frame_bytes=1, max_batch=1, max_unacked=7)
    apply_hello(connection, {"version": 1, "server": "pymq 0.1", "max_batch": 5})
    assert connection.max_unacked is None
    assert connection.max_batch == 5
    apply_hello(connection, {"version": 1, "server": "pymq 0.1", "max_unacked": 9})
    assert connection.max_unacked == 9


# Freeing room --------------------------------------------------------------------


@pytest.mark.parametrize("fsync", ["interval", "always"])
def test_settling_frees_room(servers: Callable[..., ServerProcess], fsync: str) -> None:
    server = servers(fsync=fsync, limits={"max_unacked": LIMIT}).start()
    fill(server.url, "jobs", 20)
    with pymq.connect(server.url) as client:
        jobs = client.queue("jobs")
        held = jobs.get_many(5, timeout=0)
        assert [message.offset for message in held] == [0, 1, 2, 3, 4]

        jobs.ack_many(held[:2])
        acked = jobs.get_many(10, timeout=0)
        assert [message.offset for message in acked] == [5, 6]

        jobs.ack(held[2].receipt, wait=False)
        held[3].nack()
        held[4].reject("bad input")
        # The nacked message comes again first; the rejected one is in the DLQ.
        again = jobs.get_many(10, timeout=0)
        assert [(m.offset, m.attempt) for m in again] == [(3, 2), (7, 1), (8, 1)]
        with pytest.raises(ServerError) as full:
            jobs.get(timeout=0)
        assert str(full.value) == full_text(5)

        jobs.ack_many(acked + again)
        assert len(jobs.get_many(10, timeout=0)) == 5
        stats = jobs.stats()
        assert stats.acked == 8
        assert stats.dead_lettered == 1
        assert stats.in_flight == 5


def test_stale_settlements_leave_count(server: ServerProcess) -> None:
    # Long enough for the steps between the second fetch and the extends.
    fill(server.url, "jobs", 10, visibility_timeout=2.0)
    with pymq.connect(server.url) as client:
        jobs = client.queue("jobs")
        expired = jobs.get_many(5, timeout=0)
        assert [message.offset for message in expired] == [0, 1, 2, 3, 4]

        # Once they expire, the same offsets come again as attempt 2.
        again = get_when_room(jobs, 10)
        assert [(m.offset, m.attempt) for m in again] == [
            (0, 2),
            (1, 2),
            (2, 2),
            (3, 2),
            (4, 2),
        ]
        for message in again:
            jobs.extend(message.receipt, 3600)

        # Acks of the expired deliveries are stale and free nothing: the
        # five held now count, the five expired ones do not.
        with pytest.raises(StaleReceiptError):
            jobs.ack_many(expired)
        with pytest.raises(StaleReceiptError):
            expired[0].nack()
        with pytest.raises(ServerError) as full:
            jobs.get(timeout=0)
        assert str(full.value) == full_text(5)

        jobs.ack_many(again)
        rest = jobs.get_many(10, timeout=0)
        assert [message.offset for message in rest] == [5, 6, 7, 8, 9]


def test_expiry_frees_room(server: ServerProcess) -> None:
    fill(server.url, "jobs", 10, visibility_timeout=0.5)
    with pymq.connect(server.url) as client:
        jobs = client.queue("jobs")
        held = jobs.get_many(10, timeout=0)
        assert [message.offset for message in held] == [0, 1, 2, 3, 4]
        # Never acked: the visibility timeout hands them back, and the room.
        again = get_when_room(jobs, 2)
        assert [(m.offset, m.attempt) for m in again] == [(0, 2), (1, 2)]


def test_other_connection_has_own_count(server: ServerProcess) -> None:
    fill(server.url, "jobs", 12)
    with pymq.connect(server.url) as first, pymq.connect(server.url) as second:
        first_jobs = first.queue("jobs")
        second_jobs = second.queue("jobs")
        assert len(first_jobs.get_many(10, timeout=0)) == 5
        with pytest.raises(ServerError) as full:
            first_jobs.get(timeout=0)
        assert str(full.value) == full_text(5)

        taken = second_jobs.get_many(10, timeout=0)
        assert [message.offset for message in taken] == [5, 6, 7, 8, 9]
        with pytest.raises(ServerError) as second_full:
            second_jobs.get(timeout=0)
        assert str(second_full.value) == full_text(5)


def test_ack_through_other_connection_frees_room(server: ServerProcess) -> None:
    fill(server.url, "jobs", 12)
    with pymq.connect(server.url) as first, pymq.connect(server.url) as second:
        first_jobs = first.queue("jobs")
        held = first_jobs.get_many(5, timeout=0)
        # Receipts name deliveries of the queue, so any connection may ack.
        second.queue("jobs").ack_many([message.receipt for message in held])
        assert first_jobs.stats().in_flight == 0

        more = get_when_room(first_jobs, 10)
        assert [message.offset for message in more] == [5, 6, 7, 8, 9]


def test_close_frees_room(server: ServerProcess) -> None:
    fill(server.url, "jobs", 8)
    with pymq.connect(server.url) as first:
        assert len(first.queue("jobs").get_many(5, timeout=0)) == 5
    with pymq.connect(server.url) as second:
        jobs = second.queue("jobs")
        # The five released by the close come again, and fill the room.
        taken = jobs.get_many(10, timeout=0)
        assert [(m.offset, m.attempt) for m in taken] == [
            (0, 2),
            (1, 2),
            (2, 2),
            (3, 2),
            (4, 2),
        ]
        jobs.ack_many(taken)
        rest = jobs.get_many(10, timeout=0)
        assert [message.offset for message in rest] == [5, 6, 7]


# Subscriptions -------------------------------------------------------------------


def pushed(client: RawClient, count: int) -> list[tuple[int, int, int]]:
    """Read pushes until count deliveries came; return (offset, attempt, receipt).

    Fails if they take over BOUND seconds.
    """
    deliveries: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + BOUND
    while len(deliveries) < count:
        assert time.monotonic() < deadline, f"pushed only {deliveries}"
        frame = client.next_frame()
        assert frame[0] == protocol.DELIVER, frame
        assert frame[1] & FLAG_PUSH, frame
        deliveries.extend(
            (message.offset, message.attempt, message.receipt)
            for message in decode_deliveries(frame[4], None)
        )
    return deliveries


@pytest.mark.parametrize("fsync", ["interval", "always"])
def test_subscription_pauses_at_limit(
    servers: Callable[..., ServerProcess], fsync: str
) -> None:
    # With fsync="always", fetches and acks run in the server's thread pool.
    server = servers(fsync=fsync, limits={"max_unacked": LIMIT}).start()
    fill(server.url, "jobs", 20)
    client = RawClient(server.port)
    try:
        client.handshake()
        handle = client.open_queue("jobs")
        subscribe(client, handle, 7, 100)
        first = pushed(client, 5)
        assert [offset for offset, _, _ in first] == [0, 1, 2, 3, 4]
        # Credit is left, but no room: nothing more comes.
        assert pushed_offsets(client, 1.0) == []

        receipts = [receipt for _, _, receipt in first[:2]]
        client.send(encode_receipts(protocol.ACK, FLAG_NO_REPLY, 8, handle, receipts))
        assert [offset for offset, _, _ in pushed(client, 2)] == [5, 6]
        assert pushed_offsets(client, 1.0) == []
    finally:
        client.close()
    with pymq.connect(server.url) as other:
        stats = other.queue("jobs").stats()
        assert stats.acked == 2
        assert stats.in_flight == 0


def test_subscription_resumes_after_expiry(server: ServerProcess) -> None:
    fill(server.url, "jobs", 20, visibility_timeout=0.5)
    client = RawClient(server.port)
    try:
        client.handshake()
        handle = client.open_queue("jobs")
        subscribe(client, handle, 7, 100)
        deliveries = pushed(client, 10)
    finally:
        client.close()
    # The lowest offsets come again once they expire, as attempt 2.
    assert [(offset, attempt) for offset, attempt, _ in deliveries] == [
        (0, 1),
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 1),
        (0, 2),
        (1, 2),
        (2, 2),
        (3, 2),
        (4, 2),
    ]


def test_aio_subscription_resumes_after_acks(server: ServerProcess) -> None:
    fill(server.url, "jobs", 20)

    async def consume() -> list[int]:
        broker = await pymq.aio.connect(server.url)
        offsets: list[int] = []
        try:
            jobs = await broker.queue("jobs")
            async for message in jobs:
                offsets.append(message.offset)
                await message.ack()
                if len(offsets) == 20:
                    break
        finally:
            await broker.close()
        return offsets

    offsets = asyncio.run(asyncio.wait_for(consume(), 60.0))
    assert offsets == list(range(20))


def test_long_poll_takes_room_left(server: ServerProcess) -> None:
    client = RawClient(server.port)
    try:
        client.handshake()
        handle = client.open_queue("jobs")
        # The queue is empty, so the FETCH waits: the PING's reply overtakes it.
        client.send(
            encode_frame(protocol.FETCH, 0, 9, handle, struct.pack("<Ii", 10, 10_000))
        )
        assert client.request(protocol.PING, 10, 0, b"")[2] == 10
        fill(server.url, "jobs", 8)
        frame = client.next_frame()
    finally:
        client.close()
    assert frame[0] == protocol.DELIVER
    assert frame[2] == 9
    offsets = [message.offset for message in decode_deliveries(frame[4], None)]
    assert offsets == [0, 1, 2, 3, 4]


# Configuration -------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, (1 << 31) + 1])
def test_limit_out_of_range_rejected(value: int) -> None:
    with pytest.raises(ConfigError) as raised:
        ServerLimits(max_unacked=value)
    assert str(raised.value) == (
        f"max_unacked is {value}; it must be from 1 to 2147483648"
    )


@pytest.mark.parametrize("value", [2.5, True, "5"])
def test_limit_of_wrong_type_rejected(value: object) -> None:
    with pytest.raises(ConfigError) as raised:
        ServerLimits(max_unacked=value)  # type: ignore[arg-type]
    assert str(raised.value) == f"max_unacked is {value!r}; it must be an int"


def test_default_limit() -> None:
    assert ServerLimits().max_unacked == 100_000
