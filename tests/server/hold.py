"""A client process that takes deliveries and never settles them.

Usage: hold.py URL QUEUE COUNT

Connects to URL, takes COUNT messages of QUEUE without settling them,
prints a JSON line [[offset, attempt], ...], then sleeps until the test
kills it.
"""

from __future__ import annotations

import json
import sys
import time

import pymq


def main() -> None:
    url, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    broker = pymq.connect(url)
    queue = broker.queue(name)
    deliveries = []
    deadline = time.monotonic() + 10.0
    while len(deliveries) < count and time.monotonic() < deadline:
        deliveries.extend(queue.get_many(count - len(deliveries), timeout=1.0))
    print(json.dumps([[m.offset, m.attempt] for m in deliveries]), flush=True)
    # The test kills this process by its pid; the bound only ends an orphan.
    time.sleep(60)


if __name__ == "__main__":
    main()
