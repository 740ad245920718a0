"""The pymq command line: serve a data directory, put, get, stats and dlq.

Client commands reach a broker through its server (--url) or open a data
directory directly (--data). Errors print one line on stderr and exit with
one of the codes in EXIT_CODES.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import enum
import json
import logging
import math
import os
import re
import select
import ssl
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

import pymq
from pymq._core import RESERVED_HEADERS, DirectoryLock
from pymq._version import __version__
from pymq.broker import DATA_MARKER, REDRIVE_TO_ADVICE
from pymq.errors import (
    AuthenticationError,
    BrokerLockedError,
    ConfigError,
    InvalidNameError,
    PymqError,
    QueueNotFound,
    ServerError,
)
from pymq.names import check_name, check_queue_name
from pymq.protocol import TOO_MANY_UNACKED, parse_url

__all__ = ["EXIT_CODES", "ExitCode", "build_parser", "main"]

logger = logging.getLogger(__name__)

DEFAULT_URL: Final = "pymq://127.0.0.1:7420"
DEFAULT_PORT: Final = 7420
LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The log format of the client commands, whose errors also start with "pymq:".
CLIENT_LOG_FORMAT: Final = "pymq: %(message)s"
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Messages per put_many call when putting the lines of stdin.
PUT_BATCH: Final = 1000
# Maximum bytes of bodies per put_many call, so batches of long lines stay small.
PUT_BATCH_BYTES: Final = 8 << 20
# Messages per get_many call. get_many may return fewer, never more.
GET_BATCH: Final = 1000
# Maximum wait a command accepts, in seconds: the limit of the broker's get.
MAX_SECONDS: Final = 1e9
# The range of flush_interval, in seconds, that pymq.open accepts.
MIN_FLUSH_INTERVAL: Final = 0.001
MAX_FLUSH_INTERVAL: Final = 3600.0
# The pymq.server.ServerLimits fields that pymq serve sets: field, unit, help.
# The defaults in the help are the dataclass's, which a test compares,
# because this module imports the server only to run it.
SERVE_LIMITS: Final = (
    ("max_frame_bytes", "BYTES", "largest frame in either direction (default: 16MiB)"),
    ("max_batch", "COUNT", "most messages in one publish or fetch (default: 10000)"),
    ("max_connections", "COUNT", "open connections; more are refused (default: 1024)"),
    (
        "max_handles",
        "COUNT",
        "queues, streams and groups one connection may open (default: 10000)",
    ),
    (
        "handshake_timeout",
        "SECONDS",
        "time from connect to a valid HELLO (default: 10)",
    ),
    ("frame_timeout", "SECONDS", "time a frame may stay partly received (default: 30)"),
    (
        "idle_timeout",
        "SECONDS",
        "time without a frame, with no request waiting, before a connection is "
        "dropped; 0 never drops (default: 0)",
    ),
    (
        "max_waiting",
        "COUNT",
        "long polls and subscriptions one connection may have waiting (default: 1024)",
    ),
    (
        "max_failed_logins",
        "COUNT",
        "failed logins one address may make within --login-window (default: 10)",
    ),
    ("login_window", "SECONDS", "time over which failed logins count (default: 60)"),
    (
        "max_unacked",
        "COUNT",
        "deliveries one connection may hold unsettled, across its queues and "
        "groups (default: 100000)",
    ),
)
# The choices of pymq serve --loop: pymq.server.LOOPS, which a test compares.
SERVE_LOOPS: Final = ("auto", "asyncio", "uvloop")
# The x- headers of a dead-letter move, in the order dlq list prints them.
DEAD_LETTER_HEADERS: Final = (
    "x-source",
    "x-group",
    "x-offset",
    "x-attempts",
    "x-dead-at",
    "x-reason",
)
STATS_COLUMNS: Final = (
    "name",
    "kind",
    "depth",
    "in_flight",
    "waiting",
    "acked",
    "dead_lettered",
    "oldest_unacked_age",
    "damaged",
    "skipped",
)
# Values matching this print unquoted in key=value output.
_PLAIN_VALUE = re.compile(r'[^\s"=]+')
# Characters that escape_text checks: all but printable ASCII other than "\\".
_ESCAPE_CANDIDATE = re.compile(r"[^ -\[\]-~]")


class ExitCode(enum.IntEnum):
    """Exit status of the pymq command."""

    OK = 0
    NOTHING_FOUND = 1
    USAGE = 2
    CONNECTION = 3
    AUTHENTICATION = 4
    QUEUE_NOT_FOUND = 5
    LOCKED = 6
    FAILED = 7
    INTERRUPTED = 130
    OUTPUT_CLOSED = 141


EXIT_CODES: Final = {
    ExitCode.OK: "success",
    ExitCode.NOTHING_FOUND: "get found no message before its timeout",
    ExitCode.USAGE: "invalid usage or configuration",
    ExitCode.CONNECTION: "could not connect to the server, or lost the connection",
    ExitCode.AUTHENTICATION: "the server rejected the token",
    ExitCode.QUEUE_NOT_FOUND: "the queue (or stream group) does not exist",
    ExitCode.LOCKED: "the data directory is locked by another process",
    ExitCode.FAILED: "the broker failed the request (queue full, message too "
    "large, disk error, ...)",
    ExitCode.INTERRUPTED: "interrupted by Ctrl-C (SIGINT)",
    ExitCode.OUTPUT_CLOSED: "the reader of standard output closed it (broken pipe)",
}


class CommandError(Exception):
    """A failure to report on stderr as one line, with the exit code to return."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


class _OutputClosed(Exception):
    """Standard output was closed by its reader (a broken pipe)."""


class BrokerAPI(Protocol):
    """The broker API of the client commands, shared by pymq.open() and connect()."""

    def queue(self, name: str) -> Any: ...

    def stream(self, name: str) -> Any: ...

    def names(self) -> dict[str, str]: ...

    def groups(self, stream: str) -> list[str]: ...

    def redrive(
        self,
        dlq_name: str,
        to: str | None = None,
        *,
        progress: Any = None,
    ) -> int: ...

    def close(self) -> None: ...


