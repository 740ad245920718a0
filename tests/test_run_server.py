"""The server benchmark, benchmarks/run_server.py, on tiny counts.

Every case runs against a real pymq server in a child process. The checks
are on counts and on the structure of the results, never on timings. The
Redis cases run only when a Redis server responds on 127.0.0.1:6379.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import pymq
from benchmarks import run_server
from benchmarks.benchmarks.bench_server import ServerProcess
from benchmarks.benchmarks.common import payloads
from pymq.client import RemoteQueue

TINY = run_server.Budget(
    rounds=1,
    sizes=(100,),
    round_trips=50,
    single_messages=30,
    pipelined_bytes=1 << 20,
    pipelined_messages=250,
    batched_bytes=1 << 20,
    batched_messages=2_400,
    clients=2,
    seconds=10.0,
)


@pytest.fixture(scope="module")
def servers() -> Iterator[run_server.Servers]:
    with run_server.Servers("interval", run_server.REDIS_PORT) as started:
        yield started


@pytest.fixture
def queue(
    servers: run_server.Servers, request: pytest.FixtureRequest
) -> Iterator[RemoteQueue]:
    with pymq.connect(servers.pymq.url) as broker:
        name = request.node.name.replace("[", ".").replace("]", "")
        yield broker.queue(f"test.{name}")


def check_counts(sample: run_server.Sample, expected: int) -> None:
    assert sample.produced == expected
    assert sample.consumed == expected
    assert sample.seconds > 0


def test_sizes_argument() -> None:
    assert run_server.sizes_argument("100,65536") == (100, 65536)
    with pytest.raises(argparse.ArgumentTypeError, match="invalid sizes"):
        run_server.sizes_argument("100,x")
    with pytest.raises(argparse.ArgumentTypeError, match="from 1 to"):
        run_server.sizes_argument("0")


def test_server_process_stops_and_cleans_up() -> None:
    server = ServerProcess("never").start()
    folder = server.scratch.path if server.scratch is not None else None
    with pymq.connect(server.url) as broker:
        assert broker.ping() > 0
    assert server.stop() == 0
    assert folder is not None
    assert not folder.exists()


def test_echo_round_trips(servers: run_server.Servers) -> None:
    sample = run_server.echo_round_trips(servers.echo.port, 16, 40, 10.0)
    check_counts(sample, 40)
    assert sample.p50 is not None
    assert sample.p99 is not None
    assert sample.p50 <= sample.p99


def test_put_get_ack(queue: RemoteQueue) -> None:
    sample = run_server.put_get_ack(queue, payloads(1024, 25), 10.0)
    check_counts(sample, 25)
    assert sample.p50 is not None
    assert queue.stats().depth == 0


def test_put_get_ack_no_wait(queue: RemoteQueue) -> None:
    sample = run_server.put_get_ack_no_wait(queue, payloads(100, 25), 10.0)
    check_counts(sample, 25)
    assert queue.stats().acked == 25


@pytest.mark.parametrize("batch", [100, 1000])
def test_put_many_then_drain(queue: RemoteQueue, batch: int) -> None:
    sample = run_server.put_many_then_drain(queue, payloads(100, 1234), batch, 10.0)
    check_counts(sample, 1234)
    assert sample.put_seconds is not None
    assert sample.get_seconds is not None
    assert queue.stats().depth == 0


def test_gather_then_drain(servers: run_server.Servers) -> None:
    bodies = payloads(100, 230)
    sample = run_server.gather_then_drain(
        servers.pymq.url, "test.gather", bodies, 100, 10.0
    )
    check_counts(sample, 230)
    assert servers.checker.queue("test.gather").stats().depth == 0


def test_redis_cases_delete_their_keys(servers: run_server.Servers) -> None:
    redis = servers.redis
    if redis is None:
        pytest.skip(servers.redis_reason)
    key = redis.key("test")
    bodies = payloads(100, 250)
    single = redis.redis_round(
        key, lambda: run_server.redis_one_at_a_time(redis.client, key, bodies, 10.0)
    )
    check_counts(single, 250)
    assert redis.client.exists(key) == 0
    pipelined = redis.redis_round(
        key, lambda: run_server.redis_pipelined(redis.client, key, bodies, 100, 10.0)
    )
    check_counts(pipelined, 250)
    assert redis.client.exists(key) == 0


def test_one_round_of_every_case(servers: run_server.Servers, tmp_path: Path) -> None:
    cases = run_server.build_cases(TINY, servers)
    run_server.run_rounds(cases, TINY.rounds)
    for case in cases:
        assert len(case.samples) == 1
        assert case.samples[0].produced == case.samples[0].consumed
    expected = {
        run_server.ONE_AT_A_TIME: TINY.single_messages,
        run_server.BATCHED: TINY.batched_count(100),
        run_server.GATHER: TINY.pipelined_count(100),
        run_server.clients_form(2, True): TINY.batched_count(100),
    }
    for form, count in expected.items():
        found = run_server.find(cases, run_server.PYMQ, form, payload=100)
        assert found is not None
        assert found.samples[0].consumed == count

    table = run_server.table(cases)
    assert len(table) == len(cases) + 2
    goals = run_server.goals(cases, TINY.sizes, servers.redis_reason)
    assert [goal.payload for goal in goals] == [100, 100, 100]
    rows = run_server.goal_table(goals)
    assert len(rows) == len(goals) + 2
    for goal in goals:
        assert goal.verdict()

    args = run_server.parse_args(["--json", str(tmp_path / "out.json")])
    loads = {"start": [0.0, 0.0, 0.0], "end": [0.0, 0.0, 0.0]}
    sources = {"start": run_server.read_sources()}
    report = run_server.json_report(
        args, [], TINY, servers, cases, goals, loads, sources
    )
    decoded = json.loads(json.dumps(report))
    assert decoded["fsync"] == "interval"
    assert len(decoded["cases"]) == len(cases)
    assert len(decoded["goals"]) == 3
    assert {"commit", "machine", "versions", "command", "budget"} <= set(decoded)
    assert decoded["sources"]["start"]["commit"] == decoded["commit"]
