"""The voting example: queues votes and counted, and the dead-letter queue."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pymq

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "voting" / "run.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("voting_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


voting = load_example()


def test_tally_and_dlq(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        voting.submit(broker, "e1", voting.VOTES)
        voting.validate(broker, "e1")
        tally = voting.count(broker, "e1")
        rejected = voting.rejected_votes(broker, "e1")
        assert broker.queue("votes").stats().depth == 0
        assert broker.queue("counted").stats().depth == 0
        # Listing nacks the dead letters back: the DLQ still contains all four.
        assert broker.queue("votes.dlq").stats().depth == 4
    assert dict(tally) == {"ada": 4, "grace": 3, "linus": 2}
    assert rejected == [
        ('{"voter": "bob", "candidate": "ada"}', "voter 'bob' has already voted"),
        (
            '{"voter": "grace", "candidate": "turing"}',
            "unknown candidate 'turing'",
        ),
        ('{"voter": "carol", "candidate": "linus"}', "voter 'carol' has already voted"),
        (
            '{"voter": "mallory", "candidate": "mallory"}',
            "unknown candidate 'mallory'",
        ),
    ]


def test_earlier_election_ignored(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        voting.submit(broker, "old", [("zoe", "grace"), ("zoe", "grace")])
        voting.validate(broker, "old")
        voting.submit(broker, "new", voting.VOTES)
        voting.validate(broker, "new")
        tally = voting.count(broker, "new")
        rejected = voting.rejected_votes(broker, "new")
        assert broker.queue("votes.dlq").stats().depth == 5
    assert dict(tally) == {"ada": 4, "grace": 3, "linus": 2}
    assert len(rejected) == 4


def test_embedded_run_output(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--data", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        "ada       4",
        "grace     3",
        "linus     2",
        "winner: ada",
        "rejected to votes.dlq: 4",
    ]
    assert len(lines) == 9
    assert lines[5] == (
        '  {"voter": "bob", "candidate": "ada"}: voter \'bob\' has already voted'
    )