# Entry point ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the pymq command line with argv (default sys.argv[1:]).

    Returns the exit code (see EXIT_CODES) instead of raising SystemExit.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(_options_after_command(argv))
    except SystemExit as exc:
        # argparse exits for --help, --version and usage errors.
        return _exit_status(exc.code)
    if args.command != "serve":
        # The warnings of the broker and the client, such as a message moved
        # to a DLQ or a connection that broke, print as the errors do.
        # basicConfig keeps existing handlers.
        logging.basicConfig(level=logging.WARNING, format=CLIENT_LOG_FORMAT)
    try:
        code: int = args.handler(args)
        _flush_output()
        return code
    except CommandError as exc:
        _report(args, str(exc))
        return exc.code
    except _OutputClosed:
        _silence_stdout()
        return ExitCode.OUTPUT_CLOSED
    except KeyboardInterrupt:
        _report(args, "interrupted")
        return ExitCode.INTERRUPTED
    except BrokerLockedError as exc:
        _report(args, _locked_message(exc, args.command == "serve"))
        return ExitCode.LOCKED
    except AuthenticationError as exc:
        _report(args, str(exc))
        return ExitCode.AUTHENTICATION
    except QueueNotFound as exc:
        _report(args, str(exc))
        return ExitCode.QUEUE_NOT_FOUND
    except (ConfigError, InvalidNameError) as exc:
        _report(args, str(exc))
        return ExitCode.USAGE
    except PermissionError as exc:
        # A permission error on the data directory or its files is a
        # configuration error.
        command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
        _report(args, f"{command} failed: {_describe(exc)}")
        return ExitCode.USAGE
    except (PymqError, OSError) as exc:
        command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
        _report(args, f"{command} failed: {_describe(exc)}")
        return ExitCode.FAILED
    except ValueError as exc:
        # pymq raises a plain ValueError for an argument value it rejects,
        # such as a header name over 65,535 bytes: a usage error.
        command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
        _report(args, f"{command} failed: {_describe(exc)}")
        return ExitCode.USAGE


def _exit_status(code: str | int | None) -> int:
    if code is None:
        return ExitCode.OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return ExitCode.USAGE


def _report(args: argparse.Namespace, message: str) -> None:
    if args.command == "serve":
        # serve configured logging, so its errors go to the log like the rest.
        logger.error("%s", message)
    else:
        print(f"pymq: {message}", file=sys.stderr)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _locked_message(exc: BrokerLockedError, serving: bool) -> str:
    owner = "another process" if exc.pid is None else f"process {exc.pid}"
    advice = (
        "stop that process first"
        if serving
        else "stop that process, or use --url to go through its server"
    )
    return f"data directory {exc.path} is locked by {owner}; {advice}"


# Output -----------------------------------------------------------------------


def _write_line(text: str) -> None:
    try:
        sys.stdout.write(text + "\n")
    except BrokenPipeError as exc:
        raise _OutputClosed from exc


def _flush_output() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise _OutputClosed from exc


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; pointing it at /dev/null keeps that
    # flush from printing a second broken pipe error.
    stdout = sys.__stdout__
    if stdout is not None and sys.stdout is stdout:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stdout.fileno())


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# Parser -----------------------------------------------------------------------


# Options that may come before the command, and whether each takes a value.
_CLIENT_OPTIONS: Final = {
    "--url": True,
    "--data": True,
    "--token-file": True,
    "--tls-ca": True,
    "--tls-cert": True,
    "--tls-key": True,
}
_CLIENT_COMMANDS: Final = {"serve", "put", "get", "stats", "dlq"}
# The value and a summary of each client option, for `pymq --help`.
_CLIENT_OPTION_SUMMARIES: Final = {
    "--url": ("URL", f"a running pymq serve (default: $PYMQ_URL, else {DEFAULT_URL})"),
    "--data": ("DIR", "open this data directory directly instead"),
    "--token-file": ("PATH", "file with the server's token (default: $PYMQ_TOKEN)"),
    "--tls-ca": ("PATH", "authority to check a pymqs:// server against"),
    "--tls-cert": ("PATH", "client certificate for a pymqs:// server"),
    "--tls-key": ("PATH", "key of --tls-cert, if not in its file"),
}


