"""Fixtures of the server tests: server processes and the two-sided broker.

The broker fixture runs each API test twice: against pymq.open() and
against a server subprocess through pymq.connect(), so the embedded broker
and the client cannot drift apart.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pymq
from tests.server.helpers import ServerProcess

_names = itertools.count()


@pytest.fixture(autouse=True)
def no_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep PYMQ_TOKEN of the caller's shell out of pymq.connect()."""
    monkeypatch.delenv("PYMQ_TOKEN", raising=False)


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the whole session; tests on it use unique names."""
    server = ServerProcess(tmp_path_factory.mktemp("shared-server")).start()
    yield server
    try:
        assert server.stop() == 0, server.log()
    finally:
        server.kill()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Return a factory of servers of this test; each is killed at the end.

    Each call makes a new folder under tmp_path, so tests that restart a
    server keep one ServerProcess and call its start() again.
    """
    created: list[ServerProcess] = []

    def make(**options: Any) -> ServerProcess:
        server = ServerProcess(tmp_path / f"server{len(created)}", **options)
        created.append(server)
        return server

    yield make
    for server in created:
        server.kill()


@pytest.fixture(params=["embedded", "server"])
def broker(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[pymq.Broker | pymq.RemoteBroker]:
    """A pymq.Broker, or a RemoteBroker connected to the shared server."""
    if request.param == "embedded":
        with pymq.open(tmp_path / "data") as embedded:
            yield embedded
        return
    server: ServerProcess = request.getfixturevalue("shared_server")
    with pymq.connect(server.url) as remote:
        yield remote


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A queue or stream name used by no other test on the shared server."""
    base = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.originalname)
    return f"{base[:100]}-{next(_names)}"
