"""Crash torture of pymq: processes killed with SIGKILL at random, then checked.

Usage: python -m tests.reliability.torture [--kills N] [--seconds S]
       [--fsync interval|always] [--seed N] [--keep DIR] [--consumers N]
       [--rate R]

A run has two phases, each in a data directory of its own:

- remote: a `pymq serve` process on a fixed free port of 127.0.0.1, one
  producer process and consumer processes (of the queue, and of a consumer
  group of the stream) over pymq.connect. The harness kills the server, the
  producer or a consumer at random moments and starts it again. After each
  server restart it stops the clients with SIGSTOP and checks the broker
  through a fresh client. After some server kills it also checks the data
  directory with pymq.open while the server is down.
- embedded: one process with pymq.open, whose threads produce and consume.
  The harness kills it, sometimes checks the data directory, and starts it
  again.

With --fsync always, some events are power cuts instead of kills. The
broker's owner reports the synced length of each segment, and is stopped
with SIGSTOP while its data directory is copied. Then it goes on and
reports the synced lengths again. Every returned put must lie within the
first lengths, and the copy is cut and garbled past the second ones
(powercut.py) and checked. The cut keeps at least the records each segment
held when the owner last started, because the owner killed before it may
have synced them, and a reopened store reports as synced only what its
checkpoints cover.
The server runs as tests/reliability/probe_serve.py then, which is `pymq
serve` with a probe of the synced lengths, because a server has no request
that returns them.

Seeded choices (victims, delays, damage) repeat with --seed, but the
moments of the kills depend on the machine's speed. At the end of each
phase the producer stops, the consumers drain the queue and the group, the
broker stops cleanly, and the data directory is checked once more, with
the logs of every worker (ledger.py). The summary lists the kills, the
message counts and PASS or FAIL for each check; the exit code is 0 when
every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pymq
from pymq.storage import DEFAULT_SEGMENT_BYTES
from tests.reliability.ledger import Ledger
from tests.reliability.powercut import (
    MODES,
    copy_sparse,
    damage_copy,
    indexed_lengths,
    relative_lengths,
    unsynced_records,
)
from tests.reliability.records import (
    AUDIT_GROUP,
    AUDIT_OPTIONS,
    CONSUMER_OPTIONS,
    GROUP,
    QUEUE,
    STREAM,
)
from tests.reliability.state import (
    ACKS,
    ATTEMPTS,
    CHECK_NAMES,
    CRC,
    DUPLICATES,
    ORIGIN,
    POWER_ACKS,
    POWER_CRC,
    POWER_PRESENT,
    PROCESSES,
    Audit,
    Findings,
    LedgerSnapshot,
    TargetState,
    check_failing_messages,
    check_states,
    final_counts,
    read_offline,
    read_online,
    verify_stores,
)
from tests.server.helpers import free_port

logger = logging.getLogger("tests.reliability.torture")

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
# Ports of pymq's default and of other brokers and databases, never used.
RESERVED_PORTS: Final = frozenset({7420, 6379, 5672, 4222, 1883, 5432, 3306})
# Bounds that only stop a hung run. No check depends on how fast anything is.
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 30.0
PROBE_TIMEOUT: Final = 15.0
EMBEDDED_SEGMENT_BYTES: Final = 1 << 20
# Share of the kills given to the embedded phase.
EMBEDDED_SHARE: Final = 0.25
# With fsync="always", the share of events that are power cuts.
POWER_CUT_SHARE: Final = 0.2
# Share of broker kills followed by a kill while the broker starts again.
STARTUP_KILL_SHARE: Final = 0.15
# Share of broker kills followed by an offline check of the data directory.
REMOTE_OFFLINE_SHARE: Final = 0.25
EMBEDDED_OFFLINE_SHARE: Final = 0.5
# Errors a check may raise when the broker misbehaves. Each becomes a FAIL.
CHECK_ERRORS: Final = (pymq.PymqError, OSError, TimeoutError, RuntimeError, EOFError)
# Errors a client may get while its server is killed. Others are reported.
EXPECTED_CLIENT_ERRORS: Final = frozenset({"ConnectionLostError", "StaleReceiptError"})


@dataclass
class TortureConfig:
    """Options of one torture run."""

    kills: int = 240
    seconds: float = 540.0
    fsync: str = "interval"
    seed: int = 1
    keep: Path | None = None
    # Consumer processes (remote) or threads (embedded) per queue and group.
    consumers: int = 2
    rate: float = 200.0  # puts per second
    drain_seconds: float = 60.0


@dataclass
class PhaseResult:
    """Figures and findings of one phase."""

    name: str
    seconds: float = 0.0
    kills: Counter[str] = field(default_factory=Counter)
    startup_kills: int = 0
    power_cuts: Counter[str] = field(default_factory=Counter)
    # Messages delivered before a power cut whose record the copy lost.
    lost_deliveries: int = 0
    online_checks: int = 0
    offline_checks: int = 0
    puts_returned: int = 0
    puts_maybe: int = 0
    maybe_stored: int = 0
    deliveries: int = 0
    delivered_messages: int = 0
    redeliveries: Counter[str] = field(default_factory=Counter)
    final: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_letter_causes: Counter[str] = field(default_factory=Counter)
    client_errors: Counter[str] = field(default_factory=Counter)
    findings: Findings = field(default_factory=Findings)


@dataclass
class TortureResult:
    """The outcome of a run: its phases, and PASS or FAIL per check."""

    config: TortureConfig
    folder: Path
    phases: list[PhaseResult]
    seconds: float

    def problems(self, check: str) -> list[str]:
        """Return every problem of check, in all phases."""
        return [
            f"{phase.name}: {problem}"
            for phase in self.phases
            for problem in phase.findings.problems(check)
        ]

    def rounds(self, check: str) -> int:
        return sum(phase.findings.rounds[check] for phase in self.phases)

    @property
    def passed(self) -> bool:
        return all(not self.problems(check) for check in CHECK_NAMES)

    @property
    def kills(self) -> int:
        return sum(sum(phase.kills.values()) for phase in self.phases)


# Processes -------------------------------------------------------------------


class Child:
    """A process of a phase, started again after each kill.

    Its stdout and stderr go to NAME.out in the output folder, except that a
    child with a probe (probe_serve.py, the embedded worker) gets pipes on
    stdin and stdout for request_synced().
    """

    def __init__(
        self,
        role: str,
        name: str,
        command: list[str],
        output: Path,
        *,
        probe: bool = False,
        start_log: Path | None = None,
    ) -> None:
        self.role = role
        # The ledger log where the process writes its S line once its
        # SIGTERM handler is installed.
        self.start_log = start_log
        self.name = name
        self.command = command
        self.output_path = output / f"{name}.out"
        self.probe = probe
        self.process: subprocess.Popen[bytes] | None = None
        # Called before every start, while no process of this child runs.
        self.before_start: Callable[[], None] | None = None
        self.starts = 0
        self._pending = b""
        self.environment = {
            key: value for key, value in os.environ.items() if key != "PYMQ_TOKEN"
        }

    def start(self) -> None:
        if self.before_start is not None:
            self.before_start()
        self.starts += 1
        self._pending = b""
        with open(self.output_path, "ab") as output:
            output.write(f"--- start {self.starts}\n".encode())
            output.flush()
            pipe_or_null = subprocess.PIPE if self.probe else subprocess.DEVNULL
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                env=self.environment,
                stdin=pipe_or_null,
                stdout=subprocess.PIPE if self.probe else output,
                stderr=output,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited_on_its_own(self) -> int | None:
        """Return the exit code if the process ended without the harness ending it."""
        if self.process is None:
            return None
        return self.process.poll()

    def kill(self) -> None:
        """SIGKILL the process, reap it and forget it."""
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT)
        self._close_pipes()
        self.process = None

    def send(self, signum: int) -> None:
        """Send signum if the process still runs."""
        if self.running:
            os.kill(self.pid, signum)

    def wait_started(self) -> None:
        """Wait until the process wrote its S line, so that SIGTERM stops it cleanly."""
        if self.start_log is None:
            return
        deadline = time.monotonic() + START_TIMEOUT
        while self.running and time.monotonic() < deadline:
            try:
                lines = self.start_log.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                lines = []
            if any(
                line.split()[2:3] == [str(self.pid)]
                for line in lines
                if line[:2] == "S "
            ):
                return
            time.sleep(0.02)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM the process and return its exit code; None if it was killed."""
        if self.process is None:
            return None
        self.send(signal.SIGCONT)
        self.wait_started()
        self.send(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self._close_pipes()
        self.process = None
        return code

    def request_synced(self) -> dict[str, int]:
        """Ask the probe for the synced length of every segment of the process."""
        assert self.process is not None
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(b"synced\n")
        self.process.stdin.flush()
        descriptor = self.process.stdout.fileno()
        deadline = time.monotonic() + PROBE_TIMEOUT
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name} did not answer the probe in time")
            ready, _, _ = select.select([descriptor], [], [], remaining)
            if ready:
                chunk = os.read(descriptor, 1 << 20)
                if not chunk:
                    raise EOFError(f"{self.name} closed its probe output")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        answer: dict[str, int] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name} probe: {answer['error']}")
        return answer

    def tail(self, count: int = 15) -> str:
        """Return the last count lines of the process's output."""
        try:
            lines = self.output_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-count:])

    def _close_pipes(self) -> None:
        if self.process is None:
            return
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class ServerChild(Child):
    """The pymq server of the remote phase, on a fixed port."""

    def __init__(self, data: Path, port: int, fsync: str, output: Path) -> None:
        self.port_file = output / "server.port"
        arguments = [
            "--data",
            str(data),
            "--port",
            str(port),
            "--fsync",
            fsync,
            "--port-file",
            str(self.port_file),
        ]
        probe = fsync == "always"
        if probe:
            command = [
                sys.executable,
                "-m",
                "tests.reliability.probe_serve",
                *arguments,
            ]
        else:
            command = [sys.executable, "-m", "pymq", "serve", *arguments]
        super().__init__("server", "server", command, output, probe=probe)

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        super().start()

    def wait_listening(self) -> bool:
        """Wait until the server writes its port file; False if it exits first."""
        deadline = time.monotonic() + START_TIMEOUT
        while not self.port_file.exists():
            if not self.running:
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"server did not listen within {START_TIMEOUT} s:\n{self.tail()}"
                )
            time.sleep(0.01)
        return True


