"""What the server logs for an operator: start, connections, errors, stop.

The server runs as a subprocess at DEBUG, and each line is looked up in its
log, which tests/server/serve.py writes in logging's default format.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pymq
from pymq._version import __version__
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
