"""The blocking client: the embedded broker's API, over a connection.

pymq.connect(url) returns a RemoteBroker whose queues, streams and groups
take the same calls as those of pymq.open(). One connection is shared by
every thread: requests are pipelined, and whichever thread is waiting
reads the socket for all of them, so a long-polling get in one thread does
not hold up the others.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
import numbers
import os
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar

from pymq import errors, protocol
from pymq._core import (
    FrameReader,
    MessageBatch,
    RemoteMessage,
    crc32c,
    decode_batch,
    decode_deliveries,
    encode_frame,
    encode_publish,
    encode_receipts,
    measure_bodies,
    put_header_bytes,
)
from pymq._version import __version__
from pymq.broker import (
    GROUP_DEFAULTS,
    MAX_REASON_BYTES,
    QUEUE_DEFAULTS,
    STREAM_DEFAULTS,
    _check_options,
    cut_reason,
)
from pymq.names import check_name, check_queue_name
from pymq.protocol import (
    FLAG_ERROR,
    FLAG_MORE,
    FLAG_NO_REPLY,
    FLAG_PUSH,
    FLAG_REPLY,
    PREAMBLE,
    Address,
    decode_error,
    decode_json,
    encode_json,
    parse_url,
)
from pymq.types import QueueStats

__all__ = [
    "RemoteBroker",
    "RemoteGroup",
    "RemoteMessage",
    "RemoteQueue",
    "RemoteStream",
    "connect",
]

logger = logging.getLogger("pymq.client")

_FETCH: Final = struct.Struct("<Ii")
_F64: Final = struct.Struct("<d")
_U32: Final = struct.Struct("<I")
_PUBLISHED: Final = struct.Struct("<QI")
# The head of a DELIVER payload: u32 count, u32 CRC32C of the rest.
_DELIVER_HEAD: Final = struct.Struct("<II")
# Bytes of one delivery before its record; the record's length is the
# u32 at offset 32.
_DELIVERY_HEAD_BYTES: Final = 36
# Requests sent again on their own after a reconnect, by both clients.
SAFE_TO_RETRY: Final = frozenset(
    {
        protocol.OPEN,
        protocol.STATS,
        protocol.NAMES,
        protocol.GROUPS,
        protocol.PING,
        # Deliveries whose reply was lost are released by the server when
        # the connection goes, so fetching again loses nothing.
        protocol.FETCH,
        protocol.SUBSCRIBE,
    }
)
_MAX_WAIT_MS: Final = 0x7FFFFFFF
# Bytes one read of the socket takes at most.
_RECV_BYTES: Final = 262144
_MAX_RECEIPT: Final = (1 << 64) - 1
_MAX_CONNECT_TIMEOUT: Final = 1e9
_MAX_RECONNECT_ATTEMPTS: Final = 1_000_000
# The maximum busy poll of connect(busy_poll=...), in seconds.
_MAX_BUSY_POLL: Final = 0.01
# How long the blocking client polls its socket for a reply, at most, before
# it sleeps in recv() (see FrameReader.busy_poll). On the 2-core machine of
# docs/benchmarks.md, a put, get and ack of 100 B took 66 to 73 µs at p50
# against a server on the same machine: 20 to 25 µs a request.
DEFAULT_BUSY_POLL: Final = 100e-6

Frame = tuple[int, int, int, int, bytes]
_Decoded = TypeVar("_Decoded")


def wait_ms(timeout: float | None) -> int:
    """Return the FETCH wait for timeout seconds: -1 waits without a limit."""
    if timeout is None:
        return -1
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not 0 <= timeout < 1e9:
        raise ValueError(
            f"timeout is {timeout} seconds; it must be from 0 to 1e9, or None "
            f"to wait without a limit"
        )
    milliseconds = math.ceil(timeout * 1000)
    return -1 if milliseconds > _MAX_WAIT_MS else milliseconds


def _check_timeout(timeout: float | None) -> None:
    wait_ms(timeout)


def check_receipt(receipt: object) -> None:
    """Raise as the embedded broker does for a receipt that is not a u64 int.

    A receipt is a u64 on the wire, so a negative or larger int cannot name
    a delivery. Such an int raises OverflowError, as in the embedded broker.
    """
    if isinstance(receipt, bool) or not isinstance(receipt, int):
        raise TypeError(f"receipt must be an int, not {type(receipt).__name__}")
    if not 0 <= receipt <= _MAX_RECEIPT:
        raise OverflowError(
            f"receipt {receipt} is out of range; a receipt is from 0 to 2**64 - 1"
        )


def check_connect_options(
    connect_timeout: object, reconnect_attempts: object, token: object = None
) -> None:
    """Raise TypeError or ConfigError for options of connect() out of range."""
    if token is not None and not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    if isinstance(connect_timeout, bool) or not isinstance(
        connect_timeout, (int, float)
    ):
        raise TypeError(
            f"connect_timeout must be a number of seconds, not {connect_timeout!r}"
        )
    # Written so that NaN fails the check too.
    if not 0 < connect_timeout <= _MAX_CONNECT_TIMEOUT:
        raise errors.ConfigError(
            f"connect_timeout is {connect_timeout} seconds; it must be more than 0 "
            f"and at most {_MAX_CONNECT_TIMEOUT:g}"
        )
    if isinstance(reconnect_attempts, bool) or not isinstance(reconnect_attempts, int):
        raise TypeError(
            f"reconnect_attempts must be an int, not {reconnect_attempts!r}"
        )
    if not 0 <= reconnect_attempts <= _MAX_RECONNECT_ATTEMPTS:
        raise errors.ConfigError(
            f"reconnect_attempts is {reconnect_attempts}; it must be from 0 to "
            f"{_MAX_RECONNECT_ATTEMPTS}"
        )


def encode_reason(reason: object) -> bytes:
    """Return a reject reason as the UTF-8 bytes a REJECT frame carries.

    A reason over MAX_REASON_BYTES is cut at the last whole character
    within that many bytes, and "..." is appended. Raises TypeError for a
    reason that is not a str and ValueError for one that is not valid
    Unicode (a lone surrogate), before anything is sent.
    """
    if not isinstance(reason, str):
        raise TypeError(f"reason must be a str, not {type(reason).__name__}")
    try:
        encoded = reason.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"reason cannot be encoded as UTF-8: character "
            f"{reason[exc.start]!r} at index {exc.start} is {exc.reason}"
        ) from None
    if len(encoded) <= MAX_REASON_BYTES:
        return encoded
    # The embedded broker's cut, so that both leave the same x-reason.
    return cut_reason(reason).encode("utf-8")


def reconnect_attempts_failed(
    address: object, attempts: int, exc: BaseException
) -> str:
    """Return the message for a reconnect that failed attempts times."""
    tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
    return f"could not reconnect to {address} after {tries}: {exc}"


def handshake_closed(address: Address) -> str:
    """Return the message for a server that closed before it replied to HELLO.

    A TLS server closes the connection of a client that sends a plain
    preamble, and a server that requires client certificates closes one
    that sent none, or one it does not trust, after the TLS handshake.
    """
    if address.tls:
        hint = (
            "a server that requires a client certificate does this when the "
            "client sends none, or one it does not trust"
        )
    else:
        hint = (
            "a TLS server does this to a plain client, so if it serves TLS, "
            "use pymqs://"
        )
    return f"{address} closed the connection during the handshake; {hint}"


def check_busy_poll(busy_poll: object) -> float:
    """Return connect()'s busy_poll, or raise TypeError or ConfigError.

    With one CPU to run on, polling would only keep the server from
    running, so the default is 0 there.
    """
    if busy_poll is None:
        return DEFAULT_BUSY_POLL if len(os.sched_getaffinity(0)) > 1 else 0.0
    # numbers.Real also takes numpy's integer scalars, which are not int.
    if isinstance(busy_poll, bool) or not isinstance(busy_poll, numbers.Real):
        raise TypeError(f"busy_poll must be a number of seconds, not {busy_poll!r}")
    try:
        seconds = float(busy_poll)
    except OverflowError:
        # An int or Fraction past the range of a float is out of range here
        # too, whatever its sign.
        seconds = math.inf
    # Written so that NaN fails the check too.
    if not 0 <= seconds <= _MAX_BUSY_POLL:
        raise errors.ConfigError(
            f"busy_poll is {format_number(busy_poll)} seconds; it must be from 0 "
            f"to {_MAX_BUSY_POLL:g}"
        )
    return seconds


def format_number(value: object) -> str:
    """Return str(value), or a description when str() cannot print it.

    It calls str() because format() prints numpy's longdouble through a
    float, so 1e4000 would show as inf.
    """
    try:
        return str(value)
    except ValueError:
        # An int, or a Fraction's numerator or denominator, has more
        # digits than sys.get_int_max_str_digits() allows.
        limit = sys.get_int_max_str_digits()
        return f"<{type(value).__name__} of more than {limit} digits>"


def connect_failed(address: Address, exc: OSError) -> OSError:
    """Return exc again, of the same class, with a message naming address.

    A refused connection, a missing socket file or an unknown host raise
    without saying where the client tried to connect.
    """
    if exc.errno is not None and exc.errno > 0:
        reason = os.strerror(exc.errno)
    else:
        reason = exc.strerror or str(exc)
    if not reason:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
    message = f"cannot connect to {address}: {reason}"
    if exc.errno is None:
        return type(exc)(message)
    return type(exc)(exc.errno, message)


def tls_closed(address: Address) -> str:
    """Return the message for a server that closed during the TLS handshake."""
    return (
        f"{address} closed the connection during the TLS handshake; a pymq "
        f"server does this when it holds max_connections connections and "
        f"handshakes, so try again once others close"
    )


def tls_failed(address: Address, exc: ssl.SSLError) -> str:
    """Return the message for a TLS handshake that failed with exc."""
    reason = str(exc.reason)
    hint = ""
    if reason == "WRONG_VERSION_NUMBER":
        # The server's first bytes are not a TLS record.
        hint = "; the server does not speak TLS there, so use pymq:// for it"
    elif "CERTIFICATE" in reason:
        hint = "; check the client certificate and the authority that signed it"
    return f"the TLS handshake with {address} failed: {exc}{hint}"


def reconnect_delays(attempts: int) -> Iterator[float]:
    """Yield the pauses between reconnect attempts: one fewer than attempts.

    The first is 50 ms, and each is twice the one before, up to 2 s.
    """
    delay = 0.05
    for _ in range(attempts - 1):
        yield delay
        delay = min(delay * 2, 2.0)


def hello_payload(token: str | None, client: str) -> bytes:
    """Return the payload of HELLO for this version of the protocol."""
    return encode_json(
        {
            "versions": [protocol.PROTOCOL_VERSION, protocol.PROTOCOL_VERSION],
            "token": token,
            "client": f"{client} {__version__}",
        }
    )


def apply_hello(connection: Any, answer: dict[str, Any]) -> None:
    """Set the server's limits and name, from its answer to HELLO, on connection."""
    connection.max_frame_bytes = int(
        answer.get("max_frame_bytes", connection.max_frame_bytes)
    )
    limit = answer.get("max_message_bytes")
    connection.max_message_bytes = None if limit is None else int(limit)
    connection.max_batch = int(answer.get("max_batch", connection.max_batch))
    # None from a server older than the limit.
    unacked = answer.get("max_unacked")
    connection.max_unacked = None if unacked is None else int(unacked)
    # False from a server older than CANCEL, which would close the
    # connection on that opcode.
    connection.supports_cancel = answer.get("cancel") is True
    connection.server = str(answer.get("server", ""))


