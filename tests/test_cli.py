"""The pymq command line, in-process through main() and as a subprocess.

Client commands run with --data against a data directory under tmp_path;
the tests of --url start their own server on 127.0.0.1.
"""

from __future__ import annotations

import bisect
import datetime
import errno
import fcntl
import importlib.util
import io
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pymq
from pymq import cli
from pymq._version import __version__
from pymq.cli import EXIT_CODES, format_table, main, read_token
from tests.server_loop import loop_options

# Bounds that only stop a hung test. No test asserts on how fast anything is.
PROCESS_TIMEOUT = 60.0
SERVER_START_TIMEOUT = 30.0

HAS_CLIENT = hasattr(pymq, "connect")
HAS_SERVER = importlib.util.find_spec("pymq.server") is not None


@pytest.fixture(autouse=True)
def no_broker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep PYMQ_URL and PYMQ_TOKEN of the caller's shell out of the CLI."""
    monkeypatch.delenv("PYMQ_URL", raising=False)
    monkeypatch.delenv("PYMQ_TOKEN", raising=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data directory that exists and contains no queues yet."""
    folder = tmp_path / "data"
    pymq.open(folder).close()
    return folder


def cli_process(
    *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m pymq args` in a subprocess, without PYMQ_ variables."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PYMQ_")
    }
    return subprocess.run(
        [sys.executable, "-m", "pymq", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=PROCESS_TIMEOUT,
    )


def feed_stdin(monkeypatch: pytest.MonkeyPatch, content: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(content)))


def free_port() -> int:
    """Return a port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def table_rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines()]


STATS_HEADER = [
    "name",
    "kind",
    "depth",
    "in_flight",
    "waiting",
    "acked",
    "dead_lettered",
    "oldest_unacked_age",
    "damaged",
    "skipped",
]


