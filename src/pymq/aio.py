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
import itertools
import logging
import os
import ssl
import struct
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

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
from pymq._version import __version__
from pymq.broker import GROUP_DEFAULTS, QUEUE_DEFAULTS, STREAM_DEFAULTS, _check_options
from pymq.client import (
    client_ssl_context,
    fetch_payload,
    join_offsets,
    plan_batches,
    wait_ms,
)
from pymq.names import check_name
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

__all__ = ["AsyncBroker", "AsyncGroup", "AsyncQueue", "AsyncStream", "connect"]

logger = logging.getLogger("pymq.aio")

_U32: Final = struct.Struct("<I")
_F64: Final = struct.Struct("<d")
_PUBLISHED: Final = struct.Struct("<QI")

Frame = tuple[int, int, int, int, bytes]


class AsyncConnection:
    """One connection, read by one task that routes replies and pushes."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[list[Frame]], list[Frame]]] = {}
        self._pushes: dict[int, asyncio.Queue[RemoteMessage | BaseException]] = {}
        self._owners: dict[int, Any] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._late_errors: list[errors.PymqError] = []
        self._outgoing: list[bytes] = []
        self._lost: BaseException | None = None
        self.max_frame_bytes = 16 << 20
        self.max_message_bytes: int | None = None
        self.max_batch = 10_000
        self.server = ""

    async def open(
        self, token: str | None, timeout: float, context: ssl.SSLContext | None
    ) -> None:
        address = self.address
        if address.path is not None:
            opening = asyncio.open_unix_connection(address.path)
        elif context is not None:
            opening = asyncio.open_connection(
                address.host, address.port, ssl=context, server_hostname=address.host
            )
        else:
            opening = asyncio.open_connection(address.host, address.port)
        reader, writer = await asyncio.wait_for(opening, timeout)
        hello = encode_json(
            {
                "versions": [protocol.PROTOCOL_VERSION, protocol.PROTOCOL_VERSION],
                "token": token,
                "client": f"pymq-python-asyncio {__version__}",
            }
        )
        writer.write(PREAMBLE + encode_frame(protocol.HELLO, 0, 0, 0, hello))
        frames: list[Frame] = []
        handshake = FrameReader(0xFFFFFFFF)
        try:
            while not frames:
                data = await asyncio.wait_for(reader.read(65536), timeout)
                if not data:
                    raise errors.ConnectionLostError(
                        f"{address} closed the connection during the handshake"
                    )
                frames = handshake.feed(data)
        except BaseException:
            writer.close()
            raise
        _, flags, _, _, payload = frames[0]
        if flags & FLAG_ERROR:
            writer.close()
            raise decode_error(payload)
        answer = decode_json(payload)
        self.max_frame_bytes = int(answer.get("max_frame_bytes", self.max_frame_bytes))
        limit = answer.get("max_message_bytes")
        self.max_message_bytes = None if limit is None else int(limit)
        self.max_batch = int(answer.get("max_batch", self.max_batch))
        self.server = str(answer.get("server", ""))
        self._writer = writer
        self._task = asyncio.ensure_future(self._read(reader))

    def next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF or next(self._ids)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        frames_of = FrameReader(self.max_frame_bytes)
        try:
            while True:
                data = await reader.read(262144)
                if not data:
                    raise ConnectionResetError("the server closed the connection")
                for frame in frames_of.feed(data):
                    self._route(frame)
        except (OSError, errors.ProtocolError) as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(errors.ClosedError(f"connection to {self.address} is closed"))
            raise

    def _route(self, frame: Frame) -> None:
        flags, request_id = frame[1], frame[2]
        if flags & FLAG_PUSH:
            pushes = self._pushes.get(request_id)
            if pushes is not None:
                for message in decode_deliveries(frame[4], self._owners[request_id]):
                    pushes.put_nowait(message)
            return
        entry = self._waiting.get(request_id)
        if entry is None:
            if flags & FLAG_ERROR:
                error = decode_error(frame[4])
                logger.error(
                    "request %d, sent without waiting for a reply, failed: %s",
                    request_id,
                    error,
                )
                self._late_errors.append(error)
            return
        future, frames = entry
        frames.append(frame)
        if future.cancelled() and frame[0] == protocol.DELIVER:
            # The caller gave up (a timeout around get, say): the messages
            # that still came go back at once, not after their timeout.
            self._give_back(frame)
        if not flags & FLAG_MORE:
            del self._waiting[request_id]
            if not future.done():
                future.set_result(frames)

    def _give_back(self, frame: Frame) -> None:
        deliveries = decode_deliveries(frame[4], None)
        if deliveries and self._lost is None:
            self._queue_frame(
                encode_receipts(
                    protocol.NACK,
                    FLAG_NO_REPLY,
                    self.next_id(),
                    frame[3],
                    deliveries,
                    _F64.pack(0.0),
                )
            )

    def _fail(self, exc: BaseException) -> None:
        lost = errors.ConnectionLostError(f"connection to {self.address} broke: {exc}")
        self._lost = lost
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(lost)
        for pushes in self._pushes.values():
            pushes.put_nowait(lost)

    def _check(self) -> asyncio.StreamWriter:
        if self._late_errors:
            late, self._late_errors = self._late_errors, []
            raise late[0]
        if self._lost is not None:
            raise self._lost
        assert self._writer is not None
        return self._writer

    async def call(self, request_id: int, frame: bytes) -> list[Frame]:
        """Send a request; return its reply frames or raise its error."""
        self._check()
        future: asyncio.Future[list[Frame]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (future, [])
        self._queue_frame(frame)
        frames = await future
        if frames[0][1] & FLAG_ERROR:
            raise decode_error(frames[0][4])
        return frames

    def send(self, frame: bytes) -> None:
        self._check()
        self._queue_frame(frame)

    def _queue_frame(self, frame: bytes) -> None:
        # Frames queued in one turn of the loop (a gather of puts, say) go
        # out in one write, once the running tasks have had their turn.
        self._outgoing.append(frame)
        if len(self._outgoing) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._writer is not None and outgoing and self._lost is None:
            self._writer.writelines(outgoing)

    def subscribe(
        self, request_id: int, owner: Any
    ) -> asyncio.Queue[RemoteMessage | BaseException]:
        pushes: asyncio.Queue[RemoteMessage | BaseException] = asyncio.Queue()
        self._pushes[request_id] = pushes
        self._owners[request_id] = owner
        return pushes

    def unsubscribe(self, request_id: int) -> None:
        self._pushes.pop(request_id, None)
        self._owners.pop(request_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


class AsyncBroker:
    """A broker on a server, with coroutine forms of pymq.Broker's calls."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection
        self.url = str(connection.address)

    async def _control(self, opcode: int, request: dict[str, Any]) -> dict[str, Any]:
        request_id = self._connection.next_id()
        frames = await self._connection.call(
            request_id, encode_frame(opcode, 0, request_id, 0, encode_json(request))
        )
        return decode_json(frames[0][4])

    async def queue(self, name: str, **options: Any) -> AsyncQueue:
        """Open the queue name, creating it if it is missing."""
        check_name("queue", name)
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

    async def redrive(self, dlq_name: str, to: str | None = None) -> int:
        """Move every message now in a dead-letter queue back; see Broker."""
        answer = await self._control(protocol.REDRIVE, {"dlq": dlq_name, "to": to})
        return int(answer["moved"])

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
    def __init__(self, broker: AsyncBroker, request: dict[str, Any]) -> None:
        self._broker = broker
        self._connection = broker._connection
        self._request = request
        self._handle = 0
        self._answer: dict[str, Any] = {}
        self.name = str(request["name"])

    async def reopen(self, options: dict[str, Any]) -> None:
        request = dict(self._request, options=options)
        request_id = self._connection.next_id()
        frames = await self._connection.call(
            request_id,
            encode_frame(protocol.OPEN, 0, request_id, 0, encode_json(request)),
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
        plan_batches([body], headers, self._connection)
        request_id = self._connection.next_id()
        frame = encode_publish(
            request_id, self._handle, [body], headers, wait_ms(timeout)
        )
        frames = await self._connection.call(request_id, frame)
        return int(_PUBLISHED.unpack(frames[0][4])[0])

    async def put_many(
        self,
        bodies: Iterable[Any],
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> range | list[int]:
        """Append messages in order; return their offsets (see RemoteQueue)."""
        items = bodies if isinstance(bodies, list) else list(bodies)
        connection = self._connection
        milliseconds = wait_ms(timeout)
        ranges: list[range] = []
        for start, stop in plan_batches(items, headers, connection):
            request_id = connection.next_id()
            frame = encode_publish(
                request_id, self._handle, items[start:stop], headers, milliseconds
            )
            frames = await connection.call(request_id, frame)
            first, count = _PUBLISHED.unpack(frames[0][4])
            ranges.append(range(first, first + count))
        return join_offsets(ranges)


class _AsyncConsumer(_AsyncHandle):
    prefetch = 100

    async def _fetch_frames(self, count: int, timeout: float | None) -> list[Frame]:
        connection = self._connection
        payload = fetch_payload(count, timeout, connection.max_batch)
        request_id = connection.next_id()
        frame = encode_frame(protocol.FETCH, 0, request_id, self._handle, payload)
        return await connection.call(request_id, frame)

    async def get_many(
        self, count: int, timeout: float | None = None
    ) -> list[RemoteMessage]:
        """Deliver up to count messages; wait up to timeout for the first one."""
        messages: list[RemoteMessage] = []
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

    async def get(self, timeout: float | None = None) -> RemoteMessage | None:
        """Deliver the lowest available message, or None after timeout."""
        messages = await self.get_many(1, timeout)
        return messages[0] if messages else None

    async def __aiter__(self) -> AsyncIterator[RemoteMessage]:
        """Yield messages as they arrive, from a subscription with prefetch.

        The server sends at most prefetch messages ahead of the loop body.
        Leaving the loop ends the subscription, and messages received but
        not yet handed out are nacked at once.
        """
        connection = self._connection
        subscription = connection.next_id()
        pushes = connection.subscribe(subscription, self)
        await connection.call(
            subscription,
            encode_frame(
                protocol.SUBSCRIBE,
                0,
                subscription,
                self._handle,
                _U32.pack(self.prefetch),
            ),
        )
        owed = 0
        try:
            while True:
                item = await pushes.get()
                if isinstance(item, BaseException):
                    raise item
                owed += 1
                if owed >= max(1, self.prefetch // 2):
                    connection.send(
                        encode_frame(
                            protocol.CREDIT,
                            FLAG_NO_REPLY,
                            subscription,
                            self._handle,
                            _U32.pack(owed),
                        )
                    )
                    owed = 0
                yield item
        finally:
            # Unsubscribe on the server first: pushes sent before its reply
            # still arrive here, and all that is left then goes back.
            with contextlib.suppress(errors.PymqError, OSError):
                request_id = connection.next_id()
                await connection.call(
                    request_id,
                    encode_frame(
                        protocol.UNSUBSCRIBE,
                        0,
                        request_id,
                        self._handle,
                        _U32.pack(subscription),
                    ),
                )
            connection.unsubscribe(subscription)
            left: list[RemoteMessage] = []
            while not pushes.empty():
                item = pushes.get_nowait()
                if isinstance(item, RemoteMessage):
                    left.append(item)
            if left:
                with contextlib.suppress(errors.PymqError, OSError):
                    connection.send(
                        encode_receipts(
                            protocol.NACK,
                            FLAG_NO_REPLY,
                            connection.next_id(),
                            self._handle,
                            left,
                            _F64.pack(0.0),
                        )
                    )

    async def _settle(
        self, opcode: int, items: Any, prefix: bytes, suffix: bytes, wait: bool
    ) -> None:
        connection = self._connection
        request_id = connection.next_id()
        frame = encode_receipts(
            opcode,
            0 if wait else FLAG_NO_REPLY,
            request_id,
            self._handle,
            items,
            prefix,
            suffix,
        )
        if wait:
            await connection.call(request_id, frame)
        else:
            connection.send(frame)

    async def ack(self, receipt: int, *, wait: bool = True) -> None:
        """Settle the delivery named by receipt."""
        await self._settle(protocol.ACK, [receipt], b"", b"", wait)

    async def ack_many(self, items: Any, *, wait: bool = True) -> None:
        """Settle many deliveries: all, or none when one receipt is stale."""
        await self._settle(protocol.ACK, items, b"", b"", wait)

    async def nack(self, receipt: int, delay: float = 0.0) -> None:
        """Give the message back, for redelivery after delay seconds."""
        await self._settle(protocol.NACK, [receipt], _F64.pack(delay), b"", True)

    async def extend(self, receipt: int, seconds: float) -> None:
        """Set the delivery's deadline to now plus seconds."""
        await self._settle(protocol.EXTEND, [receipt], _F64.pack(seconds), b"", True)

    async def reject(self, receipt: int, reason: str = "rejected") -> None:
        """Move the message to the dead-letter queue now, with reason."""
        await self._settle(
            protocol.REJECT, [receipt], b"", reason.encode("utf-8"), True
        )

    async def stats(self) -> QueueStats:
        """Return the counts of this queue or group."""
        request_id = self._connection.next_id()
        frames = await self._connection.call(
            request_id,
            encode_frame(protocol.STATS, 0, request_id, self._handle, b""),
        )
        return QueueStats(**decode_json(frames[0][4]))

    @property
    def dlq_name(self) -> str:
        return str(self._answer["dlq"])

    async def dlq(self) -> AsyncQueue:
        """Open the dead-letter queue of this queue or group."""
        return await self._broker.queue(self.dlq_name)


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
    ssl_context: ssl.SSLContext | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> AsyncBroker:
    """Connect to a pymq server; token defaults to PYMQ_TOKEN.

    The TLS options are those of pymq.connect, for pymqs:// URLs.

    NOTE: unlike the blocking client, this one does not reconnect; a broken
    connection raises ConnectionLostError from every later call.
    """
    if token is None:
        token = os.environ.get("PYMQ_TOKEN") or None
    address = parse_url(url)
    context = client_ssl_context(address, ssl_context, ca_file, cert_file, key_file)
    connection = AsyncConnection(address)
    await connection.open(token, connect_timeout, context)
    return AsyncBroker(connection)
