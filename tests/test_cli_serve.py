"""pymq serve's storage, limit and event loop options, through a real server process."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pymq
from pymq import MessageTooLargeError, ServerError
from pymq._version import __version__
from pymq.cli import SERVE_LIMITS, SERVE_LOOPS, _byte_size, main
from pymq.errors import ConfigError
from pymq.server import LOOPS, ServerLimits, run
from tests.server.helpers import take
from tests.server_loop import loop_options

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
# The pymq command line, in a process where `import uvloop` fails as it does
# where the fast extra is not installed. Its arguments follow the -c code.
WITHOUT_UVLOOP = """
import sys
from importlib.abc import MetaPathFinder


class HideUvloop(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "uvloop" or name.startswith("uvloop."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, HideUvloop())
from pymq.cli import main

sys.exit(main())
"""
UVLOOP_MISSING = (
    "the uvloop event loop is not available: No module named 'uvloop'. Install "
    "it with: pip install 'pymq[fast]'"
)


@dataclasses.dataclass
class Served:
    url: str
    data: Path
    log: Path
    process: subprocess.Popen[bytes]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start `pymq serve` with extra options; stop each with SIGTERM at the end.

    Without a --loop option, the server runs on the loop of --server-loop.
    hide_uvloop runs it where uvloop cannot be imported.
    """
    processes: list[subprocess.Popen[bytes]] = []

    def start(*options: str, hide_uvloop: bool = False) -> Served:
        number = len(processes)
        data = tmp_path / f"data{number}"
        port_file = tmp_path / f"port{number}"
        log = tmp_path / f"server{number}.log"
        if hide_uvloop:
            command = [sys.executable, "-c", WITHOUT_UVLOOP]
        else:
            command = [sys.executable, "-m", "pymq"]
        command += ["serve", "--data", str(data), "--port", "0"]
        command += ["--port-file", str(port_file), *options]
        if "--loop" not in options:
            command += loop_options()
        env = {key: value for key, value in os.environ.items() if key != "PYMQ_TOKEN"}
        with open(log, "wb") as output:
            process = subprocess.Popen(command, stdout=output, stderr=output, env=env)
        processes.append(process)
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "pymq serve wrote no port file"
            time.sleep(0.05)
        port = int(port_file.read_text())
        return Served(f"pymq://127.0.0.1:{port}", data, log, process)

    try:
        yield start
        for process in processes:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=STOP_TIMEOUT) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)


def test_serve_limit_help_matches_defaults() -> None:
    defaults = ServerLimits()
    assert [field for field, _, _ in SERVE_LIMITS] == [
        field.name for field in dataclasses.fields(ServerLimits)
    ]
    for field, unit, text in SERVE_LIMITS:
        match = re.search(r"\(default: ([^)]+)\)$", text)
        assert match is not None, field
        if unit == "BYTES":
            shown: float = _byte_size(match[1])
        else:
            shown = float(match[1])
        assert shown == getattr(defaults, field), field


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("64KiB", 64 << 10),
        ("64 MiB", 64 << 20),
        ("1gib", 1 << 30),
    ],
)
def test_byte_size_parses_units(text: str, expected: int) -> None:
    assert _byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "1.5MiB", "64MB", "12parsecs", "MiB"])