def worker_command(role: str, config: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "tests.reliability.workers", role, json.dumps(config)]


def pick_port() -> int:
    """Return a free port of 127.0.0.1 that no other service here is known to use."""
    for _ in range(100):
        port = free_port()
        if port not in RESERVED_PORTS:
            return port
    raise RuntimeError("no free port outside the reserved ones in 100 tries")


# Phases ---------------------------------------------------------------------


class Phase:
    """What both phases share: kills, checks, power cuts and the end."""

    segment_bytes = DEFAULT_SEGMENT_BYTES

    def __init__(
        self, name: str, config: TortureConfig, folder: Path, rng: random.Random
    ) -> None:
        self.config = config
        self.folder = folder
        self.data = folder / "data"
        self.log_dir = folder / "logs"
        self.output = folder / "output"
        for path in (self.data, self.log_dir, self.output):
            path.mkdir(parents=True, exist_ok=True)
        self.rng = rng
        self.body_seed = rng.randrange(1 << 30)
        self.ledger = Ledger(self.log_dir)
        self.result = PhaseResult(name)
        self.findings = self.result.findings
        self.children: list[Child] = []
        self.broker_kills = 0
        # {segment log path relative to data: bytes an earlier owner may
        # have synced}, read each time the owner starts.
        self.earlier_synced: dict[str, int] = {}

    def worker_config(self, seconds: float) -> dict[str, Any]:
        return {
            "log_dir": str(self.log_dir),
            "seed": self.rng.randrange(1 << 30),
            "body_seed": self.body_seed,
            "rate": self.config.rate,
            "seconds": seconds,
        }

    @property
    def kills(self) -> int:
        return sum(self.result.kills.values())

    def note(self, event: str) -> None:
        """Append a line to events.txt: a time.monotonic_ns() reading, then event."""
        with open(self.output / "events.txt", "a") as events:
            events.write(f"{time.monotonic_ns()} {event}\n")

    def kill(self, child: Child, role: str) -> None:
        """SIGKILL child and record the kill in the ledger."""
        moment = time.monotonic_ns()
        pid = child.pid
        child.kill()
        self.ledger.add_kill(moment, role, pid)
        self.result.kills[role] += 1
        self.note(f"killed {child.name} pid {pid} (SIGKILL sent at {moment})")

    def watch(self, seconds: float) -> None:
        """Wait seconds, starting again any child that exits on its own."""
        deadline = time.monotonic() + seconds
        while True:
            for child in self.children:
                code = child.exited_on_its_own()
                if code is not None:
                    self.findings.add(
                        PROCESSES,
                        [f"{child.name} exited with code {code}:\n{child.tail()}"],
                    )
                    child.kill()
                    self.restart(child)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(0.02, remaining))

    def restart(self, child: Child) -> None:
        child.start()

    def read_earlier_synced(self) -> None:
        """Read the end of every segment's records before the owner starts.

        The owner killed before may have synced all of them, and returned
        their puts, but the next owner reports as synced only what its
        checkpoints cover until it syncs again.
        """
        self.earlier_synced = indexed_lengths(self.data)

    def offline_check(
        self, label: str, *, drain: bool = False
    ) -> dict[str, TargetState] | None:
        """Check the data directory with pymq.open; no process may own it.

        Returns None, after adding a problem, when the directory cannot be read.
        """
        self.note(f"check: {label}")
        before = LedgerSnapshot.take(self.ledger)
        try:
            states = read_offline(
                self.data, self.body_seed, self.segment_bytes, drain=drain
            )
        except CHECK_ERRORS as exc:
            problem = f"reading the data directory failed: {exc!r}"
            self.findings.add(PROCESSES, [problem], label)
            return None
        self.ledger.refresh()
        check_states(states, self.ledger, before, self.findings, label)
        self.result.offline_checks += 1
        return states

    def power_cut(self, owner: Child, label: str) -> None:
        """Copy the data directory as a power cut would leave it, and check the copy."""
        try:
            self._power_cut(owner, label)
        except CHECK_ERRORS as exc:
            self.findings.add(PROCESSES, [f"power cut failed: {exc!r}"], label)
            shutil.rmtree(self.folder / "power-cut", ignore_errors=True)

    def _power_cut(self, owner: Child, label: str) -> None:
        before = LedgerSnapshot.take(self.ledger)
        snapshot_ns = time.monotonic_ns()
        # Read after the snapshot, so every put in it returned before.
        claimed = relative_lengths(owner.request_synced(), self.data)
        copy = self.folder / "power-cut"
        owner.send(signal.SIGSTOP)
        try:
            data_ends = copy_sparse(self.data, copy)
        finally:
            owner.send(signal.SIGCONT)
        # Read after the copy, so at least what was synced when it was taken.
        synced = owner.request_synced()

        mode = self.rng.choice(MODES)
        context = f"{label} ({mode})"
        unsynced = []
        for target, name in (("queue", QUEUE), ("stream", STREAM)):
            unsynced += unsynced_records(
                copy,
                os.path.join("streams", name, "log"),
                before.returned[target],
                claimed,
                self.earlier_synced,
            )
        self.findings.add(POWER_PRESENT, unsynced, context)

        # A generator of its own: how much it draws depends on what the copy
        # contains, which must not shift the seeded choices of later events.
        damage_rng = random.Random(self.rng.randrange(1 << 30))
        damaged = damage_copy(
            copy,
            self.data,
            synced,
            data_ends,
            mode,
            damage_rng,
            earlier_synced=self.earlier_synced,
        )
        self.note(
            f"{context}: {sum(damaged.values())} bytes damaged in {len(damaged)} files"
        )

        strict = mode != "pages"
        try:
            states = read_offline(copy, self.body_seed, self.segment_bytes, drain=True)
        except CHECK_ERRORS as exc:
            problem = f"opening the copy failed: {exc!r}"
            self.findings.add(POWER_CRC, [problem], context)
            shutil.rmtree(copy)
            return
        self.ledger.refresh()
        check_states(
            states,
            self.ledger,
            before,
            self.findings,
            context,
            strict_damage=strict,
            allow_skipped=True,
            present_check=POWER_PRESENT,
            acks_check=POWER_ACKS,
            crc_check=POWER_CRC,
        )

        if strict:
            self.findings.add(POWER_CRC, store_problems(copy, allow_gaps=True), context)
        lost = lost_deliveries(states, self.ledger, snapshot_ns)
        if lost:
            self.note(f"{context}: delivered before the cut, not in the copy: {lost}")
        self.result.lost_deliveries += len(lost)
        shutil.rmtree(copy)
        self.result.power_cuts[mode] += 1

    def final_check(self) -> None:
        """Check the stopped broker's data directory and every log, at the end."""
        states = self.offline_check("final check", drain=True)
        if states is None:
            return
        self.result.dead_letter_causes = check_failing_messages(
            states, self.findings, "final check"
        )
        self.findings.add(CRC, store_problems(self.data), "final check")
        self.result.final = {
            name: final_counts(state, self.ledger) for name, state in states.items()
        }
        self.check_logs(states)

    def check_logs(self, states: dict[str, TargetState]) -> None:
        ledger = self.ledger
        self.findings.add(ORIGIN, ledger.check_origins(), "logs")
        self.findings.add(CRC, ledger.check_intact(), "logs")
        self.findings.add(ATTEMPTS, ledger.check_attempts(), "logs")
        self.findings.add(ACKS, ledger.check_acks_kept(), "logs")
        causes, problems = ledger.classify_redeliveries()
        self.findings.add(DUPLICATES, problems, "logs")
        self.result.redeliveries = causes

        errors: Counter[str] = Counter(
            put.error for put in ledger.puts.values() if put.status == "failed"
        )
        for runs in ledger.deliveries.values():
            for delivery in runs:
                for outcome in delivery.outcomes.values():
                    if outcome not in ("sent", "returned"):
                        errors[outcome] += 1
        self.result.client_errors = errors
        unexpected = [
            f"clients got {name} {count} times"
            for name, count in sorted(errors.items())
            if name not in EXPECTED_CLIENT_ERRORS
        ]
        self.findings.add(PROCESSES, ledger.malformed + unexpected, "logs")

        returned = [put for put in ledger.puts.values() if put.status == "returned"]
        maybe = [put for put in ledger.puts.values() if put.status != "returned"]
        stored: set[int] = set()
        for name, state in states.items():
            assert state.records is not None
            stored.update(state.records.values())
            stored.update(dead.seq for dead in state.dead_letters)
            stored.update(ledger.delivered_seqs(name).values())
        self.result.puts_returned = len(returned)
        self.result.puts_maybe = len(maybe)
        self.result.maybe_stored = sum(put.seq in stored for put in maybe)
        self.result.deliveries = sum(len(runs) for runs in ledger.deliveries.values())
        self.result.delivered_messages = len(ledger.deliveries)


