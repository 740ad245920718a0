"""The standalone server: an embedded broker behind TCP and Unix sockets.

One asyncio loop owns the sockets: uvloop when it is installed, unless
run() is given another loop. Frames are split and built by the compiled
codec in pymq._core; each request is one call into the broker. With
fsync="always", requests that sync run in a thread pool, in order per
connection, so connections share fsyncs (group commit) while the loop keeps
serving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import hmac
import importlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from pymq import errors, protocol
from pymq._core import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_OPCODES,
    FrameReader,
    ReceiptSet,
    UnackedCount,
    decode_receipts,
    encode_deliveries,
    encode_frame,
    keep_large_buffers,
    serve_ack,
    serve_fetch,
    serve_publish,
)
from pymq._version import __version__
from pymq.broker import DLQ_HEADROOM_BYTES, Broker
from pymq.names import check_name
from pymq.protocol import (
    FLAG_ERROR,
    FLAG_MORE,
    FLAG_NO_REPLY,
    FLAG_PUSH,
    FLAG_REPLY,
    PREAMBLE,
    decode_json,
    encode_error,
    encode_json,
    error_code,
)
from pymq.queue import Group, Queue, Stream

__all__ = [
    "LOOPS",
    "Server",
    "ServerLimits",
    "check_port_file",
    "run",
    "server_ssl_context",
]

logger = logging.getLogger("pymq.server")

# The event loops that run(loop=...) and pymq serve --loop take.
LOOPS: Final = ("auto", "asyncio", "uvloop")

_FETCH: Final = struct.Struct("<Ii")
_U32: Final = struct.Struct("<I")
# Flags only the server's frames carry; a request with any of them is bad.
_SERVER_FLAGS: Final = FLAG_REPLY | FLAG_ERROR | FLAG_PUSH | FLAG_MORE
_F64: Final = struct.Struct("<d")
# Requests queued on one connection before the server stops reading it.
_MAX_PENDING: Final = 1024
# Replies to the requests of one read are written once they pass this
# size, so that a peer that does not read them is noticed (pause_writing).
_OUTBOX_BYTES: Final = 64 * 1024
# The shortest wait for room under max_unacked, so that a waiter cannot
# spin while another thread checks the deliveries held.
_MIN_ROOM_WAIT: Final = 0.001
# Maximum number of peer addresses whose failed logins are kept in memory.
_MAX_LOGIN_HOSTS: Final = 10_000
# Maximum number of failed TLS handshakes logged one by one per second. The
# others are counted, and their count is logged when the second is over.
_HANDSHAKE_WARNINGS_PER_SECOND: Final = 5
# The listen() backlog of a TLS listener: asyncio's create_server default.
_TLS_BACKLOG: Final = 100
# The likely cause of the TLS alerts and errors met most often, by the
# reason OpenSSL gives, for the failed-handshake warning.
_HANDSHAKE_HINTS: Final = {
    "WRONG_VERSION_NUMBER": "the client does not speak TLS, or uses pymq:// in "
    "place of pymqs://",
    "HTTP_REQUEST": "the client sent an HTTP request",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the authority that "
    "signed the server's certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected the server's "
    "certificate, for example for a host name it does not cover",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate, and "
    "the server requires one (--tls-client-ca)",
    "CERTIFICATE_VERIFY_FAILED": "the client's certificate failed the check "
    "against the server's --tls-client-ca authority",
}
# Control requests that may take long (files created and synced, or a
# whole DLQ moved) run in the pool; STATS and the listings run inline.
_CONTROL: Final = frozenset({protocol.OPEN, protocol.REDRIVE})
_SYNCING: Final = frozenset(
    {
        protocol.PUBLISH,
        protocol.FETCH,
        protocol.ACK,
        protocol.NACK,
        protocol.EXTEND,
        protocol.REJECT,
    }
)
# Requests that offloaded() never sends to a pool, by fsync policy. A
# PUBLISH runs in a pool when its queue blocks on overflow.
_INLINE: Final = frozenset(PROTOCOL_OPCODES.values()) - _CONTROL - {protocol.PUBLISH}
_INLINE_WHEN_SYNCING: Final = _INLINE - _SYNCING


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Per-server and per-connection limits; every one has a default.

    - max_frame_bytes: largest frame either side may send (16 MiB).
    - max_batch: most messages in one publish or one delivery (10,000).
    - max_connections: open connections; more are refused (1,024).
    - max_handles: queues, streams and groups one connection may open
      (10,000). They stay open until the connection closes.
    - handshake_timeout: seconds from connect to a valid HELLO (10).
    - frame_timeout: seconds a partial frame may stall before the
      connection is dropped (30).
    - idle_timeout: seconds without a frame, with nothing waiting, before
      the connection is dropped; 0 never drops (0).
    - max_waiting: long polls and subscriptions one connection may have
      waiting at once (1,024).
    - max_failed_logins: failed logins one peer address may make within
      login_window seconds. After that its HELLOs are rejected without
      checking the token until the oldest failure is that old (10).
    - login_window: seconds over which failed logins are counted (60).
    - max_unacked: deliveries one connection may hold unsettled at once,
      across its queues and groups, FETCH replies and subscription pushes
      alike (100,000). A FETCH takes at most the room left, and gets error
      19 when there is none; subscriptions pause until room is freed.
    """

    max_frame_bytes: int = 16 << 20
    max_batch: int = 10_000
    max_connections: int = 1024
    max_handles: int = 10_000
    handshake_timeout: float = 10.0
    frame_timeout: float = 30.0
    idle_timeout: float = 0.0
    max_waiting: int = 1024
    max_failed_logins: int = 10
    login_window: float = 60.0
    max_unacked: int = 100_000

    def __post_init__(self) -> None:
        ranges: dict[str, tuple[float, float]] = {
            "max_frame_bytes": (4096, 0xFFFFFFFF),
            "max_batch": (1, 1_000_000),
            "max_connections": (1, 1_000_000),
            "max_handles": (1, 1_000_000),
            "handshake_timeout": (0.01, 3600),
            "frame_timeout": (0.01, 3600),
            "idle_timeout": (0, 1e9),
            "max_waiting": (1, 1_000_000),
            "max_failed_logins": (1, 1_000_000),
            "login_window": (0.01, 86_400),
            "max_unacked": (1, 1 << 31),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            counts = not name.endswith(("timeout", "window"))
            if isinstance(value, bool) or not isinstance(
                value, int if counts else (int, float)
            ):
                kind = "an int" if counts else "a number of seconds"
                raise errors.ConfigError(f"{name} is {value!r}; it must be {kind}")
            if not low <= value <= high:
                raise errors.ConfigError(
                    f"{name} is {value}; it must be from {low} to {high}"
                )


def _check_unix_socket_path(path: str) -> None:
    """Raise ConfigError for a path that cannot become a listening socket.

    The path must fit a Unix socket address, and anything already there
    other than a socket is kept, never replaced.
    """
    protocol.check_unix_path(path)
    found = Path(path)
    if found.is_socket() or not os.path.lexists(path):
        return
    if found.is_symlink():
        kind = "a symbolic link"
    elif found.is_dir():
        kind = "a directory"
    elif found.is_file():
        kind = "a regular file"
    else:
        kind = "a file of another type"
    raise errors.ConfigError(
        f"Unix socket path {path} is {kind}, not a socket; remove it or "
        f"choose another path"
    )


def _remove_stale_socket(path: str) -> None:
    """Delete a Unix socket file left by a server that is gone.

    A server that still accepts on path keeps it: OSError(EADDRINUSE), as
    for a TCP port in use.
    """
    if not Path(path).is_socket():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
    raise OSError(
        errno.EADDRINUSE,
        f"Unix socket {path} is in use by a running server; stop it or choose "
        f"another path",
        path,
    )


def _check_frame_room(limits: ServerLimits, max_message_bytes: int) -> None:
    """Raise ConfigError unless a frame can carry the largest message.

    The largest is a DLQ's, which takes DLQ_HEADROOM_BYTES more for its x-
    headers, and 4096 bytes are left for the frame's own fields.
    """
    room = DLQ_HEADROOM_BYTES + 4096
    if max_message_bytes + room > limits.max_frame_bytes:
        raise errors.ConfigError(
            f"max_frame_bytes is {limits.max_frame_bytes}; it must be at "
            f"least max_message_bytes ({max_message_bytes}) plus {room}"
        )


class _Park:
    """A handler's result meaning the request waits: a long poll."""

    __slots__ = (
        "cancelled_by",
        "count",
        "handle",
        "request_id",
        "taking",
        "task",
        "wait_ms",
    )

    def __init__(self, request_id: int, handle: int, count: int, wait_ms: int) -> None:
        self.request_id = request_id
        self.handle = handle
        self.count = count
        self.wait_ms = wait_ms
        self.task: asyncio.Task[None] | None = None
        # True while the poll takes messages in the pool (fsync="always"):
        # a CANCEL that comes then cannot stop the take, so it waits for it.
        self.taking = False
        # Request id, flags and handle of the CANCEL that came while taking.
        self.cancelled_by: tuple[int, int, int] | None = None


class _Target:
    """A queue, stream or group opened on one connection, by handle."""

    __slots__ = ("consumer", "core", "handle", "kind", "name", "outstanding", "target")

    def __init__(
        self, handle: int, kind: str, name: str, target: Queue | Stream | Group
    ) -> None:
        self.handle = handle
        self.kind = kind
        self.name = name
        self.target = target
        self.consumer: Queue | Group | None = (
            None if isinstance(target, Stream) else target
        )
        self.core: Any = target._core if isinstance(target, Stream) else target.stream
        # Receipts delivered on this connection and not yet settled by it.
        # They are nacked when the connection closes. Their number counts
        # against max_unacked: see UnackedCount.
        self.outstanding = ReceiptSet()


class _Hub:
    """Wakes the long polls and subscriptions waiting on one stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop, core: Any, ready: Any) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._core = core
        self._ready = ready
        self._armed = 0
        self._future: asyncio.Future[None] | None = None

    def arm(self) -> asyncio.Future[None]:
        """Count one waiter; return the future the next put resolves."""
        if self._armed == 0:
            with self._ready:
                self._core.waiters += 1
        self._armed += 1
        if self._future is None:
            self._future = self._loop.create_future()
        return self._future

    def disarm(self) -> None:
        self._armed -= 1
        if self._armed == 0:
            with self._ready:
                self._core.waiters -= 1

    def wake(self) -> None:
        """Run by the broker after a put or settlement, in any thread."""
        if threading.get_ident() == self._loop_thread:
            self._fire()
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)


class _Subscription:
    __slots__ = ("changed", "credit", "handle", "task")

    def __init__(self, handle: int, credit: int) -> None:
        self.handle = handle
        self.credit = credit
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class _HandshakeFailureLog:
    """Logs failed TLS handshakes as WARNINGs, at most `limit` a second.

    The failures past the limit within a second are counted. One WARNING
    with their count and the last of them follows when flush() finds that
    second over: the server's sweep calls it at least once a second.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # When the current second of counting started, or None before the
        # first failure after a flush.
        self.window_start: float | None = None
        self.logged = 0
        self.suppressed = 0
        self.last_suppressed = ""

    def add(self, peer: str, reason: str, now: float) -> None:
        self.flush(now)
        if self.window_start is None:
            self.window_start = now
        if self.logged < self.limit:
            self.logged += 1
            logger.warning("TLS handshake with %s failed: %s", peer, reason)
        else:
            self.suppressed += 1
            self.last_suppressed = f"{peer}: {reason}"

    def flush(self, now: float, *, final: bool = False) -> None:
        """Log the count of unlogged failures once their second is over.

        With final, as the server stops, the count is logged at once.
        """
        if self.window_start is None:
            return
        if not final and now - self.window_start < 1.0:
            return
        if self.suppressed:
            logger.warning(
                "%d more TLS handshakes failed within 1 s and were not logged "
                "one by one (at most %d a second are); the last: %s",
                self.suppressed,
                self.limit,
                self.last_suppressed,
            )
        self.window_start = None
        self.logged = self.suppressed = 0
        self.last_suppressed = ""


def _handshake_failure_reason(exc: OSError, timeout: float) -> str:
    """Describe why a server-side TLS handshake failed, for the log.

    The text is OpenSSL's short reason and its verify message, or the
    socket error: never key material or certificate contents.
    """
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
            reason = f"{reason}: {exc.verify_message}"
        hint = _HANDSHAKE_HINTS.get(exc.reason or "")
        return f"{reason} ({hint})" if hint else reason
    if isinstance(exc, ConnectionAbortedError):
        # asyncio's and uvloop's SSL protocols raise it when
        # ssl_handshake_timeout passes.
        return f"handshake timed out after {timeout:g} s (handshake_timeout)"
    if isinstance(exc, ConnectionResetError) and exc.errno is None:
        # Raised with no errno for an end of stream during the handshake.
        return "the client closed the connection during the handshake"
    return exc.strerror or str(exc) or type(exc).__name__


async def _bind_tcp(host: str, port: int) -> list[socket.socket]:
    """Return listening sockets on the addresses host resolves to.

    The sockets are set up as loop.create_server sets up its own:
    SO_REUSEADDR, IPV6_V6ONLY on IPv6, and OSError with the same message
    when an address cannot be bound.
    """
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        # getaddrinfo may return an address twice; dict keeps the order.
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"error while attempting to bind on address {address!r}: "
                    f"{(exc.strerror or str(exc)).lower()}",
                ) from None
            sock.listen(_TLS_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _TlsListener:
    """A TCP listener that runs each TLS handshake in a task of its own.

    loop.create_server(ssl=...) reports a failed handshake only in the
    loop's debug mode, so this listener accepts sockets itself and hands
    each to loop.connect_accepted_socket(ssl=...), which raises the
    handshake's error. A connection whose handshake succeeds goes on as
    with create_server: _Connection.connection_made runs after the
    handshake.
    """

    def __init__(
        self, server: Server, context: ssl.SSLContext, sockets: list[socket.socket]
    ) -> None:
        self._server = server
        self._context = context
        self.sockets = tuple(sockets)
        # Each handshake task, with its socket until the task has started:
        # from then on the loop's transport owns the socket.
        self._handshakes: dict[asyncio.Task[None], socket.socket | None] = {}
        self._accepting = [
            asyncio.ensure_future(self._accept(sock)) for sock in sockets
        ]

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    sock, address = await loop.sock_accept(listening)
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:
                    # Out of file descriptors or memory: asyncio's own
                    # listener also waits a second before it accepts again.
                    logger.error(
                        "could not accept a TLS connection on %s: %s; accepting "
                        "again in 1 s",
                        _address_text(listening.getsockname()),
                        exc,
                    )
                    await asyncio.sleep(1.0)
                    continue
                server = self._server
                limit = server.limits.max_connections
                if len(self._handshakes) + server.connection_count >= limit:
                    # A handshake keeps its socket open for up to
                    # handshake_timeout, so handshakes count against
                    # max_connections too. Otherwise clients that never
                    # finish one could open any number of sockets.
                    server.handshake_failed(
                        _address_text(address),
                        f"refused before it began: the server holds "
                        f"max_connections ({limit}) connections and handshakes; "
                        f"try again once others close, or start it with a "
                        f"higher --max-connections",
                    )
                    sock.close()
                    continue
                task = asyncio.ensure_future(
                    self._handshake(sock, _address_text(address))
                )
                self._handshakes[task] = sock
                task.add_done_callback(self._handshake_done)
        finally:
            listening.close()

    async def _handshake(self, sock: socket.socket, peer: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handshakes[task] = None
        server = self._server
        timeout = server.limits.handshake_timeout
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: _Connection(server),
                sock,
                ssl=self._context,
                ssl_handshake_timeout=timeout,
            )
        except OSError as exc:
            server.handshake_failed(peer, _handshake_failure_reason(exc, timeout))

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        sock = self._handshakes.pop(task, None)
        if sock is not None:
            # Cancelled before it started, so no transport closes it.
            sock.close()

    def close(self) -> None:
        """Stop accepting, and end the handshakes under way."""
        for task in self._accepting:
            task.cancel()
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(
            *self._accepting, *self._handshakes, return_exceptions=True
        )


def _address_text(address: Any) -> str:
    """Return a socket address as the logs write it: HOST:PORT."""
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


class Server:
    """Serves one Broker over the wire protocol; see docs/protocol.md.

    Use run() for the command line. To embed it: ``await start()``, later
    ``await stop()``, then close the broker and call close().
    """

    def __init__(
        self,
        broker: Broker,
        *,
        token: str | None = None,
        limits: ServerLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._ssl = ssl_context
        if token is not None and not token:
            raise errors.ConfigError("token is empty; give a token or None")
        self.broker = broker
        self.limits = limits or ServerLimits()
        self._token = None if token is None else token.encode("utf-8")
        store_options = broker._store_options
        self._syncs = bool(store_options["fsync"] == "always")
        limit = store_options["max_message_bytes"]
        self.max_message_bytes: int = (
            DEFAULT_MAX_MESSAGE_BYTES if limit is None else int(limit)
        )
        _check_frame_room(self.limits, self.max_message_bytes)
        self._executor = ThreadPoolExecutor(
            max_workers=32, thread_name_prefix="pymq-server"
        )
        # Puts that wait for room in a full queue get their own threads, so
        # they never hold up the acks and fetches that would make the room.
        self._waiting_executor = ThreadPoolExecutor(
            max_workers=256, thread_name_prefix="pymq-server-put"
        )
        self._listeners: list[asyncio.Server | _TlsListener] = []
        self._connections: set[_Connection] = set()
        self._hubs: dict[str, _Hub] = {}
        self._housekeeping: asyncio.Task[None] | None = None
        self._failed_logins = 0
        self._last_failed_login_log = 0.0
        self._handshake_failures = _HandshakeFailureLog(_HANDSHAKE_WARNINGS_PER_SECOND)
        # Peer address (host only) to the times of its recent failed logins.
        self._login_failures: dict[str, collections.deque[float]] = {}
        self.addresses: list[str] = []
        # The Unix socket this server created: path, device and inode.
        self._unix_socket: tuple[str, int, int] | None = None
        self.stopping = False

    # Starting and stopping --------------------------------------------------

    async def start(
        self,
        host: str | None = "127.0.0.1",
        port: int = protocol.DEFAULT_PORT,
        unix: str | None = None,
    ) -> list[str]:
        """Listen on host:port (unless host is None) and on unix; return both."""
        loop = asyncio.get_running_loop()
        if unix is not None:
            # Checked before any listener opens.
            _check_unix_socket_path(unix)
        if host is not None:
            listener: asyncio.Server | _TlsListener
            if self._ssl is None:
                listener = await loop.create_server(
                    lambda: _Connection(self), host, port, reuse_address=True
                )
            else:
                sockets = await _bind_tcp(host, port)
                listener = _TlsListener(self, self._ssl, sockets)
            self._listeners.append(listener)
            for sock in listener.sockets:
                address = sock.getsockname()
                self.addresses.append(f"{address[0]}:{address[1]}")
                logger.info(
                    "listening on %s:%d%s",
                    address[0],
                    address[1],
                    " (TLS)" if self._ssl is not None else "",
                )
            if self._token is None and not _is_loopback(host):
                logger.warning(
                    "listening on %s without a token: anyone who can reach it "
                    "can read and write every queue; set --token-file",
                    host,
                )
        if unix is not None:
            _remove_stale_socket(unix)
            listener = await loop.create_unix_server(lambda: _Connection(self), unix)
            self._listeners.append(listener)
            created = os.stat(unix)
            self._unix_socket = (unix, created.st_dev, created.st_ino)
            self.addresses.append(unix)
            logger.info("listening on %s", unix)
        self._housekeeping = asyncio.ensure_future(self._sweep())
        return list(self.addresses)

    @property
    def port(self) -> int:
        """The bound TCP port (the first one), for --port 0."""
        for listener in self._listeners:
            for sock in listener.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        raise errors.ConfigError("the server listens on no TCP port")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, finish requests under way, release deliveries.

        Requests that wait (long polls, subscriptions, puts waiting for
        room in a full queue) get error 13 (SHUTTING_DOWN) at once, before
        their connection closes. Those took no effect.
        """
        self.stopping = True
        for listener in self._listeners:
            listener.close()
        for connection in list(self._connections):
            connection.stop_reading()
        self.broker._stop_waits("the server is shutting down")
        for connection in list(self._connections):
            connection.end_waits()
        deadline = time.monotonic() + grace
        for connection in list(self._connections):
            await connection.drained(max(0.0, deadline - time.monotonic()))
        for connection in list(self._connections):
            connection.close()
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.wait_closed(), 1.0)
        self._handshake_failures.flush(time.monotonic(), final=True)
        self._remove_own_socket()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        # Deliveries still held by connections go back before the broker
        # closes; connection_lost may not have run yet for every transport.
        for connection in list(self._connections):
            connection.release_all()
        # A put still waiting for room in a full queue ends when the broker
        # closes, so the pool is not waited for here: see close().
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._waiting_executor.shutdown(wait=False, cancel_futures=True)

    def _remove_own_socket(self) -> None:
        """Delete the Unix socket file this server created, if it is still there.

        A file that another server has since put at the path is kept: it
        has another inode.
        """
        if self._unix_socket is None:
            return
        path, device, inode = self._unix_socket
        self._unix_socket = None
        try:
            found = os.stat(path)
        except FileNotFoundError:
            return
        if (found.st_dev, found.st_ino) == (device, inode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        """Wait for the pool's threads; call after stop() and broker.close()."""
        self._executor.shutdown(wait=True)
        self._waiting_executor.shutdown(wait=True)

    async def _sweep(self) -> None:
        limits = self.limits
        while True:
            await asyncio.sleep(min(1.0, limits.frame_timeout / 2))
            now = time.monotonic()
            for connection in list(self._connections):
                connection.check_timeouts(now)
            self.forget_old_login_failures(now)
            self._handshake_failures.flush(now)

    # Shared state -----------------------------------------------------------

    def hub(self, core: Any) -> _Hub:
        hub = self._hubs.get(core.name)
        if hub is None:
            streams = self.broker._streams
            ready = streams[core.name][1]
            hub = _Hub(asyncio.get_running_loop(), core, ready)
            self._hubs[core.name] = hub
            self.broker._listen(core.name, hub.wake)
        return hub

    def check_login(self, token: object, peer: str, host: str) -> str | None:
        """Check the token of a HELLO; return None, or why it is rejected.

        host is the peer's address without its port. A host that failed
        max_failed_logins times within login_window is rejected without
        its token being compared. Failed logins are logged at most once a
        second.
        """
        if self._token is None:
            return None
        limits = self.limits
        now = time.monotonic()
        failures = self._login_failures.get(host)
        if failures is not None:
            while failures and now - failures[0] >= limits.login_window:
                failures.popleft()
            if len(failures) >= limits.max_failed_logins:
                retry = limits.login_window - (now - failures[0])
                self._log_failed_login(peer, now, "too many failed logins")
                return (
                    f"authentication failed: {host} is locked out after "
                    f"{len(failures)} failed logins within login_window "
                    f"({limits.login_window:g} s), the limit is "
                    f"max_failed_logins ({limits.max_failed_logins}), so the "
                    f"token was not checked; try again in {retry:.1f} s"
                )
        raw = token.encode("utf-8") if isinstance(token, str) else b""
        if hmac.compare_digest(raw, self._token):
            return None
        reason = "wrong token" if raw else "missing token"
        if failures is None:
            if len(self._login_failures) >= _MAX_LOGIN_HOSTS:
                # The oldest entry goes, so memory stays bounded.
                del self._login_failures[next(iter(self._login_failures))]
            failures = self._login_failures[host] = collections.deque()
        failures.append(now)
        if len(failures) == limits.max_failed_logins:
            logger.warning(
                "rejecting logins from %s for %g s: %d failed logins",
                host,
                limits.login_window,
                len(failures),
            )
        self._log_failed_login(peer, now, reason)
        if raw:
            return "authentication failed: wrong token"
        return (
            "authentication failed: missing token; this server requires one "
            "(pass token=, or set PYMQ_TOKEN)"
        )

    def _log_failed_login(self, peer: str, now: float, reason: str) -> None:
        self._failed_logins += 1
        if now - self._last_failed_login_log >= 1.0:
            logger.warning(
                "refused a connection from %s: %s (%d refused so far)",
                peer,
                reason,
                self._failed_logins,
            )
            self._last_failed_login_log = now

    def handshake_failed(self, peer: str, reason: str) -> None:
        """Log a failed TLS handshake, rate-limited: see _HandshakeFailureLog."""
        self._handshake_failures.add(peer, reason, time.monotonic())

    def forget_old_login_failures(self, now: float) -> None:
        """Drop hosts whose failed logins are all older than login_window."""
        window = self.limits.login_window
        for host, failures in list(self._login_failures.items()):
            if not failures or now - failures[-1] >= window:
                del self._login_failures[host]

    def register(self, connection: _Connection) -> bool:
        if self.stopping or len(self._connections) >= self.limits.max_connections:
            return False
        self._connections.add(connection)
        return True

    def unregister(self, connection: _Connection) -> None:
        self._connections.discard(connection)

    @property
    def connection_count(self) -> int:
        """Connections open now, past their TLS handshake if any."""
        return len(self._connections)

    @property
    def syncs(self) -> bool:
        return self._syncs

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._executor

    @property
    def waiting_executor(self) -> ThreadPoolExecutor:
        return self._waiting_executor


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Connection(asyncio.Protocol):
    """One client connection: handshake, handles, requests in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.limits = server.limits
        self.reader = FrameReader(self.limits.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_host = "?"
        self.preamble = b""
        # The preamble has been read and checked.
        self.spoke = False
        self.hello = False
        self.closed = False
        self.handles: dict[int, _Target] = {}
        self.named: dict[tuple[str, str], int] = {}
        self.next_handle = 1
        self.subscriptions: dict[int, _Subscription] = {}
        # Deliveries held unsettled, against max_unacked; see UnackedCount.
        self.unacked = UnackedCount(
            self.limits.max_unacked, self.reclaim, self.room_freed
        )
        # Futures of the requests waiting for room under max_unacked.
        self.room_waits: list[asyncio.Future[None]] = []
        self.pending: collections.deque[tuple[int, int, int, int, bytes]] = (
            collections.deque()
        )
        self.worker: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # The long polls waiting, by the request id of their FETCH.
        self.parked: dict[int, _Park] = {}
        self.disconnected: asyncio.Future[None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.opened = time.monotonic()
        self.last_frame = self.opened
        self.partial_since: float | None = None
        # Why reading is paused: "writes" (the peer is not reading its
        # replies) or "pending" (too many requests wait for the pool).
        self.holds: set[str] = set()
        # Replies gathered while one read's requests run; see data_received.
        self.outbox: list[bytes] | None = None
        self.inline = _INLINE_WHEN_SYNCING if server.syncs else _INLINE
        self.handlers: dict[int, Callable[[int, int, int, bytes], Any]] = {
            protocol.HELLO: self.on_hello,
            protocol.PING: self.on_ping,
            protocol.OPEN: self.on_open,
            protocol.STATS: self.on_stats,
            protocol.REDRIVE: self.on_redrive,
            protocol.NAMES: self.on_names,
            protocol.GROUPS: self.on_groups,
            protocol.PUBLISH: self.on_publish,
            protocol.FETCH: self.on_fetch,
            protocol.SUBSCRIBE: self.on_subscribe,
            protocol.CREDIT: self.on_credit,
            protocol.UNSUBSCRIBE: self.on_unsubscribe,
            protocol.CANCEL: self.on_cancel,
            protocol.ACK: self.on_ack,
            protocol.NACK: self.on_nack,
            protocol.EXTEND: self.on_extend,
            protocol.REJECT: self.on_reject,
        }

    # Transport events ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
            self.peer_host = str(peer[0])
        elif peer:
            self.peer = self.peer_host = str(peer)
        else:
            self.peer = self.peer_host = "unix socket"
        self.disconnected = asyncio.get_running_loop().create_future()
        if not self.server.register(self):
            reason = (
                "the server is shutting down"
                if self.server.stopping
                else f"the server holds max_connections "
                f"({self.limits.max_connections}) connections; try again once "
                f"others close, or start it with a higher --max-connections"
            )
            code = 13 if self.server.stopping else 16
            logger.warning("refused a connection from %s: %s", self.peer, reason)
            self.send_error(protocol.HELLO, 0, 0, code, reason)
            self.closed = True
            transport.close()
            return
        logger.debug("connection from %s", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = not self.closed
        self.closed = True
        if self.disconnected is not None and not self.disconnected.done():
            self.disconnected.set_result(None)
        self.writable.set()
        for subscription in self.subscriptions.values():
            subscription.changed.set()
        self.server.unregister(self)
        if self.pending or self.worker is not None:
            # The worker releases the deliveries when it has finished.
            return
        self.release_all()
        if was_open:
            logger.debug("connection from %s closed", self.peer)

    def pause_writing(self) -> None:
        # The peer reads its replies slower than it sends requests: read no
        # more requests until the replies already written have gone out.
        self.writable.clear()
        self.hold_reading("writes")

    def resume_writing(self) -> None:
        self.writable.set()
        self.release_reading("writes")

    def hold_reading(self, reason: str) -> None:
        if not self.holds and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.holds.add(reason)

    def release_reading(self, reason: str) -> None:
        if reason not in self.holds:
            return
        self.holds.discard(reason)
        if (
            not self.holds
            and self.transport is not None
            and not self.closed
            and not self.server.stopping
        ):
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.spoke:
            data = self.read_preamble(data)
            if not data:
                return
        reader = self.reader
        try:
            frames = reader.feed(data)
        except errors.ProtocolError as exc:
            self.fail(0, 0, exc)
            return
        if not frames:
            self.partial_since = time.monotonic() if reader.buffered else None
            return
        now = time.monotonic()
        self.partial_since = now if reader.buffered else None
        self.last_frame = now
        if len(frames) == 1:
            # A read with one request is the usual case for a client that
            # waits for each reply. Its reply is written at once.
            self.dispatch(frames[0])
            return
        # The replies to the requests of one read go out in one write, or
        # in several once they pass _OUTBOX_BYTES.
        outbox: list[bytes] = []
        self.outbox = outbox
        counted = 0
        size = 0
        try:
            for index, frame in enumerate(frames):
                if self.closed:
                    return
                if self.hello and not self.writable.is_set():
                    # The peer reads its replies slower than it sends
                    # requests. The rest wait for the worker, which replies
                    # to each once the replies before it have gone out.
                    self.defer(frames[index:])
                    return
                self.dispatch(frame)
                while counted < len(outbox):
                    size += len(outbox[counted])
                    counted += 1
                if size >= _OUTBOX_BYTES and self.transport is not None:
                    # May call pause_writing(), which clears writable for
                    # the next frame of this loop.
                    self.transport.writelines(outbox)
                    outbox.clear()
                    counted = size = 0
        finally:
            self.outbox = None
            if outbox and not self.closed and self.transport is not None:
                self.transport.writelines(outbox)

    def defer(self, frames: list[tuple[int, int, int, int, bytes]]) -> None:
        """Queue frames, in order, for the worker."""
        self.pending.extend(frames)
        if len(self.pending) >= _MAX_PENDING:
            self.hold_reading("pending")
        if self.worker is None:
            self.worker = asyncio.ensure_future(self.work())

    def read_preamble(self, data: bytes) -> bytes:
        """Take the preamble's bytes from data; return the bytes after it.

        Returns b"" while the preamble is incomplete, and after closing a
        connection whose preamble is not pymq's.
        """
        need = len(PREAMBLE) - len(self.preamble)
        self.preamble += data[:need]
        if len(self.preamble) < len(PREAMBLE):
            return b""
        if self.preamble[:4] == PREAMBLE[:4] and self.preamble[4] != PREAMBLE[4]:
            logger.info(
                "closed a connection from %s: it speaks pymq protocol version "
                "%d, not %d",
                self.peer,
                self.preamble[4],
                PREAMBLE[4],
            )
            self.send_error(
                protocol.HELLO,
                0,
                0,
                3,
                f"this server speaks pymq protocol version {PREAMBLE[4]}, and "
                f"the client asked for version {self.preamble[4]}; use a "
                f"client of the same major version",
            )
            self.close()
            return b""
        if self.preamble[:5] != PREAMBLE[:5]:
            logger.info(
                "closed a connection from %s: it does not speak the pymq "
                "protocol (first bytes %r)",
                self.peer,
                self.preamble,
            )
            self.send_error(
                protocol.HELLO, 0, 0, 3, "expected the pymq protocol preamble"
            )
            self.close()
            return b""
        self.spoke = True
        return data[need:]

    # Requests -------------------------------------------------------------------

    def dispatch(self, frame: tuple[int, int, int, int, bytes]) -> None:
        opcode = frame[0]
        if not self.hello and opcode != protocol.HELLO:
            self.reject_before_hello(frame)
            return
        if self.pending or (
            opcode not in self.inline and self.offloaded(opcode, frame[3]) is not None
        ):
            self.defer([frame])
            return
        self.finish(frame, self.handle(frame))

    def reject_before_hello(self, frame: tuple[int, int, int, int, bytes]) -> None:
        opcode = frame[0]
        self.fail(
            opcode,
            frame[2],
            errors.ProtocolError(
                f"opcode {opcode:#x} before HELLO; a connection starts with HELLO"
            ),
        )

    def offloaded(self, opcode: int, handle: int) -> ThreadPoolExecutor | None:
        """Return the pool that runs this request, or None to run it inline."""
        if opcode == protocol.PUBLISH:
            target = self.handles.get(handle)
            # The stream of a queue with overflow="block" has overflow_block set.
            if (
                target is not None
                and target.kind == "queue"
                and target.core.overflow_block
            ):
                return self.server.waiting_executor
        elif opcode in _CONTROL:
            return self.server.executor
        if self.server.syncs and opcode in _SYNCING:
            return self.server.executor
        return None

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                if self.closed:
                    # The peer is gone, so no reply would arrive: run no more.
                    self.pending.clear()
                    break
                if not self.writable.is_set():
                    # Bounds the replies waiting for the peer to read them.
                    await self.writable.wait()
                    continue
                frame = self.pending[0]
                executor = self.offloaded(frame[0], frame[3])
                if executor is not None:
                    result = await loop.run_in_executor(executor, self.handle, frame)
                else:
                    result = self.handle(frame)
                if self.closed:
                    # The connection closed while the request ran, and close()
                    # may have emptied pending: no reply goes out.
                    break
                self.pending.popleft()
                if len(self.pending) <= _MAX_PENDING // 4:
                    self.release_reading("pending")
                self.finish(frame, result)
        finally:
            self.worker = None
            if self.closed:
                self.release_all()

    def handle(self, frame: tuple[int, int, int, int, bytes]) -> Any:
        """Run one request; return its reply frames, a _Park, or None."""
        opcode, flags, request_id, handle, payload = frame
        handler = self.handlers.get(opcode)
        try:
            if handler is None:
                raise _Fatal(4, f"unknown opcode {opcode:#x}")
            if flags & _SERVER_FLAGS:
                raise _Fatal(
                    1,
                    f"request flags are {flags:#x}; a request may set only "
                    f"NO_REPLY ({FLAG_NO_REPLY:#x}), the others are the server's",
                )
            return handler(flags, request_id, handle, payload)
        except _Fatal as exc:
            return exc
        except errors.ProtocolError as exc:
            return _Fatal(error_code(exc), str(exc))
        except (errors.PymqError, ValueError, TypeError, OSError) as exc:
            code = error_code(exc)
            if code in (15, 18):
                logger.error(
                    "request %d (opcode %#x) from %s failed: %s",
                    request_id,
                    opcode,
                    self.peer,
                    exc,
                )
            return encode_frame(
                opcode,
                FLAG_REPLY | FLAG_ERROR,
                request_id,
                handle,
                encode_error(code, str(exc)),
            )
        except Exception as exc:
            logger.exception(
                "request %d (opcode %#x) from %s failed", request_id, opcode, self.peer
            )
            return encode_frame(
                opcode,
                FLAG_REPLY | FLAG_ERROR,
                request_id,
                handle,
                encode_error(18, f"{type(exc).__name__}: {exc}"),
            )

    def finish(self, frame: tuple[int, int, int, int, bytes], result: Any) -> None:
        kind = type(result)
        if kind is bytes or kind is list:
            # Reply frames, the common case.
            if self.closed or self.transport is None:
                return
            if self.outbox is not None:
                if kind is bytes:
                    self.outbox.append(result)
                else:
                    self.outbox.extend(result)
            elif kind is bytes:
                self.transport.write(result)
            elif len(result) == 1:
                self.transport.write(result[0])
            else:
                self.transport.writelines(result)
            return
        if result is None:
            return
        if isinstance(result, _Fatal):
            self.send_error(frame[0], frame[2], frame[3], result.code, result.text)
            logger.info(
                "closed the connection from %s: %s (request %d)",
                self.peer,
                result.text,
                frame[2],
            )
            self.close()
            return
        if isinstance(result, _Park):
            task = asyncio.ensure_future(self.long_poll(result))
            result.task = task
            self.parked[result.request_id] = result
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(functools.partial(self.unpark, result))

    def unpark(self, park: _Park, task: object = None) -> None:
        if self.parked.get(park.request_id) is park:
            del self.parked[park.request_id]

    def reply(self, opcode: int, request_id: int, handle: int, payload: bytes) -> bytes:
        return encode_frame(opcode, FLAG_REPLY, request_id, handle, payload)

    def target(self, handle: int) -> _Target:
        target = self.handles.get(handle)
        if target is None:
            raise _Fatal(14, f"handle {handle} was not opened on this connection")
        return target

    def consumer(self, handle: int) -> tuple[_Target, Queue | Group]:
        target = self.handles.get(handle)
        if target is None or target.consumer is None:
            target = self.target(handle)
            raise errors.ConfigError(
                f"{target.name} is a stream: consume it through one of its groups"
            )
        return target, target.consumer

    # Control requests -------------------------------------------------------

    def on_hello(self, flags: int, request_id: int, handle: int, payload: bytes) -> Any:
        if self.hello:
            raise errors.ProtocolError("HELLO came twice")
        request = decode_json(payload)
        versions = request.get("versions", [1, 1])
        if (
            not isinstance(versions, list)
            or len(versions) != 2
            or not all(isinstance(v, int) for v in versions)
            or not versions[0] <= protocol.PROTOCOL_VERSION <= versions[1]
        ):
            raise _Fatal(
                3,
                f"client speaks protocol versions {versions!r}; this server "
                f"speaks {protocol.PROTOCOL_VERSION}",
            )
        rejected = self.server.check_login(
            request.get("token"), self.peer, self.peer_host
        )
        if rejected is not None:
            raise _Fatal(5, rejected)
        self.hello = True
        logger.debug(
            "connection from %s is %s", self.peer, str(request.get("client"))[:100]
        )
        return self.reply(
            protocol.HELLO,
            request_id,
            0,
            encode_json(
                {
                    "version": protocol.PROTOCOL_VERSION,
                    "server": f"pymq {__version__}",
                    "max_frame_bytes": self.limits.max_frame_bytes,
                    "max_batch": self.limits.max_batch,
                    "max_message_bytes": self.server.max_message_bytes,
                    "max_unacked": self.limits.max_unacked,
                    "cancel": True,
                }
            ),
        )

    def on_ping(self, flags: int, request_id: int, handle: int, payload: bytes) -> Any:
        return self.reply(protocol.PING, request_id, 0, b"")

    def on_open(self, flags: int, request_id: int, handle: int, payload: bytes) -> Any:
        request = decode_json(payload)
        kind = request.get("kind")
        name = request.get("name")
        options = request.get("options") or {}
        if not isinstance(name, str) or not isinstance(options, dict):
            raise TypeError(
                f"OPEN needs a name (str) and options (object), not {name!r} "
                f"and {options!r}"
            )
        stream = request.get("stream")
        if kind == "group":
            if not isinstance(stream, str):
                raise TypeError(
                    f"OPEN of a group needs its stream (str), not {stream!r}"
                )
            # Checked before the stream is opened, which may create it.
            check_name("stream", stream)
            check_name("group", name)
            label = f"{stream}.{name}"
        elif kind in ("queue", "stream"):
            label = name
        else:
            raise ValueError(
                f'OPEN kind is {kind!r}; it must be "queue", "stream" or "group"'
            )
        # Opening the same target again reuses its handle, so a client that
        # opens a stream for every put does not run out of handles.
        known = self.named.get((kind, label))
        if known is None and len(self.handles) >= self.limits.max_handles:
            raise errors.ConfigError(
                f"this connection holds max_handles ({self.limits.max_handles}) "
                f"open queues, streams and groups, which the server releases "
                f"only when the connection closes; reconnect, or raise "
                f"--max-handles"
            )
        broker = self.server.broker
        opened: Queue | Stream | Group
        if kind == "queue":
            opened = broker.queue(name, **options)
        elif kind == "stream":
            opened = broker.stream(name, **options)
        else:
            start = request.get("start", "earliest")
            opened = broker.stream(str(stream)).group(name, start=start, **options)
        if known is not None:
            new = known
        else:
            # Handles are added in the order of this connection's requests,
            # one at a time, so numbering needs no lock.
            new = self.next_handle
            self.next_handle += 1
            self.handles[new] = _Target(new, kind, label, opened)
            self.named[(kind, label)] = new
        answer: dict[str, Any] = {"handle": new, "name": label}
        if not isinstance(opened, Stream):
            answer["dlq"] = opened.dlq_name
            answer["options"] = {
                "visibility_timeout": opened.visibility_timeout,
                "max_deliveries": opened.max_deliveries,
                "max_in_flight": opened.max_in_flight,
            }
            if isinstance(opened, Queue):
                answer["options"].update(
                    max_length=opened.max_length,
                    max_bytes=opened.max_bytes,
                    overflow=opened.overflow,
                )
        return self.reply(protocol.OPEN, request_id, new, encode_json(answer))

    def on_stats(self, flags: int, request_id: int, handle: int, payload: bytes) -> Any:
        _, consumer = self.consumer(handle)
        stats = dataclasses.asdict(consumer.stats())
        return self.reply(protocol.STATS, request_id, handle, encode_json(stats))

    def on_redrive(
        self, flags: int, request_id: int, handle: int, payload: bytes
    ) -> Any:
        request = decode_json(payload)
        dlq, to = request.get("dlq"), request.get("to")
        if not isinstance(dlq, str) or not (to is None or isinstance(to, str)):
            raise TypeError(
                f"REDRIVE needs dlq (str) and to (str or null), not {dlq!r} and {to!r}"
            )
        progress = None
        if request.get("progress") is True:

            def progress(moved: int) -> None:
                # A frame of the reply, flagged MORE, after each batch moved.
                self.send_part(
                    encode_frame(
                        protocol.REDRIVE,
                        FLAG_REPLY | FLAG_MORE,
                        request_id,
                        0,
                        encode_json({"moved": moved}),
                    )
                )

        moved = self.server.broker.redrive(dlq, to=to, progress=progress)
        return self.reply(
            protocol.REDRIVE, request_id, 0, encode_json({"moved": moved})
        )

    def send_part(self, frame: bytes) -> None:
        """Send a frame of a reply that is still running, from any thread.

        From a pool thread the frame goes through the loop, ahead of the
        reply's last frame, which the loop sends once the request returns.
        """
        if threading.get_ident() != self.loop_thread:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.send_part, frame)
            return
        if self.closed or self.transport is None:
            return
        if self.outbox is not None:
            self.outbox.append(frame)
        else:
            self.transport.write(frame)

    def on_names(self, flags: int, request_id: int, handle: int, payload: bytes) -> Any:
        names = self.server.broker.names()
        return self.reply(protocol.NAMES, request_id, 0, encode_json({"names": names}))

    def on_groups(
        self, flags: int, request_id: int, handle: int, payload: bytes
    ) -> Any:
        stream = decode_json(payload).get("stream")
        if not isinstance(stream, str):
            raise TypeError(f"GROUPS needs stream (str), not {stream!r}")
        groups = self.server.broker.groups(stream)
        return self.reply(
            protocol.GROUPS, request_id, 0, encode_json({"groups": groups})
        )

    # Messages -------------------------------------------------------------------

    def on_publish(
        self, flags: int, request_id: int, handle: int, payload: bytes
    ) -> Any:
        target = self.target(handle)
        if target.kind == "group":
            raise errors.ConfigError(
                f"{target.name} is a group: publish to its stream instead"
            )
        return serve_publish(
            target.core, payload, self.limits.max_batch, flags, request_id, handle
        )

    def on_fetch(self, flags: int, request_id: int, handle: int, payload: bytes) -> Any:
        target, consumer = self.consumer(handle)
        limits = self.limits
        if len(payload) == _FETCH.size:
            wait_ms = _FETCH.unpack(payload)[1]
            if wait_ms < -1:
                raise errors.ConfigError(
                    f"fetch wait is {wait_ms} ms; it must be -1 (no limit) or 0 or more"
                )
        frames = serve_fetch(
            consumer,
            payload,
            limits.max_batch,
            target.outstanding,
            request_id,
            handle,
            limits.max_frame_bytes,
            self.unacked,
        )
        if frames is not None:
            return frames
        # Nothing to deliver yet, and the request may wait for a message.
        if self.server.stopping:
            raise errors.ShuttingDownError(
                "the server is shutting down; the FETCH took no message"
            )
        if len(self.tasks) >= limits.max_waiting:
            raise errors.ConfigError(
                f"this connection has max_waiting ({limits.max_waiting}) "
                f"requests waiting already"
            )
        count, wait_ms = _FETCH.unpack(payload)
        return _Park(request_id, handle, count, wait_ms)

    def deliver(
        self,
        flags: int,
        request_id: int,
        target: _Target,
        messages: list[Any],
        reserved: int,
    ) -> list[bytes]:
        """Return the DELIVER frames of messages, taken with reserved room.

        Their receipts join the target's outstanding set, and the room
        reserved but not used is freed.
        """
        if reserved:
            assert target.consumer is not None
            self.unacked.commit(target.outstanding, messages, reserved, target.consumer)
        return encode_deliveries(
            flags,
            request_id,
            target.handle,
            messages,
            self.limits.max_frame_bytes,
        )

    async def long_poll(self, park: _Park) -> None:
        loop = asyncio.get_running_loop()
        target = self.handles[park.handle]
        consumer = target.consumer
        assert consumer is not None and self.disconnected is not None
        hub = self.server.hub(target.core)
        deadline = None if park.wait_ms < 0 else loop.time() + park.wait_ms / 1000
        messages: list[Any] = []
        # Room under max_unacked reserved for the messages taken.
        reserved = 0
        while not self.closed and not self.server.stopping:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            reserved = self.unacked.reserve(park.count)
            if not reserved:
                # Other requests took the room since this one arrived: wait
                # for room, within the request's own wait.
                await self.wait_for_room(remaining)
                continue
            woken = hub.arm()
            try:
                park.taking = True
                try:
                    messages = await self.fetch(consumer, reserved)
                except BaseException:
                    self.unacked.unreserve(reserved)
                    raise
                finally:
                    park.taking = False
                if (
                    messages
                    or self.closed
                    or self.server.stopping
                    or park.cancelled_by is not None
                ):
                    break
                self.unacked.unreserve(reserved)
                reserved = 0
                timeout = consumer._next_due()
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    timeout = remaining if timeout is None else min(timeout, remaining)
                await asyncio.wait(
                    [woken, self.disconnected],
                    timeout=timeout,
                    return_when="FIRST_COMPLETED",
                )
            finally:
                hub.disarm()
        if self.closed:
            self.unacked.unreserve(reserved)
            self.release(consumer, [message.receipt for message in messages])
            return
        if messages or (park.cancelled_by is None and not self.server.stopping):
            frames = self.deliver(
                FLAG_REPLY, park.request_id, target, messages, reserved
            )
        elif park.cancelled_by is not None:
            self.unacked.unreserve(reserved)
            frames = [self.cancelled_reply(park)]
        else:
            self.unacked.unreserve(reserved)
            frames = [
                self.shutting_down_reply(protocol.FETCH, park.request_id, park.handle)
            ]
        if park.cancelled_by is not None:
            # The CANCEL that came during the take gets its reply after it.
            cancel_id, cancel_flags, cancel_handle = park.cancelled_by
            reply = self.settled(
                cancel_flags, protocol.CANCEL, cancel_id, cancel_handle
            )
            if reply is not None:
                frames.append(reply)
        if self.transport is not None:
            self.transport.writelines(frames)

    def on_cancel(
        self, flags: int, request_id: int, handle: int, payload: bytes
    ) -> Any:
        """Stop the long poll of the FETCH that payload names, if it waits.

        A poll stopped while it waits takes nothing: its FETCH gets error
        CANCELLED, then the CANCEL its reply. A poll that is taking
        messages in the pool replies to both once the take ends. Any other id
        gets the reply alone: its FETCH got its reply before this CANCEL.
        """
        if len(payload) != 4:
            raise errors.ProtocolError(
                f"CANCEL payload is {len(payload)} bytes; it must be a u32 request id"
            )
        (fetch_id,) = _U32.unpack(payload)
        park = self.parked.get(fetch_id)
        if (
            park is None
            or park.task is None
            or park.task.done()
            or park.cancelled_by is not None
        ):
            return self.settled(flags, protocol.CANCEL, request_id, handle)
        if park.taking:
            park.cancelled_by = (request_id, flags, handle)
            return None
        del self.parked[fetch_id]
        # The task is at an await that takes nothing (a wait for a put or
        # for room, or not started yet), so cancelling it takes nothing.
        park.task.cancel()
        frames = [self.cancelled_reply(park)]
        reply = self.settled(flags, protocol.CANCEL, request_id, handle)
        if reply is not None:
            frames.append(reply)
        return frames

    def shutting_down_reply(self, opcode: int, request_id: int, handle: int) -> bytes:
        return encode_frame(
            opcode,
            FLAG_REPLY | FLAG_ERROR,
            request_id,
            handle,
            encode_error(
                13,
                f"the server is shutting down; request {request_id} took no "
                f"effect, so send it again after a reconnect",
            ),
        )

    def end_waits(self) -> None:
        """Reply with error 13 to the waiting long polls and subscriptions.

        Run when the server stops. A long poll that is taking messages in
        the pool replies by itself once the take ends: with the messages
        it took, or with error 13.
        """
        if self.closed or self.transport is None:
            return
        frames: list[bytes] = []
        for park in list(self.parked.values()):
            if park.taking or park.task is None or park.task.done():
                continue
            del self.parked[park.request_id]
            park.task.cancel()
            frames.append(
                self.shutting_down_reply(protocol.FETCH, park.request_id, park.handle)
            )
        for subscription_id, subscription in list(self.subscriptions.items()):
            del self.subscriptions[subscription_id]
            if subscription.task is not None:
                subscription.task.cancel()
            frames.append(
                self.shutting_down_reply(
                    protocol.SUBSCRIBE, subscription_id, subscription.handle
                )
            )
        if frames:
            logger.debug(
                "replied with error 13 (shutting down) to %d waiting requests of %s",
                len(frames),
                self.peer,
            )
            self.transport.writelines(frames)

    def cancelled_reply(self, park: _Park) -> bytes:
        return encode_frame(
            protocol.FETCH,
            FLAG_REPLY | FLAG_ERROR,
            park.request_id,
            park.handle,
            encode_error(
                protocol.CANCELLED,
                f"FETCH {park.request_id} was cancelled; it took no message",
            ),
        )

    async def wait_for_room(self, timeout: float | None = None) -> None:
        """Wait until room under max_unacked may be free, or timeout passes.

        Returns when a settlement or a check frees room, when a check of
        the deliveries held is due (an expiry, or a second since the last
        one), or when the connection closes.
        """
        assert self.disconnected is not None
        unacked = self.unacked
        freed: asyncio.Future[None] = self.loop.create_future()
        self.room_waits.append(freed)
        unacked.waiters += 1
        try:
            # Room freed before this wait was counted did not wake it.
            if unacked.held < unacked.limit:
                return
            due = max(unacked.seconds_to_check(), _MIN_ROOM_WAIT)
            waits: list[asyncio.Future[Any]] = [freed, self.disconnected]
            await asyncio.wait(
                waits,
                timeout=due if timeout is None else min(due, timeout),
                return_when="FIRST_COMPLETED",
            )
        finally:
            unacked.waiters -= 1
            with contextlib.suppress(ValueError):
                self.room_waits.remove(freed)

    def room_freed(self) -> None:
        """Wake the requests waiting for room; run from any thread."""
        if threading.get_ident() != self.loop_thread:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.room_freed)
            return
        waits, self.room_waits = self.room_waits, []
        for freed in waits:
            if not freed.done():
                freed.set_result(None)

    def reclaim(self) -> None:
        """Drop the receipts no longer in flight from every outstanding set.

        UnackedCount runs this when a request is short of room and a check
        is due. A delivery leaves the count here when its visibility
        timeout passed or another connection settled it.
        """
        unacked = self.unacked
        if not unacked.begin_check():
            return
        try:
            for target in list(self.handles.values()):
                if target.consumer is not None and target.outstanding:
                    with contextlib.suppress(errors.ClosedError):
                        unacked.drop_settled(target.consumer, target.outstanding)
        finally:
            unacked.end_check()

    async def fetch(self, consumer: Queue | Group, count: int) -> list[Any]:
        """Take up to count messages; in the pool when gets sync the journal."""
        if not self.server.syncs:
            return consumer.get_many_nowait(count)
        loop = asyncio.get_running_loop()
        taking = loop.run_in_executor(
            self.server.executor, consumer.get_many_nowait, count
        )
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            # The take goes on in its thread: give back what it takes.
            def give_back(done: asyncio.Future[list[Any]]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self.release(consumer, [m.receipt for m in done.result()])

            taking.add_done_callback(give_back)
            raise

    def on_subscribe(
        self, flags: int, request_id: int, handle: int, payload: bytes
    ) -> Any:
        self.consumer(handle)
        if len(payload) != 4:
            raise errors.ProtocolError(
                f"SUBSCRIBE payload is {len(payload)} bytes, not 4"
            )
        (credit,) = _U32.unpack(payload)
        if self.server.stopping:
            raise errors.ShuttingDownError("the server is shutting down")
        if request_id in self.subscriptions:
            raise errors.ConfigError(f"subscription {request_id} exists already")
        if len(self.subscriptions) >= self.limits.max_waiting:
            raise errors.ConfigError(
                f"this connection has max_waiting ({self.limits.max_waiting}) "
                f"subscriptions already"
            )
        subscription = _Subscription(handle, credit)
        self.subscriptions[request_id] = subscription
        subscription.task = asyncio.ensure_future(self.push(request_id, subscription))
        return self.reply(protocol.SUBSCRIBE, request_id, handle, b"")

    def on_credit(
        self, flags: int, request_id: int, handle: int, payload: bytes
    ) -> Any:
        subscription = self.subscriptions.get(request_id)
        if subscription is None or len(payload) != 4:
            raise errors.ConfigError(
                f"CREDIT names subscription {request_id}, which is not open here"
            )
        (more,) = _U32.unpack(payload)
        subscription.credit = min(subscription.credit + more, 0xFFFFFFFF)
        subscription.changed.set()
        return None

    def on_unsubscribe(
        self, flags: int, request_id: int, handle: int, payload: bytes
    ) -> Any:
        if len(payload) != 4:
            raise errors.ProtocolError("UNSUBSCRIBE payload is a u32 subscription")
        (which,) = _U32.unpack(payload)
        subscription = self.subscriptions.pop(which, None)
        if subscription is not None and subscription.task is not None:
            subscription.task.cancel()
        return self.reply(protocol.UNSUBSCRIBE, request_id, handle, b"")

    async def push(self, subscription_id: int, subscription: _Subscription) -> None:
        target = self.handles[subscription.handle]
        consumer = target.consumer
        assert consumer is not None and self.disconnected is not None
        hub = self.server.hub(target.core)
        while not self.closed and subscription_id in self.subscriptions:
            if subscription.credit == 0 or not self.writable.is_set():
                subscription.changed.clear()
                waits = [
                    asyncio.ensure_future(subscription.changed.wait()),
                    asyncio.ensure_future(self.writable.wait()),
                ]
                try:
                    if subscription.credit == 0:
                        await waits[0]
                    else:
                        await waits[1]
                finally:
                    for waiting in waits:
                        waiting.cancel()
                continue
            count = min(subscription.credit, self.limits.max_batch)
            reserved = self.unacked.reserve(count)
            if not reserved:
                # At max_unacked: push nothing until room is freed.
                await self.wait_for_room()
                continue
            woken = hub.arm()
            try:
                try:
                    messages = await self.fetch(consumer, reserved)
                except BaseException:
                    self.unacked.unreserve(reserved)
                    raise
                if messages:
                    if self.closed:
                        self.unacked.unreserve(reserved)
                        self.release(consumer, [m.receipt for m in messages])
                        return
                    subscription.credit -= len(messages)
                    frames = self.deliver(
                        FLAG_PUSH, subscription_id, target, messages, reserved
                    )
                    if self.transport is not None:
                        self.transport.writelines(frames)
                    continue
                self.unacked.unreserve(reserved)
                subscription.changed.clear()
                changed = asyncio.ensure_future(subscription.changed.wait())
                try:
                    pending: list[asyncio.Future[Any]] = [
                        woken,
                        self.disconnected,
                        changed,
                    ]
                    await asyncio.wait(
                        pending,
                        timeout=consumer._next_due(),
                        return_when="FIRST_COMPLETED",
                    )
                finally:
                    changed.cancel()
            finally:
                hub.disarm()

    # Settling ----------------------------------------------------------------

    def on_ack(self, flags: int, request_id: int, handle: int, payload: bytes) -> Any:
        target, consumer = self.consumer(handle)
        return serve_ack(
            consumer,
            payload,
            target.outstanding,
            flags,
            request_id,
            handle,
            self.unacked,
        )

    def on_nack(self, flags: int, request_id: int, handle: int, payload: bytes) -> Any:
        target, consumer = self.consumer(handle)
        if len(payload) < 8:
            raise errors.ProtocolError("NACK payload is cut off")
        (delay,) = _F64.unpack_from(payload)
        receipts, end = decode_receipts(payload, 8)
        if end != len(payload):
            raise errors.ProtocolError("NACK payload has bytes past its receipts")
        self.apply(consumer.nack, receipts, delay, target)
        return self.settled(flags, protocol.NACK, request_id, handle)

    def on_extend(
        self, flags: int, request_id: int, handle: int, payload: bytes
    ) -> Any:
        _, consumer = self.consumer(handle)
        if len(payload) < 8:
            raise errors.ProtocolError("EXTEND payload is cut off")
        (seconds,) = _F64.unpack_from(payload)
        receipts, end = decode_receipts(payload, 8)
        if end != len(payload):
            raise errors.ProtocolError("EXTEND payload has bytes past its receipts")
        try:
            self.each(consumer.extend, receipts, seconds)
        finally:
            # A shorter deadline may end a delivery before the check that
            # the count expects.
            self.unacked.note_extend(seconds)
        return self.settled(flags, protocol.EXTEND, request_id, handle)

    def on_reject(
        self, flags: int, request_id: int, handle: int, payload: bytes
    ) -> Any:
        target, consumer = self.consumer(handle)
        receipts, end = decode_receipts(payload, 0)
        try:
            reason = payload[end:].decode("utf-8")
        except UnicodeDecodeError:
            raise errors.ProtocolError("REJECT reason is not UTF-8") from None
        self.apply(consumer.reject, receipts, reason, target)
        return self.settled(flags, protocol.REJECT, request_id, handle)

    def apply(
        self,
        method: Callable[[int, Any], object],
        receipts: list[int],
        arg: Any,
        target: _Target,
    ) -> None:
        """Nack or reject receipts with each(); they leave the count."""
        assert target.consumer is not None
        try:
            self.each(method, receipts, arg)
        except BaseException:
            # Those that took effect, or were stale, are no longer held.
            with contextlib.suppress(errors.ClosedError):
                self.unacked.drop_settled(target.consumer, target.outstanding, receipts)
            raise
        self.unacked.settle(target.outstanding, receipts)

    @staticmethod
    def each(
        method: Callable[[int, Any], object], receipts: list[int], arg: Any
    ) -> None:
        """Apply method to every receipt; raise for the stale ones at the end."""
        stale = 0
        for receipt in receipts:
            try:
                method(receipt, arg)
            except errors.StaleReceiptError as exc:
                stale += 1
                last = exc
        if stale == 1 and len(receipts) == 1:
            raise last
        if stale:
            raise errors.StaleReceiptError(
                f"{stale} of {len(receipts)} receipts were stale (expired or "
                f"settled); the others took effect"
            )

    def settled(self, flags: int, opcode: int, request_id: int, handle: int) -> Any:
        if flags & FLAG_NO_REPLY:
            return None
        return self.reply(opcode, request_id, handle, b"")

    # Closing ------------------------------------------------------------------

    def release(self, consumer: Queue | Group, receipts: list[int]) -> None:
        """Make deliveries available again at once; their attempts stay counted."""
        for receipt in receipts:
            with contextlib.suppress(errors.StaleReceiptError, errors.ClosedError):
                consumer.nack(receipt)

    def release_all(self) -> None:
        released = 0
        for target in self.handles.values():
            if target.consumer is not None and target.outstanding:
                receipts = list(target.outstanding)
                self.unacked.settle(target.outstanding, receipts)
                self.release(target.consumer, receipts)
                released += len(receipts)
        if released:
            logger.debug(
                "released %d deliveries held by %s, which went away",
                released,
                self.peer,
            )

    def stop_reading(self) -> None:
        if self.transport is not None and not self.closed:
            with contextlib.suppress(Exception):
                self.transport.pause_reading()

    async def drained(self, timeout: float) -> None:
        """Wait until the requests under way have replied, or timeout passes.

        Long polls still parked after end_waits() are taking messages in
        the pool, and reply once the take ends.
        """
        deadline = time.monotonic() + timeout
        while (self.worker is not None or self.parked) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        # Requests already read behind a fatal one take no effect.
        self.closed = True
        self.pending.clear()
        if self.transport is not None:
            self.transport.close()
        for task in self.tasks:
            task.cancel()
        for subscription in self.subscriptions.values():
            if subscription.task is not None:
                subscription.task.cancel()

    def fail(self, opcode: int, request_id: int, exc: errors.PymqError) -> None:
        logger.info("closed the connection from %s: %s", self.peer, exc)
        self.send_error(opcode, request_id, 0, error_code(exc), str(exc))
        self.close()

    def send_error(
        self, opcode: int, request_id: int, handle: int, code: int, text: str
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.outbox:
            # Earlier replies of the same read go first, in order.
            self.transport.writelines(self.outbox)
            self.outbox.clear()
        self.transport.write(
            encode_frame(
                opcode,
                FLAG_REPLY | FLAG_ERROR,
                request_id,
                handle,
                encode_error(code, text),
            )
        )

    def check_timeouts(self, now: float) -> None:
        if self.closed:
            return
        if not self.hello and now - self.opened > self.limits.handshake_timeout:
            self.fail(
                protocol.HELLO,
                0,
                errors.ProtocolError(
                    f"no HELLO within handshake_timeout "
                    f"({self.limits.handshake_timeout} s)"
                ),
            )
        elif (
            self.partial_since is not None
            and now - self.partial_since > self.limits.frame_timeout
        ):
            self.fail(
                0,
                0,
                errors.ProtocolError(
                    f"a frame stalled part way for over frame_timeout "
                    f"({self.limits.frame_timeout} s)"
                ),
            )
        elif (
            self.limits.idle_timeout
            and not self.tasks
            and not self.subscriptions
            and now - self.last_frame > self.limits.idle_timeout
        ):
            self.fail(
                0,
                0,
                errors.ProtocolError(
                    f"idle for over idle_timeout ({self.limits.idle_timeout} s)"
                ),
            )


class _Fatal(Exception):
    """A request that breaks the protocol: reply with an error, then close."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def server_ssl_context(
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None = None,
    client_ca: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext | None:
    """Return the server's TLS context, or None without a certificate."""
    if cert is None:
        if key is not None or client_ca is not None:
            raise errors.ConfigError(
                "a TLS key or client authority is given without a certificate"
            )
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(
            f"cannot load the TLS certificate {cert} (key {key}, client "
            f"authority {client_ca}): {exc}"
        ) from exc
    return context


def _new_loop(choice: str) -> tuple[asyncio.AbstractEventLoop, str]:
    """Create the event loop that choice names, and return it with its log name.

    "auto" is uvloop when it can be imported, else asyncio's default loop.
    Raises ConfigError for an unknown choice, and for "uvloop" when uvloop
    cannot be imported.
    """
    if choice not in LOOPS:
        raise errors.ConfigError(
            f"invalid event loop {choice!r}: expected one of {', '.join(LOOPS)}"
        )
    if choice != "asyncio":
        # uvloop is optional (the "fast" extra), so it is looked up at run time.
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError as exc:
            if choice == "uvloop":
                raise errors.ConfigError(
                    f"the uvloop event loop is not available: {exc}. Install it "
                    f"with: pip install 'pymq[fast]'"
                ) from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop, f"uvloop {uvloop.__version__}"
    return asyncio.new_event_loop(), "asyncio"


def run(
    data: str | os.PathLike[str],
    *,
    host: str | None = "127.0.0.1",
    port: int = protocol.DEFAULT_PORT,
    unix: str | None = None,
    fsync: str | None = None,
    token: str | None = None,
    port_file: str | os.PathLike[str] | None = None,
    limits: ServerLimits | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    tls_client_ca: str | os.PathLike[str] | None = None,
    segment_bytes: int | None = None,
    max_message_bytes: int | None = None,
    flush_interval: float | None = None,
    loop: str = "auto",
) -> None:
    """Open the broker in data and serve it until SIGTERM or SIGINT.

    With port 0 the system picks a free port; port_file then receives it.
    loop is the event loop: "uvloop", "asyncio" (the standard library's
    default loop) or "auto", which is uvloop when it is installed.
    With tls_cert (and tls_key, unless the key is in the same file) TCP
    connections use TLS; with tls_client_ca, clients must also present a
    certificate signed by that authority. fsync, segment_bytes,
    max_message_bytes and flush_interval are passed to the Broker, whose
    defaults apply where they are None.
    """
    context = server_ssl_context(tls_cert, tls_key, tls_client_ca)
    limits = limits or ServerLimits()
    # Checked before the broker opens, so that a bad value creates no files.
    _check_frame_room(
        limits,
        DEFAULT_MAX_MESSAGE_BYTES if max_message_bytes is None else max_message_bytes,
    )
    if unix is not None:
        _check_unix_socket_path(unix)
    if port_file is not None and host is not None:
        check_port_file(port_file)
    keep_large_buffers()
    store_options: dict[str, Any] = {
        "segment_bytes": segment_bytes,
        "max_message_bytes": max_message_bytes,
    }
    if flush_interval is not None:
        store_options["flush_interval"] = flush_interval
    # Also before the broker opens: a missing uvloop creates no files.
    event_loop, loop_name = _new_loop(loop)
    try:
        broker = Broker(data, fsync=fsync, **store_options)
    except BaseException:
        event_loop.close()
        raise
    server: Server | None = None
    try:
        server = Server(broker, token=token, limits=limits, ssl_context=context)
        event_loop.run_until_complete(
            _serve(server, host, port, unix, port_file, loop_name)
        )
    finally:
        try:
            broker.close()
            if server is not None:
                server.close()
        finally:
            event_loop.run_until_complete(event_loop.shutdown_asyncgens())
            event_loop.close()
    logger.info("stopped; broker in %s closed", broker.path)


async def _serve(
    server: Server,
    host: str | None,
    port: int,
    unix: str | None,
    port_file: str | os.PathLike[str] | None,
    loop_name: str,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start(host, port, unix)
    options = server.broker._store_options
    logger.info(
        "serving %s (fsync=%s, pymq %s, event loop: %s)",
        server.broker.path,
        options["fsync"],
        __version__,
        loop_name,
    )
    try:
        if port_file is not None and host is not None:
            _write_port_file(Path(port_file), server.port)
        await stop.wait()
    finally:
        logger.info("stopping: no new connections; finishing requests under way")
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop()


def check_port_file(path: str | os.PathLike[str]) -> None:
    """Raise OSError unless a port file can be written at path.

    Run before the server listens, so that a mistyped path fails at once.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "it is a directory", str(path))
    temporary = target.with_name(target.name + ".tmp")
    with open(temporary, "w"):
        pass
    temporary.unlink()


def _write_port_file(path: Path, port: int) -> None:
    """Write port to path whole: readers never see a partial file."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(f"{port}\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