def fetch_payload(count: int, timeout: float | None, max_batch: int) -> bytes:
    """Return a FETCH payload for up to count messages, checking count.

    count over the server's max_batch asks for max_batch: FETCH takes at
    most that many.
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int, not {type(count).__name__}")
    if count <= 0:
        raise ValueError(f"count is {count}; it must be 1 or more")
    return _FETCH.pack(min(count, max_batch), wait_ms(timeout))


def cancel_frame(fetch_id: int, request_id: int, flags: int) -> bytes:
    """Return a CANCEL of the FETCH whose request id is fetch_id."""
    return encode_frame(protocol.CANCEL, flags, request_id, 0, _U32.pack(fetch_id))


def split_deliveries(payload: bytes) -> list[bytes]:
    """Split a DELIVER payload into DELIVER payloads of one delivery each.

    Raises CorruptBatchError or ProtocolError, as decode_deliveries does,
    for a payload that fails its CRC32C or whose lengths do not add up.
    """
    decode_deliveries(payload, None)
    (count,) = _U32.unpack_from(payload)
    if count == 1:
        return [payload]
    parts: list[bytes] = []
    position = _DELIVER_HEAD.size
    for _ in range(count):
        (length,) = _U32.unpack_from(payload, position + 32)
        end = position + _DELIVERY_HEAD_BYTES + length
        delivery = payload[position:end]
        parts.append(_DELIVER_HEAD.pack(1, crc32c(delivery)) + delivery)
        position = end
    return parts


def visibility_timeout_of(answer: dict[str, Any]) -> float:
    """Return the visibility timeout in seconds from the reply to OPEN."""
    return float(answer["options"]["visibility_timeout"])


class LateDeliveries:
    """Deliveries that came for a get after its caller stopped waiting.

    A FETCH whose caller was cancelled or interrupted may still get
    messages in its reply: the server sent them before the CANCEL
    arrived. Their receipts are valid, so the next get of the same queue
    or group object returns them before it sends a FETCH. Each entry is
    a DELIVER payload, the generation of the connection it came on, and
    the monotonic time its visibility timeout ends. That time is counted
    from when the client received it, so it may be later than the
    server's by the time the reply took to arrive.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: collections.deque[tuple[bytes, int, float]] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, payload: bytes, generation: int, visibility_timeout: float) -> None:
        if payload[:4] == b"\0\0\0\0":
            # An empty reply: the wait ended with no message.
            return
        if self._entries and self._entries[-1][0] is payload:
            # Routed twice, after an interrupt: see Connection._read_until.
            return
        deadline = time.monotonic() + visibility_timeout
        self._entries.append((payload, generation, deadline))

    def take(self, count: int, generation: int, name: str) -> list[bytes]:
        """Remove and return up to count payloads of one delivery each.

        Entries of another generation are dropped: the server released
        them when that connection closed. So are those whose visibility
        timeout passed, whose receipts are stale: the server delivers
        those messages again, with their attempt counted.
        """
        taken: list[bytes] = []
        expired = 0
        now = time.monotonic()
        while self._entries and len(taken) < count:
            payload, came_on, deadline = self._entries.popleft()
            if came_on != generation:
                continue
            if now >= deadline:
                expired += _U32.unpack_from(payload)[0]
                continue
            parts = split_deliveries(payload)
            room = count - len(taken)
            taken.extend(parts[:room])
            for part in reversed(parts[room:]):
                self._entries.appendleft((part, came_on, deadline))
        if expired:
            logger.warning(
                "%d deliveries of %s that came after their get was cancelled "
                "passed their visibility timeout before the next get; the "
                "server delivers them again",
                expired,
                name,
            )
        return taken

    def drain(self, generation: int) -> list[bytes]:
        """Remove every entry; return the payloads that came on generation."""
        entries, self._entries = self._entries, collections.deque()
        return [payload for payload, came_on, _ in entries if came_on == generation]


def late_frames(payloads: list[bytes], handle: int) -> list[Frame]:
    """Return late deliveries as the DELIVER frames of one FETCH reply."""
    return [(protocol.DELIVER, FLAG_REPLY, 0, handle, payload) for payload in payloads]


def give_back_frame(
    payloads: list[bytes], request_id: int, handle: int
) -> bytes | None:
    """Return a NACK, flagged NO_REPLY, of every delivery in payloads.

    Returns None when the payloads hold no delivery, or when one of them
    cannot be decoded: the server releases those deliveries when the
    connection closes, or when their visibility timeout passes.
    """
    try:
        messages = [m for payload in payloads for m in decode_deliveries(payload, None)]
    except errors.PymqError as exc:
        logger.warning("could not give back deliveries kept after a get: %s", exc)
        return None
    if not messages:
        return None
    return encode_receipts(
        protocol.NACK, FLAG_NO_REPLY, request_id, handle, messages, _F64.pack(0.0)
    )