def _options_after_command(argv: list[str] | None) -> list[str]:
    """Move client options given before the command to just after it.

    So "pymq --url URL stats" works as "pymq stats --url URL" does. Anything
    else before the command leaves argv as it is, for argparse to report.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    leading: list[str] = []
    index = 0
    while index < len(words) and words[index].startswith("--"):
        name = words[index].partition("=")[0]
        if name not in _CLIENT_OPTIONS:
            return words
        takes_value = _CLIENT_OPTIONS[name] and "=" not in words[index]
        width = 2 if takes_value else 1
        leading.extend(words[index : index + width])
        index += width
    if not leading or index >= len(words) or words[index] not in _CLIENT_COMMANDS:
        return words
    # dlq takes its own command (list or redrive) before the options.
    command_end = index + (2 if words[index] == "dlq" else 1)
    return words[index:command_end] + leading + words[command_end:]


class _IntermixedParser(argparse.ArgumentParser):
    """A parser that takes options between positionals, as in `put Q --header K=V B`.

    argparse assigns positionals in runs: QUEUE and the optional BODY of
    put are matched together at QUEUE, so a BODY after an option would be
    left over. Intermixed parsing matches the options first and then every
    positional. A parser with subcommands parses as usual, because
    intermixed parsing does not support them.
    """

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        has_subcommands = any(
            action.nargs == argparse.PARSER for action in self._get_positional_actions()
        )
        if self._intermixing or has_subcommands:
            return super().parse_known_args(args, namespace)
        # parse_known_intermixed_args calls parse_known_args twice itself.
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the pymq command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="pymq",
        description="A durable message broker: serve a data directory, put and "
        "get messages, show stats and manage dead-letter queues.",
        epilog=_client_option_help() + "\n\n" + _exit_code_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pymq {__version__}")
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=_IntermixedParser,
    )
    client = _client_options()
    _add_serve(commands)
    _add_put(commands, client)
    _add_get(commands, client)
    _add_stats(commands, client)
    _add_dlq(commands, client)
    return parser


def _client_option_help() -> str:
    lines = [
        "client options of put, get, stats and dlq, which may also come before COMMAND:"
    ]
    for option, (value, summary) in _CLIENT_OPTION_SUMMARIES.items():
        lines.append(f"  {option + ' ' + value:<19}{summary}")
    return "\n".join(lines)


def _exit_code_help() -> str:
    lines = ["exit codes:"]
    for code, meaning in EXIT_CODES.items():
        lines.append(f"  {int(code):<4} {meaning}")
    return "\n".join(lines)


def _client_options() -> argparse.ArgumentParser:
    client = argparse.ArgumentParser(add_help=False)
    exclusive = client.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--url",
        default=os.environ.get("PYMQ_URL", DEFAULT_URL),
        help=f"URL of a running pymq server (default: $PYMQ_URL, else {DEFAULT_URL})",
    )
    exclusive.add_argument(
        "--data",
        metavar="DIR",
        help="open this data directory directly instead of connecting to a "
        "server; fails when a server or another process has it open",
    )
    client.add_argument(
        "--token-file",
        metavar="PATH",
        help="file whose content is the server's token (default: $PYMQ_TOKEN); "
        "only with --url",
    )
    client.add_argument(
        "--tls-ca",
        metavar="PATH",
        help="certificate authority to check a pymqs:// server against "
        "(default: the system's)",
    )
    client.add_argument(
        "--tls-cert",
        metavar="PATH",
        help="client certificate for a pymqs:// server that requires one",
    )
    client.add_argument(
        "--tls-key", metavar="PATH", help="key of --tls-cert, if not in its file"
    )
    return client


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a data directory over the network",
        description="Serve a data directory until SIGTERM or SIGINT. The token, "
        "if any, comes from --token-file or $PYMQ_TOKEN, never from the "
        "command line.",
    )
    serve.add_argument("--data", metavar="DIR", required=True, help="data directory")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s)",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="TCP port to listen on, 0 for any free port (default: %(default)s)",
    )
    serve.add_argument("--unix", metavar="PATH", help="also listen on this Unix socket")
    serve.add_argument(
        "--fsync",
        choices=("always", "interval", "never"),
        default="interval",
        help="when writes are synced to disk (default: %(default)s)",
    )
    serve.add_argument(
        "--token-file",
        metavar="PATH",
        help="file whose content is the token clients must send (default: $PYMQ_TOKEN)",
    )
    serve.add_argument(
        "--port-file",
        metavar="PATH",
        help="write the TCP port the server listens on to this file",
    )
    serve.add_argument(
        "--tls-cert",
        metavar="PATH",
        help="serve TCP with TLS, with this certificate (PEM); clients use pymqs://",
    )
    serve.add_argument(
        "--tls-key", metavar="PATH", help="key of --tls-cert, if not in its file"
    )
    serve.add_argument(
        "--tls-client-ca",
        metavar="PATH",
        help="require client certificates signed by this authority",
    )
    serve.add_argument(
        "--loop",
        choices=SERVE_LOOPS,
        default="auto",
        help="event loop: uvloop (needs pip install 'pymq[fast]'), asyncio's "
        "default, or auto, which is uvloop when it is installed "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="minimum level of the log on stderr (default: %(default)s)",
    )
    storage = serve.add_argument_group(
        "storage",
        "They apply while this server runs. Segments already on disk keep their size.",
    )
    storage.add_argument(
        "--segment-bytes",
        type=_byte_size,
        metavar="BYTES",
        help="size of each new segment file, e.g. 64MiB (default: 64MiB)",
    )
    storage.add_argument(
        "--max-message-bytes",
        type=_byte_size,
        metavar="BYTES",
        help="largest message body accepted, e.g. 1MiB (default: 1MiB)",
    )
    storage.add_argument(
        "--flush-interval",
        type=_flush_interval,
        metavar="SECONDS",
        help="seconds between background flushes (default: 0.1)",
    )
    limits = serve.add_argument_group(
        "limits", "Per-server and per-connection limits; see docs/server.md."
    )
    parsers = {"BYTES": _byte_size, "COUNT": _count, "SECONDS": _seconds}
    for field, unit, text in SERVE_LIMITS:
        option = "--" + field.replace("_", "-")
        limits.add_argument(option, type=parsers[unit], metavar=unit, help=text)
    serve.set_defaults(handler=_serve)


def _add_put(commands: Any, client: argparse.ArgumentParser) -> None:
    put = commands.add_parser(
        "put",
        parents=[client],
        help="put messages into a queue or stream",
        description="Put one message, or with - each line of stdin as one "
        "message (without its newline). Creates the queue if it is missing.",
    )
    put.add_argument("queue", metavar="QUEUE", help="queue or stream name")
    put.add_argument(
        "body",
        metavar="BODY",
        nargs="?",
        default="-",
        help="message body, or - to read one message per line from stdin (default: -)",
    )
    put.add_argument(
        "--header",
        metavar="K=V",
        action="append",
        default=[],
        help="header of every message put; repeat for more",
    )
    put.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        default=0.0,
        help="seconds to wait for room in a full queue with overflow='block' "
        "(default: %(default)s)",
    )
    put.add_argument(
        "--progress",
        action="store_true",
        help="show a progress bar on stderr even when it is not a terminal",
    )
    put.set_defaults(handler=_put)


def _add_get(commands: Any, client: argparse.ArgumentParser) -> None:
    get = commands.add_parser(
        "get",
        parents=[client],
        help="get messages from a queue or a stream group",
        description="Get up to N messages and print each with its offset, "
        "attempt and headers. Exits with 1 when none is available.",
    )
    get.add_argument(
        "queue",
        metavar="QUEUE",
        help="queue name, or S/G for the group G of stream S",
    )
    get.add_argument(
        "-n",
        dest="count",
        metavar="N",
        type=_positive_int,
        default=1,
        help="maximum number of messages (default: %(default)s)",
    )
    get.add_argument(
        "--ack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ack the messages once printed, or with --no-ack nack them, so "
        "they are available again at once",
    )
    get.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        default=0.0,
        help="seconds to wait for the first message (default: %(default)s)",
    )
    get.add_argument(
        "--json", action="store_true", help="print one JSON object per message"
    )
    get.set_defaults(handler=_get)


def _add_stats(commands: Any, client: argparse.ArgumentParser) -> None:
    stats = commands.add_parser(
        "stats",
        parents=[client],
        help="show the counts of queues and stream groups",
        description="Print a table of counts for one queue, stream or stream "
        "group, or for every queue and stream group.",
    )
    stats.add_argument(
        "queue",
        metavar="QUEUE",
        nargs="?",
        help="queue, stream, or S/G for the group G of stream S (default: all)",
    )
    stats.set_defaults(handler=_stats)


def _add_dlq(commands: Any, client: argparse.ArgumentParser) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="list or redrive a dead-letter queue",
        description="Manage QUEUE.dlq, the dead-letter queue of QUEUE. For the "
        "group G of stream S, QUEUE is S/G (or S.G).",
    )
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        parents=[client],
        help="list the messages of a dead-letter queue, leaving them in it",
        description="Print up to N messages of QUEUE.dlq with their x- headers. "
        "Each is taken and then nacked, so it stays in the DLQ, with one more "
        "attempt counted.",
    )
    listing.add_argument("queue", metavar="QUEUE", help="queue whose DLQ to list")
    listing.add_argument(
        "-n",
        dest="count",
        metavar="N",
        type=_positive_int,
        default=100,
        help="maximum number of messages (default: %(default)s)",
    )
    listing.add_argument(
        "--json", action="store_true", help="print one JSON object per message"
    )
    listing.set_defaults(handler=_dlq_list)
    redrive = actions.add_parser(
        "redrive",
        parents=[client],
        help="move the messages of a dead-letter queue back where they failed",
        description="Move every message now in QUEUE.dlq back to the queue or "
        "group it failed in, without its x- headers, and print how many moved.",
    )
    redrive.add_argument("queue", metavar="QUEUE", help="queue whose DLQ to redrive")
    redrive.add_argument(
        "--to", metavar="QUEUE", help="move them all to this queue instead"
    )
    redrive.add_argument(
        "--progress",
        action="store_true",
        help="show a progress bar on stderr even when it is not a terminal",
    )
    redrive.set_defaults(handler=_dlq_redrive)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} must be from 0 to 65535")
    return port


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid number of seconds {text!r}"
        ) from None
    if not (math.isfinite(seconds) and 0 <= seconds < MAX_SECONDS):
        raise argparse.ArgumentTypeError(
            f"{text} seconds must be from 0 to less than {MAX_SECONDS:g}"
        )
    return seconds


def _flush_interval(text: str) -> float:
    """Parse --flush-interval, in the range the broker takes."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid number of seconds {text!r}"
        ) from None
    # Written so that NaN fails the check too.
    if not MIN_FLUSH_INTERVAL <= seconds <= MAX_FLUSH_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"flush interval is {text} seconds; it must be from "
            f"{MIN_FLUSH_INTERVAL:g} to {MAX_FLUSH_INTERVAL:g}"
        )
    return seconds


