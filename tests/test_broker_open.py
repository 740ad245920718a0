"""Opening a broker: where it may live, its options, and its exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PROCESS_TIMEOUT = 30.0


def test_unclosed_broker_exits_without_output(tmp_path: Path) -> None:
    # The unused function changes the order in which module globals are
    # torn down at exit, so that the os module goes before the locks.
    script = textwrap.dedent(
        """
        import logging
        import sys

        import pymq

        logging.basicConfig(level=logging.WARNING)

        def unused(label, function):
            pass

        broker = pymq.open(sys.argv[1], segment_bytes=1 << 22)
        jobs = broker.queue("jobs", max_deliveries=1)
        jobs.put(b"x")
        held = jobs.get(timeout=0)
        jobs.dlq.put(b"y")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert done.returncode == 0
    assert done.stderr == ""
    assert done.stdout == ""
