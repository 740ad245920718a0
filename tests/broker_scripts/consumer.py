"""A consumer process for the restart tests, killed by the test or by itself.

Usage: consumer.py DATA_DIR MODE

MODE "hold": take the first 5 messages of queue jobs, ack the first 3, print
a JSON line {"acked": [...], "held": [...]}, then sleep until killed.

MODE "hold-batch": like "hold", with get_batch and ack_many of the first 3
receipts; both lists of its report hold [offset, attempt] pairs.

MODE "runs": take the first 6 messages with get_batch, ack receipts 1 to 3
with one ack_many and receipt 5 alone, print a JSON line {"acked": [...],
"held": [...]} of offsets, then sleep until killed.

MODE "drain": with 1 MiB segments and no background flush in an hour, get
and ack every message of queue jobs one at a time, print a JSON line
{"acked": N, "log": [names of the files in the queue's log folder]}, then
sleep until killed.

MODE "once": take one message of queue jobs. A body of b"poison" makes the
process SIGKILL itself while the delivery is in flight; any other body is
acked and printed as a JSON line {"body": ..., "attempt": ...}. Prints
{"body": null} when the queue has nothing to deliver.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pymq


def hold(broker: pymq.Broker) -> None:
    q = broker.queue("jobs")
    messages = q.get_many(5, timeout=5.0)
    q.ack_many(messages[:3])
    report = {
        "acked": [m.offset for m in messages[:3]],
        "held": [[m.offset, m.attempt] for m in messages[3:]],
    }
    print(json.dumps(report), flush=True)
    # The test kills this process by its pid; the bound only ends an orphan.
    time.sleep(60)


def hold_batch(broker: pymq.Broker) -> None:
    q = broker.queue("jobs")
    batch = q.get_batch(5, timeout=5.0)
    q.ack_many(batch.receipts[:3].tolist())
    offsets = batch.offsets.tolist()
    attempts = batch.attempts.tolist()
    pairs = [
        [offset, attempt] for offset, attempt in zip(offsets, attempts, strict=True)
    ]
    report = {"acked": pairs[:3], "held": pairs[3:]}
    print(json.dumps(report), flush=True)
    # The test kills this process by its pid; the bound only ends an orphan.
    time.sleep(60)


def runs(broker: pymq.Broker) -> None:
    q = broker.queue("jobs")
    batch = q.get_batch(6, timeout=5.0)
    receipts = batch.receipts.tolist()
    q.ack_many(receipts[1:4])
    q.ack(receipts[5])
    offsets = batch.offsets.tolist()
    report = {
        "acked": offsets[1:4] + offsets[5:],
        "held": [offsets[0], offsets[4]],
    }
    print(json.dumps(report), flush=True)
    # The test kills this process by its pid; the bound only ends an orphan.
    time.sleep(60)


def drain(broker: pymq.Broker) -> None:
    q = broker.queue("jobs")
    acked = 0
    while (message := q.get_nowait()) is not None:
        message.ack()
        acked += 1
    log = broker.path / "streams" / "jobs" / "log"
    print(json.dumps({"acked": acked, "log": sorted(os.listdir(log))}), flush=True)
    # The test kills this process by its pid; the bound only ends an orphan.
    time.sleep(60)


def once(broker: pymq.Broker) -> None:
    q = broker.queue("jobs")
    msg = q.get(timeout=0.5)
    if msg is None:
        print(json.dumps({"body": None}), flush=True)
        return
    if msg.body == b"poison":
        os.kill(os.getpid(), signal.SIGKILL)
    msg.ack()
    print(json.dumps({"body": msg.body.decode(), "attempt": msg.attempt}), flush=True)


def main() -> None:
    data, mode = sys.argv[1], sys.argv[2]
    options = (
        {"segment_bytes": 1 << 20, "flush_interval": 3600} if mode == "drain" else {}
    )
    with pymq.open(data, **options) as broker:
        modes = {
            "hold": hold,
            "hold-batch": hold_batch,
            "runs": runs,
            "drain": drain,
            "once": once,
        }
        modes[mode](broker)


if __name__ == "__main__":
    main()