_BYTE_UNITS: Final = {"": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_BYTE_SIZE: Final = re.compile(r"([0-9]+)\s*([a-z]*)")


def _byte_size(text: str) -> int:
    """Parse a size in bytes: 65536, 64KiB, 64MiB or 1GiB."""
    match = _BYTE_SIZE.fullmatch(text.strip().lower())
    if match is None or match[2] not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}; give bytes, or a number with KiB, MiB or GiB"
        )
    return int(match[1]) * _BYTE_UNITS[match[2]]


def _count(text: str) -> int:
    """Parse a whole number; ServerLimits checks its range."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    return number


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"count {number} must be 1 or more")
    return number


# Tokens and connections ---------------------------------------------------------


def read_token(path: str | None) -> str | None:
    """Read the token from the file path, else from $PYMQ_TOKEN, else None.

    One trailing newline of the file is removed. An empty token, from the
    file or the variable, raises CommandError because it is a mistake rather
    than a request to run without one. So does a file of more than one line.
    """
    if path is None:
        token = os.environ.get("PYMQ_TOKEN")
        if token == "":
            raise CommandError(
                "PYMQ_TOKEN is set but empty; set it to the token or unset it",
                ExitCode.USAGE,
            )
        return token
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(
            f"cannot read token file {path}: {exc.strerror or exc}", ExitCode.USAGE
        ) from None
    except UnicodeDecodeError:
        raise CommandError(
            f"token file {path} is not valid UTF-8", ExitCode.USAGE
        ) from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise CommandError(f"token file {path} is empty", ExitCode.USAGE)
    if "\n" in text:
        raise CommandError(
            f"token file {path} has more than one line; it must contain only the token",
            ExitCode.USAGE,
        )
    return text


@contextlib.contextmanager
def open_broker(args: argparse.Namespace, *, create: bool) -> Iterator[BrokerAPI]:
    """Open the broker that args name (--data or --url) and close it at the end.

    With create False, a --data directory that does not exist raises
    CommandError instead of being created.
    """
    if args.data is not None:
        if args.token_file is not None:
            raise CommandError(
                "--token-file applies only with --url, not with --data",
                ExitCode.USAGE,
            )
        if args.tls_ca or args.tls_cert or args.tls_key:
            raise CommandError(
                "--tls-ca, --tls-cert and --tls-key apply only with a pymqs:// "
                "--url, not with --data",
                ExitCode.USAGE,
            )
        if not args.data:
            raise CommandError(
                "--data is empty; give the path of a data directory",
                ExitCode.USAGE,
            )
        folder = Path(args.data)
        if folder.exists() and not folder.is_dir():
            raise CommandError(
                f"data directory {args.data} is not a directory", ExitCode.USAGE
            )
        if not create and not folder.is_dir():
            raise CommandError(
                f"data directory {args.data} does not exist", ExitCode.USAGE
            )
        try:
            broker = pymq.open(args.data)
        except OSError as exc:
            # The directory, or a folder on its path, cannot be used as it is:
            # not writable, not a folder, or in a file system such as /proc.
            raise CommandError(
                f"cannot open data directory {args.data}: {_describe(exc)}",
                ExitCode.USAGE,
            ) from None
        try:
            yield broker
        finally:
            broker.close()
        return

    url: str = args.url
    if args.tls_key and not args.tls_cert:
        raise CommandError(
            "--tls-key is given without --tls-cert; give --tls-cert too, or "
            "only --tls-cert when its file contains the key",
            ExitCode.USAGE,
        )
    tls = {
        "ca_file": args.tls_ca,
        "cert_file": args.tls_cert,
        "key_file": args.tls_key,
    }
    remote = _connect(url, read_token(args.token_file), tls)
    try:
        yield remote
    except AuthenticationError as exc:
        # A reconnect during the command sends the token again, so a later
        # request can fail too.
        raise CommandError(
            _authentication_message(url, exc), ExitCode.AUTHENTICATION
        ) from None
    except OSError as exc:
        raise CommandError(
            f"lost the connection to {url}: {_describe(exc)}", ExitCode.CONNECTION
        ) from None
    finally:
        try:
            remote.close()
        except (OSError, PymqError) as exc:
            # A failing close changes nothing, because the request has already
            # completed or failed.
            logger.warning("closing the connection to %s failed: %s", url, exc)


def _connect(
    url: str, token: str | None, tls: dict[str, str | None] | None = None
) -> BrokerAPI:
    connect = getattr(pymq, "connect", None)
    if connect is None:
        raise CommandError(
            "this pymq installation has no network client (pymq.connect); "
            "use --data DIR to open a data directory directly",
            ExitCode.USAGE,
        )
    try:
        remote: BrokerAPI = connect(url, token=token, **(tls or {}))
    except AuthenticationError as exc:
        raise CommandError(
            _authentication_message(url, exc), ExitCode.AUTHENTICATION
        ) from None
    except OSError as exc:
        # A refused or timed-out connection may mean that no server runs
        # there. The other errors, TLS ones included, explain themselves.
        hint = ""
        if isinstance(exc, (ConnectionRefusedError, TimeoutError)):
            hint = "; is `pymq serve` running there?"
        elif isinstance(exc, ssl.SSLCertVerificationError):
            hint = (
                "; if the server's certificate is signed by your own authority, "
                "pass it with --tls-ca"
            )
        reason = _describe(exc)
        if (
            exc.errno is not None
            and exc.errno > 0
            and not isinstance(exc, ssl.SSLError)
        ):
            # The client's message names the address too: keep the reason.
            reason = _describe(type(exc)(exc.errno, os.strerror(exc.errno)))
        raise CommandError(
            f"could not connect to {_url_with_port(url)}: {reason}{hint}",
            ExitCode.CONNECTION,
        ) from None
    return remote


def _url_with_port(url: str) -> str:
    """Return url, with the port it stands for when it gives none."""
    try:
        address = parse_url(url)
    except ConfigError:
        return url
    if address.path is not None or urlsplit(url).port is not None:
        return url
    return f"{url} (port {address.port}, the default)"


def _authentication_message(url: str, exc: AuthenticationError) -> str:
    text = str(exc)
    if "token was not checked" in text:
        # A locked-out address: the token may well be right.
        return f"{url}: {text}"
    return f"{url}: {text}; check --token-file or PYMQ_TOKEN"


def split_group(text: str) -> tuple[str, str] | None:
    """Return (stream, group) for S/G, the group G of stream S, else None.

    Raises InvalidNameError for a stream or group name that breaks the
    naming rules.
    """
    if "/" not in text:
        return None
    stream, _, group = text.partition("/")
    return check_name("stream", stream), check_name("group", group)


def _require_group(broker: BrokerAPI, stream: str, group: str) -> None:
    """Raise CommandError unless the group exists: opening it would create it."""
    if broker.names().get(stream) != "stream" or group not in broker.groups(stream):
        raise CommandError(
            f"group {group} of stream {stream} does not exist",
            ExitCode.QUEUE_NOT_FOUND,
        )


def _stream_advice(broker: BrokerAPI, stream: str, command: str) -> str:
    """Return how to name a group of stream in command, with its groups."""
    groups = broker.groups(stream)
    listed = f"its groups: {', '.join(groups)}" if groups else "it has no groups yet"
    return f"{command} {stream}/GROUP for the group GROUP ({listed})"


def _require_consumer(broker: BrokerAPI, target: str) -> tuple[Any, str]:
    """Open the existing queue, or S/G group, that target names.

    Never creates anything. Returns the queue or group and its label for
    messages ("queue jobs", "group billing of stream events").
    """
    pair = split_group(target)
    if pair is not None:
        stream, group = pair
        _require_group(broker, stream, group)
        return broker.stream(stream).group(group), f"group {group} of stream {stream}"
    name: str = check_queue_name(target)
    kind = broker.names().get(name)
    if kind is None:
        raise CommandError(f"queue {name} does not exist", ExitCode.QUEUE_NOT_FOUND)
    if kind == "stream":
        # Reading a stream goes through one of its groups, which keeps the
        # position; a usage error, not a missing queue.
        raise CommandError(
            f"{name} is a stream, not a queue; read it through a group: "
            f"{_stream_advice(broker, name, 'pymq get')}",
            ExitCode.USAGE,
        )
    if kind != "queue":
        raise CommandError(f"{name} is a {kind}, not a queue", ExitCode.QUEUE_NOT_FOUND)
    return broker.queue(name), f"queue {name}"


# serve ------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    token = read_token(args.token_file)
    try:
        import pymq.server as server  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        if exc.name == "pymq.server":
            raise CommandError(
                "pymq serve needs the module pymq.server, which this "
                "installation does not have",
                ExitCode.USAGE,
            ) from None
        raise CommandError(
            f"pymq.server could not be imported: {exc}", ExitCode.USAGE
        ) from None
    address = f"{args.host}:{args.port}"
    if args.unix is not None:
        address += f" and {args.unix}"
    chosen = {}
    for field, _, _ in SERVE_LIMITS:
        if getattr(args, field) is not None:
            chosen[field] = getattr(args, field)
    try:
        limits = server.ServerLimits(**chosen)
    except ConfigError as exc:
        # ServerLimits names its fields; the user typed options.
        field = str(exc).split(" ", 1)[0]
        option = "--" + field.replace("_", "-")
        raise CommandError(
            f"{option}: {exc}".replace(f"{field} is", "the value is", 1),
            ExitCode.USAGE,
        ) from None
    data = Path(args.data)
    if data.exists() and not data.is_dir():
        raise CommandError(
            f"data directory {args.data} is not a directory", ExitCode.USAGE
        )
    if args.port_file is not None:
        try:
            server.check_port_file(args.port_file)
        except OSError as exc:
            raise CommandError(
                f"cannot write --port-file {args.port_file}: {exc.strerror or exc}",
                ExitCode.USAGE,
            ) from None
    created = _missing_folders(Path(args.data))
    try:
        server.run(
            args.data,
            host=args.host,
            port=args.port,
            unix=args.unix,
            fsync=args.fsync,
            token=token,
            port_file=args.port_file,
            limits=limits,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            segment_bytes=args.segment_bytes,
            max_message_bytes=args.max_message_bytes,
            flush_interval=args.flush_interval,
            loop=args.loop,
        )
    except BaseException as exc:
        # A server that fails to start (on a port in use, for example)
        # leaves no new data directory behind.
        _remove_unused_folders(created)
        if isinstance(exc, OSError):
            raise CommandError(
                f"could not serve {args.data} on {address}: {_describe(exc)}",
                ExitCode.USAGE,
            ) from None
        raise
    return ExitCode.OK


def _missing_folders(path: Path) -> list[Path]:
    """Return path and its ancestors that do not exist, deepest first."""
    missing = []
    for folder in [path.absolute(), *path.absolute().parents]:
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    return missing


def _remove_unused_folders(created: list[Path]) -> None:
    """Remove the folders in created that hold nothing a broker left in use.

    created lists the folders made by this command, deepest first. The data
    directory may hold only the LOCK and DATA_MARKER files of a broker that
    has closed: a lock that another process holds now keeps everything.
    """
    if not created:
        return
    data = created[0]
    try:
        entries = os.listdir(data)
    except OSError:
        return
    if not set(entries) <= {"LOCK", DATA_MARKER}:
        return
    if entries:
        try:
            lock = DirectoryLock(str(data))
        except (BrokerLockedError, OSError):
            return
        try:
            (data / DATA_MARKER).unlink(missing_ok=True)
            (data / "LOCK").unlink()
        finally:
            lock.release()
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            # Not empty: something else is using it now.
            return


# put --------------------------------------------------------------------------


def _put(args: argparse.Namespace) -> int:
    headers = parse_headers(args.header)
    if "/" in args.queue:
        stream = args.queue.partition("/")[0]
        raise CommandError(
            f"put takes a queue or a stream, not the group {args.queue}; put "
            f"to the stream ({stream}), and each of its groups receives the "
            f"message",
            ExitCode.USAGE,
        )
    name: str = check_queue_name(args.queue)
    # Checked before connecting, so that a bad header changes nothing.
    check_put_headers(headers, name)
    with open_broker(args, create=True) as broker:
        # A stream takes puts too; anything else is opened (or created) as a
        # queue.
        if broker.names().get(name) == "stream":
            target = broker.stream(name)
        else:
            target = broker.queue(name)
        if args.body != "-":
            offset = target.put(
                os.fsencode(args.body), headers=headers, timeout=args.timeout
            )
            _write_line(f"put 1 message to {name} at offset {offset}")
            return ExitCode.OK
        show_progress = args.progress or sys.stderr.isatty()
        lines = _stdin_lines(_max_message_bytes(target))
        count = _put_lines(target, name, headers, lines, args, show_progress)
        _write_line(f"put {_plural(count, 'message')} to {name}")
    return ExitCode.OK


def parse_headers(items: Sequence[str]) -> dict[str, str] | None:
    """Parse K=V strings into a headers dict, None when there are none.

    The value is everything after the first "=" and may be empty. A key
    given twice is a usage error, since one of its values would be lost.
    """
    headers: dict[str, str] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise CommandError(
                f"invalid header {item!r}: write it as KEY=VALUE", ExitCode.USAGE
            )
        if key in headers:
            raise CommandError(
                f"header {key!r} is given twice ({key}={headers[key]} and "
                f"{item}); give each key once",
                ExitCode.USAGE,
            )
        headers[key] = value
    return headers or None


def check_put_headers(headers: dict[str, str] | None, name: str) -> None:
    """Raise CommandError for headers that a put to queue name would reject.

    The reserved names of a dead-letter move are rejected unless name is a
    DLQ, as the broker does. A name or value must be valid UTF-8: a
    command-line argument that is not arrives with surrogate escapes.
    """
    for key, value in (headers or {}).items():
        if key in RESERVED_HEADERS and not name.endswith(".dlq"):
            raise CommandError(
                f"header {key!r} is reserved: pymq writes "
                f"{', '.join(sorted(RESERVED_HEADERS))} when it moves a message "
                f"to a dead-letter queue and back, so puts to other queues "
                f"reject these names; use another name",
                ExitCode.USAGE,
            )
        for part, text in (("name", key), ("value", value)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raw = os.fsencode(text)
                raise CommandError(
                    f"header {part} {raw!r} is not valid UTF-8; header names "
                    f"and values must be UTF-8 text",
                    ExitCode.USAGE,
                ) from None


class _LineTooLong(Exception):
    """A line of stdin is longer than max_message_bytes; nothing of it was put."""


def _max_message_bytes(target: Any) -> int | None:
    """Return the max_message_bytes of target, or None when it is unknown."""
    connection = getattr(target, "_connection", None)
    if connection is not None:
        limit: int | None = connection.max_message_bytes
        return limit
    # An embedded queue has its stream's core as .stream, a stream as ._core.
    core = getattr(target, "stream", None) or getattr(target, "_core", None)
    store = getattr(core, "store", None)
    return getattr(store, "max_message_bytes", None)


def _stdin_lines(limit: int | None) -> Iterator[bytes | None]:
    """Yield the lines of stdin without their newline.

    Yields None whenever no more input is ready yet, so that the caller
    can send its batch before it waits. At most limit bytes and the
    newline are held for one line, so a line over limit bytes raises
    _LineTooLong without being read whole, and Ctrl-C is handled between
    reads even on input without newlines.
    """
    if sys.stdin is None:
        raise CommandError("stdin is closed; give BODY instead of -", ExitCode.USAGE)
    try:
        fd: int | None = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:
        yield from _stream_lines(limit)
        return
    pending = bytearray()
    number = 0
    end_of_input = False
    while True:
        newline = pending.find(b"\n")
        if newline >= 0:
            line = bytes(pending[:newline])
            del pending[: newline + 1]
        elif end_of_input:
            if not pending:
                return
            line = bytes(pending)
            pending.clear()
        else:
            line = None
        if line is not None or (limit is not None and len(pending) > limit):
            number += 1
            if line is None or (limit is not None and len(line) > limit):
                raise _LineTooLong(
                    f"line {number} of stdin is longer than max_message_bytes "
                    f"({limit} bytes)"
                )
            yield line
            continue
        if not select.select([fd], [], [], 0)[0]:
            yield None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            end_of_input = True
        pending += chunk


def _stream_lines(limit: int | None) -> Iterator[bytes]:
    """Yield the lines of a sys.stdin that has no file descriptor."""
    binary = getattr(sys.stdin, "buffer", None)
    size = -1 if limit is None else limit + 1
    number = 0
    while True:
        if binary is None:
            line = sys.stdin.readline(size).encode()
        else:
            line = binary.readline(size)
        if not line:
            return
        number += 1
        if limit is not None and len(line) > limit and not line.endswith(b"\n"):
            raise _LineTooLong(
                f"line {number} of stdin is longer than max_message_bytes "
                f"({limit} bytes)"
            )
        yield line.removesuffix(b"\n")


def _put_lines(
    target: Any,
    name: str,
    headers: dict[str, str] | None,
    lines: Iterable[bytes | None],
    args: argparse.Namespace,
    show_progress: bool,
) -> int:
    """Put each line as one message, in batches, and return the count.

    A batch is at most PUT_BATCH lines or PUT_BATCH_BYTES bytes of bodies.
    """
    count = 0
    batch: list[bytes] = []
    batch_bytes = 0
    with tqdm(
        desc=f"put {name}",
        unit="msg",
        file=sys.stderr,
        disable=not show_progress,
    ) as progress:

        def put_batch() -> None:
            nonlocal count, batch, batch_bytes
            target.put_many(batch, headers=headers, timeout=args.timeout)
            count += len(batch)
            progress.update(len(batch))
            batch = []
            batch_bytes = 0

        try:
            try:
                for line in lines:
                    if line is None:
                        # No more input is ready: send what is held, so
                        # that a slow pipe's lines are not kept back.
                        if batch:
                            put_batch()
                        continue
                    batch.append(line)
                    batch_bytes += len(line)
                    if len(batch) == PUT_BATCH or batch_bytes >= PUT_BATCH_BYTES:
                        put_batch()
            except _LineTooLong as exc:
                if batch:
                    put_batch()
                raise CommandError(str(exc), ExitCode.FAILED) from None
            if batch:
                put_batch()
        except BaseException:
            # put_many writes all of a batch or none of it, so count is exact.
            if count:
                print(
                    f"pymq: put {_plural(count, 'message')} to {name}, then failed",
                    file=sys.stderr,
                )
            raise
    return count


# get ----------------------------------------------------------------------------


def _get(args: argparse.Namespace) -> int:
    # Names are checked before the broker is opened.
    if split_group(args.queue) is None:
        check_queue_name(args.queue)
    with open_broker(args, create=False) as broker:
        queue, label = _require_consumer(broker, args.queue)
        messages = take_messages(queue, args.count, args.timeout)
        if not messages:
            within = f" within {args.timeout:g} seconds" if args.timeout else ""
            raise CommandError(
                f"{label} had no message available{within}",
                ExitCode.NOTHING_FOUND,
            )
        written = 0
        try:
            for message in messages:
                _write_line(format_message(message, args.json))
                # Flushed line by line, so that a broken pipe leaves no
                # doubt about which lines the pipe accepted.
                _flush_output()
                written += 1
        except BaseException:
            # The lines the pipe accepted count as written, as when every
            # write succeeds. The rest were not printed, so not consumed.
            unprinted = messages
            if args.ack:
                unprinted = messages[written:]
                if written:
                    with contextlib.suppress(PymqError, OSError):
                        queue.ack_many(messages[:written])
            for message in unprinted:
                with contextlib.suppress(PymqError, OSError):
                    message.nack()
            raise
        if args.ack:
            queue.ack_many(messages)
        else:
            for message in messages:
                message.nack()
    return ExitCode.OK


def take_messages(consumer: Any, count: int, timeout: float) -> list[Any]:
    """Deliver up to count messages, waiting up to timeout for the first.

    After the first, only messages available at once are taken. Fewer than
    count come back when the consumer reaches its max_in_flight, or the
    connection the server's max_unacked.
    """
    messages: list[Any] = consumer.get_many(min(count, GET_BATCH), timeout=timeout)
    while messages and len(messages) < count:
        try:
            more = consumer.get_many(min(count - len(messages), GET_BATCH), timeout=0)
        except ServerError as exc:
            if exc.code != TOO_MANY_UNACKED:
                raise
            # The connection is at max_unacked: print the messages taken.
            break
        if not more:
            break
        messages.extend(more)
    return messages


def escape_text(text: str) -> str:
    """Escape backslashes and unprintable characters as a Python literal does.

    So a body prints as one line, and cannot send control sequences to the
    terminal: a newline becomes \\n and ESC becomes \\x1b.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return _ESCAPE_CANDIDATE.sub(_escape_character, text)


