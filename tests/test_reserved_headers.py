"""Header checks on every path that puts: reserved names, and text that UTF-8
cannot encode.

A put with a reserved name, embedded and through a server, is checked by
tests/server/test_api.py.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import pymq
from pymq import protocol
from pymq._core import RESERVED_HEADERS, crc32c, encode_publish, publish_into
from tests.server.helpers import RawClient, ServerProcess, error_of

RESERVED = sorted(
    [
        "x-source",
        "x-group",
        "x-offset",
        "x-attempts",
        "x-reason",
        "x-dead-at",
        "x-for-group",
    ]
)
LISTED = "x-attempts, x-dead-at, x-for-group, x-group, x-offset, x-reason, x-source"


def reserved_error(name: str) -> str:
    return (
        f"header {name!r} is reserved for the headers that pymq writes when it "
        f"moves a message to a dead-letter queue and back ({LISTED}); use "
        f"another name"
    )


def header_block(headers: dict[str, str]) -> bytes:
    """Encode headers as the record format does, with no name check."""
    parts = [struct.pack("<H", len(headers))]
    for key, value in headers.items():
        raw_key, raw_value = key.encode(), value.encode()
        parts.append(struct.pack("<H", len(raw_key)) + raw_key)
        parts.append(struct.pack("<I", len(raw_value)) + raw_value)
    return b"".join(parts)


def publish_payload(record: bytes) -> bytes:
    """A PUBLISH payload of one record that starts with a header block."""
    records = struct.pack("<I", len(record)) + record
    return struct.pack("<IIIi", 1, 1, crc32c(records), -1) + records


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[pymq.Broker]:
    with pymq.open(tmp_path / "data") as opened:
        yield opened


def test_reserved_names_match_broker() -> None:
    assert sorted(RESERVED_HEADERS) == RESERVED


def test_other_x_headers_move_and_come_back(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs", max_deliveries=1)
    jobs.put(b"x", headers={"x-trace": "t1", "x-sources": "s"})
    message = jobs.get(timeout=0)
    assert message is not None
    message.reject("bad")
    moved = jobs.dlq.get(timeout=0)
    assert moved is not None
    assert moved.headers["x-trace"] == "t1"
    assert moved.headers["x-reason"] == "bad"
    moved.nack()
    assert broker.redrive("jobs.dlq") == 1
    back = jobs.get(timeout=0)
    assert back is not None
    assert back.headers == {"x-trace": "t1", "x-sources": "s"}


def test_dlq_put_takes_reserved_headers(broker: pymq.Broker) -> None:
    broker.queue("jobs")
    dlq = broker.queue("jobs.dlq")
    headers = {"x-source": "jobs", "x-group": "", "x-reason": "imported"}
    assert dlq.put(b"one", headers=headers) == 0
    assert dlq.put_many([b"two"], headers=headers) == range(1, 2)
    assert broker.redrive("jobs.dlq") == 2
    back = broker.queue("jobs").get(timeout=0)
    assert back is not None
    assert (back.body, back.headers) == (b"one", {})


def test_compiled_publish_into_dlq_takes_reserved_header(
    broker: pymq.Broker,
) -> None:
    dlq = broker.queue("jobs").dlq
    payload = encode_publish(1, 1, [b"x"], {"x-source": "jobs"}, -1)[16:]
    assert publish_into(dlq.stream, payload, 100) == (0, 1)
    moved = dlq.get(timeout=0)
    assert moved is not None
    assert moved.headers == {"x-source": "jobs"}


def test_compiled_publish_rejects_reserved_header(broker: pymq.Broker) -> None:
    jobs = broker.queue("jobs")
    payload = publish_payload(header_block({"x-dead-at": "1"}) + b"body")
    with pytest.raises(ValueError) as raised:
        publish_into(jobs.stream, payload, 100)
    assert str(raised.value) == (
        f"publish record 0: {reserved_error('x-dead-at')}; nothing was written"
    )
    assert jobs.stream.store.next_offset == 0


def test_server_rejects_reserved_header(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    try:
        with pymq.connect(server.url, reconnect_attempts=0) as client:
            remote = client.queue("jobs")
            # The client checks the names before it sends, as put does.
            with pytest.raises(ValueError) as raised:
                remote.put(b"x", headers={"x-source": "mine"})
            assert str(raised.value) == reserved_error("x-source")
        # The server checks them too, for clients that skip the check. Its
        # ValueError comes back as a bad request (code 17).
        raw = RawClient(server.port)
        try:
            raw.handshake()
            handle = raw.open_queue("jobs")
            payload = publish_payload(header_block({"x-reason": "mine"}) + b"body")
            reply = raw.request(protocol.PUBLISH, 5, handle, payload)
            assert error_of(reply) == (
                17,
                f"publish record 0: {reserved_error('x-reason')}; nothing was written",
            )
        finally:
            raw.close()
        with pymq.connect(server.url, reconnect_attempts=0) as client:
            assert client.queue("jobs").stats().depth == 0
        assert server.stop() == 0, server.log()
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            {"kind": "a", "trace": "x\udc80"},
            "value of header 'trace' cannot be encoded as UTF-8: it has a lone "
            "surrogate at index 1",
        ),
        (
            {"bad\udc80": "v"},
            "header name 'bad\\udc80' cannot be encoded as UTF-8: it has a lone "
            "surrogate at index 3",
        ),
    ],
)
def test_unencodable_header_named(
    broker: pymq.Broker, headers: dict[str, str], message: str
) -> None:
    jobs = broker.queue("jobs")
    with pytest.raises(ValueError) as raised:
        jobs.put(b"x", headers=headers)
    assert str(raised.value) == message
    with pytest.raises(ValueError) as raised:
        jobs.put_many([b"x"], headers=headers)
    assert str(raised.value) == message
    assert jobs.stream.store.next_offset == 0
