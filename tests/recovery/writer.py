"""Writer processes for the recovery tests: `python writer.py MODE DIR SEGMENT_BYTES`.

Each mode opens a SegmentStore in DIR and writes its output to stdout one
line per os.write() call, so that a killed writer leaves each line whole or
absent. A returned append is reported as "OFFSET INDEX": append number
INDEX (counted from 0) returned OFFSET.

    loop SEED MAX_BODY_BYTES  Print "start", open the store with
                              fsync="always", print "ready NEXT_OFFSET",
                              then append make_body(SEED, i, MAX_BODY_BYTES)
                              until killed (at most LOOP_MAX_APPENDS appends
                              and LOOP_MAX_SECONDS seconds).
    tail COUNT [BODY_BYTES]   Append COUNT records (make_body(0, i), or
                              make_sized_body(i, BODY_BYTES)) and exit with
                              os._exit(0), so that no checkpoint covers them.
    check                     Open the store, print one JSON line with
                              next_offset, damaged, the verify() counts and
                              the CRC32C of every body, and close it.
    fill                      Append make_body(0, i) with fsync="always" until
                              OSError; print "error ERRNO", try one
                              append_many that needs new segments, print
                              "batch {json}", wait for a line on stdin (space
                              was freed), append again, print "after {json}".
    fsize LIMIT               Open the store, set RLIMIT_FSIZE to LIMIT bytes
                              and append until creating a segment fails;
                              print one JSON line about what was left.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

from pymq import _core

LOOP_MAX_APPENDS = 200_000
LOOP_MAX_SECONDS = 30.0
# Body size of the fill and fsize batches, in bytes.
BATCH_BODY_BYTES = 100


def make_body(seed: int, index: int, max_bytes: int = 200) -> bytes:
    """Return body number index of a writer started with seed: 0 to max_bytes."""
    rng = random.Random(seed * 1_000_003 + index)
    return rng.randbytes(rng.randrange(max_bytes + 1))


def make_sized_body(index: int, length: int) -> bytes:
    """Return body number index of the given length, with no zero byte."""
    rng = random.Random(index)
    return bytes(rng.randrange(1, 256) for _ in range(length))


def batch_bodies(seed: int, segments: int, segment_bytes: int) -> list[bytes]:
    """Return enough BATCH_BODY_BYTES-byte bodies to fill segments segments."""
    count = segments * segment_bytes // (BATCH_BODY_BYTES + 32) + 1
    return [
        make_sized_body(seed * 1_000_003 + i, BATCH_BODY_BYTES) for i in range(count)
    ]


def run_writer(
    mode: str,
    directory: object,
    segment_bytes: int,
    *arguments: int,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run this file in a new interpreter and wait for it to exit."""
    command = [sys.executable, __file__, mode, str(directory), str(segment_bytes)]
    return subprocess.run(
        [*command, *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def output(line: str) -> None:
    os.write(1, (line + "\n").encode("ascii"))


def list_files(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


def run_loop(
    directory: str, segment_bytes: int, seed: int, max_body_bytes: int
) -> None:
    """Append until killed. One call in ten is an append_many of 2 to 5 bodies."""
    rng = random.Random(seed)
    output("start")
    store = _core.SegmentStore(directory, segment_bytes=segment_bytes, fsync="always")
    output(f"ready {store.next_offset}")
    deadline = time.monotonic() + LOOP_MAX_SECONDS
    index = 0
    while index < LOOP_MAX_APPENDS and time.monotonic() < deadline:
        choice = rng.random()
        if choice < 0.1:
            count = rng.randrange(2, 6)
            bodies = [make_body(seed, index + i, max_body_bytes) for i in range(count)]
            first = store.append_many(bodies)
            for i in range(count):
                output(f"{first + i} {index + i}")
            index += count
        else:
            offset = store.append(make_body(seed, index, max_body_bytes))
            output(f"{offset} {index}")
            index += 1
        if choice > 0.98:
            # Writes checkpoints, so that some kills land in one.
            store.flush()
    store.close()


def run_tail(directory: str, segment_bytes: int, count: int, body_bytes: int) -> None:
    store = _core.SegmentStore(directory, segment_bytes=segment_bytes)
    output(f"ready {store.next_offset}")
    for index in range(count):
        if body_bytes < 0:
            body = make_body(0, index)
        else:
            body = make_sized_body(index, body_bytes)
        offset = store.append(body)
        output(f"{offset} {index}")
    os._exit(0)


def run_check(directory: str, segment_bytes: int) -> None:
    store = _core.SegmentStore(directory, segment_bytes=segment_bytes)
    report = store.verify()
    result = {
        "next_offset": store.next_offset,
        "damaged": store.damaged,
        "verify_records": report["records"],
        "verify_missing": report["missing"],
        "verify_damaged": len(report["damaged"]),
        "crcs": {
            str(offset): _core.crc32c(body)
            for offset, _, _, body in store.read_records(0, store.next_offset)
        },
    }
    store.close()
    output(json.dumps(result))


def run_fill(directory: str, segment_bytes: int) -> None:
    store = _core.SegmentStore(directory, segment_bytes=segment_bytes, fsync="always")
    output(f"ready {store.next_offset}")
    index = 0
    try:
        # Bounded: the disk is meant to fill long before this count.
        while index < 1_000_000:
            offset = store.append(make_body(0, index))
            output(f"{offset} {index}")
            index += 1
    except OSError as exc:
        output(f"error {exc.errno}")
    else:
        output("error 0")

    files_before = list_files(directory)
    try:
        store.append_many(batch_bodies(1, 2, segment_bytes))
    except OSError as exc:
        batch_errno = exc.errno
    else:
        batch_errno = 0
    batch = {
        "errno": batch_errno,
        "next_offset": store.next_offset,
        "files_before": files_before,
        "files_after": list_files(directory),
    }
    output("batch " + json.dumps(batch))

    sys.stdin.readline()
    offsets = [store.append(make_body(2, i)) for i in range(3)]
    first = store.append_many(batch_bodies(3, 1, segment_bytes))
    after = {
        "offsets": offsets,
        "batch_first": first,
        "next_offset": store.next_offset,
        "crcs": [_core.crc32c(body) for body in store.read_range(0, store.next_offset)],
    }
    store.close()
    output("after " + json.dumps(after))


def run_fsize(directory: str, segment_bytes: int, limit: int) -> None:
    # Past RLIMIT_FSIZE the kernel sends SIGXFSZ, which kills by default.
    # With the signal ignored, the call fails with EFBIG instead.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    store = _core.SegmentStore(directory, segment_bytes=segment_bytes)
    files_before = list_files(directory)

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    appended = 0
    error = 0
    try:
        # Bounded: a segment contains at most segment_bytes // 32 records.
        while appended <= 3 * segment_bytes // 32:
            store.append(make_body(0, appended))
            appended += 1
    except OSError as exc:
        error = exc.errno
    files_after_error = list_files(directory)
    next_after_error = store.next_offset

    try:
        store.append_many(batch_bodies(1, 2, segment_bytes))
    except OSError as exc:
        batch_error = exc.errno
    else:
        batch_error = 0
    result = {
        "errno": error,
        "appended": appended,
        "files_before": files_before,
        "files_after_error": files_after_error,
        "next_after_error": next_after_error,
        "batch_errno": batch_error,
        "next_after_batch": store.next_offset,
        "files_after_batch": list_files(directory),
    }

    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    result["offset_after_limit"] = store.append(b"after the limit")
    store.close()
    output(json.dumps(result))


def main(argv: list[str]) -> None:
    mode, directory, segment_bytes = argv[0], argv[1], int(argv[2])
    arguments = [int(value) for value in argv[3:]]
    if mode == "loop":
        run_loop(directory, segment_bytes, *arguments)
    elif mode == "tail":
        count = arguments[0]
        body_bytes = arguments[1] if len(arguments) > 1 else -1
        run_tail(directory, segment_bytes, count, body_bytes)
    elif mode == "check":
        run_check(directory, segment_bytes)
    elif mode == "fill":
        run_fill(directory, segment_bytes)
    elif mode == "fsize":
        run_fsize(directory, segment_bytes, *arguments)
    else:
        raise SystemExit(
            f"unknown mode {mode!r}; expected loop, tail, check, fill or fsize"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
