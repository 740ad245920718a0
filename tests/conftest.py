"""Shared fixtures, Hypothesis profiles and the --server-loop option.

HYPOTHESIS_PROFILE=ci (set by .ci/run) makes runs repeatable: no deadline,
derandomized examples.

--server-loop chooses the event loop of every server the tests start
(tests/server_loop.py): "auto" (the default) is uvloop when it is
installed, as for pymq serve. .ci/run runs the server tests once more with
--server-loop asyncio.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests import server_loop

# No deadline: the test machines are shared, and speed is for benchmarks.
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def segment_dir(tmp_path: Path) -> Path:
    """A folder for one segment store, inside the test's own tmp_path."""
    return tmp_path / "log"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--server-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop of the pymq servers that the tests start; auto is "
        "uvloop when it is installed (default: auto)",
    )


def pytest_configure(config: pytest.Config) -> None:
    choice = config.getoption("server_loop")
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not has_uvloop:
        raise pytest.UsageError(
            "--server-loop uvloop needs uvloop: pip install 'pymq[fast]'"
        )
    if choice == "auto":
        choice = "uvloop" if has_uvloop else "asyncio"
    # Servers get the resolved name, never auto, so that the report header
    # names the loop that they ran on.
    server_loop.NAME = choice


def pytest_report_header(config: pytest.Config) -> str:
    return f"server event loop: {server_loop.NAME} (--server-loop)"
