"""Crash windows the torture harness found, reproduced without relying on timing.

Each test runs a worker process (workers.py) that SIGKILLs itself at the
exact point of a window, and then opens the data directory it left.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pymq
from tests.reliability.torture import REPO_ROOT

TIMEOUT = 60.0


def run_worker(data: Path, crash: str) -> subprocess.CompletedProcess[str]:
    config = json.dumps({"data": str(data), "crash": crash})
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.reliability.workers",
            "dead-letter-crash",
            config,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_dead_letter_move_cut_by_crash_happens_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    worker = run_worker(data, "after")
    assert worker.returncode == -signal.SIGKILL, worker.stderr

    with pymq.open(data) as broker:
        assert broker.queue("jobs.dlq").stats().depth == 1
        # The message is in the DLQ, so its queue must not deliver it again.
        assert broker.queue("jobs").get(timeout=0) is None


def test_dead_letter_move_cut_before_put_keeps_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    worker = run_worker(data, "before")
    assert worker.returncode == -signal.SIGKILL, worker.stderr

    with pymq.open(data) as broker:
        assert broker.queue("jobs.dlq").stats().depth == 0
        # The move never reached the DLQ: the message is delivered again,
        # with its first attempt counted.
        message = broker.queue("jobs").get(timeout=0)
        assert message is not None
        assert message.body == b"rejected once"
        assert message.attempt == 2