# The name of each settle request, for the messages about them.
SETTLE_NAMES: Final = {
    protocol.ACK: "ack",
    protocol.NACK: "nack",
    protocol.EXTEND: "extend",
    protocol.REJECT: "reject",
}


class UnconfirmedSettles:
    """Settles sent flagged NO_REPLY that no later reply has confirmed yet.

    The server handles a connection's requests in order. So the reply to
    any request sent after a settle shows that the server processed the
    settle, and an error it got has come before that reply. Each frame
    sent on the connection has an index in the order it went out.
    """

    __slots__ = ("counts", "last", "messages")

    def __init__(self) -> None:
        # Requests by name ("ack"), the receipts they carry, and the index
        # of the last one sent (0 when there is none).
        self.counts: dict[str, int] = {}
        self.messages = 0
        self.last = 0

    def add(self, frame: bytes, index: int) -> None:
        """Count frame, sent at index, if it is a settle."""
        opcode = frame[4] if len(frame) > 4 else 0
        name = SETTLE_NAMES.get(opcode)
        prefix = 8 if opcode in (protocol.NACK, protocol.EXTEND) else 0
        if name is None or len(frame) < 20 + prefix:
            return
        self.counts[name] = self.counts.get(name, 0) + 1
        self.messages += _U32.unpack_from(frame, 16 + prefix)[0]
        self.last = index

    def confirm(self) -> None:
        """Forget them all: a reply to a later request came."""
        self.counts = {}
        self.messages = 0
        self.last = 0

    def lost(
        self, address: object, reason: BaseException
    ) -> errors.UnconfirmedSettleError | None:
        """Return the error that reports them after the connection broke.

        Returns None when there are none. Forgets them, so that each is
        reported once, and logs the error as a WARNING.
        """
        if not self.last:
            return None
        requests = sum(self.counts.values())
        kinds = ", ".join(
            f"{count} {name}{'' if count == 1 else 's'}"
            for name, count in sorted(self.counts.items())
        )
        noun = "message" if self.messages == 1 else "messages"
        error = errors.UnconfirmedSettleError(
            f"connection to {address} broke ({reason}) before the server "
            f"confirmed {kinds} sent without waiting for a reply, for "
            f"{self.messages} {noun}: they may not have been applied, so those "
            f"messages may be delivered again",
            requests=requests,
            messages=self.messages,
        )
        self.confirm()
        logger.warning("%s", error)
        return error


def take_unconfirmed_error(
    late_errors: list[errors.PymqError],
) -> errors.UnconfirmedSettleError | None:
    """Remove and return the UnconfirmedSettleError among late_errors, if any."""
    for index, error in enumerate(late_errors):
        if isinstance(error, errors.UnconfirmedSettleError):
            del late_errors[index]
            return error
    return None


class _NotSent(Exception):
    """A request found its connection gone or replaced before it was sent."""


# The most times call() and send() rebuild a request whose connection was
# replaced before it went out.
_MAX_REBUILDS: Final = 5


class _Slot:
    __slots__ = (
        "abandoned",
        "consumer",
        "done",
        "error",
        "frames",
        "index",
        "progress",
        "sock",
        "updates",
    )

    def __init__(self, progress: Callable[[Frame], object] | None = None) -> None:
        self.frames: list[Frame] = []
        self.done = False
        self.error: BaseException | None = None
        # The caller stopped waiting. Deliveries that still come for a
        # FETCH are kept for its consumer's next get.
        self.abandoned = False
        # The queue or group of a FETCH, else None.
        self.consumer: _RemoteConsumer | None = None
        # The socket the request went out on, and the index of its frame
        # among those sent on it (see UnconfirmedSettles).
        self.sock: Any = None
        self.index = 0
        # Called, in the caller's thread, with each frame flagged MORE.
        self.progress = progress
        self.updates: list[Frame] = []


