"""Write each line of a text file to a pymq segment store, then read it back.

    python examples/store_lines.py FILE [--data DIR]

The store is reopened before the read, so the lines come back from disk
through recovery, and every line is compared byte for byte.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pymq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="text file whose lines are stored")
    parser.add_argument(
        "--data",
        type=Path,
        help="folder for the store (default: a new temporary folder)",
    )
    args = parser.parse_args(argv)

    lines = args.file.read_bytes().splitlines(keepends=True)
    with tempfile.TemporaryDirectory(prefix="pymq-example-") as scratch:
        folder = args.data or Path(scratch) / "lines"

        started = time.perf_counter()
        with pymq.open_store(folder, fsync="interval") as store:
            first = store.append_many(lines)
            last = store.next_offset
        written = time.perf_counter() - started

        started = time.perf_counter()
        with pymq.open_store(folder) as store:
            back = store.read_range(first, last)
            damaged = store.damaged
        read = time.perf_counter() - started

    if back != lines or damaged:
        print(
            f"mismatch: wrote {len(lines)} lines, read {len(back)} back, "
            f"{damaged} damaged",
            file=sys.stderr,
        )
        return 1
    size = sum(map(len, lines))
    print(
        f"{args.file}: {len(lines)} lines, {size} bytes, offsets {first} to "
        f"{last - 1}; written in {written * 1e3:.1f} ms, reopened and read "
        f"back in {read * 1e3:.1f} ms; every line matches"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