def lost_deliveries(
    states: dict[str, TargetState], ledger: Ledger, before_ns: int
) -> list[str]:
    """Return the messages delivered before before_ns that a state has no record of.

    A record is deliverable once written, before fsync="always" syncs it,
    so a power cut can remove a message a consumer already received. Its
    put had not returned, so no check counts this as a loss.
    """
    lost = []
    for name, state in states.items():
        assert state.records is not None
        for (target, offset), runs in ledger.deliveries.items():
            if target != name or offset < state.first_offset or offset in state.records:
                continue
            if any(delivery.returned_ns < before_ns for delivery in runs):
                lost.append(f"{name} offset {offset}")
    return sorted(lost)


def store_problems(data: Path, *, allow_gaps: bool = False) -> list[str]:
    """Return what verify() found wrong in the stores of a data directory.

    With allow_gaps, offsets between segments are no problem: after a power
    cut, a group that saw a lost record moves its stream's next offset past
    it.
    """
    problems = []
    for report in verify_stores(data):
        if report.damaged or report.missing or (report.gap_offsets and not allow_gaps):
            problems.append(
                f"store {report.path}: {report.damaged} damaged, {report.missing} "
                f"missing, {report.gap_offsets} gap offsets"
            )
    return problems


class RemotePhase(Phase):
    """A server, a producer and consumer processes over pymq.connect."""

    def __init__(
        self,
        config: TortureConfig,
        folder: Path,
        rng: random.Random,
        worker_seconds: float,
    ) -> None:
        super().__init__("remote", config, folder, rng)
        self.port = pick_port()
        self.url = f"pymq://127.0.0.1:{self.port}"
        self.server = ServerChild(self.data, self.port, config.fsync, self.output)
        self.server.before_start = self.read_earlier_synced
        self.audit = Audit()
        worker = self.worker_config(worker_seconds)
        self.producer = Child(
            "producer",
            "producer",
            worker_command(
                "producer", {**worker, "url": self.url, "log_name": "producer.log"}
            ),
            self.output,
            start_log=self.log_dir / "producer.log",
        )
        self.consumers = []
        for index in range(config.consumers):
            for target in ("queue", "group"):
                name = f"consumer-{target}-{index}"
                options = {
                    **self.worker_config(worker_seconds),
                    "url": self.url,
                    "target": target,
                    "log_name": f"{name}.log",
                }
                self.consumers.append(
                    Child(
                        "consumer",
                        name,
                        worker_command("consumer", options),
                        self.output,
                        start_log=self.log_dir / f"{name}.log",
                    )
                )
        self.clients = [self.producer, *self.consumers]
        self.children = [self.server, *self.clients]

    def run(self, kills: int, deadline: float) -> None:
        started = time.monotonic()
        self.start_server()
        self.declare()
        for child in self.clients:
            child.start()
        while self.kills < kills and time.monotonic() < deadline:
            self.watch(self.rng.uniform(0.05, 0.6))
            if self.config.fsync == "always" and self.rng.random() < POWER_CUT_SHARE:
                self.power_cut(
                    self.server, f"power cut {sum(self.result.power_cuts.values()) + 1}"
                )
                continue
            roll = self.rng.random()
            if roll < 0.3:
                self.kill_server(kills - self.kills)
            elif roll < 0.55:
                self.kill(self.producer, "producer")
                self.producer.start()
            else:
                consumer = self.rng.choice(self.consumers)
                self.kill(consumer, "consumer")
                consumer.start()
        self.finish()
        self.result.seconds = time.monotonic() - started

    def start_server(self) -> None:
        """Start the server and wait until it listens, three tries at most."""
        for _ in range(3):
            self.server.start()
            if self.server.wait_listening():
                return
            self.findings.add(
                PROCESSES,
                [f"server exited while starting:\n{self.server.tail()}"],
            )
            self.server.kill()
        raise RuntimeError(f"server failed to start three times:\n{self.server.tail()}")

    def restart(self, child: Child) -> None:
        if child is self.server:
            self.start_server()
            self.online_check("after an unexpected server exit")
        else:
            child.start()

    def declare(self) -> None:
        """Create the queue, the stream and its groups with their options."""
        with pymq.connect(self.url, connect_timeout=10.0) as client:
            client.queue(QUEUE, **CONSUMER_OPTIONS)
            stream = client.stream(STREAM)
            stream.group(GROUP, **CONSUMER_OPTIONS)
            stream.group(AUDIT_GROUP, **AUDIT_OPTIONS)

    def kill_server(self, allowed: int) -> None:
        """Kill the server, maybe again while it starts (if allowed > 1), check it."""
        self.broker_kills += 1
        label = f"server kill {self.broker_kills}"
        self.kill(self.server, "server")
        if self.rng.random() < STARTUP_KILL_SHARE and allowed > 1:
            self.server.start()
            time.sleep(self.rng.uniform(0.0, 0.4))
            self.kill(self.server, "server")
            self.result.startup_kills += 1
        if self.rng.random() < REMOTE_OFFLINE_SHARE:
            self.offline_check(f"offline after {label}")
        self.start_server()
        self.online_check(f"online after {label}")

    def online_check(self, label: str) -> None:
        """Stop the clients, check the broker through a fresh client, go on."""
        self.note(f"check: {label}")
        frozen = [child for child in self.clients if child.running]
        for child in frozen:
            child.send(signal.SIGSTOP)
        try:
            # Requests already sent finish meanwhile; read_online also
            # repeats until the counts hold still.
            time.sleep(0.05)
            before = LedgerSnapshot.take(self.ledger)
            try:
                states = read_online(self.url, self.body_seed, self.audit)
            except CHECK_ERRORS as exc:
                problem = f"reading the broker failed: {exc!r}"
                self.findings.add(PROCESSES, [problem], label)
                return
            self.ledger.refresh()
            check_states(states, self.ledger, before, self.findings, label)
            self.findings.add(ORIGIN, self.audit.problems, label)
            self.audit.problems = []
            self.result.online_checks += 1
        finally:
            for child in frozen:
                child.send(signal.SIGCONT)

    def finish(self) -> None:
        """Stop the producer, drain, stop consumers and server, check it all."""
        problems = []
        code = self.producer.stop(STOP_TIMEOUT)
        if code != 0:
            problems.append(
                f"producer stopped with code {code}:\n{self.producer.tail()}"
            )
        try:
            drained = wait_drained(self.url, self.config.drain_seconds)
        except (pymq.PymqError, OSError) as exc:
            problems.append(f"reading the depth of the queue and group failed: {exc!r}")
        else:
            if not drained:
                problems.append(
                    f"queue or group not drained within {self.config.drain_seconds} s"
                )
        for consumer in self.consumers:
            code = consumer.stop(STOP_TIMEOUT)
            if code != 0:
                problems.append(
                    f"{consumer.name} stopped with code {code}:\n{consumer.tail()}"
                )
        self.online_check("online at the end")
        code = self.server.stop(STOP_TIMEOUT)
        if code != 0:
            problems.append(f"server stopped with code {code}:\n{self.server.tail()}")
        self.findings.add(PROCESSES, problems, "end")
        self.final_check()