class TlsChannel:
    """A TLS session over a socket that one thread reads while others write.

    OpenSSL does not allow one SSL object to be used by two threads at
    once, and an SSLSocket would do that for a read in one thread and a
    write in another. So the session runs on memory buffers under a lock,
    and the socket I/O happens outside it. Everything sent goes out under
    send_lock, so TLS records leave in the order they were made.
    """

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, hostname: str
    ) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._session = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=hostname
        )
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        while True:
            try:
                self._session.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = sock.recv(65536)
                if not data:
                    # The caller names the server in its message.
                    raise ConnectionResetError(
                        "the server closed the connection during the TLS handshake"
                    ) from None
                self._incoming.write(data)
        self._flush()

    def _flush(self) -> None:
        with self._send_lock:
            with self._lock:
                data = self._outgoing.read()
            if data:
                self.sock.sendall(data)

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._lock:
                self._session.write(data)
                out = self._outgoing.read()
            self.sock.sendall(out)

    def recv_into(self, buffer: bytearray) -> int:
        data = self.recv(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def recv(self, size: int) -> bytes:
        while True:
            with self._lock:
                try:
                    data = self._session.read(size)
                except ssl.SSLWantReadError:
                    data = b""
                except ssl.SSLZeroReturnError:
                    return b""
                pending = self._outgoing.pending
            if pending:
                # Reading can produce records to send (a key update).
                self._flush()
            if data:
                return data
            # NOTE: a signal handler that raises as this recv returns drops
            # the bytes read. The TLS session then fails and the connection
            # breaks, so over TLS an interrupted get may still spend an attempt.
            raw = self.sock.recv(262144)
            if not raw:
                return b""
            with self._lock:
                self._incoming.write(raw)

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()


class Connection:
    """One socket to a server, shared by threads; reconnects where safe."""

    def __init__(
        self,
        address: Address,
        *,
        token: str | None,
        connect_timeout: float,
        reconnect_attempts: int,
        ssl_context: ssl.SSLContext | None = None,
        busy_poll: float = 0.0,
    ) -> None:
        self.address = address
        self._busy_poll = busy_poll
        self._ssl_context = ssl_context
        self._token = token
        self._connect_timeout = connect_timeout
        self._reconnect_attempts = reconnect_attempts
        self._send_lock = threading.Lock()
        # _lock guards the state below. _cv, over the same lock, wakes the
        # threads that wait for another thread to read their reply. Where a
        # signal handler may raise (a get waiting for its reply), the locks
        # are taken by with statements: an interrupt right after acquire()
        # would leave the lock held.
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._waiting = 0
        self._ids = itertools.count(1)
        self._slots: dict[int, _Slot] = {}
        # The ident of the thread that reads the socket, or 0 when none does.
        self._reading = 0
        self._sock: Any = None  # a socket, or a TlsChannel over one
        self._reader: FrameReader | None = None
        # Received bytes land here, so a read allocates nothing. Only the
        # thread that reads (see _reading) uses it.
        self._buffer = bytearray(_RECV_BYTES)
        self._late_errors: list[errors.PymqError] = []
        # Frames sent on the current socket, counted under _send_lock.
        self._sent = 0
        # Settles sent without waiting for a reply, guarded by _lock.
        self._unconfirmed = UnconfirmedSettles()
        self._closed = False
        self.generation = 0
        self.max_frame_bytes = 16 << 20
        self.max_message_bytes: int | None = None
        self.max_batch = 10_000
        self.max_unacked: int | None = None
        self.supports_cancel = False
        self.server = ""
        self._connect()

    # Connecting ---------------------------------------------------------------

    def _open_socket(self) -> Any:
        address = self.address
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._connect_timeout)
            try:
                sock.connect(address.path)
            except OSError as exc:
                sock.close()
                raise connect_failed(address, exc) from exc
            except BaseException:
                sock.close()
                raise
        else:
            try:
                sock = socket.create_connection(
                    (address.host, address.port), timeout=self._connect_timeout
                )
            except OSError as exc:
                raise connect_failed(address, exc) from exc
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if address.tls:
                context = self._ssl_context or ssl.create_default_context()
                try:
                    return TlsChannel(sock, context, address.host)
                except ssl.SSLCertVerificationError:
                    sock.close()
                    raise
                except ssl.SSLError as exc:
                    sock.close()
                    raise errors.ConnectionLostError(tls_failed(address, exc)) from exc
                except (ConnectionResetError, BrokenPipeError) as exc:
                    # A server that closes with the ClientHello unread sends
                    # a reset, not a FIN.
                    sock.close()
                    raise errors.ConnectionLostError(tls_closed(address)) from exc
                except BaseException:
                    sock.close()
                    raise
        return sock

    def _connect(self) -> None:
        sock = self._open_socket()
        try:
            hello = hello_payload(self._token, "pymq-python")
            sock.sendall(PREAMBLE + encode_frame(protocol.HELLO, 0, 0, 0, hello))
            reader = FrameReader(0xFFFFFFFF)
            frames: list[Frame] = []
            while not frames:
                data = sock.recv(65536)
                if not data:
                    raise errors.ConnectionLostError(handshake_closed(self.address))
                frames = reader.feed(data)
            _, flags, _, _, payload = frames[0]
            if flags & FLAG_ERROR:
                raise decode_error(payload)
            answer = decode_json(payload)
            sock.settimeout(None)
        except (ConnectionResetError, BrokenPipeError) as exc:
            # A server that closes with the HELLO unread sends a reset, not a FIN.
            sock.close()
            raise errors.ConnectionLostError(handshake_closed(self.address)) from exc
        except BaseException:
            sock.close()
            raise
        apply_hello(self, answer)
        self._reader = FrameReader(self.max_frame_bytes)
        if self._busy_poll and isinstance(sock, socket.socket):
            # Not over TLS: the bytes of a TLS session go through its object.
            self._reader.busy_poll(sock.fileno(), self._busy_poll)
        self._sent = 0
        self._unconfirmed = UnconfirmedSettles()
        self._sock = sock
        self.generation += 1

    def check_open(self) -> None:
        """Raise ClosedError once close() was called."""
        if self._closed:
            raise errors.ClosedError(f"connection to {self.address} is closed")

    def _ensure(self) -> None:
        """Reconnect a broken connection, with backoff, before a request."""
        if self._sock is not None:
            return
        self.check_open()
        attempts = self._reconnect_attempts + 1
        delays = reconnect_delays(attempts)
        for attempt in range(1, attempts + 1):
            try:
                self._connect()
                logger.info("reconnected to %s", self.address)
                return
            except (OSError, errors.ConnectionLostError) as exc:
                if attempt == attempts:
                    raise errors.ConnectionLostError(
                        reconnect_attempts_failed(self.address, attempt, exc)
                    ) from exc
                time.sleep(next(delays))

    # Requests -----------------------------------------------------------------

    def next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF or next(self._ids)

    def ensure(self) -> None:
        """Reconnect now if the connection broke."""
        if self._sock is not None:
            # Connected: a break from now on is found by the request itself.
            return
        with self._cv:
            self._ensure()

    def call(
        self,
        opcode: int,
        build: Callable[[int], bytes],
        progress: Callable[[Frame], object] | None = None,
        consumer: _RemoteConsumer | None = None,
        received: list[Frame] | None = None,
    ) -> list[Frame]:
        """Send the frame build(request_id) returns; return its reply frames.

        Raises the server's error, or ConnectionLostError when the
        connection breaks. A request that is safe to repeat is built and
        sent once more after reconnecting, so it names the new handles.
        progress, if given, is called in this thread with each frame of the
        reply flagged MORE, as it arrives. consumer is the queue or group
        of a FETCH: the deliveries of a FETCH whose caller is interrupted
        are kept for its next get. received, if given, is the list that
        the reply's frames are added to and that is returned.
        """
        repeated = rebuilt = 0
        while True:
            if self._sock is None:
                self.ensure()
            generation = self.generation
            request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            frame = build(request_id)
            try:
                frames = self._exchange(
                    request_id, frame, progress, generation, consumer, received
                )
            except _NotSent as exc:
                # Nothing went out, so any request may be built again for
                # the new connection's handles.
                rebuilt += 1
                if rebuilt > _MAX_REBUILDS or self._closed:
                    raise errors.ConnectionLostError(str(exc)) from None
                continue
            except errors.ConnectionLostError as exc:
                self.raise_unconfirmed(exc)
                if repeated or opcode not in SAFE_TO_RETRY or self._closed:
                    raise
                repeated += 1
                continue
            # An error is the last frame of a reply.
            last = frames[-1]
            if last[1] & FLAG_ERROR:
                raise decode_error(last[4])
            return frames

    def send(self, build: Callable[[int], bytes]) -> None:
        """Send a request flagged NO_REPLY; its error, if any, is raised later."""
        if self._late_errors:
            self.raise_late_errors()
        for _ in range(_MAX_REBUILDS + 1):
            self.ensure()
            generation = self.generation
            frame = build(self.next_id())
            # Read together: a reconnect sets both under the lock.
            lock = self._lock
            lock.acquire()
            try:
                sock = self._sock
                current = self.generation == generation
            finally:
                lock.release()
            if sock is not None and current:
                break
            if self._closed:
                raise errors.ClosedError(f"connection to {self.address} is closed")
        else:
            raise errors.ConnectionLostError(
                f"connection to {self.address} broke before the request went out"
            )
        try:
            with self._send_lock:
                sock.sendall(frame)
                self._sent += 1
                with self._lock:
                    if self._sock is sock:
                        self._unconfirmed.add(frame, self._sent)
        except OSError as exc:
            self._broken(exc, sock)
            self.raise_unconfirmed(exc)
            raise errors.ConnectionLostError(
                f"connection to {self.address} broke: {exc}"
            ) from exc

    def raise_unconfirmed(self, cause: BaseException) -> None:
        """Raise the UnconfirmedSettleError of a break, if one is pending.

        Run by a call that found the connection broken, so that it reports
        the settles that may be lost rather than its own error alone.
        """
        if self._late_errors:
            with self._cv:
                error = take_unconfirmed_error(self._late_errors)
            if error is not None:
                raise error from cause

    def raise_late_errors(self) -> None:
        """Raise the first error a no-reply request got, if any came."""
        if self._late_errors:
            with self._cv:
                late, self._late_errors = self._late_errors, []
            if late:
                raise late[0]

    def _exchange(
        self,
        request_id: int,
        frame: bytes,
        progress: Callable[[Frame], object] | None,
        generation: int,
        consumer: _RemoteConsumer | None = None,
        received: list[Frame] | None = None,
    ) -> list[Frame]:
        if self._late_errors:
            self.raise_late_errors()
        slot = _Slot(progress)
        slot.consumer = consumer
        if received is not None:
            # Frames of an earlier try, on a connection that broke.
            received.clear()
            slot.frames = received
        # with statements here, not acquire() then try: an interrupt that
        # comes right after acquire() would leave the lock held.
        with self._lock:
            # The frame names handles of the connection it was built for:
            # after a reconnect by another thread, the same numbers may
            # name other queues.
            sock = self._sock
            if sock is None or self.generation != generation:
                raise _NotSent(
                    f"connection to {self.address} broke before the request went out"
                )
            self._slots[request_id] = slot
        slot.sock = sock
        # False before sendall, None during it (part of the frame may be
        # out), True once the whole frame is out.
        sent: bool | None = False
        try:
            try:
                with self._send_lock:
                    sent = None
                    self._sent += 1
                    slot.index = self._sent
                    sock.sendall(frame)
                    sent = True
            except OSError as exc:
                self._broken(exc, sock)
            self._wait_reply(slot, sock)
        except BaseException:
            # Interrupted (Ctrl-C, a signal handler): the next waiting thread
            # reads instead.
            self._abandon(request_id, slot, sent)
            raise
        if slot.error is not None:
            raise slot.error
        return slot.frames

    def _wait_reply(self, slot: _Slot, sock: Any) -> None:
        """Return once slot is done, reading sock when no other thread does."""
        lock = self._lock
        me = threading.get_ident()
        while True:
            try:
                with lock:
                    if slot.done or slot.updates or self._reading:
                        read = self._take_turn(slot, me)
                    else:
                        # No thread is reading, so this one reads now.
                        self._reading = me
                        read = True
                    updates = slot.updates
                    if updates:
                        slot.updates = []
                if read:
                    self._read_until(slot, sock)
                    if slot.done and not slot.updates:
                        # Finished by this thread: nothing else changes the
                        # slot now, so no lock is needed to return it.
                        break
                elif updates:
                    assert slot.progress is not None
                    for update in updates:
                        slot.progress(update)
                else:
                    break
            except BaseException:
                # An interrupt after this thread took its turn, but before
                # _read_until started, leaves it the reader: hand the turn on.
                with self._cv:
                    if self._reading == me:
                        self._reading = 0
                        self._cv.notify_all()
                raise

    def _abandon(self, request_id: int, slot: _Slot, sent: bool | None) -> None:
        """Stop waiting for the reply of request_id: its caller was interrupted.

        sent is as in _exchange. A frame cut off part way breaks the
        connection, because the server cannot tell where the next frame
        starts. A FETCH that went out whole is cancelled, on a server that
        supports CANCEL, and the deliveries that come for it are kept for
        its consumer's next get. That get first waits for the CANCEL's
        reply, which the server sends after the FETCH's last frame.
        """
        sock = slot.sock
        consumer = slot.consumer
        cancel = False
        with self._cv:
            slot.abandoned = True
            self._cv.notify_all()
            if not sent:
                self._slots.pop(request_id, None)
            elif consumer is not None:
                # Emptied in place: it may be the caller's received list.
                frames = list(slot.frames)
                slot.frames.clear()
                for frame in frames:
                    self._keep_late(consumer, frame)
                cancel = not slot.done and self.supports_cancel and self._sock is sock
        if sent is None:
            self._broken(
                ConnectionAbortedError("a request was interrupted while it was sent"),
                sock,
            )
        elif cancel:
            assert consumer is not None
            cancelling = self._send_cancel(request_id, sock)
            if cancelling is not None:
                with self._cv:
                    consumer._cancelling.append((request_id, slot, cancelling))

    def _send_cancel(self, fetch_id: int, sock: Any) -> _Slot | None:
        """Send a CANCEL of fetch_id on sock; return the slot of its reply.

        Returns None when sock was replaced: its FETCH was failed then.
        """
        request_id = self.next_id()
        cancelling = _Slot()
        cancelling.sock = sock
        with self._cv:
            if self._sock is not sock:
                return None
            self._slots[request_id] = cancelling
        with self._send_lock:
            try:
                self._sent += 1
                cancelling.index = self._sent
                sock.sendall(cancel_frame(fetch_id, request_id, 0))
            except OSError as exc:
                self._broken(exc, sock)
            except BaseException as exc:
                # Another interrupt may have cut the frame.
                self._broken(exc, sock)
                raise
        return cancelling

    def _keep_late(self, consumer: _RemoteConsumer, frame: Frame) -> None:
        """Keep the deliveries of frame for consumer; run under _lock."""
        if frame[0] == protocol.DELIVER and not frame[1] & FLAG_ERROR:
            consumer._late.add(frame[4], self.generation, consumer.visibility_timeout)

    def keep_received(self, consumer: _RemoteConsumer, frames: list[Frame]) -> None:
        """Keep for consumer the deliveries of a reply its caller never got."""
        with self._cv:
            for frame in frames:
                self._keep_late(consumer, frame)
            frames.clear()

    def finish_cancelled(self, consumer: _RemoteConsumer) -> None:
        """Wait until each cancelled FETCH of consumer has sent its last frame.

        The reply to a CANCEL comes after the last frame of its FETCH.
        """
        while consumer._cancelling:
            entry = consumer._cancelling[0]
            fetch_id, fetch, cancelling = entry
            self._wait_reply(cancelling, cancelling.sock)
            with self._cv:
                if consumer._cancelling and consumer._cancelling[0] is entry:
                    del consumer._cancelling[0]
                if not fetch.done and self._slots.get(fetch_id) is fetch:
                    # An interrupt stopped the reading thread after it read
                    # the FETCH's last frame but before it routed it.
                    del self._slots[fetch_id]
                    fetch.done = True

    def send_quietly(self, frame: bytes, what: str) -> None:
        """Send frame on the current socket; log a failure instead of raising."""
        with self._cv:
            sock = self._sock
        if sock is None:
            return
        try:
            with self._send_lock:
                self._sent += 1
                sock.sendall(frame)
        except OSError as exc:
            logger.warning("could not send %s to %s: %s", what, self.address, exc)

    def _take_turn(self, slot: _Slot, me: int) -> bool:
        """Wait, holding _lock, until slot has news or nobody reads.

        Returns True when this thread, whose ident is me, is now the reader.
        """
        while not slot.done and not slot.updates:
            if not self._reading:
                self._reading = me
                return True
            self._waiting += 1
            try:
                self._cv.wait()
            finally:
                self._waiting -= 1
        return False

    def _read_until(self, slot: _Slot, sock: Any) -> None:
        reader = self._reader
        assert reader is not None
        buffer = self._buffer
        lock = self._lock
        # Frames read but not yet routed. An interrupt (a signal handler
        # that raises) leaves them there, and the handler below routes them.
        ready = reader.ready
        try:
            while True:
                if not reader.receive(sock, buffer):
                    raise ConnectionResetError("the server closed the connection")
                if not ready:
                    continue
                with lock:
                    while ready:
                        self._route(ready[0])
                        ready.popleft()
                    # Back to the caller for its result, or a part to report.
                    done = slot.done or bool(slot.updates)
                    if done:
                        self._reading = 0
                    if self._waiting:
                        self._cv.notify_all()
                if done:
                    return
        except (OSError, errors.ProtocolError) as exc:
            with self._cv:
                self._reading = 0
                self._cv.notify_all()
            self._broken(exc, sock)
        except BaseException:
            with self._cv:
                self._reading = 0
                # Interrupted: the frames already read still reach their
                # requests, or the deliveries among them would be lost.
                with contextlib.suppress(ConnectionResetError):
                    while ready:
                        self._route(ready[0])
                        ready.popleft()
                self._cv.notify_all()
            raise

    def _route(self, frame: Frame) -> None:
        flags, request_id = frame[1], frame[2]
        if flags & FLAG_PUSH:
            return
        slot = self._slots.get(request_id)
        if slot is None:
            if flags & FLAG_ERROR and request_id == 0:
                # An error about the connection, not a request: the server
                # closes it next. _read_until fails every waiting request.
                raise ConnectionResetError(
                    f"the server closed the connection: {decode_error(frame[4])}"
                )
            if flags & FLAG_ERROR:
                error = decode_error(frame[4])
                logger.error(
                    "request %d, sent without waiting for a reply, failed: %s",
                    request_id,
                    error,
                )
                self._late_errors.append(error)
            return
        unconfirmed = self._unconfirmed
        if unconfirmed.last and slot.index > unconfirmed.last:
            unconfirmed.confirm()
        if slot.abandoned and slot.consumer is not None:
            self._keep_late(slot.consumer, frame)
        elif not slot.frames or slot.frames[-1] is not frame:
            # Checked because an interrupt right after the append makes
            # _read_until route the same frame again.
            slot.frames.append(frame)
            if slot.progress is not None and flags & FLAG_MORE and not slot.abandoned:
                slot.updates.append(frame)
        if not flags & FLAG_MORE:
            slot.done = True
            del self._slots[request_id]

    def _broken(self, exc: BaseException, sock: Any) -> None:
        """Fail every request waiting on sock; the next request reconnects."""
        with self._cv:
            if sock is None or self._sock is not sock:
                # Already replaced: its requests were failed then.
                return
            self._sock = None
            slots, self._slots = self._slots, {}
            unconfirmed = self._unconfirmed.lost(self.address, exc)
            if unconfirmed is not None:
                # Raised by the call that found the break, or the next one.
                self._late_errors.insert(0, unconfirmed)
            lost = errors.ConnectionLostError(
                f"connection to {self.address} broke: {exc}"
            )
            for slot in slots.values():
                slot.error = lost
                slot.done = True
            self._cv.notify_all()
        with contextlib.suppress(OSError):
            # shutdown() first: a thread blocked in recv() on sock wakes
            # with end of file, and one polling it reads no other socket
            # that reuses the descriptor after close().
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
        logger.warning("connection to %s broke: %s", self.address, exc)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            sock, self._sock = self._sock, None
            slots, self._slots = self._slots, {}
            closed = errors.ClosedError(f"connection to {self.address} is closed")
            for slot in slots.values():
                slot.error = closed
                slot.done = True
            self._cv.notify_all()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class RemoteBroker:
    """A broker on a server, with the API of pymq.Broker. Thread-safe."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.url = str(connection.address)
        self._lock = threading.Lock()
        self._queues: dict[str, RemoteQueue] = {}
        self._streams: dict[str, RemoteStream] = {}
        self._groups: dict[tuple[str, str], RemoteGroup] = {}

    def _control(self, opcode: int, request: dict[str, Any]) -> dict[str, Any]:
        payload = encode_json(request)
        frames = self._connection.call(
            opcode, lambda request_id: encode_frame(opcode, 0, request_id, 0, payload)
        )
        return decode_json(frames[0][4])

    def queue(self, name: str, **options: Any) -> RemoteQueue:
        """Open the queue name on the server, creating it if it is missing.

        Options as for pymq.Broker.queue; an explicit different value
        updates the stored one.
        """
        # Checked here too, so a bad option raises the embedded broker's
        # TypeError or ConfigError rather than a server error.
        check_queue_name(name)
        options = _check_options(options, QUEUE_DEFAULTS)
        self._connection.check_open()
        with self._lock:
            queue = self._queues.get(name)
            if queue is None:
                queue = RemoteQueue(self, {"kind": "queue", "name": name})
                queue.reopen(options)
                self._queues[name] = queue
            elif options:
                queue.reopen(options)
            return queue

    def stream(self, name: str, **options: Any) -> RemoteStream:
        """Open the stream name on the server, creating it if it is missing."""
        check_name("stream", name)
        options = _check_options(options, STREAM_DEFAULTS)
        self._connection.check_open()
        # One object, and one handle on the server, per stream.
        with self._lock:
            stream = self._streams.get(name)
            if stream is None:
                stream = RemoteStream(self, {"kind": "stream", "name": name})
                stream.reopen(options)
                self._streams[name] = stream
            elif options:
                stream.reopen(options)
            return stream

    def names(self) -> dict[str, str]:
        """Return every queue and stream on the server, with its kind."""
        names = self._control(protocol.NAMES, {})["names"]
        return {str(key): str(value) for key, value in names.items()}

    def groups(self, stream: str) -> list[str]:
        """Return the names of the consumer groups of stream, sorted."""
        check_name("stream", stream)
        return [
            str(name)
            for name in self._control(protocol.GROUPS, {"stream": stream})["groups"]
        ]

    def redrive(
        self,
        dlq_name: str,
        to: str | None = None,
        *,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Move every message now in a dead-letter queue back; see Broker.

        progress, if given, is called in this thread with the number moved
        so far after each batch the server moved.
        """
        check_name("queue", dlq_name, derived=True)
        if to is not None:
            check_name("queue", to)
        request: dict[str, Any] = {"dlq": dlq_name, "to": to}
        report = None
        if progress is not None:
            request["progress"] = True

            def report(frame: Frame) -> None:
                progress(int(decode_json(frame[4])["moved"]))

        payload = encode_json(request)
        frames = self._connection.call(
            protocol.REDRIVE,
            lambda request_id: encode_frame(
                protocol.REDRIVE, 0, request_id, 0, payload
            ),
            report,
        )
        return int(decode_json(frames[-1][4])["moved"])

    def ping(self) -> float:
        """Send PING and return the round trip in seconds."""
        start = time.perf_counter()
        self._connection.call(
            protocol.PING,
            lambda request_id: encode_frame(protocol.PING, 0, request_id, 0, b""),
        )
        return time.perf_counter() - start

    @property
    def server_version(self) -> str:
        """The server's name and version as it sent them, as in "pymq 0.1.0"."""
        return self._connection.server

    @property
    def max_unacked(self) -> int | None:
        """Deliveries this connection may hold unsettled at once, or None.

        The server's max_unacked, from its reply to HELLO; None from a
        server that has no such limit.
        """
        return self._connection.max_unacked

    def close(self) -> None:
        """Close the connection; deliveries not yet settled go back at once.

        Deliveries kept after an interrupted get are nacked first.
        """
        with self._lock:
            consumers = [*self._queues.values(), *self._groups.values()]
        for consumer in consumers:
            consumer._give_back_late()
        self._connection.close()

    def __enter__(self) -> RemoteBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteBroker {self.url}>"