def utc_text(nanoseconds: int) -> str:
    seconds, remainder = divmod(nanoseconds, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{remainder // 1000:06d}Z"


# --version, --help and usage ---------------------------------------------------


def test_version_prints_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"pymq {__version__}\n"
    assert captured.err == ""


def test_version_through_python_m() -> None:
    result = cli_process("--version")
    assert result.returncode == 0
    assert result.stdout == f"pymq {__version__}\n".encode()
    assert result.stderr == b""


def test_help_lists_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "exit codes:" in lines
    for code, meaning in EXIT_CODES.items():
        assert f"  {int(code):<4} {meaning}" in lines


def test_help_lists_client_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heading = (
        "client options of put, get, stats and dlq, which may also come before COMMAND:"
    )
    assert heading in lines
    listed = lines[lines.index(heading) + 1 : lines.index(heading) + 7]
    assert [line.split()[:2] for line in listed] == [
        ["--url", "URL"],
        ["--data", "DIR"],
        ["--token-file", "PATH"],
        ["--tls-ca", "PATH"],
        ["--tls-cert", "PATH"],
        ["--tls-key", "PATH"],
    ]
    assert listed[0].endswith(
        "a running pymq serve (default: $PYMQ_URL, else pymq://127.0.0.1:7420)"
    )


def test_no_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.endswith("pymq: error: the following arguments are required: COMMAND\n")


def test_url_and_data_together_rejected(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["stats", "--url", "pymq://127.0.0.1:1", "--data", str(data)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.endswith(
        "pymq stats: error: argument --data: not allowed with argument --url\n"
    )


def test_client_options_before_command(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs", max_deliveries=1)
        jobs.put_many([b"a", b"b"])
        rejected = jobs.get(timeout=0)
        assert rejected is not None
        rejected.reject("bad input")
    assert main(["stats", "jobs", "--data", str(data)]) == 0
    after = table_rows(capsys.readouterr().out)
    assert main(["--data", str(data), "stats", "jobs"]) == 0
    before = table_rows(capsys.readouterr().out)
    # Every column but oldest_unacked_age, which grows between the calls.
    age = STATS_HEADER.index("oldest_unacked_age")
    assert [row[:age] + row[age + 1 :] for row in before] == [
        row[:age] + row[age + 1 :] for row in after
    ]
    assert before[1][:3] == ["jobs", "queue", "1"]
    assert main([f"--data={data}", "dlq", "list", "jobs"]) == 0
    assert "bad input" in capsys.readouterr().out


def test_repeated_header_key_rejected(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["put", "jobs", "x", "--data", str(data)]
    code = main([*args, "--header", "k=v", "--header", "k=w"])
    assert code == 2
    assert "header 'k' is given twice (k=v and k=w)" in capsys.readouterr().err
    with pymq.open(data) as broker:
        assert "jobs" not in broker.names()


def test_token_file_with_data_rejected(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    assert main(["stats", "--data", str(data), "--token-file", str(token)]) == 2
    assert (
        capsys.readouterr().err
        == "pymq: --token-file applies only with --url, not with --data\n"
    )


def test_negative_timeout_rejected(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["get", "jobs", "--data", str(data), "--timeout", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.endswith(
        "pymq get: error: argument --timeout: -1 seconds must be from 0 to less "
        "than 1e+09\n"
    )


def test_missing_data_dir_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    assert main(["stats", "--data", str(missing)]) == 2
    assert capsys.readouterr().err == f"pymq: data directory {missing} does not exist\n"
    assert not missing.exists()


def test_data_dir_that_is_a_file_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    for command in (["put", "jobs", "body"], ["stats"], ["get", "jobs"]):
        assert main([*command, "--data", str(afile)]) == 2
        assert capsys.readouterr().err == (
            f"pymq: data directory {afile} is not a directory\n"
        )
    assert afile.read_text() == "not a directory\n"


def test_data_dir_under_a_file_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["put", "jobs", "body", "--data", str(afile / "sub")]) == 2
    assert capsys.readouterr().err == (
        f"pymq: cannot open data directory {afile / 'sub'}: NotADirectoryError: "
        f"[Errno {errno.ENOTDIR}] {os.strerror(errno.ENOTDIR)}: '{afile / 'sub'}'\n"
    )


def test_empty_data_dir_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["put", "jobs", "body"], ["stats"]):
        assert main([*command, "--data", ""]) == 2
        assert capsys.readouterr().err == (
            "pymq: --data is empty; give the path of a data directory\n"
        )
    assert list(tmp_path.iterdir()) == []


def without_permissions() -> list[str]:
    """Return the command prefix that runs a command without root's rights.

    root passes every permission check, so as root the command runs in a
    new user namespace, where the files of the real root are not its own
    to override.
    """
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None:
        pytest.skip("running as root without the unshare command")
    probe = subprocess.run(["unshare", "--user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root, and user namespaces are not allowed")
    return ["unshare", "--user"]


def run_without_permissions(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PYMQ_")
    }
    return subprocess.run(
        [*without_permissions(), sys.executable, "-m", "pymq", *args],
        capture_output=True,
        env=env,
        timeout=PROCESS_TIMEOUT,
    )


def test_data_dir_without_permission_exits_2(tmp_path: Path) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir(mode=0o500)
    denied = f"[Errno {errno.EACCES}] {os.strerror(errno.EACCES)}"
    try:
        for command in (["put", "jobs", "body"], ["stats"]):
            result = run_without_permissions(*command, "--data", str(folder))
            assert result.returncode == 2
            assert result.stdout == b""
            assert result.stderr.decode() == (
                f"pymq: cannot open data directory {folder}: PermissionError: "
                f"{denied}: '{folder / 'LOCK'}'\n"
            )
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_queue_folder_without_permission_exits_2(data: Path) -> None:
    # The broker opens, but cannot make the folder of a new queue.
    data.chmod(0o500)
    try:
        result = run_without_permissions("put", "jobs", "body", "--data", str(data))
    finally:
        data.chmod(0o755)
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode() == (
        f"pymq: put failed: PermissionError: [Errno {errno.EACCES}] "
        f"{os.strerror(errno.EACCES)}: '{data / 'streams'}'\n"
    )


# Tokens --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("secret", "secret"),
        ("secret\n", "secret"),
        ("secret\r\n", "secret"),
        (" spaced secret \n", " spaced secret "),
    ],
)
def test_read_token_strips_one_newline(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "token"
    path.write_bytes(content.encode())
    assert read_token(str(path)) == expected


def test_read_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYMQ_TOKEN", "from-env")
    assert read_token(None) == "from-env"


def test_read_token_none_without_source() -> None:
    assert read_token(None) is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [("", "is empty"), ("\n", "is empty"), ("a\nb\n", "has more than one line")],
)
def test_serve_rejects_bad_token_file(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content: str,
    problem: str,
) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    code = main(["serve", "--data", str(tmp_path / "data"), "--token-file", str(token)])
    assert code == 2
    messages = [record.getMessage() for record in caplog.records]
    expected = f"token file {token} {problem}"
    if problem == "has more than one line":
        expected += "; it must contain only the token"
    assert messages[-1] == expected
    assert not (tmp_path / "data").exists()


def test_serve_rejects_empty_environment_token(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PYMQ_TOKEN", "")
    assert main(["serve", "--data", str(tmp_path / "data")]) == 2
    assert caplog.records[-1].getMessage() == (
        "PYMQ_TOKEN is set but empty; set it to the token or unset it"
    )


def test_serve_rejects_missing_token_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "absent"
    code = main(["serve", "--data", str(tmp_path / "data"), "--token-file", str(token)])
    assert code == 2
    assert caplog.records[-1].getMessage() == (
        f"cannot read token file {token}: No such file or directory"
    )


# put -------------------------------------------------------------------------------


def test_put_single_body_prints_offset(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["put", "jobs", "first", "--data", str(data)]) == 0
    assert main(["put", "jobs", "second", "--data", str(data)]) == 0
    assert capsys.readouterr().out == (
        "put 1 message to jobs at offset 0\nput 1 message to jobs at offset 1\n"
    )
    with pymq.open(data) as broker:
        messages = broker.queue("jobs").get_many(3, timeout=0)
        assert [m.body for m in messages] == [b"first", b"second"]
        assert [m.headers for m in messages] == [{}, {}]


@pytest.mark.parametrize(
    "options",
    [
        ["--header", "kind=resize"],
        ["--progress", "--header", "kind=resize"],
        ["--timeout", "1.5", "--header", "kind=resize"],
    ],
    ids=["header", "progress", "timeout"],
)
def test_put_options_between_queue_and_body(
    data: Path, capsys: pytest.CaptureFixture[str], options: list[str]
) -> None:
    assert main(["put", "jobs", *options, "the body", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "put 1 message to jobs at offset 0\n"
    assert captured.err == ""
    with pymq.open(data) as broker:
        message = broker.queue("jobs").get(timeout=0)
        assert message is not None
        assert message.body == b"the body"
        assert message.headers == {"kind": "resize"}


def test_put_stdin_with_options_between(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    feed_stdin(monkeypatch, b"one\ntwo\n")
    assert main(["put", "jobs", "--header", "k=v", "-", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "put 2 messages to jobs\n"
    with pymq.open(data) as broker:
        messages = broker.queue("jobs").get_many(3, timeout=0)
        assert [m.body for m in messages] == [b"one", b"two"]
        assert [m.headers for m in messages] == [{"k": "v"}, {"k": "v"}]


def test_put_two_bodies_rejected(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["put", "jobs", "one", "--header", "k=v", "two", "--data", str(data)]) == 2
    )
    assert capsys.readouterr().err.endswith(
        "pymq: error: unrecognized arguments: two\n"
    )
    with pymq.open(data) as broker:
        assert broker.names() == {}


def test_put_creates_queue_and_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "new"
    assert main(["put", "jobs", "body", "--data", str(folder)]) == 0
    assert capsys.readouterr().out == "put 1 message to jobs at offset 0\n"
    with pymq.open(folder) as broker:
        assert broker.names() == {"jobs": "queue"}


def test_put_headers_parsed(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "put",
            "jobs",
            "body",
            "--header",
            "kind=resize",
            "--header",
            "formula=a=b",
            "--header",
            "empty=",
            "--data",
            str(data),
        ]
    )
    assert code == 0
    with pymq.open(data) as broker:
        message = broker.queue("jobs").get(timeout=0)
        assert message is not None
        assert message.headers == {"kind": "resize", "formula": "a=b", "empty": ""}


@pytest.mark.parametrize("header", ["novalue", "=value"])
def test_put_invalid_header_rejected(
    data: Path, capsys: pytest.CaptureFixture[str], header: str
) -> None:
    code = main(["put", "jobs", "body", "--header", header, "--data", str(data)])
    assert code == 2
    assert capsys.readouterr().err == (
        f"pymq: invalid header {header!r}: write it as KEY=VALUE\n"
    )
    with pymq.open(data) as broker:
        assert broker.names() == {}


RESERVED_MESSAGE = (
    "pymq: header {key!r} is reserved: pymq writes x-attempts, x-dead-at, "
    "x-for-group, x-group, x-offset, x-reason, x-source when it moves a message "
    "to a dead-letter queue and back, so puts to other queues reject these "
    "names; use another name\n"
)


@pytest.mark.parametrize("key", ["x-source", "x-for-group", "x-dead-at"])
def test_put_reserved_header_exits_2(tmp_path: Path, key: str) -> None:
    folder = tmp_path / "data"
    # Nothing listens on the --url port: the header is checked before
    # connecting, as it is before --data is opened.
    for where in (
        ["--data", str(folder)],
        ["--url", f"pymq://127.0.0.1:{free_port()}"],
    ):
        result = cli_process("put", "jobs", "x", "--header", f"{key}=a", *where)
        assert result.returncode == 2
        assert result.stdout == b""
        assert result.stderr.decode() == RESERVED_MESSAGE.format(key=key)
    assert not folder.exists()


@pytest.mark.skipif(
    not (HAS_CLIENT and HAS_SERVER), reason="pymq.server or pymq.connect is missing"
)
def test_put_reserved_header_through_server(
    served: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, token = served
    remote = ["--url", url, "--token-file", str(token)]
    assert main(["put", "jobs", "x", "--header", "x-group=g", *remote]) == 2
    assert capsys.readouterr().err == RESERVED_MESSAGE.format(key="x-group")
    assert main(["stats", *remote]) == 0
    assert "no queues" in capsys.readouterr().err


def test_put_reserved_header_into_dlq_accepted(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs")
    where = ["--data", str(data)]
    assert main(["put", "jobs.dlq", "x", "--header", "x-source=jobs", *where]) == 0
    assert capsys.readouterr().out == "put 1 message to jobs.dlq at offset 0\n"
    with pymq.open(data) as broker:
        message = broker.queue("jobs.dlq").get(timeout=0)
        assert message is not None
        assert message.headers == {"x-source": "jobs"}


NOT_UTF8_HEADERS = [
    (b"k=a\xff", "value b'a\\xff'"),
    (b"\xfe=v", "name b'\\xfe'"),
]


@pytest.mark.parametrize(("header", "part"), NOT_UTF8_HEADERS)
def test_put_header_not_utf8_exits_2(tmp_path: Path, header: bytes, part: str) -> None:
    folder = tmp_path / "data"
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PYMQ_")
    }
    command = [sys.executable, "-m", "pymq", "put", "jobs", "x", "--header", header]
    result = subprocess.run(
        [*command, "--data", str(folder)],
        capture_output=True,
        env=env,
        timeout=PROCESS_TIMEOUT,
    )
    assert result.returncode == 2
    assert result.stderr.decode() == (
        f"pymq: header {part} is not valid UTF-8; header names and values "
        f"must be UTF-8 text\n"
    )
    assert not folder.exists()


def test_put_header_name_too_long_exits_2(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header = "k" * 70_000 + "=v"
    assert main(["put", "jobs", "x", "--header", header, "--data", str(data)]) == 2
    assert capsys.readouterr().err == (
        "pymq: put failed: ValueError: header name is 70000 bytes; the maximum "
        "is 65535\n"
    )


def test_put_to_group_exits_2(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["put", "events/billing", "x", "--data", str(data)]) == 2
    assert capsys.readouterr().err == (
        "pymq: put takes a queue or a stream, not the group events/billing; put "
        "to the stream (events), and each of its groups receives the message\n"
    )
    with pymq.open(data) as broker:
        assert broker.names() == {}


def test_put_invalid_queue_name_rejected(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["put", ".hidden", "body", "--data", str(data)]) == 2
    assert capsys.readouterr().err == (
        "pymq: invalid queue name '.hidden': use ASCII letters, digits, '.', '_', "
        "'-' and ':', and do not start with '.'\n"
    )


def test_put_stdin_lines_in_batches(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bodies = [f"line {number}".encode() for number in range(2500)]
    feed_stdin(monkeypatch, b"".join(body + b"\n" for body in bodies))
    assert main(["put", "jobs", "-", "--header", "batch=7", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "put 2500 messages to jobs\n"
    assert captured.err == ""
    with pymq.open(data) as broker:
        queue = broker.queue("jobs")
        messages = []
        for _ in range(3):
            messages.extend(queue.get_many(1000, timeout=0))
        assert [m.body for m in messages] == bodies
        assert [m.offset for m in messages] == list(range(2500))
        assert {tuple(m.headers.items()) for m in messages} == {(("batch", "7"),)}


def test_put_stdin_line_too_long_names_line(data: Path) -> None:
    limit = 1 << 20  # max_message_bytes of pymq.open() by default
    lines = [b"a"] * 1500 + [b"x" * (limit + 1), b"b"]
    result = cli_process(
        "put", "jobs", "-", "--data", str(data), stdin=b"\n".join(lines) + b"\n"
    )
    assert result.returncode == 7
    assert result.stderr == (
        b"pymq: put 1500 messages to jobs, then failed\n"
        b"pymq: line 1501 of stdin is longer than max_message_bytes (1048576 bytes)\n"
    )
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 1500


def test_put_stdin_line_at_limit_is_put(data: Path) -> None:
    body = b"x" * (1 << 20)
    result = cli_process("put", "jobs", "-", "--data", str(data), stdin=body + b"\n")
    assert result.returncode == 0, result.stderr
    with pymq.open(data) as broker:
        message = broker.queue("jobs").get(timeout=0)
        assert message is not None
        assert message.body == body


def test_put_stdin_without_newline_fails_fast(data: Path) -> None:
    result = cli_process("put", "jobs", "-", "--data", str(data), stdin=bytes(3 << 20))
    assert result.returncode == 7
    assert result.stderr == (
        b"pymq: line 1 of stdin is longer than max_message_bytes (1048576 bytes)\n"
    )


def test_put_stdin_batches_bounded_by_bytes(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Records the size of each batch that reaches the queue's put_many.
    sizes: list[int] = []
    put_lines = cli._put_lines

    def put_lines_recorded(target: Any, *args: Any) -> int:
        put_many = target.put_many

        def put_many_recorded(batch: list[bytes], **options: Any) -> Any:
            sizes.append(len(batch))
            return put_many(batch, **options)

        monkeypatch.setattr(target, "put_many", put_many_recorded)
        return put_lines(target, *args)

    monkeypatch.setattr(cli, "_put_lines", put_lines_recorded)
    body = b"y" * (1 << 19)
    feed_stdin(monkeypatch, (body + b"\n") * 40)
    assert main(["put", "jobs", "-", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "put 40 messages to jobs\n"
    # 8 MiB of bodies is 16 lines of 512 KiB.
    assert sizes == [16, 16, 8]


def test_put_stdin_interrupted_exits_130(data: Path) -> None:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PYMQ_")
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "pymq", "put", "jobs", "-", "--data", str(data)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdin is not None
        # Nothing is written: put waits for its first line when interrupted.
        # The queue exists once put has opened it, before it reads stdin.
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while not (data / "streams" / "jobs" / "kind").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "put did not open the queue"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=PROCESS_TIMEOUT) == 130
        assert process.stderr is not None
        assert process.stderr.read() == b"pymq: interrupted\n"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 0


def test_put_body_defaults_to_stdin(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    feed_stdin(monkeypatch, b"one\ntwo\n")
    assert main(["put", "jobs", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "put 2 messages to jobs\n"


def test_put_stdin_keeps_bytes_exact(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    feed_stdin(monkeypatch, b"a\n\nb\xff\r\nlast without newline")
    assert main(["put", "jobs", "-", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "put 4 messages to jobs\n"
    with pymq.open(data) as broker:
        messages = broker.queue("jobs").get_many(10, timeout=0)
        assert [m.body for m in messages] == [
            b"a",
            b"",
            b"b\xff\r",
            b"last without newline",
        ]


def test_put_empty_stdin_puts_nothing(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    feed_stdin(monkeypatch, b"")
    assert main(["put", "jobs", "-", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "put 0 messages to jobs\n"


def test_put_progress_bar_only_on_request(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    feed_stdin(monkeypatch, b"a\nb\nc\n")
    assert main(["put", "jobs", "-", "--data", str(data)]) == 0
    assert capsys.readouterr().err == ""

    feed_stdin(monkeypatch, b"a\nb\nc\n")
    assert main(["put", "jobs", "-", "--progress", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "put 3 messages to jobs\n"
    assert "put jobs: 3msg" in captured.err


def test_put_into_stream_reaches_group(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.stream("events").group("billing")
    assert main(["put", "events", "paid", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "put 1 message to events at offset 0\n"
    with pymq.open(data) as broker:
        assert broker.names() == {"events": "stream"}
        message = broker.stream("events").group("billing").get(timeout=0)
        assert message is not None
        assert message.body == b"paid"


def test_put_full_queue_reports_partial_count(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs", max_length=1200)
    feed_stdin(monkeypatch, b"x\n" * 1500)
    assert main(["put", "jobs", "-", "--data", str(data)]) == 7
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "pymq: put 1000 messages to jobs, then failed\n"
        "pymq: put failed: QueueFull: queue jobs is full: max_length 1200 messages\n"
    )
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 1000


# get -------------------------------------------------------------------------------


def test_get_prints_fields_and_acks(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs").put(b"resize photo 17", headers={"kind": "resize"})
    assert main(["get", "jobs", "--data", str(data)]) == 0
    assert capsys.readouterr().out == (
        'offset=0 attempt=1 headers={"kind": "resize"} body=resize photo 17\n'
    )
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 0


def test_get_prints_non_ascii_headers_as_text(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs").put("naïve".encode(), headers={"é": "ü"})
    assert main(["get", "jobs", "--no-ack", "--data", str(data)]) == 0
    assert capsys.readouterr().out == (
        'offset=0 attempt=1 headers={"é": "ü"} body=naïve\n'
    )
    # JSON output stays ASCII, the body included.
    assert main(["get", "jobs", "--json", "--data", str(data)]) == 0
    record = capsys.readouterr().out
    assert '"headers": {"\\u00e9": "\\u00fc"}' in record
    assert '"body": "na\\u00efve"' in record


def test_get_count_limits_messages(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs").put_many([b"a", b"b", b"c", b"d", b"e"])
    assert main(["get", "jobs", "-n", "3", "--data", str(data)]) == 0
    assert capsys.readouterr().out == (
        "offset=0 attempt=1 headers={} body=a\n"
        "offset=1 attempt=1 headers={} body=b\n"
        "offset=2 attempt=1 headers={} body=c\n"
    )
    with pymq.open(data) as broker:
        remaining = broker.queue("jobs").get_many(10, timeout=0)
        assert [m.body for m in remaining] == [b"d", b"e"]


def test_get_more_than_one_batch(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs").put_many([b"%d" % n for n in range(2500)])
    assert main(["get", "jobs", "-n", "2400", "--json", "--data", str(data)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["body"] for record in records] == [str(n) for n in range(2400)]
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 100


def test_get_no_ack_makes_available_again(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs").put(b"again")
    assert main(["get", "jobs", "--no-ack", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "offset=0 attempt=1 headers={} body=again\n"
    with pymq.open(data) as broker:
        message = broker.queue("jobs").get(timeout=0)
        assert message is not None
        assert message.offset == 0
        assert message.attempt == 2


def test_get_json_fields(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs").put("café".encode(), headers={"kind": "text"})
    assert main(["get", "jobs", "--json", "--no-ack", "--data", str(data)]) == 0
    record = json.loads(capsys.readouterr().out)
    with pymq.open(data) as broker:
        message = broker.queue("jobs").get(timeout=0)
        assert message is not None
        timestamp = message.timestamp
    assert record == {
        "offset": 0,
        "attempt": 1,
        "timestamp": timestamp,
        "headers": {"kind": "text"},
        "body": "café",
    }


def test_get_binary_body_shown_as_bytes(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs").put_many([b"\xff\x00", b"\xfe"])
    assert main(["get", "jobs", "--data", str(data)]) == 0
    assert (
        capsys.readouterr().out == "offset=0 attempt=1 headers={} body=b'\\xff\\x00'\n"
    )
    assert main(["get", "jobs", "--json", "--data", str(data)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["body_base64"] == "/g=="
    assert "body" not in record


def test_get_empty_queue_exits_1(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs")
    assert main(["get", "jobs", "--data", str(data)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "pymq: queue jobs had no message available\n"
    assert main(["get", "jobs", "--timeout", "0.2", "--data", str(data)]) == 1
    assert capsys.readouterr().err == (
        "pymq: queue jobs had no message available within 0.2 seconds\n"
    )


def test_get_stream_name_exits_2(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.stream("events")
    assert main(["get", "events", "--data", str(data)]) == 2
    assert capsys.readouterr().err == (
        "pymq: events is a stream, not a queue; read it through a group: pymq "
        "get events/GROUP for the group GROUP (it has no groups yet)\n"
    )
    with pymq.open(data) as broker:
        events = broker.stream("events")
        events.group("billing")
        events.group("audit")
    assert main(["get", "events", "--data", str(data)]) == 2
    assert capsys.readouterr().err == (
        "pymq: events is a stream, not a queue; read it through a group: pymq "
        "get events/GROUP for the group GROUP (its groups: audit, billing)\n"
    )


def test_get_group_prints_and_acks(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        events = broker.stream("events")
        events.group("billing")
        events.group("audit")
        events.put_many([b"one", b"two", b"three"])
    where = ["--data", str(data)]
    assert main(["get", "events/billing", "-n", "2", "--no-ack", *where]) == 0
    assert capsys.readouterr().out == (
        "offset=0 attempt=1 headers={} body=one\n"
        "offset=1 attempt=1 headers={} body=two\n"
    )
    assert main(["get", "events/billing", "-n", "5", "--json", *where]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["body"] for line in lines] == ["one", "two", "three"]
    assert [json.loads(line)["attempt"] for line in lines] == [2, 2, 1]
    assert main(["get", "events/billing", *where]) == 1
    assert capsys.readouterr().err == (
        "pymq: group billing of stream events had no message available\n"
    )
    with pymq.open(data) as broker:
        events = broker.stream("events")
        assert events.group("billing").stats().depth == 0
        # The other group still has every message.
        assert events.group("audit").stats().depth == 3


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("events/nope", "group nope of stream events does not exist"),
        ("nope/billing", "group billing of stream nope does not exist"),
        ("jobs/billing", "group billing of stream jobs does not exist"),
    ],
)
def test_get_missing_group_exits_5(
    data: Path, capsys: pytest.CaptureFixture[str], target: str, message: str
) -> None:
    with pymq.open(data) as broker:
        broker.stream("events").group("billing")
        broker.queue("jobs")
    assert main(["get", target, "--data", str(data)]) == 5
    assert capsys.readouterr().err == f"pymq: {message}\n"
    with pymq.open(data) as broker:
        assert broker.names() == {"events": "stream", "jobs": "queue"}
        assert broker.groups("events") == ["billing"]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["get", "nope"], "queue nope does not exist"),
        (["stats", "nope"], "queue nope does not exist"),
        (
            ["dlq", "list", "nope"],
            "queue nope does not exist, nor a stream group of that name",
        ),
        (
            ["dlq", "redrive", "nope"],
            "queue nope does not exist, nor a stream group of that name",
        ),
    ],
)
def test_unknown_queue_exits_5_without_creating(
    data: Path,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    message: str,
) -> None:
    with pymq.open(data) as broker:
        broker.queue("other")
    assert main([*command, "--data", str(data)]) == 5
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"pymq: {message}\n"
    with pymq.open(data) as broker:
        assert broker.names() == {"other": "queue"}


def test_unknown_queue_exits_5_in_subprocess(data: Path) -> None:
    result = cli_process("get", "nope", "--data", str(data))
    assert result.returncode == 5
    assert result.stdout == b""
    assert result.stderr == b"pymq: queue nope does not exist\n"


def test_get_broken_pipe_nacks_messages(data: Path) -> None:
    # 5,000 lines are far more than a pipe buffer holds, so writing them
    # to a pipe whose reader is gone must fail.
    with pymq.open(data) as broker:
        broker.queue("jobs").put_many([b"x" * 40] * 5000)
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PYMQ_")
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pymq",
            "get",
            "jobs",
            "-n",
            "5000",
            "--data",
            str(data),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
    assert process.returncode == 141
    assert stderr == b""
    with pymq.open(data) as broker:
        stats = broker.queue("jobs").stats()
        assert stats.depth == 5000
        assert stats.acked == 0


class ClosingStdout(io.StringIO):
    """A stdout whose reader goes away after it has taken `accepted` lines."""

    def __init__(self, accepted: int) -> None:
        super().__init__()
        self.accepted = accepted

    def flush(self) -> None:
        if self.getvalue().count("\n") > self.accepted:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


@pytest.mark.parametrize("accepted", [0, 1, 7])
def test_get_broken_pipe_acks_accepted_lines(
    data: Path, monkeypatch: pytest.MonkeyPatch, accepted: int
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs").put_many([b"%d" % i for i in range(10)])
    monkeypatch.setattr(sys, "stdout", ClosingStdout(accepted))
    assert main(["get", "jobs", "-n", "10", "--data", str(data)]) == 141
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        assert jobs.stats().depth == 10 - accepted
        again = jobs.get_many(20, timeout=0)
        assert [m.offset for m in again] == list(range(accepted, 10))
        assert [m.attempt for m in again] == [2] * (10 - accepted)


def test_get_broken_pipe_no_ack_nacks_all(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs").put_many([b"%d" % i for i in range(10)])
    monkeypatch.setattr(sys, "stdout", ClosingStdout(4))
    assert main(["get", "jobs", "-n", "10", "--no-ack", "--data", str(data)]) == 141
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 10


def expected_get_lines(count: int, body: bytes) -> list[bytes]:
    return [
        b"offset=%d attempt=1 headers={} body=%s\n" % (offset, body)
        for offset in range(count)
    ]


@pytest.mark.skipif(
    not hasattr(fcntl, "F_SETPIPE_SZ"), reason="F_SETPIPE_SZ is Linux only"
)
def test_get_into_closed_pipe_acks_what_the_pipe_took(data: Path) -> None:
    """A real pipe of one page: get fills it and blocks, then the reader goes.

    Each line is one write of less than PIPE_BUF bytes, so the pipe holds
    whole lines only, and FIONREAD tells how many. Nothing is read, since
    that would make room for more.
    """
    count, body = 1000, b"x" * 40
    with pymq.open(data) as broker:
        broker.queue("jobs").put_many([body] * count)
    lines = expected_get_lines(count, body)
    # Where each line ends in get's output.
    ends = list(itertools.accumulate(len(line) for line in lines))
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    capacity = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PYMQ_")
    }
    command = ["get", "jobs", "-n", str(count), "--data", str(data)]
    process = subprocess.Popen(
        [sys.executable, "-m", "pymq", *command],
        stdout=write_end,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(write_end)
    try:
        # Wait until the next line cannot fit: get is blocked in its write.
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while True:
            raw = fcntl.ioctl(read_end, termios.FIONREAD, b"\0\0\0\0")
            pending = struct.unpack("i", raw)[0]
            taken = bisect.bisect_right(ends, pending)
            if pending + len(lines[taken]) > capacity:
                break
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"{pending} bytes in the pipe"
            time.sleep(0.01)
    finally:
        os.close(read_end)
    _, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
    assert process.returncode == 141
    assert stderr == b""
    assert pending == ends[taken - 1]
    assert 1 <= taken < count
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        assert jobs.stats().depth == count - taken
        again = jobs.get_many(count, timeout=0)
        assert [m.offset for m in again] == list(range(taken, count))
        assert {m.attempt for m in again} == {2}


# stats -----------------------------------------------------------------------------


def test_stats_one_queue_values(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pymq.open(data) as broker:
        queue = broker.queue("jobs")
        queue.put_many([b"a", b"b", b"c", b"d"])
        first = queue.get(timeout=0)
        assert first is not None
        first.ack()
        # Left in flight: the next open makes it available again.
        assert queue.get(timeout=0) is not None
    assert main(["stats", "jobs", "--data", str(data)]) == 0
    output = capsys.readouterr().out
    rows = table_rows(output)
    assert rows[0] == STATS_HEADER
    assert len(rows) == 2
    assert rows[1][:7] == ["jobs", "queue", "3", "0", "1", "0", "0"]
    assert float(rows[1][7]) >= 0.0
    assert rows[1][8:] == ["0", "0"]
    lengths = {len(line) for line in output.splitlines()}
    assert len(lengths) == 1


def test_stats_drained_queue_table_exact(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        queue = broker.queue("jobs")
        queue.put(b"a")
        message = queue.get(timeout=0)
        assert message is not None
        message.ack()
    assert main(["stats", "--data", str(data)]) == 0
    assert capsys.readouterr().out == (
        "name  kind   depth  in_flight  waiting  acked  dead_lettered  "
        "oldest_unacked_age  damaged  skipped\n"
        "jobs  queue      0          0        0      0              0  "
        "                 -        0        0\n"
    )


def test_stats_lists_queues_and_groups(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        jobs.put_many([b"a", b"b"])
        rejected = jobs.get(timeout=0)
        assert rejected is not None
        rejected.reject("bad input")
        events = broker.stream("events")
        events.group("billing")
        audit = events.group("audit")
        events.put_many([b"e1", b"e2", b"e3"])
        for message in audit.get_many(3, timeout=0):
            message.ack()
        broker.stream("no-groups")
    assert main(["stats", "--data", str(data)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0] == STATS_HEADER
    assert [row[:5] for row in rows[1:]] == [
        ["events/audit", "group", "0", "0", "0"],
        ["events/billing", "group", "3", "0", "0"],
        ["jobs", "queue", "1", "0", "0"],
        ["jobs.dlq", "queue", "1", "0", "0"],
    ]
    assert [row[8:] for row in rows[1:]] == [["0", "0"]] * 4
    with pymq.open(data) as broker:
        assert broker.groups("events") == ["audit", "billing"]
        assert broker.groups("no-groups") == []


def test_stats_stream_name_shows_its_groups(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        events = broker.stream("events")
        events.group("billing")
        events.put(b"e1")
        broker.stream("quiet")
    assert main(["stats", "events", "--data", str(data)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[:3] for row in rows[1:]] == [["events/billing", "group", "1"]]
    assert main(["stats", "quiet", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "pymq: stream quiet has no groups\n"


def test_stats_table_in_subprocess(data: Path) -> None:
    with pymq.open(data) as broker:
        queue = broker.queue("jobs")
        queue.put_many([b"a", b"b"])
        for message in queue.get_many(2, timeout=0):
            message.ack()
        broker.queue("idle")
    result = cli_process("stats", "--data", str(data))
    assert result.returncode == 0
    assert result.stderr == b""
    assert result.stdout.decode() == (
        "name  kind   depth  in_flight  waiting  acked  dead_lettered  "
        "oldest_unacked_age  damaged  skipped\n"
        "idle  queue      0          0        0      0              0  "
        "                 -        0        0\n"
        "jobs  queue      0          0        0      0              0  "
        "                 -        0        0\n"
    )


def test_format_table_aligns_columns() -> None:
    lines = format_table(["name", "n"], [["a", "1"], ["longer", "100"]], left_columns=1)
    assert lines == ["name      n", "a         1", "longer  100"]


# dlq -------------------------------------------------------------------------------


def reject_two(data: Path) -> None:
    with pymq.open(data) as broker:
        jobs = broker.queue("jobs")
        jobs.put(b"first", headers={"kind": "a"})
        jobs.put(b"second")
        first, second = jobs.get_many(2, timeout=0)
        first.reject("bad input")
        second.reject("no-such-user")


def read_dlq(data: Path) -> list[pymq.Message]:
    """Return the DLQ's messages, leaving them there."""
    with pymq.open(data) as broker:
        messages = broker.queue("jobs.dlq").get_many(100, timeout=0)
        for message in messages:
            message.nack()
        return messages


def test_dlq_list_shows_dead_letter_headers(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reject_two(data)
    assert main(["dlq", "list", "jobs", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    dead_letters = read_dlq(data)
    assert [m.body for m in dead_letters] == [b"first", b"second"]
    dead_at = [utc_text(int(m.headers["x-dead-at"])) for m in dead_letters]
    assert captured.out == (
        f"offset=0 x-source=jobs x-offset=0 x-attempts=1 x-dead-at={dead_at[0]} "
        f'x-reason="bad input" headers={{"kind": "a"}} body=first\n'
        f"offset=1 x-source=jobs x-offset=1 x-attempts=1 x-dead-at={dead_at[1]} "
        f"x-reason=no-such-user headers={{}} body=second\n"
    )


def test_dlq_list_leaves_messages(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reject_two(data)
    for _ in range(3):
        assert main(["dlq", "list", "jobs", "--data", str(data)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6
    with pymq.open(data) as broker:
        dlq = broker.queue("jobs.dlq")
        assert dlq.stats().depth == 2
        assert [m.offset for m in dlq.get_many(10, timeout=0)] == [0, 1]


def test_dlq_list_limit_reports_rest(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reject_two(data)
    assert main(["dlq", "list", "jobs", "-n", "1", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1
    assert captured.out.startswith("offset=0 x-source=jobs ")
    assert captured.err == (
        "pymq: listed 1 of 2 messages in jobs.dlq; pass -n to list more\n"
    )


def test_dlq_list_json(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reject_two(data)
    assert main(["dlq", "list", "jobs", "--json", "--data", str(data)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    dead_letters = read_dlq(data)
    assert [record["body"] for record in records] == ["first", "second"]
    assert [record["headers"] for record in records] == [
        m.headers for m in dead_letters
    ]
    assert records[0]["headers"]["x-reason"] == "bad input"


def test_dlq_list_queue_without_dlq(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs")
    assert main(["dlq", "list", "jobs", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "pymq: jobs.dlq has no messages\n"
    with pymq.open(data) as broker:
        assert broker.names() == {"jobs": "queue"}


def test_dlq_redrive_moves_back(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reject_two(data)
    assert main(["dlq", "redrive", "jobs", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "moved 2 messages from jobs.dlq\n"
    with pymq.open(data) as broker:
        assert broker.queue("jobs.dlq").stats().depth == 0
        back = broker.queue("jobs").get_many(10, timeout=0)
        assert [m.body for m in back] == [b"first", b"second"]
        assert [m.headers for m in back] == [{"kind": "a"}, {}]


def test_dlq_redrive_to_other_queue(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reject_two(data)
    with pymq.open(data) as broker:
        broker.queue("review")
    assert main(["dlq", "redrive", "jobs", "--to", "review", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "moved 2 messages from jobs.dlq to review\n"
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 0
        assert broker.queue("review").stats().depth == 2


def test_dlq_redrive_to_missing_queue_exits_5(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reject_two(data)
    assert main(["dlq", "redrive", "jobs", "--to", "jbos", "--data", str(data)]) == 5
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "pymq: queue jbos (--to) does not exist; redrive moves messages only "
        "into an existing queue\n"
    )
    with pymq.open(data) as broker:
        assert broker.names() == {"jobs": "queue", "jobs.dlq": "queue"}
        assert broker.queue("jobs.dlq").stats().depth == 2


def test_dlq_redrive_to_missing_queue_without_dlq(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs")
        broker.stream("events")
    assert main(["dlq", "redrive", "jobs", "--to", "jbos", "--data", str(data)]) == 5
    assert capsys.readouterr().err == (
        "pymq: queue jbos (--to) does not exist; redrive moves messages only "
        "into an existing queue\n"
    )
    assert main(["dlq", "redrive", "jobs", "--to", "events", "--data", str(data)]) == 5
    assert capsys.readouterr().err == "pymq: events (--to) is a stream, not a queue\n"
    with pymq.open(data) as broker:
        assert broker.names() == {"events": "stream", "jobs": "queue"}


def test_dlq_redrive_without_dlq_moves_none(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs")
    assert main(["dlq", "redrive", "jobs", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "moved 0 messages from jobs.dlq\n"


def put_dead_letters(data: Path, count: int, missing_at: int | None = None) -> None:
    """Put count messages into jobs.dlq, as if they had failed in jobs.

    The message at missing_at, if any, names a source that does not exist.
    """
    headers = {"x-source": "jobs", "x-group": "", "x-reason": "test"}
    with pymq.open(data) as broker:
        broker.queue("jobs")
        dlq = broker.queue("jobs.dlq")
        for index in range(count):
            source = "gone" if index == missing_at else "jobs"
            dlq.put(b"%d" % index, headers=dict(headers, **{"x-source": source}))


def test_dlq_redrive_progress_bar_only_on_request(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put_dead_letters(data, 2500)
    assert main(["dlq", "redrive", "jobs", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "moved 2500 messages from jobs.dlq\n"
    assert captured.err == ""

    put_dead_letters(data, 2500)
    assert main(["dlq", "redrive", "jobs", "--progress", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "moved 2500 messages from jobs.dlq\n"
    assert "redrive jobs.dlq: 100%" in captured.err
    assert "2500/2500" in captured.err
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 5000
        assert broker.queue("jobs.dlq").stats().depth == 0


def test_dlq_redrive_failure_reports_moved_count(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put_dead_letters(data, 2000, missing_at=1500)
    assert main(["dlq", "redrive", "jobs", "--progress", "--data", str(data)]) == 7
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert "1500/2000" in captured.err
    assert err[-2] == "pymq: moved 1500 messages from jobs.dlq, then failed"
    assert err[-1] == (
        "pymq: dlq redrive failed: PymqError: message 1500 names no queue or "
        "group to go back to (x-source 'gone', x-group ''); pass --to QUEUE to "
        "move the messages to a queue"
    )
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 1500
        assert broker.queue("jobs.dlq").stats().depth == 500


@pytest.mark.parametrize("action", ["list", "redrive"])
def test_dlq_of_stream_name_exits_2(
    data: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    with pymq.open(data) as broker:
        broker.stream("events").group("billing")
    assert main(["dlq", action, "events", "--data", str(data)]) == 2
    assert capsys.readouterr().err == (
        f"pymq: events is a stream, which has no dead-letter queue; each of its "
        f"groups has one: pymq dlq {action} events/GROUP for the group GROUP "
        f"(its groups: billing)\n"
    )


@pytest.mark.parametrize("action", ["list", "redrive"])
def test_dlq_of_missing_group_exits_5(
    data: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    with pymq.open(data) as broker:
        broker.stream("events").group("billing")
    assert main(["dlq", action, "events/audit", "--data", str(data)]) == 5
    assert capsys.readouterr().err == (
        "pymq: group audit of stream events does not exist\n"
    )


def test_dlq_of_stream_group(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pymq.open(data) as broker:
        events = broker.stream("events")
        billing = events.group("billing")
        audit = events.group("audit")
        events.put(b"invoice")
        message = billing.get(timeout=0)
        assert message is not None
        message.reject("unpaid")
        for seen in audit.get_many(10, timeout=0):
            seen.ack()
    assert main(["dlq", "list", "events.billing", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "offset=0 x-source=events x-group=billing x-offset=0 x-attempts=1 x-dead-at="
    )
    assert out.endswith(" x-reason=unpaid headers={} body=invoice\n")
    # S/G names the group as stats and get do.
    assert main(["dlq", "list", "events/billing", "--data", str(data)]) == 0
    assert capsys.readouterr().out == out
    assert main(["dlq", "redrive", "events/billing", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "moved 1 message from events.billing.dlq\n"
    with pymq.open(data) as broker:
        events = broker.stream("events")
        again = events.group("billing").get(timeout=0)
        assert again is not None
        assert again.body == b"invoice"
        assert events.group("audit").get(timeout=0) is None


# Locked data directories and connections ------------------------------------------


def test_locked_data_dir_exits_6(data: Path) -> None:
    with pymq.open(data):
        result = cli_process("get", "jobs", "--data", str(data))
    assert result.returncode == 6
    assert result.stdout == b""
    assert result.stderr.decode() == (
        f"pymq: data directory {data.absolute()} is locked by process "
        f"{os.getpid()}; stop that process, or use --url to go through its "
        f"server\n"
    )


def test_put_stdin_then_get_in_subprocess(data: Path) -> None:
    lines = ["plain", "", "with spaces and = signs", "naïve café", '{"json": 1}']
    stdin = "".join(line + "\n" for line in lines).encode()
    put = cli_process("put", "jobs", "-", "--data", str(data), stdin=stdin)
    assert put.returncode == 0
    assert put.stdout == b"put 5 messages to jobs\n"
    assert put.stderr == b""
    get = cli_process("get", "jobs", "-n", "10", "--json", "--data", str(data))
    assert get.returncode == 0
    assert get.stderr == b""
    records = [json.loads(line) for line in get.stdout.decode().splitlines()]
    assert [record["body"] for record in records] == lines
    assert [record["offset"] for record in records] == [0, 1, 2, 3, 4]
    assert [record["attempt"] for record in records] == [1] * 5
    again = cli_process("get", "jobs", "--data", str(data))
    assert again.returncode == 1


@pytest.mark.skipif(not HAS_CLIENT, reason="pymq.connect is not in this build")
def test_refused_connection_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"pymq://127.0.0.1:{free_port()}"
    assert main(["get", "jobs", "--url", url]) == 3
    refused = ConnectionRefusedError(
        errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED)
    )
    assert capsys.readouterr().err == (
        f"pymq: could not connect to {url}: ConnectionRefusedError: {refused}; "
        f"is `pymq serve` running there?\n"
    )


@pytest.mark.skipif(not HAS_CLIENT, reason="pymq.connect is not in this build")
def test_refused_connection_names_default_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A URL without a port goes to the default port, here one nothing
    # listens on, rather than 7420, where a server may run.
    port = free_port()
    monkeypatch.setattr(pymq.protocol, "DEFAULT_PORT", port)
    assert main(["stats", "--url", "pymq://127.0.0.1"]) == 3
    refused = ConnectionRefusedError(
        errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED)
    )
    assert capsys.readouterr().err == (
        f"pymq: could not connect to pymq://127.0.0.1 (port {port}, the default): "
        f"ConnectionRefusedError: {refused}; is `pymq serve` running there?\n"
    )


@pytest.mark.skipif(not HAS_CLIENT, reason="pymq.connect is not in this build")
def test_refused_connection_url_from_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"pymq://127.0.0.1:{free_port()}"
    monkeypatch.setenv("PYMQ_URL", url)
    assert main(["stats"]) == 3
    assert capsys.readouterr().err.startswith(f"pymq: could not connect to {url}: ")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Run `pymq serve` with a token on a free port; yield its URL and token file.

    The server is stopped with SIGTERM at the end and must exit with 0.
    """
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    port_file = tmp_path / "port"
    log = (tmp_path / "server.log").open("wb")
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PYMQ_")
    }
    command = [sys.executable, "-m", "pymq", "serve", "--data", str(tmp_path / "srv")]
    command += ["--port", "0", "--port-file", str(port_file)]
    command += ["--token-file", str(token), "--log-level", "WARNING"]
    command += loop_options()
    process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not port_file.exists():
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "pymq serve wrote no port file"
            time.sleep(0.05)
        yield f"pymq://127.0.0.1:{int(port_file.read_text())}", token
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=PROCESS_TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT)
        log.close()


@pytest.mark.skipif(
    not (HAS_CLIENT and HAS_SERVER), reason="pymq.server or pymq.connect is missing"
)
def test_serve_then_client_commands(
    served: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, token = served
    remote = ["--url", url, "--token-file", str(token)]
    feed_stdin(monkeypatch, b"one\ntwo\nthree\n")
    assert main(["put", "jobs", "-", *remote]) == 0
    assert capsys.readouterr().out == "put 3 messages to jobs\n"

    assert main(["get", "jobs", "-n", "2", *remote]) == 0
    assert capsys.readouterr().out == (
        "offset=0 attempt=1 headers={} body=one\n"
        "offset=1 attempt=1 headers={} body=two\n"
    )

    assert main(["stats", "jobs", *remote]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[1][:6] == ["jobs", "queue", "1", "0", "0", "2"]

    assert main(["get", "missing", *remote]) == 5
    assert capsys.readouterr().err == "pymq: queue missing does not exist\n"

    assert main(["dlq", "redrive", "jobs", "--to", "jbos", *remote]) == 5
    assert capsys.readouterr().err == (
        "pymq: queue jbos (--to) does not exist; redrive moves messages only "
        "into an existing queue\n"
    )

    monkeypatch.setenv("PYMQ_TOKEN", "s3cret")
    assert main(["get", "jobs", "--url", url]) == 0
    assert capsys.readouterr().out == "offset=2 attempt=1 headers={} body=three\n"

    with pymq.connect(url, token="s3cret") as client:
        events = client.stream("events")
        billing = events.group("billing")
        events.put_many([b"paid", b"unpaid"])
        billing.get(timeout=5.0).ack()
        billing.get(timeout=5.0).reject("no funds")
    assert main(["get", "events", *remote]) == 2
    assert "read it through a group: pymq get events/GROUP" in capsys.readouterr().err
    assert main(["dlq", "list", "events/billing", *remote]) == 0
    assert capsys.readouterr().out.endswith(
        ' x-reason="no funds" headers={} body=unpaid\n'
    )
    assert main(["dlq", "redrive", "events/billing", *remote]) == 0
    assert capsys.readouterr().out == "moved 1 message from events.billing.dlq\n"
    assert main(["get", "events/billing", *remote]) == 0
    assert capsys.readouterr().out == "offset=2 attempt=1 headers={} body=unpaid\n"


@pytest.mark.skipif(
    not (HAS_CLIENT and HAS_SERVER), reason="pymq.server or pymq.connect is missing"
)
def test_dlq_redrive_progress_through_server(
    served: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, token = served
    remote = ["--url", url, "--token-file", str(token)]
    headers = {"x-source": "jobs", "x-group": "", "x-reason": "test"}
    with pymq.connect(url, token="s3cret") as broker:
        broker.queue("jobs")
        dlq = broker.queue("jobs.dlq")
        dlq.put_many([b"%d" % i for i in range(2500)], headers=headers)
        dlq.put(b"lost", headers=dict(headers, **{"x-source": "gone"}))
        dlq.put_many([b"after"] * 10, headers=headers)

    assert main(["dlq", "redrive", "jobs", "--progress", *remote]) == 7
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "2500/2511" in captured.err
    err = captured.err.splitlines()
    assert err[-2] == "pymq: moved 2500 messages from jobs.dlq, then failed"
    assert err[-1] == (
        "pymq: dlq redrive failed: ServerError: message 2500 names no queue or "
        "group to go back to (x-source 'gone', x-group ''); pass --to QUEUE to "
        "move the messages to a queue"
    )

    with pymq.connect(url, token="s3cret") as broker:
        dlq = broker.queue("jobs.dlq")
        lost = dlq.get(timeout=5.0)
        assert lost is not None
        assert lost.body == b"lost"
        lost.ack()
    assert main(["dlq", "redrive", "jobs", *remote]) == 0
    captured = capsys.readouterr()
    assert captured.out == "moved 10 messages from jobs.dlq\n"
    assert captured.err == ""
    with pymq.connect(url, token="s3cret") as broker:
        assert broker.queue("jobs").stats().depth == 2510


@pytest.mark.skipif(not HAS_SERVER, reason="pymq.server is not in this build")
def test_serve_port_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "data"
        result = cli_process(
            "serve",
            "--data",
            str(data),
            "--port",
            str(port),
            "--log-level",
            "ERROR",
            *loop_options(),
        )
    assert result.returncode == 2
    assert result.stdout == b""
    log = result.stderr.decode()
    assert f" ERROR pymq.cli: could not serve {data} on 127.0.0.1:{port}: " in log
    assert log.lower().endswith("address already in use\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAS_SERVER, reason="pymq.server is not in this build")
def test_serve_port_in_use_removes_new_parents(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "existing" / "new" / "data"
        (tmp_path / "existing").mkdir()
        result = cli_process(
            "serve", "--data", str(data), "--port", str(port), *loop_options()
        )
    assert result.returncode == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "existing"]
    assert list((tmp_path / "existing").iterdir()) == []


@pytest.mark.skipif(not HAS_SERVER, reason="pymq.server is not in this build")
def test_serve_port_in_use_keeps_existing_data(data: Path) -> None:
    with pymq.open(data) as broker:
        broker.queue("jobs").put(b"kept")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli_process(
            "serve", "--data", str(data), "--port", str(port), *loop_options()
        )
    assert result.returncode == 2
    with pymq.open(data) as broker:
        assert broker.queue("jobs").stats().depth == 1


@pytest.mark.skipif(not HAS_SERVER, reason="pymq.server is not in this build")
def test_serve_port_in_use_keeps_existing_empty_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli_process(
            "serve", "--data", str(data), "--port", str(port), *loop_options()
        )
    assert result.returncode == 2
    # Not made by this serve, so its files stay, as after any run.
    assert sorted(path.name for path in data.iterdir()) == ["LOCK", "PYMQ"]


@pytest.mark.skipif(
    not (HAS_CLIENT and HAS_SERVER), reason="pymq.server or pymq.connect is missing"
)
def test_wrong_token_exits_4(
    served: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = served
    wrong = tmp_path / "wrong"
    wrong.write_text("guess\n")
    assert main(["stats", "--url", url, "--token-file", str(wrong)]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"pymq: {url}: ")
    assert err.endswith("; check --token-file or PYMQ_TOKEN\n")
    assert main(["stats", "--url", url]) == 4


def test_unparsable_url_is_usage_error() -> None:
    result = cli_process("stats", "--url", "pymq://[::1")
    assert result.returncode == 2
    assert result.stderr == (
        b"pymq: URL 'pymq://[::1' is invalid: Invalid IPv6 URL; write "
        b"pymq://HOST:PORT, pymqs://HOST:PORT or pymq+unix:///PATH\n"
    )


def test_long_dlq_name_in_stats_and_get(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = "L" * 128
    with pymq.open(data) as broker:
        queue = broker.queue(source, max_deliveries=1)
        queue.put(b"poison")
        rejected = queue.get(timeout=0)
        assert rejected is not None
        rejected.reject("bad")
    dlq_name = f"{source}.dlq"
    assert main(["stats", dlq_name, "--data", str(data)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[1][:3] == [dlq_name, "queue", "1"]
    assert main(["get", dlq_name, "--data", str(data)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("offset=0 attempt=1 headers={")
    assert line.endswith(" body=poison\n")
    assert main(["stats", "--data", str(data)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[:3] for row in rows[1:]] == [
        [source, "queue", "0"],
        [dlq_name, "queue", "0"],
    ]


def test_get_escapes_control_characters(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        queue = broker.queue("jobs")
        queue.put(b"line1\nline2")
        queue.put(b"tab\there\x1b[31mred\\n")
        queue.put(b"x", headers={"k": "v\nw\x9b"})
        queue.put("caf\u00e9 \u202e".encode())
    assert main(["get", "jobs", "-n", "5", "--no-ack", "--data", str(data)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "offset=0 attempt=1 headers={} body=line1\\nline2",
        "offset=1 attempt=1 headers={} body=tab\\there\\x1b[31mred\\\\n",
        'offset=2 attempt=1 headers={"k": "v\\nw\\u009b"} body=x',
        "offset=3 attempt=1 headers={} body=caf\u00e9 \\u202e",
    ]
    assert main(["get", "jobs", "-n", "5", "--json", "--data", str(data)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["body"] for record in records] == [
        "line1\nline2",
        "tab\there\x1b[31mred\\n",
        "x",
        "caf\u00e9 \u202e",
    ]
    assert records[2]["headers"] == {"k": "v\nw\x9b"}


def test_dlq_list_escapes_control_characters(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pymq.open(data) as broker:
        queue = broker.queue("jobs")
        queue.put(b"bad\nphoto\x1b[2J")
        message = queue.get(timeout=0)
        assert message is not None
        message.reject("broken\x1b[31m")
    assert main(["dlq", "list", "jobs", "--data", str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(
        ' x-reason="broken\\u001b[31m" headers={} body=bad\\nphoto\\x1b[2J'
    )


def test_put_into_proc_data_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["put", "jobs", "x", "--data", "/proc/1"]) == 2
    assert capsys.readouterr().err.startswith(
        "pymq: cannot open data directory /proc/1: "
    )


def test_serve_data_file_not_a_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["serve", "--data", str(afile), "--port", "0"]) == 2
    assert caplog.records[-1].getMessage() == (
        f"data directory {afile} is not a directory"
    )


@pytest.mark.parametrize("value", ["nan", "0", "3601", "inf"])
def test_serve_flush_interval_one_range(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--data", "unused", "--flush-interval", value]) == 2
    assert capsys.readouterr().err.endswith(
        f"pymq serve: error: argument --flush-interval: flush interval is {value} "
        f"seconds; it must be from 0.001 to 3600\n"
    )


def test_stats_of_one_group(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pymq.open(data) as broker:
        events = broker.stream("events")
        events.group("billing")
        events.group("audit")
        events.put(b"x")
    assert main(["stats", "events/billing", "--data", str(data)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0] == STATS_HEADER
    assert [row[:3] for row in rows[1:]] == [["events/billing", "group", "1"]]
    assert main(["stats", "events/nope", "--data", str(data)]) == 5
    assert capsys.readouterr().err == (
        "pymq: group nope of stream events does not exist\n"
    )


@pytest.mark.skipif(
    not (HAS_CLIENT and HAS_SERVER), reason="pymq.server or pymq.connect is missing"
)
def test_put_stdin_server_gone_prints_pymq_lines(tmp_path: Path) -> None:
    from tests.server.helpers import ServerProcess

    server = ServerProcess(tmp_path / "server").start()
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PYMQ_")
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "pymq", "put", "jobs", "-", "--url", server.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdin is not None
        process.stdin.write(b"line\n" * 1000)
        process.stdin.flush()
        # The first batch of 1000 lines is put before the server goes.
        deadline = time.monotonic() + PROCESS_TIMEOUT
        with pymq.connect(server.url) as client:
            while (
                "jobs" not in client.names()
                or client.queue("jobs").stats().depth < 1000
            ):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "put did not put 1000 lines"
                time.sleep(0.05)
        server.kill()
        _, err = process.communicate(b"more\n", timeout=PROCESS_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT)
        server.kill()
    assert process.returncode == 3
    lines = err.decode().splitlines()
    assert lines[0].startswith(f"pymq: connection to {server.url} broke: ")
    assert lines[-2] == "pymq: put 1000 messages to jobs, then failed"
    assert lines[-1].startswith(f"pymq: lost the connection to {server.url}: ")
    assert all(line.startswith("pymq: ") for line in lines)


def test_submodules_load_as_attributes() -> None:
    code = (
        "import sys, pymq; "
        "assert 'pymq.aio' not in sys.modules; "
        "print(pymq.aio.connect.__module__, pymq.server.ServerLimits.__module__); "
        "pymq.nothing"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert result.stdout == "pymq.aio pymq.server\n"
    assert result.stderr.endswith(
        "AttributeError: module 'pymq' has no attribute 'nothing'\n"
    )
