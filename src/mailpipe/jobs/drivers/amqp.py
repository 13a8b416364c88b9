"""RabbitMQ pipeline driver (aio-pika): durable queue, publisher confirms, dead-letter exchange.

Topology, declared by `connect()` (durable unless `durable: false`):

- exchange `<exchange>` (`exchange_type`) → queue `<queue>` (quorum by default), bound with
  `routing_key`. The queue dead-letters (basic.reject without requeue) into the direct exchange
  `<exchange>.dlx`, bound to `<queue>.dead` with the queue's name as routing key.
- delays: RabbitMQ has no per-message delay without a plugin, so a delayed job waits in a classic
  queue `<queue>.delay.<ms>` whose queue-wide `x-message-ttl` dead-letters it into `<queue>`
  through the default exchange. One queue per (rounded up) delay rather than one queue with a
  per-message `expiration`: RabbitMQ only expires messages at the head of a queue, so a 1 s retry
  would wait behind a 1 h job. RoadRunner's amqp driver does the same. Unused delay queues
  delete themselves (`x-expires`); delays are rounded up to two significant digits (at most 10%
  later) so backoff with jitter does not make a queue per millisecond.

Attempts: quorum queues count returns of a message in `x-delivery-count` (0 on the first
delivery, verified on RabbitMQ 3.10). A nack with requeue republishes the job (to the tail, or to
a delay queue) with `x-mailpipe-attempts` = deliveries so far and acks the original, so
attempt = x-mailpipe-attempts + returns + 1. Classic queues only have the `redelivered` flag,
which counts as one return: there, deliveries lost to crashed consumers are under-counted.

Visibility: RabbitMQ gives an unacked message back as soon as the consumer's channel or
connection closes (a crashed or killed process), which is sooner than any timeout. A consumer
that is alive but stuck is handled here: a message handed out by receive() and not settled
within `visibility_timeout` is given back by this driver, which also cancels its consumer until
the next receive() so that the broker does not push it straight back. The handed-out one is
nacked (an attempt; a later ack of it raises DriverError); what still waits in the prefetch
buffer is republished with its attempt count unchanged. The broker's `consumer_timeout` (30 min by
default, per queue only from 3.12) maps to this loosely: it closes the whole channel. Keep
`prefetch` near the number of workers, or prefetched jobs wait (up to visibility_timeout) for a
busy process while others idle.

Routing: pushes go through `<exchange>` with `routing_key`; retries and delayed jobs go straight
to `<queue>` (default exchange), so a fanout/topic exchange does not copy them to other queues
again. Priorities travel (message priority, exact value in `x-mailpipe-priority`) but RabbitMQ
does not reorder by them: quorum queues have no priorities before 4.0 and the classic queue is
not declared with x-max-priority. stats(): `reserved` is this process's own unacked deliveries
and `delayed` the delay queues it has used (AMQP can neither list queues nor count unacked).

Failures: every call has a timeout (`op_timeout`) and raises DriverError; a lost connection is
replaced by a new one on the next call (at most one attempt per backoff step, capped at
MAX_BACKOFF). aio-pika's connect_robust is not used on purpose: its background restore makes calls
wait for a reconnection instead of failing fast, and restores the consumer onto a channel whose
delivery tags no longer match the deliveries the caller holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from yarl import URL

from mailpipe.config import AMQPPipelineOptions, PipelineOptions
from mailpipe.jobs.base import JOB_NAME, Delivery, Driver, DriverError, Job, PipelineStats

T = TypeVar("T")

OP_TIMEOUT = 5.0  # seconds for any one broker operation
MAX_BACKOFF = 1.0  # longest pause between reconnection attempts
DELAY_REDECLARE = 30.0  # a delay queue is re-declared this often, which keeps it from expiring
# Unless the address sets one: a half-open connection (dead network, no RST) is noticed by both
# ends after a few missed heartbeats, so an idle consumer reconnects and the broker requeues its
# unacked jobs within about a minute instead of the three minutes of the 60 s default.
HEARTBEAT = 15

H_HEADERS = "x-mailpipe-headers"  # names of the job's own headers among the AMQP headers
H_ATTEMPTS = "x-mailpipe-attempts"  # deliveries before this (re)publication
H_PIPELINE = "x-mailpipe-pipeline"
H_PRIORITY = "x-mailpipe-priority"
H_DELAY = "x-mailpipe-delay"
H_AUTO_ACK = "x-mailpipe-auto-ack"
H_REASON = "x-mailpipe-dead-reason"


@dataclass(slots=True, eq=False)
class _Reservation:
    """A message delivered to this driver and not settled yet (Delivery.ref)."""

    message: AbstractIncomingMessage
    generation: int  # the connection it came on: its delivery tag is meaningless on another
    timer: asyncio.TimerHandle | None = None
    expired: bool = False  # given back by the visibility watchdog
    handed_out: bool = False  # returned by receive() (else still in the prefetch buffer)
    settled: bool = False


class _Lost:
    """Put into the receive buffer when the connection goes, to wake a waiting receive()."""


def delay_ms(delay: float) -> int:
    """The delay queue a delay goes to: milliseconds rounded up to two significant digits."""
    ms = max(1, math.ceil(delay * 1000))
    if ms <= 100:
        return ms
    step = 10 ** (len(str(ms)) - 2)
    return math.ceil(ms / step) * step


def attempt_of(message: AbstractIncomingMessage) -> int:
    headers = message.headers or {}
    before = _as_int(headers.get(H_ATTEMPTS), 0)
    returns = _as_int(headers.get("x-delivery-count"), 0)
    return before + max(returns, 1 if message.redelivered else 0) + 1


class AMQPDriver(Driver):
    name = "amqp"
    op_timeout: float = OP_TIMEOUT

    def __init__(self, pipeline: str, options: PipelineOptions, *, data_dir: Path) -> None:
        if not isinstance(options, AMQPPipelineOptions):
            options = AMQPPipelineOptions.model_validate(options.model_dump())
        super().__init__(pipeline, options, data_dir=data_dir)
        self.opts: AMQPPipelineOptions = options
        self.queue = options.queue or pipeline
        self.routing_key = options.routing_key or self.queue
        self.dlx = f"{options.exchange or self.queue}.dlx"
        self.dead_queue = f"{self.queue}.dead"
        self._conn: AbstractConnection | None = None
        self._pub: AbstractChannel | None = None  # publisher confirms; declarations
        self._sub: AbstractChannel | None = None  # the consumer, with prefetch
        self._exchange: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._generation = 0  # bumped whenever a connection is given up
        self._consumer_generation = -1  # the generation whose channel has our consumer
        self._consuming = False  # receive() was called: consume again after a reconnection
        self._consumer: tuple[AbstractQueue, str] | None = None
        self._buffer: asyncio.Queue[_Reservation | _Lost] = asyncio.Queue()
        self._reserved: set[_Reservation] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._delay_queues: dict[str, float] = {}  # name → when this connection declared it
        self._connect_lock = asyncio.Lock()
        self._consume_lock = asyncio.Lock()  # one consumer, however many concurrent receive()s
        self._retry_at = 0.0
        self._backoff = 0.0
        self._last_error: str | None = None
        self._closed = False

    # -- connection -------------------------------------------------------------------------

    def _healthy(self) -> bool:
        return not (
            self._conn is None or self._conn.is_closed
            or self._pub is None or self._pub.is_closed
            or self._sub is None or self._sub.is_closed
        )

    def _where(self) -> str:
        url = URL(self.opts.addr)
        return f"{url.host}:{url.port}"

    async def connect(self) -> None:
        self._closed = False
        await self._ensure()

    async def _ensure(self) -> None:
        if self._healthy():
            return
        if self._closed:
            raise DriverError(f"amqp pipeline {self.pipeline!r} is closed")
        if self.opts.queue_type == "quorum" and not self.opts.durable:
            raise DriverError("quorum queues are always durable: set durable or queue_type classic")
        async with self._connect_lock:
            if self._healthy():
                return
            wait = self._retry_at - time.monotonic()
            if wait > 0:  # fail fast while backing off instead of queueing up connect attempts
                raise DriverError(
                    f"RabbitMQ at {self._where()} unavailable ({self._last_error}); "
                    f"next attempt in {wait:.1f}s"
                )
            await self._teardown()
            try:
                await asyncio.wait_for(self._open(), self.op_timeout)
            except Exception as exc:  # anything from socket to AMQP: the caller sees DriverError
                await self._teardown()
                self._backoff = min(max(self._backoff * 2, 0.1), MAX_BACKOFF)
                self._retry_at = time.monotonic() + self._backoff
                self._last_error = _describe(exc)
                raise DriverError(
                    f"cannot connect to RabbitMQ at {self._where()}: {self._last_error}"
                ) from exc
            self._backoff = 0.0
            self._last_error = None

    async def _open(self) -> None:
        name = f"mailpipe {self.pipeline} {socket.gethostname()}:{os.getpid()}"
        url = URL(self.opts.addr)
        if "heartbeat" not in url.query:
            url = url.update_query(heartbeat=HEARTBEAT)
        self._conn = conn = await aio_pika.connect(
            url, timeout=self.op_timeout, client_properties={"connection_name": name}
        )
        conn.close_callbacks.add(functools.partial(self._on_close, self._generation))
        pub = await conn.channel(publisher_confirms=True, on_return_raises=True)
        sub = await conn.channel(publisher_confirms=False)
        await sub.set_qos(prefetch_count=self.opts.prefetch)
        await self._declare(pub)
        # Only now does _healthy() hold: a caller racing this connect must not publish
        # before the exchange is declared.
        self._pub, self._sub = pub, sub
        self._delay_queues.clear()  # declared again before their next use on this connection
        if self._consuming:
            await self._start_consumer()

    async def _declare(self, channel: AbstractChannel) -> None:
        durable = self.opts.durable
        kind = {"x-queue-type": self.opts.queue_type}
        self._dlx = await channel.declare_exchange(
            self.dlx, aio_pika.ExchangeType.DIRECT, durable=durable
        )
        queue = await channel.declare_queue(self.queue, durable=durable, arguments={
            **kind, "x-dead-letter-exchange": self.dlx, "x-dead-letter-routing-key": self.queue,
        })
        dead = await channel.declare_queue(self.dead_queue, durable=durable, arguments=kind)
        await dead.bind(self._dlx, routing_key=self.queue)
        if not self.opts.exchange:  # the default exchange routes by queue name and is implicit
            self._exchange = channel.default_exchange
            return
        self._exchange = await channel.declare_exchange(
            self.opts.exchange, aio_pika.ExchangeType(self.opts.exchange_type), durable=durable
        )
        await queue.bind(self._exchange, routing_key=self.routing_key)

    def _on_close(self, generation: int, _sender: Any, exc: BaseException | None = None) -> None:
        if generation == self._generation:  # not a connection we already gave up ourselves
            self._last_error = _describe(exc) if exc else "connection closed"
            self._invalidate()

    def _invalidate(self) -> None:
        """Forget everything tied to the current connection: its deliveries cannot be settled
        any more (the broker requeues them itself) and a waiting receive() must wake up."""
        self._generation += 1
        self._consumer = None
        for reservation in self._reserved:
            if reservation.timer is not None:
                reservation.timer.cancel()
        self._reserved.clear()
        old, self._buffer = self._buffer, asyncio.Queue()
        old.put_nowait(_Lost())

    async def _teardown(self) -> None:
        self._invalidate()
        conn, self._conn, self._pub, self._sub = self._conn, None, None, None
        if conn is not None and not conn.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

    async def _call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one broker operation on a live connection, within op_timeout, as DriverError."""
        await self._ensure()
        generation = self._generation
        try:
            return await asyncio.wait_for(operation(), self.op_timeout)
        except DriverError:
            raise
        except TimeoutError as exc:
            # No answer in time: the connection is suspect (a half-open socket looks like this),
            # so the next call starts on a fresh one.
            if generation == self._generation:
                self._last_error = f"{what} timed out"
                await self._teardown()
            raise DriverError(f"RabbitMQ {what} timed out after {self.op_timeout}s") from exc
        except Exception as exc:  # AMQP, channel and socket errors alike
            if generation == self._generation and not self._healthy():
                self._last_error = _describe(exc)
                await self._teardown()
            raise DriverError(f"RabbitMQ {what} failed: {_describe(exc)}") from exc

    # -- producing --------------------------------------------------------------------------

    async def push_batch(self, jobs: list[Job]) -> None:
        if jobs:
            outgoing = [(self._message(job, attempts=0), job.delay) for job in jobs]
            await self._call("publish", lambda: self._publish(outgoing, retry=False))

    def _message(self, job: Job, *, attempts: int, reason: str | None = None) -> aio_pika.Message:
        headers: dict[str, Any] = {name: _as_list(values) for name, values in job.headers.items()}
        headers.update({
            H_HEADERS: list(job.headers), H_ATTEMPTS: attempts, H_PIPELINE: job.pipeline,
            H_PRIORITY: job.priority, H_DELAY: float(job.delay), H_AUTO_ACK: job.auto_ack,
        })
        if reason is not None:
            headers[H_REASON] = reason
        mode = aio_pika.DeliveryMode.PERSISTENT if self.opts.durable else None
        return aio_pika.Message(
            job.payload, headers=headers, message_id=job.id, type=job.name,
            priority=min(max(job.priority, 0), 255), delivery_mode=mode,
        )

    async def _publish(
        self, outgoing: list[tuple[aio_pika.Message, float]], *, retry: bool
    ) -> None:
        """Publish everything, then wait for all the confirms together (one round trip, not one
        per message). A retry goes straight to the queue, not through a fanout/topic exchange
        that would copy it to other queues again."""
        routes = {delay: await self._route(delay, retry=retry) for _, delay in outgoing}
        results = await asyncio.gather(
            *(routes[delay][0].publish(message, routes[delay][1]) for message, delay in outgoing),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _route(self, delay: float, *, retry: bool) -> tuple[AbstractExchange, str]:
        assert self._pub is not None and self._exchange is not None
        if delay > 0:
            return self._pub.default_exchange, await self._delay_queue(delay)
        if retry or not self.opts.exchange:
            return self._pub.default_exchange, self.queue
        return self._exchange, self.routing_key

    async def _delay_queue(self, delay: float) -> str:
        assert self._pub is not None
        ms = delay_ms(delay)
        name = f"{self.queue}.delay.{ms}"
        declared = self._delay_queues.get(name)
        if declared is None or time.monotonic() - declared > DELAY_REDECLARE:
            # x-expires outlives the last message by far: declared at most DELAY_REDECLARE
            # before a publish, the queue lives 2*ttl + 60 s from then.
            await self._pub.declare_queue(name, durable=self.opts.durable, arguments={
                "x-queue-type": "classic", "x-message-ttl": ms, "x-expires": 2 * ms + 60_000,
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.queue,
            })
            self._delay_queues[name] = time.monotonic()
        return name

    # -- consuming --------------------------------------------------------------------------

    async def _start_consumer(self) -> None:
        async with self._consume_lock:
            if self._consumer_generation == self._generation:
                return  # another receive() or the reconnection in _ensure() started it
            assert self._sub is not None
            generation = self._generation
            queue = await self._sub.get_queue(self.queue, ensure=False)
            tag = await queue.consume(functools.partial(self._on_message, generation))
            self._consumer = (queue, tag)
            self._consumer_generation = generation
            self._consuming = True

    async def _on_message(self, generation: int, message: AbstractIncomingMessage) -> None:
        if generation != self._generation:
            return  # from a connection already given up: the broker requeues it
        reservation = _Reservation(message, generation)
        self._reserved.add(reservation)
        self._buffer.put_nowait(reservation)

    def _expire(self, reservation: _Reservation) -> None:
        """Visibility timeout: hand the message back so that another consumer gets it."""
        if reservation.settled or reservation.generation != self._generation:
            return
        reservation.expired = True
        self._reserved.discard(reservation)
        task = asyncio.get_running_loop().create_task(self._give_back(reservation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back(self, reservation: _Reservation) -> None:
        # A job held this long means this process is not consuming right now (its workers are
        # stuck, or it was abandoned): stop the broker pushing jobs here until the next
        # receive(), before giving this one back, or it could come straight back here.
        await self._pause_consumer()
        self._recycle_buffered()
        if not reservation.handed_out:
            # Prefetched but never handed out: not an attempt. Counted, it would bounce until
            # max_attempts without ever running.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._recycle(reservation), self.op_timeout)
                return
        with contextlib.suppress(Exception):  # if the channel is gone, the broker requeued it
            await asyncio.wait_for(reservation.message.nack(requeue=True), self.op_timeout)

    def _recycle_buffered(self) -> None:
        """A stuck consumer also gives back what waits in its prefetch buffer, unattempted."""
        for waiting in [r for r in self._reserved if not r.handed_out and not r.settled]:
            waiting.expired = True
            self._reserved.discard(waiting)
            task = asyncio.get_running_loop().create_task(self._give_back_unattempted(waiting))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _give_back_unattempted(self, reservation: _Reservation) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._recycle(reservation), self.op_timeout)
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reservation.message.nack(requeue=True), self.op_timeout)

    async def _recycle(self, reservation: _Reservation) -> None:
        """Republish a message that was never handed out with its attempt count unchanged, then
        ack it."""
        if reservation.generation != self._generation or not self._healthy():
            raise DriverError("connection lost")  # the broker has requeued it already
        message = reservation.message
        copy = self._message(self._job(message), attempts=attempt_of(message) - 1)
        await self._publish([(copy, 0.0)], retry=True)
        await message.ack()

    async def _pause_consumer(self) -> None:
        # Under the lock: concurrent give-backs wait until the broker confirmed the cancel.
        async with self._consume_lock:
            consumer, self._consumer = self._consumer, None
            if consumer is None or self._consumer_generation != self._generation:
                return
            self._consumer_generation = -1  # the next receive() consumes again
            queue, tag = consumer
            with contextlib.suppress(Exception):
                await asyncio.wait_for(queue.cancel(tag), self.op_timeout)

    async def receive(self, max_items: int, timeout: float) -> list[Delivery]:
        if self._consumer_generation != self._generation or not self._healthy():
            await self._call("consume", self._start_consumer)
        buffer = self._buffer
        deliveries: list[Delivery] = []
        deadline = time.monotonic() + max(timeout, 0.0)
        while not deliveries:
            if buffer.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                try:
                    item = await asyncio.wait_for(buffer.get(), remaining)
                except TimeoutError:
                    return []
            else:
                item = buffer.get_nowait()
            self._take(buffer, item, deliveries)
            while len(deliveries) < max_items and not buffer.empty():
                self._take(buffer, buffer.get_nowait(), deliveries)
        return deliveries

    def _take(self, buffer: asyncio.Queue[Any], item: Any, deliveries: list[Delivery]) -> None:
        if isinstance(item, _Lost):
            buffer.put_nowait(item)  # wake the other receivers waiting on this buffer too
            raise DriverError(f"RabbitMQ connection lost: {self._last_error}")
        if item.expired or item.settled or item.generation != self._generation:
            return  # given back already (visibility timeout, lost connection)
        item.handed_out = True
        # The visibility clock runs from the hand-over: a job waiting in the prefetch buffer of
        # a live consumer is not being worked on late, it is queued (and the consumer asks only
        # for as many jobs as it has free workers).
        timeout = self.opts.visibility_timeout
        if timeout and timeout > 0:
            item.timer = asyncio.get_running_loop().call_later(timeout, self._expire, item)
        message = item.message
        deliveries.append(Delivery(self._job(message), attempt_of(message), item, self.queue))

    def _job(self, message: AbstractIncomingMessage) -> Job:
        headers = message.headers or {}
        names = headers.get(H_HEADERS)
        if not isinstance(names, list):  # published by someone else: plain headers are the job's
            names = [name for name in headers if not name.startswith("x-")]
        return Job(
            id=message.message_id or str(uuid.uuid4()),
            payload=message.body,
            name=message.type or JOB_NAME,
            headers={_as_str(n): _as_list(headers[_as_str(n)]) for n in names
                     if _as_str(n) in headers},
            pipeline=_as_str(headers.get(H_PIPELINE, self.pipeline)),
            priority=_as_int(headers.get(H_PRIORITY), message.priority or self.opts.priority),
            delay=float(headers.get(H_DELAY) or 0.0),
            auto_ack=bool(headers.get(H_AUTO_ACK, False)),
        )

    def _reservation(self, delivery: Delivery) -> _Reservation:
        reservation = delivery.ref
        if not isinstance(reservation, _Reservation):
            raise DriverError("not a delivery of the amqp driver")
        if reservation.settled:
            raise DriverError(f"job {delivery.job.id} was already acked or nacked")
        if reservation.expired:
            raise DriverError(
                f"job {delivery.job.id} was not settled within visibility_timeout and was "
                "given back to the queue"
            )
        if reservation.generation != self._generation:
            raise DriverError(
                f"the connection job {delivery.job.id} came on was lost; RabbitMQ redelivers it"
            )
        return reservation

    async def _settle(self, reservation: _Reservation, what: str,
                      operation: Callable[[], Awaitable[None]]) -> None:
        # Settled before awaiting, so that the watchdog cannot nack it meanwhile.
        reservation.settled = True
        if reservation.timer is not None:
            reservation.timer.cancel()
        self._reserved.discard(reservation)
        try:
            await asyncio.wait_for(operation(), self.op_timeout)
        except Exception as exc:  # a closed channel: the broker redelivers the message
            raise DriverError(f"RabbitMQ {what} failed: {_describe(exc)}") from exc

    async def ack(self, delivery: Delivery) -> None:
        reservation = self._reservation(delivery)
        await self._settle(reservation, "ack", reservation.message.ack)

    async def nack(self, delivery: Delivery, *, requeue: bool, delay: float = 0.0) -> None:
        reservation = self._reservation(delivery)
        if not requeue:  # the queue's dead-letter exchange moves it to <queue>.dead
            await self._settle(
                reservation, "reject", lambda: reservation.message.reject(requeue=False)
            )
            return
        # Republish (confirmed) then ack, rather than basic.nack: it carries the attempt count
        # (classic queues have none), honours the delay, and goes to the tail of the queue.
        copy = self._message(delivery.job, attempts=delivery.attempt)
        await self._call("requeue", lambda: self._publish([(copy, delay)], retry=True))
        await self._settle(reservation, "ack", reservation.message.ack)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        reservation = self._reservation(delivery)
        copy = self._message(delivery.job, attempts=delivery.attempt, reason=reason)

        async def publish() -> None:
            assert self._dlx is not None
            await self._dlx.publish(copy, self.queue)

        await self._call("dead-letter", publish)
        await self._settle(reservation, "ack", reservation.message.ack)

    # -- inspection -------------------------------------------------------------------------

    async def stats(self) -> PipelineStats:
        return await self._call("stats", self._stats)

    async def _stats(self) -> PipelineStats:
        delay_queues = sorted(self._delay_queues)
        counts = await self._on_queues([self.queue, self.dead_queue, *delay_queues], _count)
        ready, consumers = counts.get(self.queue, (0, 0))
        return PipelineStats(
            pipeline=self.pipeline, driver=self.name, queue=self.queue,
            ready=ready,
            # Only delay queues this process published to are known (AMQP cannot list queues).
            delayed=sum(counts[name][0] for name in delay_queues if name in counts),
            # AMQP does not report unacked counts: these are this process's own reservations.
            reserved=len(self._reserved),
            dead=counts.get(self.dead_queue, (0, 0))[0],
            extra={"consumers": consumers, "queue_type": self.opts.queue_type},
        )

    async def purge(self) -> int:
        async def purge_all() -> int:
            names = [self.queue, *sorted(self._delay_queues)]
            return sum((await self._on_queues(names, _purge)).values())

        return await self._call("purge", purge_all)

    async def _on_queues(
        self, names: list[str], operation: Callable[[AbstractChannel, str], Awaitable[T]]
    ) -> dict[str, T]:
        """Run operation on each queue that exists. A missing queue (an expired delay queue)
        closes the channel that asked (404), so this uses throwaway channels."""
        assert self._conn is not None
        results: dict[str, T] = {}
        channel = await self._conn.channel(publisher_confirms=False)
        try:
            for name in names:
                try:
                    results[name] = await operation(channel, name)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    self._delay_queues.pop(name, None)
                    channel = await self._conn.channel(publisher_confirms=False)
        finally:
            if not channel.is_closed:
                await channel.close()
        return results

    async def close(self) -> None:
        self._closed = True
        self._consuming = False
        self._consumer_generation = -1
        for task in list(self._tasks):
            task.cancel()
        await self._teardown()  # unacked deliveries go back to the queue right away

    def health(self) -> dict[str, Any]:
        return {
            "ok": self._healthy(), "driver": self.name, "addr": self._where(),
            "queue": self.queue, "error": self._last_error,
        }


async def _count(channel: AbstractChannel, name: str) -> tuple[int, int]:
    queue = await channel.declare_queue(name, passive=True)
    result = queue.declaration_result
    return result.message_count or 0, result.consumer_count or 0


async def _purge(channel: AbstractChannel, name: str) -> int:
    queue = await channel.get_queue(name, ensure=False)
    result = await queue.purge()
    return result.message_count or 0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _as_str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _as_list(value: Any) -> list[str]:
    values = value if isinstance(value, list | tuple) else [value]
    return [_as_str(item) for item in values]


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