def wait_drained(url: str, seconds: float) -> bool:
    """Wait until the queue and the group have no unsettled message."""
    deadline = time.monotonic() + seconds
    with pymq.connect(url, connect_timeout=10.0) as client:
        queue = client.queue(QUEUE)
        group = client.stream(STREAM).group(GROUP)
        while time.monotonic() < deadline:
            if queue.stats().depth == 0 and group.stats().depth == 0:
                return True
            time.sleep(0.2)
    return False


class EmbeddedPhase(Phase):
    """One process with pymq.open, producing and consuming in threads."""

    segment_bytes = EMBEDDED_SEGMENT_BYTES

    def __init__(
        self,
        config: TortureConfig,
        folder: Path,
        rng: random.Random,
        worker_seconds: float,
    ) -> None:
        super().__init__("embedded", config, folder, rng)
        options = {
            **self.worker_config(worker_seconds),
            "data": str(self.data),
            "fsync": config.fsync,
            "segment_bytes": EMBEDDED_SEGMENT_BYTES,
            "consumers": config.consumers,
            "drain_seconds": config.drain_seconds,
        }
        self.worker = Child(
            "embedded",
            "embedded",
            worker_command("embedded", options),
            self.output,
            probe=True,
            start_log=self.log_dir / "producer.log",
        )
        self.worker.before_start = self.read_earlier_synced
        self.children = [self.worker]

    def run(self, kills: int, deadline: float) -> None:
        started = time.monotonic()
        self.worker.start()
        while self.kills < kills and time.monotonic() < deadline:
            self.watch(self.rng.uniform(0.1, 0.8))
            if self.config.fsync == "always" and self.rng.random() < POWER_CUT_SHARE:
                self.power_cut(
                    self.worker, f"power cut {sum(self.result.power_cuts.values()) + 1}"
                )
                continue
            self.broker_kills += 1
            self.kill(self.worker, "embedded")
            if self.rng.random() < STARTUP_KILL_SHARE and kills - self.kills > 0:
                self.worker.start()
                time.sleep(self.rng.uniform(0.0, 0.4))
                self.kill(self.worker, "embedded")
                self.result.startup_kills += 1
            if self.rng.random() < EMBEDDED_OFFLINE_SHARE:
                self.offline_check(f"offline after kill {self.broker_kills}")
            self.worker.start()
        code = self.worker.stop(self.config.drain_seconds + STOP_TIMEOUT)
        if code != 0:
            self.findings.add(
                PROCESSES,
                [f"embedded worker stopped with code {code}:\n{self.worker.tail()}"],
                "end",
            )
        self.final_check()
        self.result.seconds = time.monotonic() - started


