"""asv benchmarks of the systems that benchmarks/compare.py measures beside pymq.

One class per system, parameterised by message size, so that `asv run`
shows them next to pymq's own classes in bench_queue (the standard library
queues are in bench_queue.InProcessQueue). setup raises NotImplementedError,
which asv reports as a skip, when the system's client library is missing
or its server does not answer on 127.0.0.1 at its standard port within a
second.

A sample produces a few hundred messages (at most 8 MiB of bodies) and
then drains them, with the ack where the system has one, to stay fast. The
full comparison, with N scaled per system, round trips and ratios, is
`python -m benchmarks.compare`. Each sample uses a fresh folder, stream or
queue, deleted in teardown.
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing
import secrets
from collections.abc import Sequence
from typing import Any, ClassVar

from .common import BROKER_PAYLOAD_SIZES, Scratch, payloads

HOST = "127.0.0.1"
CONNECT_TIMEOUT = 1.0
IO_TIMEOUT = 10.0
BATCH = 100
MAX_SAMPLE_BYTES = 8 << 20


def count(messages: int, payload: int) -> int:
    return max(1, min(messages, MAX_SAMPLE_BYTES // payload))


def require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise NotImplementedError(f"{module} is not installed")


def unique(kind: str) -> str:
    return f"pymq-asv-{kind}-{secrets.token_hex(4)}"


class Baseline:
    """Shared asv settings: at least 3 samples, no warm-up, one call each."""

    params: ClassVar[list[Sequence[object]]] = [list(BROKER_PAYLOAD_SIZES)]
    param_names: ClassVar[list[str]] = ["payload"]
    timeout = 120.0
    repeat = (3, 10, 5.0)
    number = 1
    warmup_time = 0.0
    rounds = 1
    messages = 500

    scratch: Scratch | None = None

    def bodies(self, payload: int) -> list[bytes]:
        return payloads(payload, count(self.messages, payload))

    def teardown(self, payload: int, *params: object) -> None:
        if self.scratch is not None:
            self.scratch.remove()
            self.scratch = None


def _produce(jobs: Any, bodies: list[bytes], ready: Any, go: Any) -> None:
    ready.set()
    if go.wait(60.0):
        for body in bodies:
            jobs.put(body)


class MultiprocessingQueue(Baseline):
    """multiprocessing.Queue: a forked process puts, this one gets.

    Forked, not spawned: asv loads this module from a path that a spawned
    interpreter could not import it from. Skipped where fork is missing.
    """

    messages = 2000

    def setup(self, payload: int) -> None:
        if "fork" not in multiprocessing.get_all_start_methods():
            raise NotImplementedError("no fork start method here")
        context = multiprocessing.get_context("fork")
        self.count = count(self.messages, payload)
        self.jobs = context.Queue()
        ready, self.go = context.Event(), context.Event()
        self.process = context.Process(
            target=_produce,
            args=(self.jobs, self.bodies(payload), ready, self.go),
            daemon=True,
        )
        self.process.start()
        if not ready.wait(IO_TIMEOUT):
            raise RuntimeError("the producer process did not start")

    def time_produce_drain(self, payload: int) -> None:
        self.go.set()
        for _ in range(self.count):
            self.jobs.get(timeout=IO_TIMEOUT)

    def teardown(self, payload: int, *params: object) -> None:
        self.process.join(IO_TIMEOUT)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(IO_TIMEOUT)
        self.jobs.close()
        self.jobs.join_thread()


class PersistQueueFile(Baseline):
    """persistqueue.Queue at its defaults: put, then get and task_done."""

    messages = 300

    def setup(self, payload: int) -> None:
        require("persistqueue")
        import persistqueue

        self.scratch = Scratch()
        self.queue = persistqueue.Queue(str(self.scratch.path / "queue"))
        self.items = self.bodies(payload)

    def time_produce_drain(self, payload: int) -> None:
        for body in self.items:
            self.queue.put(body)
        for _ in self.items:
            self.queue.get(block=False)
            self.queue.task_done()


class PersistQueueSQLiteAck(Baseline):
    """persistqueue.SQLiteAckQueue at its defaults: put, then get and ack."""

    messages = 100

    def setup(self, payload: int) -> None:
        require("persistqueue")
        import persistqueue

        self.scratch = Scratch()
        self.queue = persistqueue.SQLiteAckQueue(str(self.scratch.path / "queue"))
        self.items = self.bodies(payload)

    def time_produce_drain(self, payload: int) -> None:
        for body in self.items:
            self.queue.put(body)
        for _ in self.items:
            item = self.queue.get(block=False, raw=True)
            self.queue.ack(id=item["pqid"])

    def teardown(self, payload: int, *params: object) -> None:
        self.queue.close()
        super().teardown(payload)


class LiteQueue(Baseline):
    """litequeue.LiteQueue at its defaults: put, then pop and done."""

    def setup(self, payload: int) -> None:
        require("litequeue")
        import litequeue

        self.scratch = Scratch()
        self.queue = litequeue.LiteQueue(str(self.scratch.path / "queue.sqlite3"))
        self.items = self.bodies(payload)

    def time_produce_drain(self, payload: int) -> None:
        for body in self.items:
            self.queue.put(body)
        for _ in self.items:
            message = self.queue.pop()
            self.queue.done(message.message_id)

    def teardown(self, payload: int, *params: object) -> None:
        self.queue.close()
        super().teardown(payload)


class DiskcacheDeque(Baseline):
    """diskcache.Deque at its defaults: append, then popleft (no ack)."""

    def setup(self, payload: int) -> None:
        require("diskcache")
        import diskcache

        self.scratch = Scratch()
        self.queue = diskcache.Deque(directory=str(self.scratch.path / "deque"))
        self.items = self.bodies(payload)

    def time_produce_drain(self, payload: int) -> None:
        for body in self.items:
            self.queue.append(body)
        for _ in self.items:
            self.queue.popleft()

    def teardown(self, payload: int, *params: object) -> None:
        self.queue.cache.close()
        super().teardown(payload)


class RedisStreams(Baseline):
    """Redis Streams with redis-py: XADD, then XREADGROUP and XACK.

    "one at a time" sends one command per message; "pipelined" sends 100
    XADD per pipeline and reads and acks 100 entries per call.
    """

    params: ClassVar[list[Sequence[object]]] = [
        list(BROKER_PAYLOAD_SIZES),
        ["one at a time", "pipelined"],
    ]
    param_names: ClassVar[list[str]] = ["payload", "form"]

    def setup(self, payload: int, form: str) -> None:
        require("redis")
        import redis

        self.client = redis.Redis(
            host=HOST,
            port=6379,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=IO_TIMEOUT,
        )
        self.key = unique("stream")
        try:
            self.client.xgroup_create(self.key, "workers", id="0", mkstream=True)
        except redis.RedisError as exc:
            self.client.close()
            raise NotImplementedError(f"no Redis at {HOST}:6379: {exc}") from exc
        self.items = self.bodies(payload)

    def time_produce_drain(self, payload: int, form: str) -> None:
        client, key, streams = self.client, self.key, {self.key: ">"}
        size = 1 if form == "one at a time" else BATCH
        if size == 1:
            for body in self.items:
                client.xadd(key, {"b": body})
        else:
            pipe = client.pipeline(transaction=False)
            for first in range(0, len(self.items), size):
                for body in self.items[first : first + size]:
                    pipe.xadd(key, {"b": body})
                pipe.execute()
        done = 0
        while done < len(self.items):
            reply = client.xreadgroup("workers", "worker-1", streams, size)
            ids = [message_id for message_id, _ in reply[0][1]]
            client.xack(key, "workers", *ids)
            done += len(ids)

    def teardown(self, payload: int, *params: object) -> None:
        self.client.delete(self.key)
        self.client.close()


class RabbitMQ(Baseline):
    """RabbitMQ with pika: basic_publish each, consume with prefetch 100.

    "durable, confirms": a durable queue, persistent messages, and each
    publish waits for its confirm. "non-durable, no confirms": neither.
    """

    params: ClassVar[list[Sequence[object]]] = [
        list(BROKER_PAYLOAD_SIZES),
        ["durable, confirms", "non-durable, no confirms"],
    ]
    param_names: ClassVar[list[str]] = ["payload", "form"]
    messages = 300

    def setup(self, payload: int, form: str) -> None:
        require("pika")
        import pika

        parameters = pika.ConnectionParameters(
            host=HOST,
            port=5672,
            credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1,
            socket_timeout=CONNECT_TIMEOUT,
            stack_timeout=CONNECT_TIMEOUT * 5,
        )
        try:
            self.connection = pika.BlockingConnection(parameters)
        except Exception as exc:
            raise NotImplementedError(f"no RabbitMQ at {HOST}:5672: {exc}") from exc
        durable = form.startswith("durable")
        self.channel = self.connection.channel()
        self.name = unique("queue")
        self.channel.queue_declare(queue=self.name, durable=durable)
        if durable:
            self.channel.confirm_delivery()
        mode = pika.DeliveryMode.Persistent if durable else pika.DeliveryMode.Transient
        self.properties = pika.BasicProperties(delivery_mode=mode)
        self.channel.basic_qos(prefetch_count=BATCH)
        self.items = self.bodies(payload)

    def time_produce_drain(self, payload: int, form: str) -> None:
        channel = self.channel
        for body in self.items:
            channel.basic_publish("", self.name, body, self.properties)
        deliveries = channel.consume(
            self.name, auto_ack=False, inactivity_timeout=IO_TIMEOUT
        )
        for _ in self.items:
            method, _, _ = next(deliveries)
            if method is None:
                raise RuntimeError("no message from RabbitMQ")
            channel.basic_ack(method.delivery_tag)
        channel.cancel()

    def teardown(self, payload: int, *params: object) -> None:
        self.channel.queue_delete(queue=self.name)
        self.connection.close()


class NatsJetStream(Baseline):
    """NATS JetStream with nats-py: publish, then a pull consumer fetches 100.

    "await each ack" awaits every publish's ack; "acks per 100" publishes
    100 with publish_async and then gathers their acks.
    """

    params: ClassVar[list[Sequence[object]]] = [
        list(BROKER_PAYLOAD_SIZES),
        ["await each ack", "acks per 100"],
    ]
    param_names: ClassVar[list[str]] = ["payload", "form"]

    def setup(self, payload: int, form: str) -> None:
        require("nats")
        self.loop = asyncio.new_event_loop()
        self.name = unique("stream")
        self.items = self.bodies(payload)
        try:
            self.loop.run_until_complete(
                asyncio.wait_for(self._open(), CONNECT_TIMEOUT * 5)
            )
        except Exception as exc:
            self.loop.close()
            raise NotImplementedError(
                f"no NATS JetStream at {HOST}:4222: {exc}"
            ) from exc

    async def _open(self) -> None:
        import nats
        from nats.js.api import RetentionPolicy

        self.connection = await nats.connect(
            f"nats://{HOST}:4222",
            connect_timeout=CONNECT_TIMEOUT,
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )
        self.js = self.connection.jetstream(timeout=IO_TIMEOUT)
        await self.js.add_stream(
            name=self.name, subjects=[self.name], retention=RetentionPolicy.WORK_QUEUE
        )
        self.puller = await self.js.pull_subscribe(
            self.name, durable="workers", stream=self.name
        )

    def time_produce_drain(self, payload: int, form: str) -> None:
        self.loop.run_until_complete(self._produce_drain(form))

    async def _produce_drain(self, form: str) -> None:
        js, subject = self.js, self.name
        if form == "await each ack":
            for body in self.items:
                await js.publish(subject, body)
        else:
            for first in range(0, len(self.items), BATCH):
                chunk = self.items[first : first + BATCH]
                acks = [await js.publish_async(subject, body) for body in chunk]
                await asyncio.gather(*acks)
        done = 0
        while done < len(self.items):
            fetched = await self.puller.fetch(
                min(BATCH, len(self.items) - done), IO_TIMEOUT
            )
            for message in fetched:
                await message.ack()
            done += len(fetched)
        await self.connection.flush(IO_TIMEOUT)

    def teardown(self, payload: int, *params: object) -> None:
        async def close() -> None:
            try:
                await self.js.delete_stream(self.name)
            finally:
                await self.connection.close()

        try:
            self.loop.run_until_complete(close())
        finally:
            self.loop.close()