def json_line(value: Any) -> str:
    """Return value as JSON text, with unprintable characters as \\u escapes.

    json.dumps escapes only the characters below U+0020, so DEL, the C1
    controls and the bidirectional overrides are escaped here. The other
    text stays as it is, UTF-8 included.
    """
    text = json.dumps(value, ensure_ascii=False)
    if text.isprintable():
        return text
    return _ESCAPE_CANDIDATE.sub(_escape_json_character, text)


def _escape_json_character(match: re.Match[str]) -> str:
    character = match[0]
    if character.isprintable():
        return character
    return json.dumps(character)[1:-1]


def _escape_character(match: re.Match[str]) -> str:
    character = match[0]
    if character.isprintable() and character != "\\":
        return character
    # The repr of one character is that character's escape, in quotes.
    return repr(character)[1:-1]


def format_message(message: Any, as_json: bool) -> str:
    """Format a message as one line: key=value fields, or a JSON object.

    The body is text when it decodes as UTF-8. Otherwise it is the repr of
    the bytes, or in JSON, base64 under "body_base64" instead of "body".
    In key=value fields the headers are JSON with their text unescaped,
    as the body is.
    """
    body: bytes = message.body
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if as_json:
        record: dict[str, Any] = {
            "offset": message.offset,
            "attempt": message.attempt,
            "timestamp": message.timestamp,
            "headers": message.headers,
        }
        if text is None:
            record["body_base64"] = base64.b64encode(body).decode("ascii")
        else:
            record["body"] = text
        return json.dumps(record)
    body_text = repr(body) if text is None else escape_text(text)
    return (
        f"offset={message.offset} attempt={message.attempt} "
        f"headers={json_line(message.headers)} body={body_text}"
    )