# Running ----------------------------------------------------------------------


def run_phase(phase: RemotePhase | EmbeddedPhase, kills: int, deadline: float) -> None:
    """Run phase; an error that ends it early becomes a problem of the phase."""
    try:
        phase.run(kills, deadline)
    except (*CHECK_ERRORS, subprocess.SubprocessError, AssertionError) as exc:
        details = "".join(traceback.format_exception(exc))
        phase.findings.add(PROCESSES, [f"the phase stopped early:\n{details}"], "run")


def run_torture(config: TortureConfig) -> TortureResult:
    """Run both phases and return their results; every child is gone after."""
    rng = random.Random(config.seed)
    if config.keep is not None:
        config.keep.mkdir(parents=True, exist_ok=True)
        folder = config.keep
    else:
        folder = Path(tempfile.mkdtemp(prefix="pymq-torture-"))
    started = time.monotonic()
    embedded_kills = max(1, round(config.kills * EMBEDDED_SHARE))
    remote_kills = config.kills - embedded_kills
    remote_seconds = config.seconds * (1 - EMBEDDED_SHARE)
    # Workers stop on their own only if the harness is gone.
    worker_seconds = config.seconds + config.drain_seconds + 120.0
    phases: list[Phase] = []
    try:
        remote = RemotePhase(config, folder / "remote", rng, worker_seconds)
        phases.append(remote)
        logger.info(
            "remote phase: %d kills within %.0f s", remote_kills, remote_seconds
        )
        run_phase(remote, remote_kills, started + remote_seconds)

        embedded = EmbeddedPhase(config, folder / "embedded", rng, worker_seconds)
        phases.append(embedded)
        remaining = config.kills - remote.kills
        logger.info("embedded phase: %d kills", remaining)
        run_phase(embedded, remaining, started + config.seconds)
    finally:
        for phase in phases:
            for child in phase.children:
                if child.process is not None:
                    child.send(signal.SIGCONT)
                    child.kill()
    result = TortureResult(
        config, folder, [phase.result for phase in phases], time.monotonic() - started
    )
    if config.keep is None and result.passed:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def format_summary(result: TortureResult) -> str:
    """Return the summary of a run as lines of text."""
    config = result.config
    lines = [
        f"pymq torture: seed {config.seed}, fsync={config.fsync}, {result.kills} kills "
        f"in {result.seconds:.1f} s",
    ]
    for phase in result.phases:
        kills = ", ".join(
            f"{role} {count}" for role, count in sorted(phase.kills.items())
        )
        lines.append(f"phase {phase.name} ({phase.seconds:.1f} s)")
        lines.append(
            f"  kills: {kills or 'none'} "
            f"({phase.startup_kills} while the broker started)"
        )
        if phase.power_cuts:
            cuts = ", ".join(
                f"{mode} {count}" for mode, count in sorted(phase.power_cuts.items())
            )
            lines.append(
                f"  power cuts: {sum(phase.power_cuts.values())} ({cuts}); "
                f"{phase.lost_deliveries} messages delivered before a cut were "
                f"not in its copy"
            )
        lines.append(
            f"  checks of the broker: {phase.online_checks} online, "
            f"{phase.offline_checks} offline"
        )
        lines.append(
            f"  puts: {phase.puts_returned} returned, {phase.puts_maybe} maybe "
            f"({phase.maybe_stored} of them stored)"
        )
        redelivered = sum(phase.redeliveries.values())
        nacked = phase.redeliveries.get("nack", 0)
        duplicates = redelivered - nacked
        unjustified = phase.redeliveries.get("no cause", 0)
        causes = ", ".join(
            f"{cause} {count}"
            for cause, count in sorted(phase.redeliveries.items())
            if cause not in ("nack", "no cause")
        )
        lines.append(
            f"  delivered: {phase.deliveries} deliveries of {phase.delivered_messages} "
            f"messages; {nacked} redelivered after a nack"
        )
        lines.append(
            f"  duplicates: {duplicates} ({duplicates - unjustified} justified: "
            f"{causes or 'none'}; {unjustified} unjustified)"
        )
        for name, counts in sorted(phase.final.items()):
            lines.append(
                f"  {name}: {counts['messages']} messages, {counts['acked']} acked, "
                f"{counts['dead-lettered']} in the DLQ, {counts['available']} available"
            )
        if phase.dead_letter_causes:
            causes = ", ".join(
                f"{cause} {count}"
                for cause, count in sorted(phase.dead_letter_causes.items())
            )
            lines.append(f"  DLQ: {causes}")
        if phase.client_errors:
            errors = ", ".join(
                f"{name} {count}" for name, count in sorted(phase.client_errors.items())
            )
            lines.append(f"  client errors: {errors}")
    lines.append("checks:")
    for check in CHECK_NAMES:
        rounds = result.rounds(check)
        problems = result.problems(check)
        if not rounds:
            lines.append(f"  not run  {check}")
            continue
        verdict = "FAIL" if problems else "PASS"
        lines.append(
            f"  {verdict}  {check} ({rounds} rounds, {len(problems)} problems)"
        )
        for problem in problems[:5]:
            lines.append(f"        {problem}")
        if len(problems) > 5:
            lines.append(f"        ... and {len(problems) - 5} more")
    lines.append(f"result: {'PASS' if result.passed else 'FAIL'}")
    if result.folder.exists():
        lines.append(f"files: {result.folder}")
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None) -> TortureConfig:
    defaults = TortureConfig()
    parser = argparse.ArgumentParser(
        prog="python -m tests.reliability.torture",
        description="Kill pymq servers, clients and embedded brokers at random "
        "and check that nothing returned is lost.",
    )
    parser.add_argument(
        "--kills", type=int, default=defaults.kills, help="SIGKILLs in the whole run"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=defaults.seconds,
        help="time bound of the kill phases in seconds; draining and checks come after",
    )
    parser.add_argument(
        "--fsync",
        choices=("interval", "always"),
        default=defaults.fsync,
        help="fsync policy of the brokers; 'always' adds power cuts",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the random choices"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="folder for the data directories and logs, kept after the run",
    )
    parser.add_argument(
        "--consumers",
        type=int,
        default=defaults.consumers,
        help="consumers per queue and group",
    )
    parser.add_argument(
        "--rate", type=float, default=defaults.rate, help="puts per second"
    )
    args = parser.parse_args(argv)
    return TortureConfig(
        kills=args.kills,
        seconds=args.seconds,
        fsync=args.fsync,
        seed=args.seed,
        keep=args.keep,
        consumers=args.consumers,
        rate=args.rate,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # The harness's own brokers log every cut tail; keep those out of the summary.
    logging.getLogger("pymq").setLevel(logging.ERROR)
    result = run_torture(config)
    print(format_summary(result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
