"""Constants of the wire protocol shared by the server and the clients.

The frame codec itself is compiled (pymq._core); docs/protocol.md describes
every byte.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from pymq import errors
from pymq._core import PROTOCOL_OPCODES

__all__ = [
    "DEFAULT_PORT",
    "ERROR_CODES",
    "PREAMBLE",
    "Address",
    "decode_error",
    "encode_error",
    "error_code",
    "parse_url",
]

PREAMBLE: Final = b"PMQ\x00\x01\x00\x00\x00"
# Longest Unix socket path Linux accepts, in bytes: sun_path is 108 bytes
# including the terminating NUL (see unix(7)).
MAX_UNIX_PATH_BYTES: Final = 107
PROTOCOL_VERSION: Final = 1
DEFAULT_PORT: Final = 7420

HELLO: Final = PROTOCOL_OPCODES["HELLO"]
PING: Final = PROTOCOL_OPCODES["PING"]
OPEN: Final = PROTOCOL_OPCODES["OPEN"]
STATS: Final = PROTOCOL_OPCODES["STATS"]
REDRIVE: Final = PROTOCOL_OPCODES["REDRIVE"]
NAMES: Final = PROTOCOL_OPCODES["NAMES"]
GROUPS: Final = PROTOCOL_OPCODES["GROUPS"]
PUBLISH: Final = PROTOCOL_OPCODES["PUBLISH"]
FETCH: Final = PROTOCOL_OPCODES["FETCH"]
SUBSCRIBE: Final = PROTOCOL_OPCODES["SUBSCRIBE"]
CREDIT: Final = PROTOCOL_OPCODES["CREDIT"]
UNSUBSCRIBE: Final = PROTOCOL_OPCODES["UNSUBSCRIBE"]
CANCEL: Final = PROTOCOL_OPCODES["CANCEL"]
DELIVER: Final = PROTOCOL_OPCODES["DELIVER"]
ACK: Final = PROTOCOL_OPCODES["ACK"]
NACK: Final = PROTOCOL_OPCODES["NACK"]
EXTEND: Final = PROTOCOL_OPCODES["EXTEND"]
REJECT: Final = PROTOCOL_OPCODES["REJECT"]

FLAG_REPLY: Final = 1
FLAG_ERROR: Final = 2
FLAG_NO_REPLY: Final = 4
FLAG_PUSH: Final = 8
FLAG_MORE: Final = 16

# The error code of a FETCH on a connection already at max_unacked.
TOO_MANY_UNACKED: Final = 19
# The error code of a FETCH that a CANCEL stopped before it took a message.
CANCELLED: Final = 20

# Error codes: (code, retriable, class). The class is what the client raises.
ERROR_CODES: Final[dict[int, tuple[str, bool, type[errors.PymqError]]]] = {
    1: ("PROTOCOL", False, errors.ProtocolError),
    2: ("FRAME_TOO_LARGE", False, errors.FrameTooLargeError),
    3: ("UNSUPPORTED_VERSION", False, errors.ProtocolError),
    4: ("UNKNOWN_OPCODE", False, errors.ProtocolError),
    5: ("NOT_AUTHORIZED", False, errors.AuthenticationError),
    6: ("QUEUE_NOT_FOUND", False, errors.QueueNotFound),
    7: ("INVALID_NAME", False, errors.InvalidNameError),
    8: ("CONFIG", False, errors.ConfigError),
    9: ("STALE_RECEIPT", False, errors.StaleReceiptError),
    10: ("QUEUE_FULL", True, errors.QueueFull),
    11: ("MESSAGE_TOO_LARGE", False, errors.MessageTooLargeError),
    12: ("CORRUPT_BATCH", True, errors.CorruptBatchError),
    13: ("SHUTTING_DOWN", True, errors.ShuttingDownError),
    14: ("UNKNOWN_HANDLE", False, errors.ProtocolError),
    15: ("STORAGE", True, errors.ServerError),
    16: ("TOO_MANY_CONNECTIONS", True, errors.ServerError),
    17: ("INVALID_REQUEST", False, errors.ServerError),
    18: ("UNKNOWN", False, errors.ServerError),
    TOO_MANY_UNACKED: ("TOO_MANY_UNACKED", True, errors.ServerError),
    CANCELLED: ("CANCELLED", False, errors.ServerError),
}
_CODE_OF_CLASS: Final[list[tuple[type[BaseException], int]]] = [
    (errors.FrameTooLargeError, 2),
    (errors.AuthenticationError, 5),
    (errors.QueueNotFound, 6),
    (errors.InvalidNameError, 7),
    (errors.MessageTooLargeError, 11),
    (errors.ConfigError, 8),
    (errors.StaleReceiptError, 9),
    (errors.QueueFull, 10),
    (errors.CorruptBatchError, 12),
    (errors.ClosedError, 13),
    (errors.ProtocolError, 1),
    (errors.CorruptSegmentError, 15),
    (OSError, 15),
    (ValueError, 17),
    (TypeError, 17),
    # Any other error of pymq's own is about the request, not a bug.
    (errors.PymqError, 17),
]
_ERROR_HEAD: Final = struct.Struct("<HBx")
# The size and the limit in the text of a MessageTooLargeError.
_SIZES: Final = re.compile(r"(\d+) bytes; (?:maximum|max_frame_bytes) is (\d+)")


def error_code(exc: BaseException) -> int:
    """Return the wire code for exc: its class's code, or UNKNOWN (18).

    A ServerError raised with a known code keeps it.
    """
    if isinstance(exc, errors.ServerError) and exc.code in ERROR_CODES:
        return exc.code
    for cls, code in _CODE_OF_CLASS:
        if isinstance(exc, cls):
            return code
    return 18


def encode_error(code: int, message: str) -> bytes:
    """Return an error payload: u16 code, u8 retriable, u8 0, UTF-8 text."""
    retriable = ERROR_CODES.get(code, ERROR_CODES[18])[1]
    return _ERROR_HEAD.pack(code, retriable) + message.encode("utf-8")


def decode_error(payload: bytes) -> errors.PymqError:
    """Return the exception that an error payload encodes."""
    if len(payload) < _ERROR_HEAD.size:
        return errors.ProtocolError(f"error frame of {len(payload)} bytes")
    code, retriable = _ERROR_HEAD.unpack_from(payload)
    text = payload[_ERROR_HEAD.size :].decode("utf-8", "replace")
    cls = ERROR_CODES.get(code, ERROR_CODES[18])[2]
    exc: errors.PymqError
    if cls is errors.ServerError:
        exc = errors.ServerError(text, code=code)
    elif cls is errors.MessageTooLargeError:
        found = _SIZES.search(text)
        size, limit = (int(found[1]), int(found[2])) if found else (-1, -1)
        exc = errors.MessageTooLargeError(size, limit, text)
    else:
        exc = cls(text)
    # Every error from a server carries its wire code and retriable flag.
    exc.code = code  # type: ignore[attr-defined]
    exc.retriable = bool(retriable)  # type: ignore[attr-defined]
    return exc


def encode_json(value: Any) -> bytes:
    """Return the payload of a control frame: one UTF-8 JSON object."""
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def decode_json(payload: bytes) -> dict[str, Any]:
    """Parse a control frame's payload; raise ProtocolError unless an object."""
    try:
        # Decoded here: json.loads guesses UTF-16 or UTF-32 for some bytes.
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.ProtocolError(
            f"control payload is not valid UTF-8 JSON: {exc.reason} "
            f"{payload[exc.start]:#04x} at byte {exc.start}"
        ) from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise errors.ProtocolError(
            f"control payload is not JSON, or nested too deeply: {exc}"
        ) from None
    if not isinstance(value, dict):
        raise errors.ProtocolError(
            f"control payload is a JSON {type(value).__name__}, not an object"
        )
    return value


