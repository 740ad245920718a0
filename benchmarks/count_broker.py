"""Count the instructions per message of the embedded broker with callgrind.

valgrind counts the same instructions however loaded the machine is, so
this compares two versions of the code where wall-clock rates cannot. Run
from the repository root (valgrind and callgrind_annotate must be on PATH):

    .venv/bin/python -m benchmarks.count_broker [--forms single,batch,many]

Each form runs twice in a child process under
`valgrind --tool=callgrind --separate-threads=yes`, with --small and
--large messages after --warmup ones, in a fresh broker (fsync="interval")
and queue. The difference between the two runs of the calling thread's
instructions, divided by the difference in messages, is the figure per
message: imports and setup cancel out, and the background flush and
prefault threads are left out. The forms, with 100-byte bodies:

- single: q.put(body), then q.get_nowait() and message.ack()
- batch: q.put_many(100 bodies), q.get_batch(100, timeout=0), q.ack_many()
- many: the same with q.get_many(100, timeout=0)

--top N also lists the N functions whose own instructions per message
changed most between the two runs. `--run FORM COUNT` runs one workload
without valgrind; the parent starts it that way.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pymq
from benchmarks.benchmarks.common import QUEUE_BATCH, Scratch, payloads

FORMS = ("single", "batch", "many")
PAYLOAD = 100
# Seconds one valgrind run may take: far more than the 1 to 3 minutes that
# the longest default run took on a loaded 2-core machine.
RUN_TIMEOUT = 1800.0


def single(queue: pymq.Queue, count: int) -> None:
    put = queue.put
    get = queue.get_nowait
    body = payloads(PAYLOAD, 1)[0]
    for _ in range(count):
        put(body)
        get().ack()


def batches(queue: pymq.Queue, count: int, columns: bool) -> None:
    chunk = payloads(PAYLOAD, QUEUE_BATCH)
    put_many = queue.put_many
    get_many = queue.get_batch if columns else queue.get_many
    ack_many = queue.ack_many
    for _ in range(count // QUEUE_BATCH):
        put_many(chunk)
        ack_many(get_many(QUEUE_BATCH, timeout=0))


def run_workload(form: str, count: int) -> None:
    """Move count messages through a fresh queue, then check it is empty."""
    with Scratch() as scratch, pymq.open(scratch.path / "broker") as broker:
        queue = broker.queue("jobs")
        if form == "single":
            single(queue, count)
        else:
            batches(queue, count, columns=form == "batch")
        depth = queue.stats().depth
        if depth:
            raise RuntimeError(f"{depth} messages left in the queue after {form}")


def callgrind(form: str, count: int, folder: Path) -> Path:
    """Run the workload under callgrind and return the calling thread's file."""
    out = folder / f"{form}.{count}"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            f"--callgrind-out-file={out}.%p",
            sys.executable,
            "-m",
            "benchmarks.count_broker",
            "--run",
            form,
            str(count),
        ],
        check=True,
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )
    # With --separate-threads=yes the first thread's counts end in -01.
    (found,) = folder.glob(f"{form}.{count}.*-01")
    return found


def total(path: Path) -> int:
    match = re.search(r"^totals: (\d+)", path.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{path} has no totals line")
    return int(match.group(1))


def own_costs(path: Path) -> dict[str, int]:
    """Return each function's own instructions, from callgrind_annotate."""
    output = subprocess.run(
        ["callgrind_annotate", "--auto=no", "--threshold=100", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    costs: dict[str, int] = {}
    for line in output.splitlines():
        match = re.match(r"\s*([\d,]+) \([^)]*\)\s+\S*?:(\S+)", line)
        if match:
            name = match.group(2)
            costs[name] = costs.get(name, 0) + int(match.group(1).replace(",", ""))
    return costs


def measure(form: str, warmup: int, small: int, large: int, top: int) -> None:
    with tempfile.TemporaryDirectory(prefix="pymq-callgrind-") as name:
        folder = Path(name)
        first = callgrind(form, warmup + small, folder)
        second = callgrind(form, warmup + large, folder)
        messages = large - small
        per_message = (total(second) - total(first)) / messages
        print(f"{form}: {per_message:,.0f} instructions per message")
        if not top:
            return
        before, after = own_costs(first), own_costs(second)
        changes = {
            name: (after.get(name, 0) - before.get(name, 0)) / messages
            for name in before.keys() | after.keys()
        }
        for name in sorted(changes, key=lambda key: -abs(changes[key]))[:top]:
            print(f"  {changes[name]:8,.0f}  {name}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--forms",
        default=",".join(FORMS),
        help=f"comma-separated forms to count, of {', '.join(FORMS)}",
    )
    parser.add_argument(
        "--warmup", type=int, default=2000, help="messages before the counted ones"
    )
    parser.add_argument(
        "--small", type=int, default=10_000, help="messages of the first run"
    )
    parser.add_argument(
        "--large", type=int, default=60_000, help="messages of the second run"
    )
    parser.add_argument(
        "--top", type=int, default=0, help="list this many functions per form"
    )
    parser.add_argument(
        "--run",
        nargs=2,
        metavar=("FORM", "COUNT"),
        help="run one workload of COUNT messages, without valgrind",
    )
    return parser


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    forms = [args.run[0]] if args.run else args.forms.split(",")
    unknown = set(forms) - set(FORMS)
    if unknown:
        parser.error(
            f"unknown forms: {', '.join(sorted(unknown))}; the forms are "
            f"{', '.join(FORMS)}"
        )
    if args.run:
        run_workload(args.run[0], int(args.run[1]))
        return
    if args.large <= args.small:
        parser.error(f"--large ({args.large}) must be more than --small ({args.small})")
    for form in forms:
        measure(form, args.warmup, args.small, args.large, args.top)


if __name__ == "__main__":
    main()
