"""The asyncio client: pymq's API as coroutines, over one connection.

    broker = await pymq.aio.connect("pymq://127.0.0.1:7420")
    queue = await broker.queue("jobs")
    await queue.put(b"payload")
    async for message in queue:      # a subscription with prefetch
        await message.ack()

Every call that the blocking client offers is a coroutine here; messages
are settled with ``await message.ack()`` (or nack, extend, reject).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import ssl
import struct
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
)
from typing import Any, Final, TypeAlias

from pymq import errors, protocol
from pymq._core import (
    FrameReader,
    MessageBatch,
    RemoteMessage,
    decode_batch,
    decode_deliveries,
    encode_frame,
    encode_publish,
    encode_receipts,
)
from pymq.broker import GROUP_DEFAULTS, QUEUE_DEFAULTS, STREAM_DEFAULTS, _check_options
from pymq.client import (
    SAFE_TO_RETRY,
    LateDeliveries,
    UnconfirmedSettles,
    _seconds,
    apply_hello,
    bodies_as_list,
    cancel_frame,
    check_connect_options,
    check_receipt,
    client_ssl_context,
    connect_failed,
    encode_reason,
    fetch_payload,
    give_back_frame,
    handshake_closed,
    hello_payload,
    join_offsets,
    late_frames,
    plan_batches,
    reconnect_attempts_failed,
    reconnect_delays,
    take_unconfirmed_error,
    tls_closed,
    tls_failed,
    visibility_timeout_of,
    wait_ms,
)
from pymq.names import check_name, check_queue_name
from pymq.protocol import (
    FLAG_ERROR,
    FLAG_MORE,
    FLAG_NO_REPLY,
    FLAG_PUSH,
    PREAMBLE,
    Address,
    decode_error,
    decode_json,
    encode_json,
    parse_url,
)
from pymq.types import QueueStats

__all__ = [
    "AsyncBroker",
    "AsyncGroup",
    "AsyncMessage",
    "AsyncQueue",
    "AsyncStream",
    "connect",
]

logger = logging.getLogger("pymq.aio")

_U32: Final = struct.Struct("<I")
_F64: Final = struct.Struct("<d")
_PUBLISHED: Final = struct.Struct("<QI")

Frame = tuple[int, int, int, int, bytes]

# A delivery of this client. It is a RemoteMessage whose ack, nack, extend
# and reject return a coroutine, which settles the delivery when awaited.
AsyncMessage: TypeAlias = RemoteMessage[Coroutine[Any, Any, None]]


# A request whose reply is awaited: its future, the frames come so far, the
# queue of frames flagged MORE for a caller that reports progress, and the
# index of its frame among those queued on the link.
_Waiter = tuple[
    "asyncio.Future[list[Frame]]", list[Frame], "asyncio.Queue[Frame] | None", int
]


class _Link:
    """One socket of an AsyncConnection, and the requests waiting on it.

    A reconnect makes a new link, so nothing of a broken one (a reply, a
    frame not yet written, a subscription) reaches its successor.
    """

    __slots__ = (
        "generation",
        "lost",
        "outgoing",
        "owners",
        "pushes",
        "queued",
        "task",
        "unconfirmed",
        "unwritten",
        "waiting",
        "writer",
    )

    def __init__(self, generation: int, writer: asyncio.StreamWriter) -> None:
        self.generation = generation
        self.writer = writer
        self.task: asyncio.Task[None] | None = None
        self.waiting: dict[int, _Waiter] = {}
        self.pushes: dict[int, asyncio.Queue[AsyncMessage | BaseException]] = {}
        self.owners: dict[int, Any] = {}
        # Frames queued in this turn of the loop, and for those sent without
        # waiting, what to report if they never go out, the frame and its index.
        self.outgoing: list[bytes] = []
        self.unwritten: list[tuple[str, bytes, int]] = []
        # Frames queued on this link so far, and the settles written
        # without waiting that no later reply has confirmed.
        self.queued = 0
        self.unconfirmed = UnconfirmedSettles()
        self.lost: BaseException | None = None


class AsyncConnection:
    """One connection, read by one task per socket; reconnects where safe.

    After a broken connection, the next call connects again, with backoff,
    and the queues, streams and groups open their handles again. Only
    requests that are safe to repeat (client.SAFE_TO_RETRY) are sent again
    on their own; a request not yet sent when the connection broke is
    built again, for the new handles, and sent on the new connection.
    """

    def __init__(
        self,
        address: Address,
        *,
        token: str | None = None,
        connect_timeout: float = 10.0,
        reconnect_attempts: int = 5,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self._token = token
        self._connect_timeout = connect_timeout
        self._reconnect_attempts = reconnect_attempts
        self._ssl_context = ssl_context
        self._ids = itertools.count(1)
        self._link: _Link | None = None
        self._late_errors: list[errors.PymqError] = []
        self._reconnecting: asyncio.Lock | None = None
        self._closed = False
        # Queues and groups that kept deliveries after a cancelled get.
        self._late_owners: set[_AsyncConsumer] = set()
        self.generation = 0
        self.max_frame_bytes = 16 << 20
        self.max_message_bytes: int | None = None
        self.max_batch = 10_000
        self.max_unacked: int | None = None
        self.supports_cancel = False
        self.server = ""

    # Connecting ---------------------------------------------------------------

    async def open(self) -> None:
        """Connect for the first time; raise at once if that fails."""
        await self._connect()

    async def _connect(self) -> None:
        address, timeout = self.address, self._connect_timeout
        if address.path is not None:
            opening = asyncio.open_unix_connection(address.path)
        elif self._ssl_context is not None:
            opening = asyncio.open_connection(
                address.host,
                address.port,
                ssl=self._ssl_context,
                server_hostname=address.host,
            )
        else:
            opening = asyncio.open_connection(address.host, address.port)
        try:
            reader, writer = await asyncio.wait_for(opening, timeout)
        except ssl.SSLCertVerificationError:
            raise
        except ssl.SSLError as exc:
            raise errors.ConnectionLostError(tls_failed(address, exc)) from exc
        except (ConnectionResetError, BrokenPipeError) as exc:
            if not address.tls:
                raise connect_failed(address, exc) from exc
            # A TCP connect is refused rather than reset, so the reset came
            # during the TLS handshake.
            raise errors.ConnectionLostError(tls_closed(address)) from exc
        except OSError as exc:
            raise connect_failed(address, exc) from exc
        try:
            hello = hello_payload(self._token, "pymq-python-asyncio")
            writer.write(PREAMBLE + encode_frame(protocol.HELLO, 0, 0, 0, hello))
            frames: list[Frame] = []
            handshake = FrameReader(0xFFFFFFFF)
            while not frames:
                data = await asyncio.wait_for(reader.read(65536), timeout)
                if not data:
                    raise errors.ConnectionLostError(handshake_closed(address))
                frames = handshake.feed(data)
            _, flags, _, _, payload = frames[0]
            if flags & FLAG_ERROR:
                raise decode_error(payload)
            answer = decode_json(payload)
        except (ConnectionResetError, BrokenPipeError) as exc:
            # A server that closes with the HELLO unread sends a reset, not a FIN.
            writer.close()
            raise errors.ConnectionLostError(handshake_closed(address)) from exc
        except BaseException:
            writer.close()
            raise
        apply_hello(self, answer)
        link = _Link(self.generation + 1, writer)
        self.generation = link.generation
        self._link = link
        link.task = asyncio.ensure_future(self._read(link, reader))

    async def ensure(self) -> _Link:
        """Return the connection's socket, reconnecting with backoff if broken."""
        link = self._link
        if link is not None and link.lost is None:
            return link
        if self._closed:
            raise self._closed_error()
        if self._reconnecting is None:
            self._reconnecting = asyncio.Lock()
        async with self._reconnecting:
            # Another task may have reconnected while this one waited.
            link = self._link
            if link is not None and link.lost is None:
                return link
            attempts = self._reconnect_attempts + 1
            delays = reconnect_delays(attempts)
            for attempt in range(1, attempts + 1):
                if self._closed:
                    raise self._closed_error()
                try:
                    await self._connect()
                except (
                    OSError,
                    asyncio.TimeoutError,
                    errors.ConnectionLostError,
                ) as exc:
                    # Any other error, such as a refused token, is raised.
                    if attempt == attempts:
                        raise errors.ConnectionLostError(
                            reconnect_attempts_failed(self.address, attempt, exc)
                        ) from exc
                    await asyncio.sleep(next(delays))
                    continue
                assert self._link is not None
                if self._closed:
                    # close() ran while this connected.
                    await self.close()
                    raise self._closed_error()
                logger.info("reconnected to %s", self.address)
                return self._link
        raise AssertionError("unreachable")

    def next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF or next(self._ids)

    def _closed_error(self) -> errors.ClosedError:
        return errors.ClosedError(f"connection to {self.address} is closed")

    # Reading ------------------------------------------------------------------

    async def _read(self, link: _Link, reader: asyncio.StreamReader) -> None:
        frames_of = FrameReader(self.max_frame_bytes)
        try:
            while True:
                data = await reader.read(262144)
                if not data:
                    raise ConnectionResetError("the server closed the connection")
                for frame in frames_of.feed(data):
                    self._route(link, frame)
        except asyncio.CancelledError:
            self._fail(link, self._closed_error())
            raise
        except Exception as exc:
            # A socket error, a protocol error, or a delivery that failed its
            # CRC32C: the connection cannot be trusted any more.
            self._fail(link, exc)

    def _route(self, link: _Link, frame: Frame) -> None:
        flags, request_id = frame[1], frame[2]
        if flags & FLAG_PUSH:
            pushes = link.pushes.get(request_id)
            if pushes is not None:
                for message in decode_deliveries(frame[4], link.owners[request_id]):
                    pushes.put_nowait(message)
            return
        waiter = link.waiting.get(request_id)
        if waiter is None:
            if flags & FLAG_ERROR and request_id == 0:
                # An error about the connection, not a request: the server
                # closes it next. _read fails every waiting request.
                raise ConnectionResetError(
                    f"the server closed the connection: {decode_error(frame[4])}"
                )
            if flags & FLAG_ERROR:
                error = decode_error(frame[4])
                pushes = link.pushes.get(request_id)
                if pushes is not None:
                    # The server ended the subscription, as it does when it
                    # stops: `async for` raises the error.
                    pushes.put_nowait(error)
                    return
                logger.error(
                    "request %d, sent without waiting for a reply, failed: %s",
                    request_id,
                    error,
                )
                self._late_errors.append(error)
            return
        future, frames, parts, index = waiter
        unconfirmed = link.unconfirmed
        if unconfirmed.last and index > unconfirmed.last:
            unconfirmed.confirm()
        frames.append(frame)
        if parts is not None and flags & FLAG_MORE and not future.cancelled():
            parts.put_nowait(frame)
        if not flags & FLAG_MORE:
            del link.waiting[request_id]
            if not future.done():
                future.set_result(frames)

    def _fail(self, link: _Link, exc: BaseException) -> None:
        """Fail everything waiting on link; the next call reconnects."""
        if link.lost is not None:
            return
        if isinstance(exc, errors.ClosedError):
            lost: BaseException = exc
        else:
            lost = errors.ConnectionLostError(
                f"connection to {self.address} broke: {exc}"
            )
            logger.warning("connection to %s broke: %s", self.address, exc)
        link.lost = lost
        waiting, link.waiting = link.waiting, {}
        for waiter in waiting.values():
            if not waiter[0].done():
                waiter[0].set_exception(lost)
        for pushes in link.pushes.values():
            # Received but not handed out: the server releases them anyway.
            while not pushes.empty():
                pushes.get_nowait()
            pushes.put_nowait(lost)
        link.outgoing = []
        if not isinstance(exc, errors.ClosedError):
            unconfirmed = link.unconfirmed.lost(self.address, exc)
            if unconfirmed is not None:
                self._late_errors.insert(0, unconfirmed)
        unwritten, link.unwritten = link.unwritten, []
        for what, _, _ in unwritten:
            # Sent without waiting, but never written: say so, later.
            self._late_errors.append(
                errors.ConnectionLostError(
                    f"{what} was not sent: the connection to "
                    f"{self.address} broke first ({exc})"
                )
            )
        link.writer.close()

    # Requests -----------------------------------------------------------------

    def raise_late_errors(self) -> None:
        """Raise the first error a request sent without waiting got, if any."""
        if self._late_errors:
            late, self._late_errors = self._late_errors, []
            raise late[0]

    async def _ready(self, owner: _AsyncHandle | None) -> tuple[_Link, int]:
        """Return the current link and owner's handle on it, once both are open.

        Reconnects if the connection broke, and opens owner again on a new
        connection. Nothing is awaited after the check, so a frame built
        with the handle and queued at once goes out on the link it names.
        """
        for _ in range(_READY_TRIES):
            link = await self.ensure()
            if owner is not None and owner._generation != link.generation:
                await owner.reopen({})
            # The connection may have broken again while owner was opened.
            if link is self._link and link.lost is None:
                if owner is None:
                    return link, 0
                if owner._generation == link.generation:
                    return link, owner._handle
        raise errors.ConnectionLostError(
            f"the connection to {self.address} broke {_READY_TRIES} times "
            f"before a request could go out"
        )

    async def call(
        self,
        opcode: int,
        build: Callable[[int, int], bytes],
        owner: _AsyncHandle | None = None,
        progress: Callable[[Frame], object] | None = None,
        opened: _AsyncHandle | None = None,
    ) -> list[Frame]:
        """Send build(request_id, handle); return the reply's frames.

        handle is owner's on the current connection (0 without owner).
        Raises the server's error, or ConnectionLostError when the
        connection breaks. A request that is safe to repeat is built and
        sent once more after reconnecting, so it names the new handles.
        progress, if given, is called with each frame flagged MORE. For an
        OPEN, opened is the object opened: it is marked as opened on the
        connection that answered.
        """
        for attempt in (0, 1):
            self.raise_late_errors()
            link = self._link
            if (
                link is not None
                and link.lost is None
                and (owner is None or owner._generation == link.generation)
            ):
                handle = 0 if owner is None else owner._handle
            else:
                link, handle = await self._ready(owner)
            request_id = self.next_id()
            frame = build(request_id, handle)
            future: asyncio.Future[list[Frame]] = (
                asyncio.get_running_loop().create_future()
            )
            parts: asyncio.Queue[Frame] | None = (
                None if progress is None else asyncio.Queue()
            )
            link.waiting[request_id] = (future, [], parts, link.queued + 1)
            self._queue_frame(link, frame)
            try:
                if opcode == protocol.FETCH:
                    # Shielded, so that the reply of a cancelled FETCH still
                    # comes to _abandon_fetch, which keeps its deliveries.
                    frames = await asyncio.shield(future)
                elif parts is None or progress is None:
                    frames = await future
                else:
                    frames = await _with_parts(future, parts, progress)
            except errors.ConnectionLostError as exc:
                unconfirmed = take_unconfirmed_error(self._late_errors)
                if unconfirmed is not None:
                    raise unconfirmed from exc
                if attempt or opcode not in SAFE_TO_RETRY or self._closed:
                    raise
                continue
            except BaseException:
                if opcode == protocol.FETCH and isinstance(owner, _AsyncConsumer):
                    self._abandon_fetch(link, request_id, future, owner)
                raise
            # An error is the last frame of a reply.
            last = frames[-1]
            if last[1] & FLAG_ERROR:
                raise decode_error(last[4])
            if opened is not None:
                opened._generation = link.generation
            return frames
        raise AssertionError("unreachable")

    def _abandon_fetch(
        self,
        link: _Link,
        request_id: int,
        future: asyncio.Future[list[Frame]],
        owner: _AsyncConsumer,
    ) -> None:
        """Cancel a FETCH whose caller stopped waiting; keep what it still gets.

        The server may have sent deliveries before the CANCEL arrived. They
        go to owner's next get, which first waits for the FETCH's last frame.
        """
        if future.done():
            # The whole reply came before the caller was cancelled.
            self._keep_reply(link, owner, None, future)
            return
        end: asyncio.Future[None] | None = None
        if self.supports_cancel and link.lost is None:
            end = asyncio.get_running_loop().create_future()
            owner._cancelling.add(end)
            self._queue_frame(
                link, cancel_frame(request_id, self.next_id(), FLAG_NO_REPLY)
            )
        future.add_done_callback(functools.partial(self._keep_reply, link, owner, end))

    def _keep_reply(
        self,
        link: _Link,
        owner: _AsyncConsumer,
        end: asyncio.Future[None] | None,
        future: asyncio.Future[list[Frame]],
    ) -> None:
        """Keep the deliveries of an abandoned FETCH's reply for owner."""
        if not future.cancelled() and future.exception() is None:
            visibility_timeout = visibility_timeout_of(owner._answer)
            for frame in future.result():
                if frame[0] == protocol.DELIVER and not frame[1] & FLAG_ERROR:
                    owner._late.add(frame[4], link.generation, visibility_timeout)
                    self._late_owners.add(owner)
        if end is not None and not end.done():
            end.set_result(None)

    def _give_back_late(self, link: _Link) -> None:
        """Nack, on link, the deliveries every owner kept after a cancelled get.

        Written at once, for close(): they are available again at once,
        with their attempt counted.
        """
        owners, self._late_owners = self._late_owners, set()
        for owner in owners:
            payloads = owner._late.drain(link.generation)
            if not payloads or owner._generation != link.generation:
                continue
            frame = give_back_frame(payloads, self.next_id(), owner._handle)
            if frame is not None:
                link.writer.write(frame)

    async def send(
        self,
        build: Callable[[int, int], bytes],
        owner: _AsyncHandle | None,
        what: str,
    ) -> None:
        """Send a request flagged NO_REPLY; its error, if any, is raised later.

        what names the request in the ConnectionLostError raised by a later
        call when the connection breaks before the frame is written.
        """
        self.raise_late_errors()
        link, handle = await self._ready(owner)
        self._queue_frame(link, build(self.next_id(), handle), what)

    def send_on(self, link: _Link, frame: bytes) -> bool:
        """Queue frame on link, unless it broke; return whether it was queued.

        For frames that belong to one socket only, as CREDIT does.
        """
        if link.lost is not None or link is not self._link:
            return False
        self._queue_frame(link, frame)
        return True

    def _queue_frame(self, link: _Link, frame: bytes, what: str | None = None) -> None:
        # Frames queued in one turn of the loop (a gather of puts, say) go
        # out in one write, once the running tasks have had their turn.
        link.outgoing.append(frame)
        link.queued += 1
        if what is not None:
            link.unwritten.append((what, frame, link.queued))
        if len(link.outgoing) == 1:
            asyncio.get_running_loop().call_soon(self._flush, link)

    def _flush(self, link: _Link) -> None:
        if link.lost is None and link.writer.transport.is_closing():
            # Closed before the reader saw it: what is queued would be
            # dropped by the transport, so it is reported instead.
            self._fail(link, ConnectionResetError("the connection closed"))
        outgoing, link.outgoing = link.outgoing, []
        unwritten, link.unwritten = link.unwritten, []
        if outgoing and link.lost is None:
            link.writer.writelines(outgoing)
            # Written, but the server may not have read them yet.
            for _, frame, index in unwritten:
                link.unconfirmed.add(frame, index)

    async def subscribe(
        self, owner: _AsyncConsumer, credit: int
    ) -> tuple[_Link, int, asyncio.Queue[AsyncMessage | BaseException]]:
        """Subscribe owner with credit; return the link, its id and its pushes.

        A subscription lives on one socket: when it breaks, its pushes end
        with ConnectionLostError, and the caller subscribes again.
        """
        pushes: asyncio.Queue[AsyncMessage | BaseException] = asyncio.Queue()
        for attempt in (0, 1):
            self.raise_late_errors()
            link, handle = await self._ready(owner)
            subscription = self.next_id()
            link.pushes[subscription] = pushes
            link.owners[subscription] = owner
            future: asyncio.Future[list[Frame]] = (
                asyncio.get_running_loop().create_future()
            )
            link.waiting[subscription] = (future, [], None, link.queued + 1)
            self._queue_frame(
                link,
                encode_frame(
                    protocol.SUBSCRIBE, 0, subscription, handle, _U32.pack(credit)
                ),
            )
            try:
                frames = await future
            except errors.ConnectionLostError:
                self.unsubscribe(link, subscription)
                while not pushes.empty():
                    pushes.get_nowait()
                if attempt or self._closed:
                    raise
                continue
            except BaseException:
                self.unsubscribe(link, subscription)
                raise
            if frames[-1][1] & FLAG_ERROR:
                self.unsubscribe(link, subscription)
                raise decode_error(frames[-1][4])
            return link, subscription, pushes
        raise AssertionError("unreachable")

    def unsubscribe(self, link: _Link, subscription: int) -> None:
        link.pushes.pop(subscription, None)
        link.owners.pop(subscription, None)

    async def close(self) -> None:
        self._closed = True
        link = self._link
        if link is None:
            return
        if link.lost is None and self._late_owners:
            self._give_back_late(link)
        if link.task is not None:
            link.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link.task
        self._fail(link, self._closed_error())
        link.writer.close()
        with contextlib.suppress(OSError):
            await link.writer.wait_closed()


