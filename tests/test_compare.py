"""The comparison harness, benchmarks/compare.py, on tiny counts.

Only the in-process queues and the embedded pymq broker run here, so no
server and no optional client library is needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare

REPO = Path(__file__).resolve().parent.parent
TINY = compare.Budget(
    sizes=(100,),
    repeats=2,
    seconds=0.01,
    max_messages=800,
    max_bytes=1 << 20,
    min_messages=100,
    round_trips=20,
    round_trip_seconds=0.1,
    timeout=10.0,
)
LOCAL = {"pymq", "deque", "queue", "simplequeue", "asyncio", "multiprocessing"}
CLIENTS = (
    "redis",
    "hiredis",
    "pika",
    "nats",
    "persistqueue",
    "litequeue",
    "diskcache",
    "matplotlib",
)
OPTIONAL = {
    "persistqueue",
    "persistqueue-sqlite",
    "litequeue",
    "diskcache",
    "redis",
    "rabbitmq",
    "nats",
}


@pytest.fixture(scope="module")
def finished(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[compare.Case], dict[str, object]]:
    with compare.Workspace(tmp_path_factory.mktemp("compare")) as ws:
        cases, checks = compare.build_cases(TINY, LOCAL)
        loads = compare.run_cases(cases, ws, TINY, progress=lambda line: None)
        assert len(loads) == TINY.repeats * len(cases)
        meta = compare.metadata(["--only", "pymq"], ws, checks, TINY)
    return cases, meta


def test_every_local_case_drains_what_it_produced(
    finished: tuple[list[compare.Case], dict[str, object]],
) -> None:
    cases, _ = finished
    assert {case.key for case in cases} == LOCAL
    for case in cases:
        assert case.skipped is None, case.label
        assert len(case.samples) == TINY.repeats
        assert case.n >= TINY.min_messages
        assert case.n <= TINY.max_messages
        assert case.n % case.multiple == 0
        for sample in case.samples:
            assert sample.messages == sample.consumed == case.n
            assert sample.total_seconds > 0
            if sample.produce_seconds is not None:
                assert sample.consume_seconds is not None
                assert sample.produce_seconds + sample.consume_seconds == (
                    pytest.approx(sample.total_seconds)
                )
        single = case.batch == 1 and "threads" not in case.variant
        has_round_trips = [bool(sample.round_trips_us) for sample in case.samples]
        assert has_round_trips == [single] * TINY.repeats, case.label
        if single:
            assert case.round_trip(0.5) <= case.round_trip(0.99)


def test_ratios_pair_each_row_with_its_pymq_reference(
    finished: tuple[list[compare.Case], dict[str, object]],
) -> None:
    cases, _ = finished
    for case in cases:
        reference = compare.reference(cases, case)
        if case.group == compare.IN_PROCESS:
            assert reference is not None and reference.tag == "E1"
            ratio = compare.Ratio.of(reference, case)
            assert ratio is not None
            assert ratio.low <= ratio.high
        else:
            assert reference is None


def test_json_has_every_repeat_and_the_metadata(
    finished: tuple[list[compare.Case], dict[str, object]],
) -> None:
    cases, meta = finished
    result = json.loads(json.dumps(compare.results_json(cases, meta)))
    assert set(result) == {"metadata", "cases", "goals"}
    metadata = result["metadata"]
    assert metadata["command"].endswith("-m benchmarks.compare --only pymq")
    for key in ("commit", "python", "clients", "servers", "machine"):
        assert key in metadata
    assert set(metadata["machine"]) >= {"cpu", "cores", "memory_bytes", "filesystem"}
    assert len(result["cases"]) == len(cases)
    for row in result["cases"]:
        assert len(row["repeats"]) == TINY.repeats
        for repeat in row["repeats"]:
            assert repeat["messages"] == repeat["consumed"] == row["n"]
            assert repeat["total_msg_per_s"] > 0
        assert row["median"]["total_msg_per_s"] > 0
    # No embedded durable queue nor server ran, so no goal is measured.
    assert result["goals"]
    assert {goal["verdict"] for goal in result["goals"]} == {"not measured"}


def test_tables_and_docs_section_name_every_row(
    finished: tuple[list[compare.Case], dict[str, object]],
) -> None:
    cases, meta = finished
    lines = compare.table(cases, 100)
    assert len(lines) == 2 + len(cases)
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert any("reference E1" in line for line in lines)
    section = compare.docs_section(cases, TINY, {**meta, "wall_seconds": 1.0}, None)
    assert section.startswith(compare.START_MARKER)
    assert section.endswith(compare.END_MARKER)


def test_update_docs_replaces_only_the_marked_section(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        f"# Title\n\n{compare.DOCS_HEADING}\n\nHow to run it.\n\n"
        f"{compare.START_MARKER}\nold\n{compare.END_MARKER}\n\n## After\n"
    )
    section = f"{compare.START_MARKER}\nnew\n{compare.END_MARKER}"
    compare.update_docs(section, page)
    assert page.read_text() == (
        f"# Title\n\n{compare.DOCS_HEADING}\n\nHow to run it.\n\n"
        f"{section}\n\n## After\n"
    )
    compare.update_docs(section, page)
    assert page.read_text().count(compare.START_MARKER) == 1


def test_missing_clients_make_skipped_rows_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in CLIENTS:
        # A None entry makes import fail and importlib.util.find_spec say None.
        monkeypatch.setitem(sys.modules, name, None)
    cases, checks = compare.build_cases(TINY, OPTIONAL)
    assert {case.key for case in cases} == OPTIONAL
    for case in cases:
        assert case.run is None
        assert case.skipped is not None and "not installed" in case.skipped
    rows = compare.table(cases, 100)[2:]
    assert all("skipped: " in row for row in rows)
    assert all(checks[key].reason for key in OPTIONAL)


def test_help_works_with_no_client_installed() -> None:
    blocked = ", ".join(repr(name) for name in CLIENTS)
    code = (
        "import runpy, sys\n"
        f"for name in ({blocked}):\n"
        "    sys.modules[name] = None\n"
        "sys.argv = ['compare', '--help']\n"
        "runpy.run_module('benchmarks.compare', run_name='__main__', alter_sys=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m benchmarks.compare" in result.stdout
    assert "--only" in result.stdout


def test_help_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_importing_the_harness_imports_no_client() -> None:
    code = (
        "import sys, benchmarks.compare\n"
        f"print([name for name in {CLIENTS!r} if name in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
