"""`pymq serve` with a probe of the synced lengths of its segment stores.

Usage: python -m tests.reliability.probe_serve SERVE_OPTIONS...

Runs `pymq serve SERVE_OPTIONS` in this process, through pymq's own command
line, plus a daemon thread that replies to each line "synced" on stdin
with one JSON line on stdout: {segment path: bytes synced} of every open store
of the process (SegmentStore.synced_lengths()). The power-cut check of the
torture harness needs these lengths, and the server has no request that
returns them.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
from pathlib import Path

from pymq import cli
from pymq._core import SegmentStore


def synced_lengths() -> dict[str, int]:
    """Return the synced length of every segment of every open store here.

    The stores are found through the garbage collector, which tracks every
    SegmentStore, so the broker needs no hook. The stores go on writing
    while they are read one by one, so group journals (folders under
    "groups") are read first. Then a record whose delivery a journal
    synced is covered by the stream store's length, read later, whenever
    the record was synced before its delivery.
    """
    stores = [
        candidate
        for candidate in gc.get_objects()
        if isinstance(candidate, SegmentStore) and not candidate.closed
    ]
    stores.sort(key=lambda store: "groups" not in Path(store.path).parts)
    lengths: dict[str, int] = {}
    for store in stores:
        lengths.update(store.synced_lengths())
    return lengths


def answer_probes() -> None:
    """Reply to "synced" lines on stdin until stdin closes."""
    for line in sys.stdin:
        if line.strip() == "synced":
            sys.stdout.write(json.dumps(synced_lengths()) + "\n")
        else:
            sys.stdout.write(json.dumps({"error": f"unknown request {line!r}"}) + "\n")
        sys.stdout.flush()


def start_probe_thread() -> None:
    """Start the thread of answer_probes()."""
    threading.Thread(target=answer_probes, name="synced-probe", daemon=True).start()


def main() -> int:
    start_probe_thread()
    return cli.main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
