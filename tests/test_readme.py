"""The Python examples in README.md and docs/ run as written."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    folder = tmp_path_factory.mktemp("readme-server")
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
