"""The event loop of the pymq servers that the tests start.

tests/conftest.py sets NAME from the pytest option --server-loop, before any
test runs. This module imports no part of pymq, so that the option works in
a build without pymq.server.
"""

from __future__ import annotations

import asyncio
import importlib

# "asyncio" or "uvloop": --server-loop auto is resolved before it is stored.
NAME = "asyncio"


def loop_options() -> list[str]:
    """Return the options that run a `pymq serve` command on the loop NAME."""
    return ["--loop", NAME]


def new_server_loop() -> asyncio.AbstractEventLoop:
    """Return a new event loop of the kind NAME names."""
    if NAME == "uvloop":
        uvloop = importlib.import_module("uvloop")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def logged_name() -> str:
    """Return the loop NAME as the server's start line logs it, with a version."""
    if NAME == "uvloop":
        uvloop = importlib.import_module("uvloop")
        return f"uvloop {uvloop.__version__}"
    return "asyncio"