# stats --------------------------------------------------------------------------


def _stats(args: argparse.Namespace) -> int:
    with open_broker(args, create=False) as broker:
        names = broker.names()
        group_name = None
        pair = None if args.queue is None else split_group(args.queue)
        if args.queue is None:
            targets = list(names.items())
        elif pair is not None:
            # S/G, as the table names the group G of stream S.
            stream_name, group_name = pair
            _require_group(broker, stream_name, group_name)
            targets = [(stream_name, "stream")]
        else:
            name: str = check_queue_name(args.queue)
            if name not in names:
                raise CommandError(
                    f"queue {name} does not exist", ExitCode.QUEUE_NOT_FOUND
                )
            targets = [(name, names[name])]
        rows: list[list[str]] = []
        for name, kind in targets:
            if kind == "queue":
                rows.append(_stats_row(name, "queue", broker.queue(name).stats()))
                continue
            # groups() lists only existing groups, and opening one of them
            # creates nothing.
            stream = broker.stream(name)
            groups = broker.groups(name) if group_name is None else [group_name]
            for group in groups:
                stats = stream.group(group).stats()
                rows.append(_stats_row(f"{name}/{group}", "group", stats))
    if not rows:
        if args.queue is None:
            print("pymq: no queues or stream groups to show", file=sys.stderr)
        else:
            print(f"pymq: stream {args.queue} has no groups", file=sys.stderr)
        return ExitCode.OK
    for line in format_table(STATS_COLUMNS, rows, left_columns=2):
        _write_line(line)
    return ExitCode.OK


