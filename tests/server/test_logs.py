"""What the server logs for an operator: start, connections, errors, stop.

The server runs as a subprocess at DEBUG, and each line is looked up in its
log, which tests/server/serve.py writes in logging's default format. The
rate limit of the failed-handshake warnings is checked in this process,
with given clock readings; tests/server/test_tls.py checks the warnings of
a real server.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import pytest

import pymq
from pymq._version import __version__
from pymq.server import _HandshakeFailureLog
from tests.server.helpers import RawClient, ServerProcess, error_of
from tests.server_loop import logged_name


def test_log_follows_server_life(servers: Callable[..., ServerProcess]) -> None:
    server = servers(log_level="DEBUG").start()
    with pymq.connect(server.url) as client:
        jobs = client.queue("jobs", visibility_timeout=3600)
        jobs.put_many([b"a", b"b"])
        assert len(jobs.get_many(2, timeout=10.0)) == 2

    raw = RawClient(server.port)
    try:
        raw.handshake()
        raw_peer = f"127.0.0.1:{raw.sock.getsockname()[1]}"
        reply = raw.request(0x7F, 9, 0, b"")
        assert error_of(reply)[1] == "unknown opcode 0x7f"
        assert raw.read_until_closed() == []
    finally:
        raw.close()
    assert server.stop() == 0
    log = server.log()
    # The client's port is known only from the log.
    found = re.search(
        r"^DEBUG:pymq.server:connection from (127\.0\.0\.1:[0-9]+) is pymq-python ",
        log,
        re.MULTILINE,
    )
    assert found is not None, log
    peer = found[1]

    expected = [
        f"INFO:pymq.server:listening on 127.0.0.1:{server.port}",
        f"INFO:pymq.server:serving {server.data} (fsync=interval, pymq {__version__}, "
        f"event loop: {logged_name()})",
        f"DEBUG:pymq.server:connection from {peer}",
        f"DEBUG:pymq.server:connection from {peer} is pymq-python {__version__}",
        f"DEBUG:pymq.server:released 2 deliveries held by {peer}, which went away",
        f"DEBUG:pymq.server:connection from {peer} closed",
        f"INFO:pymq.server:closed the connection from {raw_peer}: unknown opcode "
        f"0x7f (request 9)",
        "INFO:pymq.server:stopping: no new connections; finishing requests under way",
        f"INFO:pymq.server:stopped; broker in {server.data} closed",
    ]
    lines = log.splitlines()
    for line in expected:
        assert line in lines, f"{line!r} not in the log:\n{log}"
    positions = [lines.index(line) for line in expected]
    assert positions == sorted(positions)


def test_handshake_failures_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    failures = _HandshakeFailureLog(limit=3)
    caplog.set_level(logging.WARNING, logger="pymq.server")
    for number in range(7):
        failures.add(
            f"10.0.0.{number}:4000", "WRONG_VERSION_NUMBER", 100.0 + number / 10
        )
    assert [record.getMessage() for record in caplog.records] == [
        f"TLS handshake with 10.0.0.{number}:4000 failed: WRONG_VERSION_NUMBER"
        for number in range(3)
    ]
    assert all(record.levelno == logging.WARNING for record in caplog.records)

    caplog.clear()
    failures.flush(100.9)
    assert caplog.records == []
    failures.flush(101.0)
    assert [record.getMessage() for record in caplog.records] == [
        "4 more TLS handshakes failed within 1 s and were not logged one by one "
        "(at most 3 a second are); the last: 10.0.0.6:4000: WRONG_VERSION_NUMBER"
    ]

    # A new second logs the first failures one by one again.
    caplog.clear()
    failures.add("10.0.0.7:4000", "HTTP_REQUEST", 101.5)
    assert [record.getMessage() for record in caplog.records] == [
        "TLS handshake with 10.0.0.7:4000 failed: HTTP_REQUEST"
    ]
    failures.flush(103.0)
    assert len(caplog.records) == 1


def test_handshake_failure_count_logged_at_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = _HandshakeFailureLog(limit=1)
    caplog.set_level(logging.WARNING, logger="pymq.server")
    failures.add("10.0.0.1:4000", "HTTP_REQUEST", 50.0)
    failures.add("10.0.0.2:4000", "HTTP_REQUEST", 50.1)
    failures.flush(50.2, final=True)
    assert [record.getMessage() for record in caplog.records] == [
        "TLS handshake with 10.0.0.1:4000 failed: HTTP_REQUEST",
        "1 more TLS handshakes failed within 1 s and were not logged one by one "
        "(at most 1 a second are); the last: 10.0.0.2:4000: HTTP_REQUEST",
    ]
