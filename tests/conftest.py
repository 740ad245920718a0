"""Shared fixtures and Hypothesis profiles.

HYPOTHESIS_PROFILE=ci (set by .ci/run) makes runs repeatable: no deadline,
derandomized examples.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

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