def _stats_row(name: str, kind: str, stats: Any) -> list[str]:
    age = stats.oldest_unacked_age
    return [
        name,
        kind,
        str(stats.depth),
        str(stats.in_flight),
        str(stats.waiting),
        str(stats.acked),
        str(stats.dead_lettered),
        "-" if age is None else f"{age:.1f}",
        str(stats.damaged),
        str(stats.skipped),
    ]


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], left_columns: int
) -> list[str]:
    """Align rows under headers, two spaces apart, without trailing spaces.

    The first left_columns columns are aligned left, the rest right.
    """
    widths = [len(header) for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            cell.ljust(width) if index < left_columns else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


# dlq ----------------------------------------------------------------------------


def _dlq_list(args: argparse.Namespace) -> int:
    source, dlq_name = _dlq_names(args.queue)
    with open_broker(args, create=False) as broker:
        if not _dlq_exists(broker, args.queue, source, dlq_name, "pymq dlq list"):
            print(f"pymq: {dlq_name} has no messages", file=sys.stderr)
            return ExitCode.OK
        dlq = broker.queue(dlq_name)
        depth: int = dlq.stats().depth
        messages = take_messages(dlq, args.count, 0.0)
        try:
            for message in messages:
                _write_line(
                    format_message(message, True)
                    if args.json
                    else format_dead_letter(message)
                )
            _flush_output()
        finally:
            # Listing must not consume: every message goes back at once.
            for message in messages:
                message.nack(delay=0.0)
    if not messages:
        print(f"pymq: {dlq_name} has no messages available", file=sys.stderr)
    elif len(messages) < depth:
        print(
            f"pymq: listed {len(messages)} of {depth} messages in {dlq_name}; "
            f"pass -n to list more",
            file=sys.stderr,
        )
    return ExitCode.OK


def _dlq_redrive(args: argparse.Namespace) -> int:
    source, dlq_name = _dlq_names(args.queue)
    to: str | None = None if args.to is None else check_name("queue", args.to)
    where = "" if to is None else f" to {to}"
    with open_broker(args, create=False) as broker:
        if to is not None:
            # Checked before the DLQ, so a mistyped --to is reported even
            # when there is nothing to move.
            _check_redrive_target(broker, to)
        moved = 0
        if _dlq_exists(broker, args.queue, source, dlq_name, "pymq dlq redrive"):
            show_progress = args.progress or sys.stderr.isatty()
            try:
                moved = _redrive(broker, dlq_name, to, where, show_progress)
            except PymqError as exc:
                text = str(exc)
                if not text.endswith(REDRIVE_TO_ADVICE):
                    raise
                # The broker's advice names its argument to=; here it is --to.
                advice = "pass --to QUEUE to move the messages to a queue"
                raise CommandError(
                    f"dlq redrive failed: {type(exc).__name__}: "
                    f"{text.removesuffix(REDRIVE_TO_ADVICE)}{advice}",
                    ExitCode.FAILED,
                ) from None
    _write_line(f"moved {_plural(moved, 'message')} from {dlq_name}{where}")
    return ExitCode.OK


def _check_redrive_target(broker: BrokerAPI, to: str) -> None:
    """Raise CommandError unless the queue to exists: redrive never creates it."""
    kind = broker.names().get(to)
    if kind is None:
        raise CommandError(
            f"queue {to} (--to) does not exist; redrive moves messages only "
            f"into an existing queue",
            ExitCode.QUEUE_NOT_FOUND,
        )
    if kind != "queue":
        raise CommandError(
            f"{to} (--to) is a {kind}, not a queue", ExitCode.QUEUE_NOT_FOUND
        )


def _redrive(
    broker: BrokerAPI, dlq_name: str, to: str | None, where: str, show_progress: bool
) -> int:
    """Redrive dlq_name with a progress bar; return the number moved.

    The bar's total is the DLQ's depth when the redrive starts. The broker
    reports the count after each batch it moved, so when the redrive
    fails, the messages already moved are reported before the error.
    """
    total = None
    if show_progress:
        total = broker.queue(dlq_name).stats().depth
    # A disabled bar counts nothing, so the count is kept here.
    moved = 0
    try:
        with tqdm(
            desc=f"redrive {dlq_name}",
            unit="msg",
            total=total,
            file=sys.stderr,
            disable=not show_progress,
        ) as progress:

            def moved_so_far(count: int) -> None:
                nonlocal moved
                progress.update(count - moved)
                moved = count

            moved_so_far(broker.redrive(dlq_name, to=to, progress=moved_so_far))
    except BaseException:
        # After the bar's last line, as put reports a partial count.
        if moved:
            print(
                f"pymq: moved {_plural(moved, 'message')} from "
                f"{dlq_name}{where}, then failed",
                file=sys.stderr,
            )
        raise
    return moved


def _dlq_names(source: str) -> tuple[str, str]:
    """Return the source and DLQ names for QUEUE, S.G or S/G (group G of S)."""
    pair = split_group(source)
    if pair is not None:
        source = ".".join(pair)
    else:
        check_name("queue", source)
    dlq_name = f"{source}.dlq"
    check_name("dead-letter queue", dlq_name, derived=True)
    return source, dlq_name


def _dlq_exists(
    broker: BrokerAPI, text: str, source: str, dlq_name: str, command: str
) -> bool:
    """Return whether dlq_name exists, or raise CommandError if its source is missing.

    text is the argument of command (such as "pymq dlq list"): a queue, S.G
    or S/G for the group G of stream S. A source that exists but never
    dead-lettered a message has no DLQ yet.
    """
    pair = split_group(text)
    if pair is not None:
        _require_group(broker, *pair)
        return dlq_name in broker.names()
    names = broker.names()
    if dlq_name in names:
        return True
    if names.get(source) == "queue":
        return False
    if names.get(source) == "stream":
        raise CommandError(
            f"{source} is a stream, which has no dead-letter queue; each of its "
            f"groups has one: {_stream_advice(broker, source, command)}",
            ExitCode.USAGE,
        )
    for stream, kind in names.items():
        prefix = f"{stream}."
        if (
            kind == "stream"
            and source.startswith(prefix)
            and source.removeprefix(prefix) in broker.groups(stream)
        ):
            return False
    raise CommandError(
        f"queue {source} does not exist, nor a stream group of that name",
        ExitCode.QUEUE_NOT_FOUND,
    )


def format_dead_letter(message: Any) -> str:
    """Format a dead-letter message as one line, its x- headers first.

    x-dead-at is shown as UTC time. The other headers follow as JSON, then
    the body as format_message shows it.
    """
    headers: dict[str, str] = dict(message.headers)
    fields = [f"offset={message.offset}"]
    for key in DEAD_LETTER_HEADERS:
        value = headers.pop(key, None)
        if not value:
            continue
        if key == "x-dead-at":
            value = _utc_time(value)
        quoted = (
            value
            if _PLAIN_VALUE.fullmatch(value) and value.isprintable()
            else json_line(value)
        )
        fields.append(f"{key}={quoted}")
    body: bytes = message.body
    try:
        text = escape_text(body.decode("utf-8"))
    except UnicodeDecodeError:
        text = repr(body)
    fields.append(f"headers={json_line(headers)}")
    fields.append(f"body={text}")
    return " ".join(fields)


def _utc_time(nanoseconds: str) -> str:
    """Format nanoseconds since the epoch as ISO 8601 UTC, other text unchanged."""
    try:
        count = int(nanoseconds)
        seconds, remainder = divmod(count, 1_000_000_000)
        moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    except (ValueError, OverflowError, OSError):
        return nanoseconds
    moment = moment.replace(microsecond=remainder // 1000)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
