"""The Python examples in README.md and docs/ run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "broker.md"]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def examples() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for number, code in enumerate(BLOCK.findall(document.read_text()), 1):
            found.append((f"{document.name}:{number}", code))
    return found


@pytest.mark.parametrize(
    ("name", "code"), examples(), ids=[name for name, _ in examples()]
)
def test_documented_example_runs(name: str, code: str, tmp_path: Path) -> None:
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