_READY_TRIES: Final = 3


async def _with_parts(
    future: asyncio.Future[list[Frame]],
    parts: asyncio.Queue[Frame],
    progress: Callable[[Frame], object],
) -> list[Frame]:
    """Await future, calling progress with each part as it arrives."""
    try:
        while not future.done():
            getter: asyncio.Future[Frame] = asyncio.ensure_future(parts.get())
            waiting: set[asyncio.Future[Any]] = {future, getter}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                progress(getter.result())
    except BaseException:
        future.cancel()
        raise
    # Parts that came with the last frame, in the same read.
    while not parts.empty():
        progress(parts.get_nowait())
    return future.result()


class AsyncBroker:
    """A broker on a server, with coroutine forms of pymq.Broker's calls."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection
        self.url = str(connection.address)

    async def _control(
        self,
        opcode: int,
        request: dict[str, Any],
        progress: Callable[[Frame], object] | None = None,
    ) -> dict[str, Any]:
        payload = encode_json(request)
        frames = await self._connection.call(
            opcode,
            lambda request_id, _: encode_frame(opcode, 0, request_id, 0, payload),
            None,
            progress,
        )
        return decode_json(frames[-1][4])

    async def queue(self, name: str, **options: Any) -> AsyncQueue:
        """Open the queue name, creating it if it is missing."""
        check_queue_name(name)
        options = _check_options(options, QUEUE_DEFAULTS)
        queue = AsyncQueue(self, {"kind": "queue", "name": name})
        await queue.reopen(options)
        return queue

    async def stream(self, name: str, **options: Any) -> AsyncStream:
        """Open the stream name, creating it if it is missing."""
        check_name("stream", name)
        options = _check_options(options, STREAM_DEFAULTS)
        stream = AsyncStream(self, {"kind": "stream", "name": name})
        await stream.reopen(options)
        return stream

    async def names(self) -> dict[str, str]:
        """Return every queue and stream on the server, with its kind."""
        names = (await self._control(protocol.NAMES, {}))["names"]
        return {str(key): str(value) for key, value in names.items()}

    async def groups(self, stream: str) -> list[str]:
        """Return the names of the consumer groups of stream, sorted."""
        answer = await self._control(protocol.GROUPS, {"stream": stream})
        return [str(name) for name in answer["groups"]]

    async def redrive(
        self,
        dlq_name: str,
        to: str | None = None,
        *,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Move every message now in a dead-letter queue back; see Broker.

        progress, if given, is called with the number moved so far after
        each batch the server moved.
        """
        request: dict[str, Any] = {"dlq": dlq_name, "to": to}
        report = None
        if progress is not None:
            request["progress"] = True

            def report(frame: Frame) -> None:
                progress(int(decode_json(frame[4])["moved"]))

        answer = await self._control(protocol.REDRIVE, request, report)
        return int(answer["moved"])

    async def ping(self) -> float:
        """Send PING and return the round trip in seconds."""
        start = time.perf_counter()
        await self._control(protocol.PING, {})
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

    async def close(self) -> None:
        """Close the connection; deliveries not yet settled go back at once."""
        await self._connection.close()

    async def __aenter__(self) -> AsyncBroker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncBroker {self.url}>"