def test_byte_size_rejects_bad_text(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid size"):
        _byte_size(text)


def test_serve_options_reach_broker_and_server(serve: Any) -> None:
    served = serve(
        "--segment-bytes",
        "256KiB",
        "--max-message-bytes",
        "1000",
        "--max-batch",
        "5",
        "--max-connections",
        "1",
        "--log-level",
        "WARNING",
    )
    with pymq.connect(served.url, reconnect_attempts=0) as client:
        jobs = client.queue("jobs")
        with pytest.raises(MessageTooLargeError) as too_large:
            jobs.put(bytes(1001))
        assert "1001 bytes" in str(too_large.value)
        assert "1000" in str(too_large.value)

        # 12 bodies go as batches of at most 5, and all arrive in order.
        bodies = [b"%d" % index for index in range(12)]
        assert list(jobs.put_many(bodies)) == list(range(12))
        first = jobs.get_many(12, timeout=5.0)
        assert [message.body for message in first] == bodies[:5]
        messages = first + take(jobs, 7)
        assert [message.body for message in messages] == bodies
        jobs.ack_many(messages)

        with pytest.raises(ServerError) as refused:
            pymq.connect(served.url, reconnect_attempts=0)
        assert refused.value.code == 16

    segments = sorted((served.data / "streams" / "jobs" / "log").glob("*.log"))
    assert [path.stat().st_size for path in segments] == [256 << 10]


def test_serve_max_unacked_reaches_server(serve: Any) -> None:
    served = serve("--max-unacked", "3")
    with pymq.connect(served.url, reconnect_attempts=0) as client:
        assert client.max_unacked == 3
        jobs = client.queue("jobs")
        jobs.put_many([b"a", b"b", b"c", b"d", b"e"])
        assert [message.offset for message in jobs.get_many(5, timeout=0)] == [
            0,
            1,
            2,
        ]
        with pytest.raises(ServerError) as full:
            jobs.get(timeout=0)
        assert full.value.code == 19
        assert str(full.value) == (
            "this connection holds 3 unsettled deliveries, max_unacked (3); "
            "ack, nack or reject some of them before fetching more"
        )


def test_get_stops_at_max_unacked(
    serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    served = serve("--max-unacked", "1500")
    with pymq.connect(served.url, reconnect_attempts=0) as client:
        client.queue("jobs").put_many([b"%d" % n for n in range(2000)])
    capsys.readouterr()
    # Two batches of 1,000 would pass the limit: the second is cut to 500,
    # and the third finds no room, which ends the get.
    assert main(["get", "jobs", "-n", "1800", "--url", served.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1500
    assert lines[-1] == "offset=1499 attempt=1 headers={} body=1499"
    with pymq.connect(served.url, reconnect_attempts=0) as client:
        stats = client.queue("jobs").stats()
        assert stats.acked == 1500
        assert stats.depth == 500


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            ["--max-batch", "0"],
            "--max-batch: the value is 0; it must be from 1 to 1000000",
        ),
        (
            ["--max-message-bytes", "32MiB"],
            "max_frame_bytes is 16777216; it must be at least max_message_bytes "
            "(33554432) plus 8192",
        ),
        (
            ["--segment-bytes", "32"],
            "segment_bytes is 32",
        ),
        (
            ["--max-unacked", "0"],
            "--max-unacked: the value is 0; it must be from 1 to 2147483648",
        ),
        (
            ["--max-unacked", "2147483649"],
            "--max-unacked: the value is 2147483649; it must be from 1 to 2147483648",
        ),
        (
            ["--max-connections", "0"],
            "--max-connections: the value is 0; it must be from 1 to 1000000",
        ),
        (
            ["--login-window", "0"],
            "--login-window: the value is 0.0; it must be from 0.01 to 86400",
        ),
    ],
)
def test_serve_rejects_bad_values(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    options: list[str],
    expected: str,
) -> None:
    data = tmp_path / "data"
    code = main(["serve", "--data", str(data), "--port", "0", *options])
    assert code == 2
    assert expected in caplog.records[-1].getMessage()
    assert not data.exists()


def test_serve_rejects_bad_size_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--data", "unused", "--segment-bytes", "64MB"]) == 2
    err = capsys.readouterr().err
    assert "argument --segment-bytes: invalid size '64MB'" in err


def test_serve_loop_choices_match_server() -> None:
    assert SERVE_LOOPS == LOOPS


def round_trip(url: str) -> None:
    """Put, get and ack one message through the server at url."""
    with pymq.connect(url, reconnect_attempts=0) as client:
        jobs = client.queue("jobs")
        assert jobs.put(b"resize photo 17", headers={"kind": "resize"}) == 0
        message = jobs.get(timeout=10.0)
        assert message is not None
        assert message.body == b"resize photo 17"
        assert message.headers == {"kind": "resize"}
        message.ack()
        stats = jobs.stats()
        assert stats.depth == 0
        assert stats.acked == 1


def uvloop_name() -> str:
    """Return the name of the uvloop loop as the start line logs it."""
    import uvloop

    return f"uvloop {uvloop.__version__}"


@pytest.mark.parametrize(
    "loop",
    [
        "asyncio",
        pytest.param(
            "uvloop",
            marks=pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed"),
        ),
    ],
)
def test_serve_loop_round_trip(serve: Any, loop: str) -> None:
    served = serve("--loop", loop)
    round_trip(served.url)
    name = uvloop_name() if loop == "uvloop" else "asyncio"
    line = (
        f" INFO pymq.server: serving {served.data} (fsync=interval, "
        f"pymq {__version__}, event loop: {name})"
    )
    assert line in served.log.read_text()


def test_serve_loop_auto_without_uvloop_is_asyncio(serve: Any) -> None:
    served = serve("--loop", "auto", hide_uvloop=True)
    round_trip(served.url)
    assert "event loop: asyncio)\n" in served.log.read_text()


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed")
def test_serve_loop_auto_with_uvloop_is_uvloop(serve: Any) -> None:
    served = serve("--loop", "auto")
    round_trip(served.url)
    assert f"event loop: {uvloop_name()})\n" in served.log.read_text()


def test_serve_loop_uvloop_without_uvloop_exits_2(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port_file = tmp_path / "port"
    command = [sys.executable, "-c", WITHOUT_UVLOOP, "serve", "--data", str(data)]
    command += ["--port", "0", "--port-file", str(port_file), "--loop", "uvloop"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=START_TIMEOUT, check=False
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith(f" ERROR pymq.cli: {UVLOOP_MISSING}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["tokio", "UVLOOP", "", "uv"])
def test_serve_rejects_bad_loop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    data = tmp_path / "data"
    assert main(["serve", "--data", str(data), "--port", "0", "--loop", value]) == 2
    err = capsys.readouterr().err
    assert (
        f"argument --loop: invalid choice: '{value}' (choose from 'auto', "
        "'asyncio', 'uvloop')"
    ) in err
    assert not data.exists()


def test_run_rejects_bad_loop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(ConfigError) as raised:
        run(data, port=0, loop="tokio")
    assert str(raised.value) == (
        "invalid event loop 'tokio': expected one of auto, asyncio, uvloop"
    )
    assert not data.exists()


def test_run_uvloop_without_uvloop_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import uvloop` raise ImportError.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    data = tmp_path / "data"
    with pytest.raises(ConfigError) as raised:
        run(data, port=0, loop="uvloop")
    assert str(raised.value) == (
        "the uvloop event loop is not available: import of uvloop halted; None "
        "in sys.modules. Install it with: pip install 'pymq[fast]'"
    )
    assert not data.exists()


def run_serve(*options: str) -> subprocess.CompletedProcess[str]:
    """Run `pymq serve` that is expected to fail at start; return its result."""
    env = {key: value for key, value in os.environ.items() if key != "PYMQ_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "pymq", "serve", "--port", "0", *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=START_TIMEOUT,
    )


def test_serve_port_file_in_missing_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port_file = tmp_path / "nodir" / "p.port"
    result = run_serve("--data", str(data), "--port-file", str(port_file))
    assert result.returncode == 2
    assert result.stderr.endswith(
        f"ERROR pymq.cli: cannot write --port-file {port_file}: "
        f"No such file or directory\n"
    )
    assert len(result.stderr.splitlines()) == 1
    assert not data.exists()


def test_serve_port_file_is_directory(tmp_path: Path) -> None:
    folder = tmp_path / "adir"
    folder.mkdir()
    result = run_serve("--data", str(tmp_path / "data"), "--port-file", str(folder))
    assert result.returncode == 2
    assert result.stderr.endswith(
        f"ERROR pymq.cli: cannot write --port-file {folder}: it is a directory\n"
    )
    assert len(result.stderr.splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adir"]


def test_serve_unix_path_too_long(tmp_path: Path) -> None:
    path = tmp_path / ("u" * 120 + ".sock")
    size = len(os.fsencode(str(path)))
    result = run_serve("--data", str(tmp_path / "data"), "--unix", str(path))
    assert result.returncode == 2
    assert result.stderr.endswith(
        f"ERROR pymq.cli: Unix socket path {path} is {size} bytes; the limit is "
        f"107 bytes on Linux, so choose a shorter path\n"
    )
    assert not (tmp_path / "data").exists()


def test_serve_unix_path_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    result = run_serve("--data", str(tmp_path / "data"), "--unix", str(path))
    assert result.returncode == 2
    assert result.stderr.endswith(
        f"ERROR pymq.cli: Unix socket path {path} is a regular file, not a "
        f"socket; remove it or choose another path\n"
    )
    assert path.read_text() == "keep me"


def test_serve_removes_its_socket_at_stop(serve: Any, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    served = serve("--unix", str(path))
    with pymq.connect(f"pymq+unix://{path}") as client:
        assert client.queue("jobs").put(b"x") == 0
    assert path.is_socket()
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=STOP_TIMEOUT) == 0
    assert not os.path.lexists(path)
    assert "Task was destroyed" not in served.log.read_text()


def test_serve_keeps_socket_it_did_not_create(serve: Any, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    served = serve("--unix", str(path))
    # Another process replaces the socket file while the server runs.
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=STOP_TIMEOUT) == 0
        assert path.is_socket()


def test_put_stdin_sends_lines_of_a_slow_pipe(serve: Any) -> None:
    served = serve()
    env = {key: value for key, value in os.environ.items() if key != "PYMQ_TOKEN"}
    command = [sys.executable, "-m", "pymq", "put", "slow", "-", "--url", served.url]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdin is not None
        # Two lines, then the pipe stays open, as with tail -f.
        process.stdin.write(b"first\nsecond\n")
        process.stdin.flush()
        with pymq.connect(served.url, reconnect_attempts=0) as client:
            deadline = time.monotonic() + START_TIMEOUT
            while client.names().get("slow") != "queue" or (
                client.queue("slow").stats().depth < 2
            ):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the lines were not put"
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=STOP_TIMEOUT) == 130
            assert process.stderr is not None
            assert process.stderr.read() == (
                b"pymq: put 2 messages to slow, then failed\npymq: interrupted\n"
            )
            messages = client.queue("slow").get_many(10, timeout=0)
            assert [message.body for message in messages] == [b"first", b"second"]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