class _Handle:
    """Something opened on the server by OPEN, opened again after a reconnect."""

    def __init__(self, broker: RemoteBroker, request: dict[str, Any]) -> None:
        self._broker = broker
        self._connection = broker._connection
        self._request = request
        self._generation = -1
        self._handle = 0
        self._open_lock = threading.Lock()
        self._answer: dict[str, Any] = {}
        self.name = str(request["name"])

    def reopen(self, options: dict[str, Any]) -> None:
        with self._open_lock:
            payload = encode_json(dict(self._request, options=options))
            connection = self._connection
            frames = connection.call(
                protocol.OPEN,
                lambda request_id: encode_frame(
                    protocol.OPEN, 0, request_id, 0, payload
                ),
            )
            self._answer = decode_json(frames[0][4])
            self._handle = int(self._answer["handle"])
            self._generation = connection.generation
            self.name = str(self._answer["name"])

    def handle(self) -> int:
        """This object's handle on the current connection, opened again if new."""
        connection = self._connection
        if connection._sock is None:
            connection.ensure()
        if self._generation != connection.generation:
            self.reopen({})
        return self._handle


def _seconds(method: str, name: str, value: object) -> bytes:
    """Return value packed as an f64, or raise TypeError or ValueError as the
    core does for the argument name of method."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{method}(): {name} must be a number of seconds, not {value!r}"
        )
    # Written so that NaN fails the check too.
    if not 0 <= value <= 1e9:
        raise ValueError(
            f"{method}(): {name} is {value!r}; it must be from 0 to 1e9 seconds"
        )
    return _F64.pack(value)


def _nbytes(body: Any) -> int:
    return len(body) if type(body) is bytes else memoryview(body).nbytes


def bodies_as_list(bodies: Iterable[Any]) -> list[Any]:
    """Return put_many's bodies as a list; raise TypeError for a lone body or str."""
    if isinstance(bodies, list):
        return bodies
    if isinstance(bodies, (bytes, bytearray, memoryview, str)):
        raise TypeError(
            f"bodies must be an iterable of bytes-like objects (a list of bytes, "
            f"say), not {type(bodies).__name__}; use put() for one message"
        )
    return list(bodies)