class _AsyncHandle:
    """Something opened on the server by OPEN, opened again after a reconnect."""

    def __init__(self, broker: AsyncBroker, request: dict[str, Any]) -> None:
        self._broker = broker
        self._connection = broker._connection
        self._request = request
        self._generation = -1
        self._handle = 0
        self._answer: dict[str, Any] = {}
        self.name = str(request["name"])

    async def reopen(self, options: dict[str, Any]) -> None:
        payload = encode_json(dict(self._request, options=options))
        frames = await self._connection.call(
            protocol.OPEN,
            lambda request_id, _: encode_frame(
                protocol.OPEN, 0, request_id, 0, payload
            ),
            opened=self,
        )
        self._answer = decode_json(frames[0][4])
        self._handle = int(self._answer["handle"])
        self.name = str(self._answer["name"])


class _AsyncPublisher(_AsyncHandle):
    async def put(
        self,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Append one message and return its offset."""
        plan_batches([body], headers, self.name, self._connection, "put")
        milliseconds = wait_ms(timeout)
        frames = await self._connection.call(
            protocol.PUBLISH,
            lambda request_id, handle: encode_publish(
                request_id, handle, [body], headers, milliseconds
            ),
            self,
        )
        return int(_PUBLISHED.unpack(frames[0][4])[0])

    async def put_many(
        self,
        bodies: Iterable[Any],
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> range | list[int]:
        """Append messages in order; return their offsets (see RemoteQueue)."""
        items = bodies_as_list(bodies)
        connection = self._connection
        milliseconds = wait_ms(timeout)
        ranges: list[range] = []
        for start, stop in plan_batches(items, headers, self.name, connection):
            part = items[start:stop]
            frames = await connection.call(
                protocol.PUBLISH,
                lambda request_id, handle, part=part: encode_publish(  # type: ignore[misc]
                    request_id, handle, part, headers, milliseconds
                ),
                self,
            )
            first, count = _PUBLISHED.unpack(frames[0][4])
            ranges.append(range(first, first + count))
        return join_offsets(ranges)


class _AsyncConsumer(_AsyncHandle):
    prefetch = 100

    def __init__(self, broker: AsyncBroker, request: dict[str, Any]) -> None:
        super().__init__(broker, request)
        # Deliveries of FETCHes whose caller was cancelled, for the next get.
        self._late = LateDeliveries()
        # Resolved when the last frame of such a FETCH, cancelled, has come.
        self._cancelling: set[asyncio.Future[None]] = set()

    async def _late_frames(self, count: int) -> list[Frame]:
        """Take up to count deliveries kept after a cancelled get."""
        if self._cancelling:
            ends = list(self._cancelling)
            # The server replies to a cancelled FETCH as soon as it reads
            # the CANCEL, and a broken connection resolves them too.
            await asyncio.wait(ends)
            self._cancelling.difference_update(ends)
        if not self._late:
            return []
        link = self._connection._link
        generation = -1 if link is None or link.lost is not None else link.generation
        payloads = self._late.take(count, generation, self.name)
        return late_frames(payloads, self._handle)

    async def _fetch_frames(self, count: int, timeout: float | None) -> list[Frame]:
        """Send FETCH for up to count messages; return the DELIVER frames.

        Deliveries kept after a cancelled get come first, without a FETCH.
        """
        connection = self._connection
        payload = fetch_payload(count, timeout, connection.max_batch)
        if self._cancelling or self._late:
            late = await self._late_frames(count)
            if late:
                return late
        return await connection.call(
            protocol.FETCH,
            lambda request_id, handle: encode_frame(
                protocol.FETCH, 0, request_id, handle, payload
            ),
            self,
        )

    async def get_many(
        self, count: int, timeout: float | None = None
    ) -> list[AsyncMessage]:
        """Deliver up to count messages; wait up to timeout for the first one."""
        messages: list[AsyncMessage] = []
        for reply in await self._fetch_frames(count, timeout):
            messages.extend(decode_deliveries(reply[4], self))
        return messages

    async def get_batch(self, count: int, timeout: float | None = None) -> MessageBatch:
        """Deliver up to count messages as one MessageBatch of numpy columns.

        Waits up to timeout for the first message; settle the batch with
        ack_many(batch).
        """
        replies = await self._fetch_frames(count, timeout)
        return decode_batch([reply[4] for reply in replies], self)

    async def get(self, timeout: float | None = None) -> AsyncMessage | None:
        """Deliver the lowest available message, or None after timeout."""
        messages = await self.get_many(1, timeout)
        return messages[0] if messages else None

    async def __aiter__(self) -> AsyncIterator[AsyncMessage]:
        """Yield messages as they arrive, from a subscription with prefetch.

        The server sends at most prefetch messages ahead of the loop body.
        Leaving the loop ends the subscription, and messages received but
        not yet handed out are nacked at once. When the connection breaks,
        the loop reconnects and subscribes again; the messages received
        but not handed out were released by the server, so none is lost.
        A message handed out after the break but before the read task saw
        it belongs to the old connection: its ack raises StaleReceiptError
        or ConnectionLostError, and it comes again.
        """
        connection = self._connection
        while True:
            if self._cancelling or self._late:
                for frame in await self._late_frames(self.prefetch):
                    for message in decode_deliveries(frame[4], self):
                        yield message
            link, subscription, pushes = await connection.subscribe(self, self.prefetch)
            # Closed here, not later by the loop, so that leaving the loop
            # unsubscribes before it returns.
            pushed = self._pushed(link, subscription, pushes)
            try:
                async with contextlib.aclosing(pushed):
                    async for item in pushed:
                        yield item
            except errors.ConnectionLostError:
                if connection._closed:
                    raise
                logger.info(
                    "subscription to %s ended with its connection; subscribing again",
                    self.name,
                )
                continue

    async def _pushed(
        self,
        link: _Link,
        subscription: int,
        pushes: asyncio.Queue[AsyncMessage | BaseException],
    ) -> AsyncGenerator[AsyncMessage, None]:
        """Yield the pushes of one subscription, on one socket."""
        connection = self._connection
        handle = self._handle
        owed = 0
        try:
            while True:
                item = await pushes.get()
                if isinstance(item, BaseException):
                    raise item
                owed += 1
                if owed >= max(1, self.prefetch // 2):
                    connection.send_on(
                        link,
                        encode_frame(
                            protocol.CREDIT,
                            FLAG_NO_REPLY,
                            subscription,
                            handle,
                            _U32.pack(owed),
                        ),
                    )
                    owed = 0
                yield item
        finally:
            if link.lost is None:
                await self._unsubscribe(link, subscription, pushes)
            connection.unsubscribe(link, subscription)

    async def _unsubscribe(
        self,
        link: _Link,
        subscription: int,
        pushes: asyncio.Queue[AsyncMessage | BaseException],
    ) -> None:
        connection = self._connection
        handle = self._handle
        # Unsubscribe on the server first: pushes sent before its reply
        # still arrive here, and all that is left then goes back.
        request_id = connection.next_id()
        future: asyncio.Future[list[Frame]] = asyncio.get_running_loop().create_future()
        link.waiting[request_id] = (future, [], None, link.queued + 1)
        if connection.send_on(
            link,
            encode_frame(
                protocol.UNSUBSCRIBE,
                0,
                request_id,
                handle,
                _U32.pack(subscription),
            ),
        ):
            with contextlib.suppress(errors.PymqError, OSError):
                await future
        else:
            link.waiting.pop(request_id, None)
        left: list[AsyncMessage] = []
        while not pushes.empty():
            item = pushes.get_nowait()
            if isinstance(item, RemoteMessage):
                left.append(item)
        if left:
            connection.send_on(
                link,
                encode_receipts(
                    protocol.NACK,
                    FLAG_NO_REPLY,
                    connection.next_id(),
                    handle,
                    left,
                    _F64.pack(0.0),
                ),
            )

    async def _settle(
        self, opcode: int, items: Any, prefix: bytes, suffix: bytes, wait: bool
    ) -> None:
        flags = 0 if wait else FLAG_NO_REPLY

        def build(request_id: int, handle: int) -> bytes:
            return encode_receipts(
                opcode, flags, request_id, handle, items, prefix, suffix
            )

        if wait:
            await self._connection.call(opcode, build, self)
        else:
            await self._connection.send(build, self, f"{_NAMES[opcode]} of {self.name}")

    async def ack(self, receipt: int, *, wait: bool = True) -> None:
        """Settle the delivery named by receipt.

        With wait=False the ack is sent without waiting for the reply; an
        error it gets is logged and raised by a later call on this
        connection, and so is a ConnectionLostError when the connection
        broke before the ack was written. When it broke after, but before
        the reply to a later request confirmed the ack, a call raises
        UnconfirmedSettleError.
        """
        check_receipt(receipt)
        await self._settle(protocol.ACK, [receipt], b"", b"", wait)

    async def ack_many(self, items: Any, *, wait: bool = True) -> None:
        """Settle many deliveries: all, or none when one receipt is stale."""
        await self._settle(protocol.ACK, items, b"", b"", wait)

    async def nack(self, receipt: int, delay: float = 0.0) -> None:
        """Give the message back, for redelivery after delay seconds."""
        check_receipt(receipt)
        await self._settle(
            protocol.NACK, [receipt], _seconds("nack", "delay", delay), b"", True
        )

    async def extend(self, receipt: int, seconds: float) -> None:
        """Set the delivery's deadline to now plus seconds."""
        check_receipt(receipt)
        await self._settle(
            protocol.EXTEND,
            [receipt],
            _seconds("extend", "seconds", seconds),
            b"",
            True,
        )

    async def reject(self, receipt: int, reason: str = "rejected") -> None:
        """Move the message to the dead-letter queue now, with reason.

        A reason over 1000 UTF-8 bytes is cut as the embedded broker cuts
        it; see pymq.client.encode_reason.
        """
        check_receipt(receipt)
        await self._settle(protocol.REJECT, [receipt], b"", encode_reason(reason), True)

    async def stats(self) -> QueueStats:
        """Return the counts of this queue or group."""
        frames = await self._connection.call(
            protocol.STATS,
            lambda request_id, handle: encode_frame(
                protocol.STATS, 0, request_id, handle, b""
            ),
            self,
        )
        return QueueStats(**decode_json(frames[0][4]))

    @property
    def dlq_name(self) -> str:
        return str(self._answer["dlq"])

    async def dlq(self) -> AsyncQueue:
        """Open the dead-letter queue of this queue or group."""
        return await self._broker.queue(self.dlq_name)


_NAMES: Final = {
    protocol.ACK: "ack",
    protocol.NACK: "nack",
    protocol.EXTEND: "extend",
    protocol.REJECT: "reject",
}


class AsyncQueue(_AsyncConsumer, _AsyncPublisher):
    """A queue on a server, with coroutine forms of pymq.Queue's calls."""

    def __repr__(self) -> str:
        return f"<AsyncQueue {self.name!r} on {self._broker.url}>"


class AsyncGroup(_AsyncConsumer):
    """A consumer group on a server, with coroutine forms of Group's calls."""

    def __repr__(self) -> str:
        return f"<AsyncGroup {self.name!r} on {self._broker.url}>"


class AsyncStream(_AsyncPublisher):
    """A stream on a server: put, put_many and its groups."""

    async def group(
        self, name: str, *, start: str | int = "earliest", **options: Any
    ) -> AsyncGroup:
        """Open the group name, creating it if it is missing."""
        check_name("group", name)
        options = _check_options(options, GROUP_DEFAULTS)
        group = AsyncGroup(
            self._broker,
            {"kind": "group", "name": name, "stream": self.name, "start": start},
        )
        await group.reopen(options)
        return group

    def __repr__(self) -> str:
        return f"<AsyncStream {self.name!r} on {self._broker.url}>"


async def connect(
    url: str = f"pymq://127.0.0.1:{protocol.DEFAULT_PORT}",
    *,
    token: str | None = None,
    connect_timeout: float = 10.0,
    reconnect_attempts: int = 5,
    ssl_context: ssl.SSLContext | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> AsyncBroker:
    """Connect to a pymq server; token defaults to PYMQ_TOKEN.

    The TLS options are those of pymq.connect, for pymqs:// URLs. As with
    pymq.connect, a broken connection is opened again, with backoff (a
    first try and reconnect_attempts more, so 6 tries by default), on the
    next call; only
    requests that are safe to repeat are sent again on their own, and
    `async for` subscribes again.
    """
    check_connect_options(connect_timeout, reconnect_attempts, token)
    if token is None:
        token = os.environ.get("PYMQ_TOKEN") or None
    address = parse_url(url)
    connection = AsyncConnection(
        address,
        token=token,
        connect_timeout=connect_timeout,
        reconnect_attempts=reconnect_attempts,
        ssl_context=client_ssl_context(
            address, ssl_context, ca_file, cert_file, key_file
        ),
    )
    await connection.open()
    return AsyncBroker(connection)