@dataclass(frozen=True)
class Address:
    """A server's address: TCP host and port, or a Unix socket path."""

    scheme: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "pymqs"

    def __str__(self) -> str:
        if self.path is not None:
            return f"pymq+unix://{self.path}"
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_url(url: str) -> Address:
    """Parse pymq://host:port, pymqs://host:port or pymq+unix:///path.

    Parts that pymq does not use (a user, a query, a fragment, a path
    after host:port) raise ConfigError rather than being ignored, and so
    does a URL that cannot be parsed, such as one with an unclosed "[".
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise errors.ConfigError(
            f"URL {url!r} is invalid: {exc}; write pymq://HOST:PORT, "
            f"pymqs://HOST:PORT or pymq+unix:///PATH"
        ) from None
    if "@" in parts.netloc:
        # Messages never repeat what may be a password.
        url = url.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)
    unused = [
        name
        for name, value in (
            ("query", parts.query),
            ("fragment", parts.fragment),
            ("user", parts.username),
        )
        if value
    ]
    if parts.scheme == "pymq+unix":
        path = parts.path
        if not path:
            raise errors.ConfigError(f"URL {url!r} names no socket path")
        if parts.netloc:
            unused.append("host")
        if unused:
            raise errors.ConfigError(
                f"URL {url!r} has a {' and a '.join(unused)}, which pymq does "
                f"not use; write pymq+unix:///PATH"
            )
        check_unix_path(path)
        return Address("pymq+unix", path=path)
    if parts.scheme not in ("pymq", "pymqs"):
        raise errors.ConfigError(
            f"URL {url!r} has scheme {parts.scheme!r}; use pymq://HOST:PORT, "
            f"pymqs://HOST:PORT or pymq+unix:///PATH"
        )
    if parts.path not in ("", "/"):
        unused.append("path")
    if unused:
        raise errors.ConfigError(
            f"URL {url!r} has a {' and a '.join(unused)}, which pymq does not "
            f"use; write {parts.scheme}://HOST:PORT"
        )
    try:
        port = parts.port
    except ValueError:
        text = parts.netloc.rpartition(":")[2]
        if text.isdigit():
            raise errors.ConfigError(
                f"URL {url!r} has port {text}; it must be from 0 to 65535"
            ) from None
        raise errors.ConfigError(
            f"URL {url!r} has port {text!r}; it must be a number from 0 to 65535"
        ) from None
    try:
        hostname = parts.hostname
    except ValueError as exc:
        raise errors.ConfigError(f"URL {url!r} is invalid: {exc}") from None
    if not hostname:
        raise errors.ConfigError(f"URL {url!r} names no host")
    return Address(parts.scheme, hostname, DEFAULT_PORT if port is None else port)


def check_unix_path(path: str) -> None:
    """Raise ConfigError if path is too long for a Unix socket address."""
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH_BYTES:
        raise errors.ConfigError(
            f"Unix socket path {path} is {size} bytes; the limit is "
            f"{MAX_UNIX_PATH_BYTES} bytes on Linux, so choose a shorter path"
        )
