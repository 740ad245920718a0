"""The examples in README.md and docs/ run as written and agree with the code."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymq.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "broker.md"]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


DEFAULT_URL = "pymq://127.0.0.1:7420"
SERVE = (
    "import sys; from pymq.server import run; "
    "run(sys.argv[1], port=0, port_file=sys.argv[2])"
)


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("readme-server")) as url:
        yield url


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Run a server on a new data directory in folder; yield its URL."""
    port_file = folder / "port"
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(folder / "data"), str(port_file)],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert process.poll() is None, "the server exited before listening"
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.05)
        yield f"pymq://127.0.0.1:{port_file.read_text().strip()}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


def examples() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for number, code in enumerate(BLOCK.findall(document.read_text()), 1):
            found.append((f"{document.name}:{number}", code))
    return found


@pytest.mark.parametrize(
    ("name", "code"), examples(), ids=[name for name, _ in examples()]
)
def test_documented_example_runs(
    name: str, code: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if DEFAULT_URL in code:
        # The example talks to a server: point it at one started for it.
        server = request.getfixturevalue("readme_server")
        code = code.replace(DEFAULT_URL, server)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stderr}"


def test_documents_have_examples() -> None:
    assert len(examples()) >= 3


def test_server_example_output_as_commented(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    # The README serves a new data directory, in the background, so that
    # the example's queue starts at offset 0 as its comment states.
    serve_lines = [
        line for line in readme.splitlines() if line.startswith("pymq serve")
    ]
    assert serve_lines == [
        'pymq serve --data "$(mktemp -d)" &     # listens on 127.0.0.1:7420'
    ]
    code = next(code for code in BLOCK.findall(readme) if "get_batch" in code)
    assert "print(batch.offsets, batch.data)     # [2] b'c' in a new queue" in code
    with serve(tmp_path) as url:
        result = subprocess.run(
            [sys.executable, "-c", code.replace(DEFAULT_URL, url)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["0 b'a'", "1 b'b'", "[2] b'c'"]


def option_rows(document: Path, option: str) -> list[list[str]]:
    """Return the cells of the table rows in document that describe option."""
    rows = []
    for line in document.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == option:
            rows.append(cells)
    return rows


def test_token_file_default_same_everywhere() -> None:
    rows = option_rows(ROOT / "docs" / "cli.md", "`--token-file PATH`")
    rows += option_rows(ROOT / "docs" / "server.md", "`--token-file PATH`")
    # The client commands' row and serve's in cli.md, and serve's in server.md.
    assert len(rows) == 3
    for row in rows:
        assert row[1] == "`$PYMQ_TOKEN`"
        assert "without the option, the token in `PYMQ_TOKEN`" in row[2]
    help_text = " ".join(build_parser().format_help().split())
    assert "file with the server's token (default: $PYMQ_TOKEN)" in help_text
