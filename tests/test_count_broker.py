"""benchmarks.count_broker: its workloads and the parsing of callgrind files.

The counting itself runs under valgrind, which takes minutes, so these
tests run each workload on its own and parse a callgrind file written here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import count_broker

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("form", count_broker.FORMS)
def test_workload_leaves_queue_empty(
    form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYMQ_BENCH_DIR", str(tmp_path))
    count_broker.run_workload(form, 300)
    assert list(tmp_path.iterdir()) == []


def test_total_reads_totals_line(tmp_path: Path) -> None:
    path = tmp_path / "callgrind.out.1-01"
    path.write_text("events: Ir\nsummary: 12345\ntotals: 12345\n")
    assert count_broker.total(path) == 12345


def test_total_without_totals_raises(tmp_path: Path) -> None:
    path = tmp_path / "callgrind.out.1-01"
    path.write_text("events: Ir\n")
    with pytest.raises(ValueError, match="has no totals line"):
        count_broker.total(path)


def test_unknown_form_is_rejected() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.count_broker", "--run", "bulk", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown forms: bulk; the forms are single, batch, many" in result.stderr
