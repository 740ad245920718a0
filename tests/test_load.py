"""The load test, benchmarks/load.py, on small counts.

The runs start a real pymq server and real client processes. The checks are
on ids, counts and empty queues, never on timings.
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import load
from pymq.types import QueueStats

SMALL = load.LoadConfig(
    connections=8, messages=2_000, queues=2, processes=2, max_seconds=120.0
)


def queue_stats(depth: int = 0, in_flight: int = 0, acked: int = 0) -> QueueStats:
    return QueueStats(
        name="load.0",
        depth=depth,
        in_flight=in_flight,
        waiting=0,
        acked=acked,
        dead_lettered=0,
        oldest_unacked_age=None,
        damaged=0,
        skipped=0,
    )


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def check_exactly_once(result: load.LoadResult, messages: int) -> None:
    verdict = result.verdict
    assert result.failures == []
    assert result.outcome == "drained"
    assert verdict.put == messages
    assert verdict.uncertain == 0
    assert verdict.delivered == messages
    assert verdict.acked == messages
    assert verdict.server_acked == messages
    assert verdict.lost == 0
    assert verdict.delivered_twice == 0
    assert verdict.acked_twice == 0
    assert verdict.unknown == 0
    assert verdict.left_in_queues == 0
    assert verdict.in_flight == 0
    assert result.redelivered == 0
    assert result.stopped_at_deadline == 0
    assert result.ok()


@pytest.mark.slow
def test_quick_run_exactly_once() -> None:
    config = dataclasses.replace(load.QUICK, max_seconds=300.0)
    result = load.run_load(config)
    check_exactly_once(result, config.messages)
    assert result.latency is not None
    assert result.latency.count == config.messages
    assert result.latency.p50 <= result.latency.p99 <= result.latency.p999
    peak = result.memory["peak"]
    end = result.memory["end"]
    assert peak is not None
    assert end is not None
    assert peak["VmHWM"] >= end["VmRSS"] > 0
    assert len(result.memory_samples) >= 2


def test_threads_client_exactly_once() -> None:
    config = dataclasses.replace(SMALL, client="threads")
    result = load.run_load(config)
    check_exactly_once(result, config.messages)


def test_one_process_exactly_once() -> None:
    config = dataclasses.replace(SMALL, processes=1, queues=1)
    result = load.run_load(config)
    check_exactly_once(result, config.messages)


def test_main_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    code = load.main(
        ["--connections", "4", "--messages", "300", "--queues", "2", "--json", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["passed"] is True
    assert report["checks"]["put"] == 300
    assert report["checks"]["lost"] == 0
    assert report["config"]["connections"] == 4
    assert {"commit", "machine", "versions", "command", "latency_ms"} <= set(report)
    assert report["server_memory_kib"]["peak"]["VmHWM"] > 0


def test_plan_covers_every_id_once() -> None:
    config = load.LoadConfig(connections=13, messages=1_003, queues=3, processes=4)
    jobs = load.plan_jobs(config, "pymq://127.0.0.1:1", 0)
    roles = [role for job in jobs for role in job.producers]
    planned = sorted(
        message_id
        for role in roles
        for message_id in range(role.first_id, role.first_id + role.count)
    )
    assert planned == list(range(config.messages))
    assert len(roles) == config.producers
    assert sum(len(job.consumers) for job in jobs) == config.consumers
    counts = [role.count for role in roles]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize(("queues", "processes"), [(5, 2), (10, 2), (3, 4)])
def test_plan_gives_every_queue_both_roles(queues: int, processes: int) -> None:
    config = load.LoadConfig(
        connections=20, messages=100, queues=queues, processes=processes
    )
    jobs = load.plan_jobs(config, "pymq://127.0.0.1:1", 0)
    produced = {role.queue for job in jobs for role in job.producers}
    consumed = {name for job in jobs for name in job.consumers}
    names = {load.queue_name(index) for index in range(config.queues)}
    assert produced == names
    assert consumed == names
    sizes = [len(job.producers) + len(job.consumers) for job in jobs]
    assert max(sizes) - min(sizes) <= 2


def test_plan_puts_consumers_in_other_process() -> None:
    config = load.LoadConfig(connections=40, messages=100, queues=10, processes=2)
    jobs = load.plan_jobs(config, "pymq://127.0.0.1:1", 0)
    produced_by = {(role.queue, job.index) for job in jobs for role in job.producers}
    consumed_by = {(name, job.index) for job in jobs for name in job.consumers}
    assert produced_by.isdisjoint(consumed_by)


def test_verify_passes_exactly_once() -> None:
    verdict = load.verify(
        ids(0, 1, 2), ids(), ids(2, 0, 1), ids(1, 2, 0), [queue_stats(acked=3)]
    )
    assert verdict.failures() == []
    assert verdict.ok()


def test_verify_finds_lost_id() -> None:
    verdict = load.verify(
        ids(0, 1, 2), ids(), ids(0, 1, 2), ids(0, 1), [queue_stats(acked=2)]
    )
    assert verdict.lost == 1
    assert not verdict.ok()


def test_verify_finds_second_delivery() -> None:
    verdict = load.verify(
        ids(0, 1), ids(), ids(0, 1, 1), ids(0, 1), [queue_stats(acked=2)]
    )
    assert verdict.delivered_twice == 1
    assert verdict.lost == 0
    assert not verdict.ok()


def test_verify_finds_second_ack() -> None:
    verdict = load.verify(
        ids(0, 1), ids(), ids(0, 1), ids(0, 1, 0), [queue_stats(acked=3)]
    )
    assert verdict.acked_twice == 1
    assert not verdict.ok()


def test_verify_finds_unknown_id() -> None:
    verdict = load.verify(
        ids(0, 1), ids(), ids(0, 1, 7), ids(0, 1, 7), [queue_stats(acked=3)]
    )
    assert verdict.unknown == 1
    assert not verdict.ok()


def test_verify_accepts_id_whose_put_raised() -> None:
    verdict = load.verify(
        ids(0, 1), ids(2), ids(0, 1, 2), ids(0, 1, 2), [queue_stats(acked=3)]
    )
    assert verdict.unknown == 0
    assert verdict.lost == 0
    assert verdict.ok()


def test_verify_finds_messages_left() -> None:
    verdict = load.verify(
        ids(0), ids(), ids(0), ids(0), [queue_stats(depth=2, in_flight=1, acked=1)]
    )
    assert verdict.left_in_queues == 2
    assert verdict.in_flight == 1
    assert not verdict.ok()


def test_verify_compares_server_acks() -> None:
    verdict = load.verify(ids(0), ids(), ids(0), ids(0), [queue_stats(acked=5)])
    assert not verdict.ok()
    assert "server counted 5 acks" in verdict.failures()[0]


def test_int64s_joins_arrays() -> None:
    joined = load.int64s([array.array("q", [1, 2]), array.array("q"), ids(3)])
    assert joined.tolist() == [1, 2, 3]
    assert load.int64s([]).dtype == np.int64


def test_latency_figures_nearest_rank() -> None:
    latency = load.latency_figures(np.arange(1, 1001, dtype=np.int64) * 1_000_000)
    assert latency is not None
    assert latency.count == 1000
    assert latency.p50 == 500.0
    assert latency.p99 == 990.0
    assert latency.p999 == 999.0
    assert latency.max == 1000.0
    assert load.latency_figures(ids()) is None


def test_read_memory_of_this_process() -> None:
    memory = load.read_memory(os.getpid())
    assert memory is not None
    assert set(memory) == set(load.RSS_FIELDS)
    assert memory["VmHWM"] >= memory["VmRSS"] > 0
    cpu = load.server_cpu_seconds(os.getpid())
    assert cpu is not None
    assert cpu > 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"connections": 1}, "invalid connections 1"),
        ({"queues": 0}, "invalid queues 0"),
        ({"connections": 4, "queues": 3}, "invalid queues 3"),
        ({"processes": 0}, "invalid processes 0"),
        ({"messages": 0}, "invalid messages 0"),
        ({"size": 15}, "invalid size 15"),
        ({"fetch": 0}, "invalid fetch 0"),
        ({"client": "fork"}, "invalid client 'fork'"),
        ({"max_seconds": 0.0}, "invalid max_seconds 0.0"),
    ],
)
def test_config_check_rejects(changes: dict[str, Any], message: str) -> None:
    config = dataclasses.replace(load.FULL, **changes)
    with pytest.raises(ValueError, match=message):
        config.check()


def test_parse_args_quick_and_overrides() -> None:
    config, _ = load.parse_args(["--quick"])
    assert config == load.QUICK
    config, args = load.parse_args(["--quick", "--connections", "60", "--json", "x"])
    assert config.connections == 60
    assert config.messages == load.QUICK.messages
    assert args.json == Path("x")
    config, _ = load.parse_args([])
    assert config == load.FULL


def test_parse_args_rejects_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load.parse_args(["--connections", "1"])
    assert "invalid connections 1" in capsys.readouterr().err