def check_size(size: int, limit: int | None) -> None:
    """Raise MessageTooLargeError, as the broker would, for size over limit."""
    if limit is not None and size > limit:
        raise errors.MessageTooLargeError(size, limit)


def plan_batches(
    items: list[Any],
    headers: dict[str, str] | None,
    target: str,
    limits: Any,
    method: str = "put_many",
) -> list[tuple[int, int]]:
    """Split items into (start, stop) spans that each fit one PUBLISH frame.

    target is the queue or stream put into. limits has the connection's
    max_batch, max_frame_bytes and max_message_bytes. Headers that a put
    into target would reject, a body that is not bytes-like and a message
    over max_message_bytes raise first, so nothing is sent. method names
    the caller in the error for a body.
    """
    block = put_header_bytes(headers, target)
    if not items:
        return []
    largest, total = measure_bodies(items, method)
    check_size(largest + block, limits.max_message_bytes)
    count = len(items)
    # Most batches fit one frame; only the others need each record's size.
    if (
        count <= limits.max_batch
        and 64 + total + (block + 4) * count <= limits.max_frame_bytes
    ):
        return [(0, count)]
    # Bytes of each record on the wire, to split batches by frame size.
    sizes = [_nbytes(body) + block for body in items]
    spans = [
        (start, min(start + limits.max_batch, len(items)))
        for start in range(0, len(items), limits.max_batch)
    ]
    planned: list[tuple[int, int]] = []
    while spans:
        start, stop = spans.pop(0)
        size = 64 + sum(sizes[start:stop]) + 4 * (stop - start)
        if size > limits.max_frame_bytes and stop - start > 1:
            middle = (start + stop) // 2
            spans[:0] = [(start, middle), (middle, stop)]
            continue
        planned.append((start, stop))
    return planned


