"""A pymq server process for the server tests, stopped by the test.

Usage: serve.py CONFIG_JSON

CONFIG_JSON is an object with "data" (the data directory) and optionally
"port_file", "fsync", "host", "port", "unix", "token", "limits" (keyword
arguments of ServerLimits), "segment_bytes", "loop" (an event loop as run()
takes it) and "log_level" (a logging level name, INFO by default). Logs go
to stderr in logging's default format.
"""

from __future__ import annotations

import json
import logging
import sys

from pymq.server import ServerLimits, run


def main() -> None:
    config = json.loads(sys.argv[1])
    logging.basicConfig(level=config.get("log_level", "INFO"))
    limits = config.get("limits")
    run(
        config["data"],
        host=config.get("host", "127.0.0.1"),
        port=config.get("port", 0),
        unix=config.get("unix"),
        fsync=config.get("fsync"),
        token=config.get("token"),
        port_file=config.get("port_file"),
        limits=None if limits is None else ServerLimits(**limits),
        segment_bytes=config.get("segment_bytes"),
        loop=config.get("loop", "auto"),
    )


if __name__ == "__main__":
    main()
