"""The types that mypy infers for the messages of both clients.

mypy (in the "dev" extra, which .ci/run installs after the test run)
checks small programs against the stubs in src/pymq, and the tests read
its report. Those tests are skipped where mypy is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import typing
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

import pymq.aio
from pymq.client import RemoteMessage

needs_mypy = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed"
)

SOURCE = Path(__file__).resolve().parents[1] / "src"

# Uses that must type-check: the blocking client's settle methods return
# None, and the asyncio client's return a coroutine that gives None.
CORRECT = """\
from collections.abc import Coroutine
from typing import Any

from typing_extensions import assert_type

import pymq.aio
from pymq.client import RemoteMessage, RemoteQueue


def blocking(queue: RemoteQueue, message: RemoteMessage) -> None:
    assert_type(message.ack(), None)
    assert_type(message.nack(1.5), None)
    assert_type(message.nack(), None)
    assert_type(message.extend(30), None)
    assert_type(message.reject("bad input"), None)
    assert_type(message.reject(), None)
    got = queue.get(timeout=1.0)
    assert got is not None
    assert_type(got, RemoteMessage[None])
    for item in queue.get_many(10):
        assert_type(item.ack(), None)


async def asynchronous(queue: pymq.aio.AsyncQueue) -> None:
    message = await queue.get(timeout=1.0)
    assert message is not None
    assert_type(message, pymq.aio.AsyncMessage)
    pending = assert_type(message.ack(), Coroutine[Any, Any, None])
    assert_type(await pending, None)
    assert_type(await message.nack(0.5), None)
    assert_type(await message.extend(30.0), None)
    async for pushed in queue:
        assert_type(await pushed.reject("bad input"), None)
"""

# Mistakes that must fail the check: each line that ends in "# error: CODE"
# gets that error, and no other line gets one.
MISTAKES = """\
import pymq.aio
from pymq.client import RemoteMessage


def blocking(message: RemoteMessage) -> None:
    message.nack("soon")  # error: arg-type
    message.extend()  # error: call-arg
    message.reject(None)  # error: arg-type
    message.ack().done()  # error: attr-defined


async def asynchronous(message: pymq.aio.AsyncMessage) -> None:
    message.ack()  # error: unused-coroutine
    await message.nack("soon")  # error: arg-type
"""


def run_mypy(folder: Path, program: str) -> list[tuple[int, str]]:
    """Check program with mypy --strict, and return its errors as (line, code)."""
    path = folder / "program.py"
    path.write_text(program)
    config = folder / "mypy.ini"
    config.write_text("[mypy]\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--python-version",
            "3.10",
            "--config-file",
            str(config),
            "--cache-dir",
            str(folder / "cache"),
            "--show-error-codes",
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=folder,
        env={**os.environ, "MYPYPATH": str(SOURCE)},
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    errors: list[tuple[int, str]] = []
    for line in result.stdout.splitlines():
        if ": error: " not in line:
            continue
        found = re.match(r"program\.py:([0-9]+): error: .*\[([a-z-]+)\]$", line)
        assert found is not None, result.stdout
        errors.append((int(found[1]), found[2]))
    return errors


@needs_mypy
def test_settle_methods_typed_for_each_client(tmp_path: Path) -> None:
    assert run_mypy(tmp_path, CORRECT) == []


@needs_mypy
def test_settle_method_mistakes_reported(tmp_path: Path) -> None:
    expected = [
        (number, line.rsplit("# error: ", 1)[1])
        for number, line in enumerate(MISTAKES.splitlines(), start=1)
        if "# error: " in line
    ]
    assert run_mypy(tmp_path, MISTAKES) == expected


def test_message_types_subscript_at_run_time() -> None:
    # Module-level annotations and typing.get_type_hints evaluate these.
    assert typing.get_origin(RemoteMessage[None]) is RemoteMessage
    assert typing.get_args(RemoteMessage[None]) == (None,)
    assert typing.get_origin(pymq.aio.AsyncMessage) is RemoteMessage
    assert typing.get_args(pymq.aio.AsyncMessage) == (Coroutine[Any, Any, None],)