def join_offsets(ranges: list[range]) -> range | list[int]:
    """Return the offsets of batches: one range when they are contiguous."""
    if not ranges:
        return range(0)
    if all(a.stop == b.start for a, b in itertools.pairwise(ranges)):
        return range(ranges[0].start, ranges[-1].stop)
    return [offset for part in ranges for offset in part]


class _Publisher(_Handle):
    def _encode(
        self,
        bodies: list[Any],
        headers: dict[str, str] | None,
        milliseconds: int,
        request_id: int,
    ) -> bytes:
        return encode_publish(request_id, self.handle(), bodies, headers, milliseconds)

    def put(
        self,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Append one message and return its offset; see Queue.put."""
        connection = self._connection
        # measure_bodies raises the broker's TypeError for a body that is
        # not bytes-like.
        size = len(body) if type(body) is bytes else measure_bodies([body], "put")[1]
        if headers:
            size += put_header_bytes(headers, self.name)
        check_size(size, connection.max_message_bytes)
        milliseconds = -1 if timeout is None else wait_ms(timeout)
        frames = connection.call(
            protocol.PUBLISH,
            functools.partial(self._encode, [body], headers, milliseconds),
        )
        return int(_PUBLISHED.unpack_from(frames[0][4])[0])

    def put_many(
        self,
        bodies: Iterable[Any],
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> range | list[int]:
        """Append messages in order; return their offsets.

        The offsets come as a range. A batch over the server's max_batch or
        max_frame_bytes is sent as several batches, each written whole or
        not at all. If other puts came between them, the offsets come as a
        list.
        """
        items = bodies_as_list(bodies)
        milliseconds = wait_ms(timeout)
        connection = self._connection
        ranges: list[range] = []
        for start, stop in plan_batches(items, headers, self.name, connection):
            frames = connection.call(
                protocol.PUBLISH,
                functools.partial(
                    self._encode, items[start:stop], headers, milliseconds
                ),
            )
            first, count = _PUBLISHED.unpack(frames[0][4])
            ranges.append(range(first, first + count))
        return join_offsets(ranges)


class _RemoteConsumer(_Handle):
    """get, get_many, ack and the rest, for a queue or a group."""

    def __init__(self, broker: RemoteBroker, request: dict[str, Any]) -> None:
        super().__init__(broker, request)
        # Deliveries of FETCHes whose caller was interrupted, for the next get.
        self._late = LateDeliveries()
        # Those FETCHes, cancelled, until the CANCEL's reply has come:
        # (the FETCH's request id, its slot, the CANCEL's slot).
        self._cancelling: list[tuple[int, _Slot, _Slot]] = []

    def _encode_fetch(self, payload: bytes, request_id: int) -> bytes:
        return encode_frame(protocol.FETCH, 0, request_id, self.handle(), payload)

    def _late_frames(self, count: int) -> list[Frame]:
        """Take up to count deliveries kept after an interrupted get."""
        connection = self._connection
        if self._cancelling:
            connection.finish_cancelled(self)
        if not self._late:
            return []
        with connection._cv:
            payloads = self._late.take(count, connection.generation, self.name)
        return late_frames(payloads, self._handle)

    def _give_back_late(self) -> None:
        """Nack the deliveries kept after an interrupted get, if any.

        They are available again at once, with their attempt counted.
        """
        connection = self._connection
        with connection._cv:
            payloads = self._late.drain(connection.generation)
            current = self._generation == connection.generation
        if not payloads or not current:
            return
        frame = give_back_frame(payloads, connection.next_id(), self._handle)
        if frame is not None:
            connection.send_quietly(
                frame, f"the nack of deliveries kept by {self.name}"
            )

    def _fetch(
        self, count: int, payload: bytes, decode: Callable[[list[Frame]], _Decoded]
    ) -> _Decoded:
        """Send FETCH with payload; return decode(the reply's frames).

        Deliveries kept after an interrupted get come first, without a
        FETCH. When the caller is interrupted after the reply came, before
        this returns, its deliveries are kept for the next get.
        """
        connection = self._connection
        received: list[Frame] = []
        try:
            if self._cancelling or self._late:
                received.extend(self._late_frames(count))
            if not received:
                connection.call(
                    protocol.FETCH,
                    functools.partial(self._encode_fetch, payload),
                    consumer=self,
                    received=received,
                )
            return decode(received)
        except BaseException as exc:
            # pymq's own errors come with no reply to keep, or a bad one.
            if received and not isinstance(exc, errors.PymqError):
                connection.keep_received(self, received)
            raise

    def _messages(self, replies: list[Frame]) -> list[RemoteMessage]:
        """Return the messages of the DELIVER frames of one FETCH."""
        if len(replies) == 1:
            return decode_deliveries(replies[0][4], self)
        messages: list[RemoteMessage] = []
        for reply in replies:
            messages.extend(decode_deliveries(reply[4], self))
        return messages

    def _fetch_messages(self, count: int, timeout: float | None) -> list[RemoteMessage]:
        payload = fetch_payload(count, timeout, self._connection.max_batch)
        return self._fetch(count, payload, self._messages)

    def get(self, timeout: float | None = None) -> RemoteMessage | None:
        """Deliver the lowest available message, waiting up to timeout seconds.

        Returns None when the timeout passes first; None waits without a
        limit.
        """
        # A count of 1 needs none of fetch_payload's checks.
        payload = _FETCH.pack(1, wait_ms(timeout))
        messages = self._fetch(1, payload, self._messages)
        return messages[0] if messages else None

    def get_many(self, count: int, timeout: float | None = None) -> list[RemoteMessage]:
        """Deliver up to count messages; wait up to timeout for the first one."""
        return self._fetch_messages(count, timeout)

    def get_batch(self, count: int, timeout: float | None = None) -> MessageBatch:
        """Deliver up to count messages as one MessageBatch of numpy columns.

        Waits up to timeout for the first message, like get_many; settle the
        batch with ack_many(batch). The batch is built from the server's
        reply in compiled code, without an object per message.
        """
        payload = fetch_payload(count, timeout, self._connection.max_batch)
        return self._fetch(count, payload, self._batch)

    def _batch(self, replies: list[Frame]) -> MessageBatch:
        return decode_batch([reply[4] for reply in replies], self)

    def get_nowait(self) -> RemoteMessage | None:
        """Deliver the lowest available message, or return None at once."""
        return self.get(timeout=0)

    def get_many_nowait(self, count: int) -> list[RemoteMessage]:
        """Deliver up to count available messages without waiting."""
        return self._fetch_messages(count, 0)

    def __iter__(self) -> Iterator[RemoteMessage]:
        """Yield messages as they arrive, forever; settle each one.

        Each message comes from a FETCH. So when the connection has the
        server's max_unacked deliveries unsettled, this raises ServerError
        with code 19 rather than waiting.
        """
        while True:
            message = self.get()
            if message is not None:
                yield message

    def _encode_settle(
        self,
        opcode: int,
        flags: int,
        items: Any,
        prefix: bytes,
        suffix: bytes,
        request_id: int,
    ) -> bytes:
        return encode_receipts(
            opcode, flags, request_id, self.handle(), items, prefix, suffix, self
        )

    def _settle(
        self, opcode: int, items: Any, prefix: bytes, suffix: bytes, wait: bool
    ) -> None:
        if wait:
            self._connection.call(
                opcode,
                functools.partial(
                    self._encode_settle, opcode, 0, items, prefix, suffix
                ),
            )
        else:
            self._connection.send(
                functools.partial(
                    self._encode_settle, opcode, FLAG_NO_REPLY, items, prefix, suffix
                )
            )

    def ack(self, receipt: int, *, wait: bool = True) -> None:
        """Settle the delivery named by receipt.

        With wait=False the ack is sent without waiting for the reply; an
        error it gets is logged and raised by a later call on this connection.
        When the connection breaks before the reply to a later request
        confirmed the ack, a call raises UnconfirmedSettleError.
        """
        check_receipt(receipt)
        self._settle(protocol.ACK, [receipt], b"", b"", wait)

    def ack_many(self, items: Any, *, wait: bool = True) -> None:
        """Settle many deliveries: messages, receipts, or a batch.

        Either all are acked or, when one receipt is stale, none.
        """
        self._settle(protocol.ACK, items, b"", b"", wait)

    def nack(self, receipt: int, delay: float = 0.0) -> None:
        """Give the message back, for redelivery after delay seconds."""
        check_receipt(receipt)
        self._settle(
            protocol.NACK, [receipt], _seconds("nack", "delay", delay), b"", True
        )

    def extend(self, receipt: int, seconds: float) -> None:
        """Set the delivery's deadline to now plus seconds."""
        check_receipt(receipt)
        self._settle(
            protocol.EXTEND,
            [receipt],
            _seconds("extend", "seconds", seconds),
            b"",
            True,
        )

    def reject(self, receipt: int, reason: str = "rejected") -> None:
        """Move the message to the dead-letter queue now, with reason.

        A reason over 1000 UTF-8 bytes is cut as the embedded broker cuts
        it; see encode_reason.
        """
        check_receipt(receipt)
        self._settle(protocol.REJECT, [receipt], b"", encode_reason(reason), True)

    def stats(self) -> QueueStats:
        """Return the counts of this queue or group; see QueueStats."""
        frames = self._connection.call(
            protocol.STATS,
            lambda request_id: encode_frame(
                protocol.STATS, 0, request_id, self.handle(), b""
            ),
        )
        return QueueStats(**decode_json(frames[0][4]))

    @property
    def dlq_name(self) -> str:
        return str(self._answer["dlq"])

    @property
    def dlq(self) -> RemoteQueue:
        """The dead-letter queue of this queue or group."""
        return self._broker.queue(self.dlq_name)

    @property
    def visibility_timeout(self) -> float:
        return float(self._answer["options"]["visibility_timeout"])

    @property
    def max_deliveries(self) -> int:
        return int(self._answer["options"]["max_deliveries"])

    @property
    def max_in_flight(self) -> int:
        return int(self._answer["options"]["max_in_flight"])


class RemoteQueue(_RemoteConsumer, _Publisher):
    """A queue on a server: put, get, ack and the rest, as pymq.Queue."""

    @property
    def max_length(self) -> int | None:
        value = self._answer["options"].get("max_length")
        return None if value is None else int(value)

    @property
    def max_bytes(self) -> int | None:
        value = self._answer["options"].get("max_bytes")
        return None if value is None else int(value)

    @property
    def overflow(self) -> str:
        return str(self._answer["options"].get("overflow", "reject"))

    def close(self) -> None:
        """Nack the deliveries kept after an interrupted get, if any.

        The server keeps the queue's handle until the connection closes:
        each queue, stream and group a connection opens counts toward the
        server's max_handles until then. Close the RemoteBroker, or open
        another connection, to release them.
        """
        self._give_back_late()

    def __enter__(self) -> RemoteQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteQueue {self.name!r} on {self._broker.url}>"


class RemoteGroup(_RemoteConsumer):
    """A consumer group of a stream on a server, as pymq.Group."""

    def close(self) -> None:
        """Nack the deliveries kept after an interrupted get; see RemoteQueue.close."""
        self._give_back_late()

    def __enter__(self) -> RemoteGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteGroup {self.name!r} on {self._broker.url}>"


class RemoteStream(_Publisher):
    """A stream on a server: put and put_many, and its groups."""

    def group(
        self, name: str, *, start: str | int = "earliest", **options: Any
    ) -> RemoteGroup:
        """Open the group name, creating it if it is missing; see Stream.group."""
        check_name("group", name)
        options = _check_options(options, GROUP_DEFAULTS)
        broker = self._broker
        with broker._lock:
            group = broker._groups.get((self.name, name))
            if group is None:
                group = RemoteGroup(
                    broker,
                    {
                        "kind": "group",
                        "name": name,
                        "stream": self.name,
                        "start": start,
                    },
                )
                group.reopen(options)
                broker._groups[(self.name, name)] = group
            elif options:
                group.reopen(options)
            return group

    def __repr__(self) -> str:
        return f"<RemoteStream {self.name!r} on {self._broker.url}>"


def client_ssl_context(
    address: Address,
    context: ssl.SSLContext | None,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
) -> ssl.SSLContext | None:
    """Return the TLS context for a pymqs:// address, or None for pymq://.

    Without a context of the caller's, the server's certificate is checked
    against ca_file (or the system's authorities), and cert_file with
    key_file is the client's own certificate, for servers that ask for one.
    """
    if not address.tls:
        if context or ca_file or cert_file or key_file:
            raise errors.ConfigError(
                f"{address} is not TLS: TLS options need a pymqs:// URL"
            )
        return None
    if context is not None:
        return context
    if cert_file is None and key_file is not None:
        raise errors.ConfigError("key_file is given without cert_file")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except OSError as exc:
        # ssl.SSLError, raised for a file without a certificate, is an
        # OSError too.
        raise errors.ConfigError(
            f"cannot load the TLS authority file {ca_file}: {exc}"
        ) from exc
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except OSError as exc:
            raise errors.ConfigError(
                f"cannot load the TLS client certificate {cert_file} (key "
                f"{key_file or 'in the same file'}): {exc}"
            ) from exc
    return context


def connect(
    url: str = f"pymq://127.0.0.1:{protocol.DEFAULT_PORT}",
    *,
    token: str | None = None,
    connect_timeout: float = 10.0,
    reconnect_attempts: int = 5,
    ssl_context: ssl.SSLContext | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    busy_poll: float | None = None,
) -> RemoteBroker:
    """Connect to a pymq server and return a broker with pymq.open()'s API.

    url is pymq://HOST:PORT, pymqs://HOST:PORT (TLS; see client_ssl_context
    for ssl_context, ca_file, cert_file and key_file) or pymq+unix:///PATH.
    token defaults to the environment variable PYMQ_TOKEN. connect_timeout
    bounds each try to connect, in seconds. A broken connection is opened
    again, with backoff, on the next call: a first try and
    reconnect_attempts more, so 6 tries by default, and 1 with 0. Only
    requests that are safe to repeat are sent again on their own.

    busy_poll is how long, in seconds, the thread that waits for a reply
    polls the socket before it sleeps: 100 µs by default where the process
    may run on more than one CPU, else 0, which turns polling off. A reply
    that comes within it saves a wake-up of the sleeping thread, which on
    many virtual machines costs more than the server's work. The poll
    shrinks to nothing while waits run longer, as when a get waits on an
    empty queue, and grows back when replies come quickly again. It is not
    used over TLS.
    """
    check_connect_options(connect_timeout, reconnect_attempts, token)
    busy_poll = check_busy_poll(busy_poll)
    if token is None:
        token = os.environ.get("PYMQ_TOKEN") or None
    address = parse_url(url)
    connection = Connection(
        address,
        token=token,
        connect_timeout=connect_timeout,
        reconnect_attempts=reconnect_attempts,
        busy_poll=busy_poll,
        ssl_context=client_ssl_context(
            address, ssl_context, ca_file, cert_file, key_file
        ),
    )
    return RemoteBroker(connection)
