"""NATS JetStream pipeline: a file-backed stream, one durable pull consumer shared by every
mailpipe node, and a dead-letter stream beside it.

- Push: every job of a batch is published at once and all PubAcks are awaited together (one
  round trip); `Nats-Msg-Id` = job id, so a batch retried after a timeout is deduplicated.
- Attempts: JetStream's own `num_delivered`, which counts naks and ack_wait expiries alike.
  The consumer never gives up on its own (max_deliver = -1): mailpipe's consumer decides when
  to dead-letter, so JetStream must keep redelivering until it does.
- Visibility: the consumer's `ack_wait` is the pipeline's visibility_timeout.
- Delay: the server here predates scheduled messages (2.12), and nak'ing an early job on the
  main consumer would burn attempts. Delayed jobs therefore go to `<subject>.delayed` in the
  same stream, read by a second durable consumer whose only job is to nak them until due (the
  server's redelivery timer does the waiting) and then move them to `<subject>`. Attempts on
  `<subject>` stay exact.
- Dead letters: copied to `<subject>.dead`, captured by the `<STREAM>_DEAD` stream (limits
  retention, inspectable with `dead_letters()` or any NATS tool), then terminated.
- Receiving: `no_wait` pull requests, polled while idle (every 50 ms at most), never long-poll
  ones: see _Puller for the nats-server 2.9 bug this avoids. Nothing is prefetched: a job is
  reserved only once handed to the caller.
- Big jobs: a payload that would not fit in one message (the server's max_payload, 1 MB by
  default) is stored in chunks in the `<STREAM>_BLOBS` stream, on `<subject>.blob.<id>.<n>`
  (one message per subject: a retried push overwrites), confirmed before the job message that
  points at it; dropped on ack; dead letters keep their own copy under `.deadblob.`.
- Priority is kept in the job but JetStream delivers in stream order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    Header,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext

from mailpipe.config import NATSPipelineOptions, PipelineOptions
from mailpipe.jobs.base import JOB_NAME, Delivery, Driver, DriverError, Job, PipelineStats

log = logging.getLogger(__name__)

OP_TIMEOUT = 5.0  # every broker round trip; the SMTP side answers 451 past its own push_timeout
CONNECT_TIMEOUT = 2.0
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0  # between our own attempts to open a fresh connection
DEDUPE_WINDOW = 120.0  # seconds a job id is remembered, covering any push retry
PROMOTE_BATCH = 256
PROMOTE_POLL = 0.1  # due delayed jobs move to the main subject within this
POLL_MIN, POLL_MAX = 0.005, 0.05  # between no_wait pulls while nothing comes
API_PREFIX = "$JS.API"

H_ID = "Mailpipe-Id"
H_NAME = "Mailpipe-Job"
H_PIPELINE = "Mailpipe-Pipeline"
H_PRIORITY = "Mailpipe-Priority"
H_DELAY = "Mailpipe-Delay"
H_AUTO_ACK = "Mailpipe-Auto-Ack"
H_HEADERS = "Mailpipe-Headers"
H_NOT_BEFORE = "Mailpipe-Not-Before"
H_REASON = "Mailpipe-Dead-Reason"
H_ATTEMPT = "Mailpipe-Attempt"
H_DEAD_AT = "Mailpipe-Dead-At"
H_BLOB = "Mailpipe-Blob"  # "<id> <chunks> <size> <sha256>": the payload is in the blob stream
H_MSG_ID = "Nats-Msg-Id"

BLOB_CHUNK = 256 * 1024  # well under max_payload (1 MB by default), API answers included

_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
_BREAKS = re.compile(r"[\r\n]+")


def _token(text: str) -> str:
    """A name safe as a stream name or a subject token (no dots, spaces, wildcards)."""
    return _NOT_TOKEN.sub("_", text) or "_"


def _single_line(text: str, limit: int = 1000) -> str:
    return _BREAKS.sub(" ", text)[:limit]


class _Puller:
    """Pulls from a durable consumer with `no_wait` requests only, one at a time on an inbox
    of its own: each request is answered at once with what is there (up to its batch) and is
    then gone from the server.

    Why not long-poll requests (nats-py's fetch, with `expires`) or standing ones: nats-server
    2.9 mishandles a redelivery (nak, ack_wait expiry) that falls due while the consumer's only
    waiting requests are dead (expiring, or from a client that left). It sends the job again
    as a first delivery (num_delivered 1, so a crashed consumer's job came back with attempt
    1) and rewinds its cursor, delivering another job twice. No_wait requests never linger,
    so they never leave a dead request behind; the price is polling while idle."""

    def __init__(self, nc: NATS, stream: str, durable: str, epoch: int,
                 on_gone: Callable[[], None]) -> None:
        self.nc, self.epoch, self.durable = nc, epoch, durable
        self.next_subject = f"{API_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = nc.new_inbox()
        self._answers: asyncio.Queue[Msg] = asyncio.Queue()
        self._on_gone = on_gone
        self._sub: Any = None
        self._open = 0  # jobs the request in flight may still bring

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        self._answers.put_nowait(msg)

    async def pull(self, batch: int, wait: float) -> list[Msg]:
        """What the consumer has for us now, up to `batch`; [] when nothing. The server
        answers a no_wait request at once, except when its count of pending jobs is stale
        (just after a purge): then the request stays open, we wait for it up to `wait`, and
        send no other until it is answered."""
        if not self._open:
            request = json.dumps({"batch": batch, "no_wait": True}).encode()
            await self.nc.publish(self.next_subject, request, reply=self.inbox)
            self._open = batch
        msgs: list[Msg] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while self._open and len(msgs) < batch:
                    msg = await self._answers.get()
                    if msg.reply:  # a job (its reply subject is where the ack goes)
                        msgs.append(msg)
                        self._open -= 1
                    elif self._ends_request(msg):
                        self._open = 0
        return msgs

    def _ends_request(self, msg: Msg) -> bool:
        headers = msg.headers or {}
        status = headers.get(Header.STATUS, "")
        if status == "409" and "deleted" in headers.get(Header.DESCRIPTION, "").lower():
            self._on_gone()
        return status != "100"  # 404 nothing, 408 no more, 409 refused; 100 is a heartbeat

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


class NATSDriver(Driver):
    name = "nats"

    def __init__(self, pipeline: str, options: PipelineOptions, *, data_dir: Path) -> None:
        if not isinstance(options, NATSPipelineOptions):
            options = NATSPipelineOptions.model_validate(options.model_dump())
        super().__init__(pipeline, options, data_dir=data_dir)
        self.opts: NATSPipelineOptions = options
        self.stream = options.stream or f"MAILPIPE_{_token(pipeline).upper()}"
        self.subject = options.subject or f"mailpipe.{_token(pipeline)}"
        self.delayed_subject = f"{self.subject}.delayed"
        self.dead_subject = f"{self.subject}.dead"
        self.dead_stream = f"{self.stream}_DEAD"
        self.blob_stream = f"{self.stream}_BLOBS"
        self.blob_prefix = f"{self.subject}.blob"
        self.dead_blob_prefix = f"{self.subject}.deadblob"
        self.durable = options.durable
        self.delay_durable = f"{options.durable}_delayed"
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._declared = False
        self._lock = asyncio.Lock()
        self._pullers: list[_Puller] = []  # idle ones; one per concurrent receive
        self._epoch = 0  # a new connection or a reconnect: pull requests must be made again
        self._promoter: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN
        self._last_error = ""

    # ---- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        nc = self._nc
        if nc is not None and nc.is_connected and self._declared:
            return  # the producer and the consumer call this before every push and receive
        async with self._lock:
            nc = self._nc
            if nc is None or nc.is_closed:
                nc = await self._open()
            elif not nc.is_connected:
                raise self._down()
            if not self._declared:
                async with self._errors("declare"):
                    await self._declare()
                self._declared = True

    async def _open(self) -> NATS:
        now = time.monotonic()
        if now < self._retry_at:
            raise DriverError(f"nats {self._where()}: unreachable ({self._last_error})")
        try:
            # No reconnect loop while the first connection is made, so that an unreachable
            # broker fails this call promptly; the client reconnects forever afterwards.
            nc = await asyncio.wait_for(nats.connect(
                servers=[self.opts.addr], name=f"mailpipe:{self.pipeline}",
                connect_timeout=CONNECT_TIMEOUT, allow_reconnect=False,
                max_reconnect_attempts=1, reconnect_time_wait=0.2, ping_interval=5,
                max_outstanding_pings=2, error_cb=self._on_error,
                disconnected_cb=self._on_disconnect, reconnected_cb=self._on_reconnect,
            ), timeout=CONNECT_TIMEOUT * 2 + 1)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            self._last_error = repr(exc)
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            raise DriverError(f"nats {self._where()}: cannot connect: {exc!r}") from exc
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 0.5
        self._nc, self._js = nc, nc.jetstream(
            timeout=OP_TIMEOUT, publish_async_max_pending=1 << 20
        )
        self._epoch += 1
        self._declared = False
        self._backoff, self._last_error = BACKOFF_MIN, ""
        return nc

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = repr(exc)
        log.debug("nats %s: %r", self.pipeline, exc)

    async def _on_disconnect(self) -> None:
        if self._nc is None:  # our own close()
            return
        log.warning("nats %s: disconnected from %s", self.pipeline, self._where())

    async def _on_reconnect(self) -> None:
        # The broker may be back without its store (a fresh container): declare again before
        # the next call, or a consumer would wait forever on a consumer that is gone. Our pull
        # requests died with the old connection: make new ones.
        self._declared = False
        self._epoch += 1
        log.info("nats %s: reconnected to %s", self.pipeline, self._where())

    def _where(self) -> str:
        parts = urlsplit(self.opts.addr)  # never show credentials
        return f"{parts.hostname}:{parts.port or 4222}" if parts.hostname else self.opts.addr

    def _down(self) -> DriverError:
        detail = f" ({self._last_error})" if self._last_error else ""
        return DriverError(f"nats {self._where()}: connection lost, reconnecting{detail}")

    async def _ready(self) -> tuple[NATS, JetStreamContext]:
        """The live client, declared; DriverError at once while it is reconnecting."""
        nc, js = self._nc, self._js
        if nc is None or js is None or not nc.is_connected or not self._declared:
            if nc is not None and (nc.is_reconnecting or nc.is_connecting):
                raise self._down()
            await self.connect()
            nc, js = self._nc, self._js
        assert nc is not None and js is not None
        return nc, js

    @contextlib.asynccontextmanager
    async def _errors(self, what: str, limit: float = OP_TIMEOUT) -> AsyncIterator[None]:
        """Every client failure becomes DriverError. A JetStream API error (say a stream or
        consumer gone with a broker restarted without its store) makes the next call declare
        everything again: that is idempotent and cheap. `limit` bounds the whole operation,
        writes included (a broker that stops reading would otherwise block them)."""
        try:
            async with asyncio.timeout(limit):
                yield
        except DriverError:
            raise
        except (nats.js.errors.APIError, nats.js.errors.NoStreamResponseError) as exc:
            self._declared = False
            raise DriverError(f"nats {what}: {exc!r}") from exc
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            nc = self._nc
            if nc is not None and not nc.is_connected:
                raise self._down() from exc
            raise DriverError(f"nats {what}: {exc!r}") from exc

    async def _declare(self) -> None:
        assert self._js is not None
        js = self._js
        await self._ensure_stream(js, StreamConfig(
            name=self.stream, subjects=[self.subject, self.delayed_subject],
            retention=RetentionPolicy(self.opts.retention),
            storage=StorageType.FILE, max_age=self.opts.max_age or None,
            duplicate_window=DEDUPE_WINDOW,
        ))
        await self._ensure_stream(js, StreamConfig(
            name=self.dead_stream, subjects=[self.dead_subject], retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE, duplicate_window=DEDUPE_WINDOW,
        ))
        await self._ensure_stream(js, StreamConfig(
            name=self.blob_stream, subjects=[f"{self.blob_prefix}.>", f"{self.dead_blob_prefix}.>"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, max_msgs_per_subject=1,
            allow_direct=True,
        ))
        for durable, subject in ((self.durable, self.subject),
                                 (self.delay_durable, self.delayed_subject)):
            # Unlimited ack-pending: nak'ed-with-delay jobs count as pending and must not stall
            # delivery of the others.
            await js.add_consumer(self.stream, ConsumerConfig(
                name=durable, durable_name=durable, filter_subject=subject,
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.opts.visibility_timeout, max_deliver=-1, max_ack_pending=-1,
            ))

    @staticmethod
    async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # exists with another config: update what may change
                raise
            await js.update_stream(config)

    async def close(self) -> None:
        await self._stop_promoter()
        pullers, self._pullers = self._pullers, []
        for puller in pullers:
            await puller.stop()
        async with self._lock:
            nc, self._nc, self._js = self._nc, None, None
            self._declared = False
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), OP_TIMEOUT)

    def health(self) -> dict[str, Any]:
        nc = self._nc
        if nc is None or nc.is_closed:
            state = "disconnected"
        elif nc.is_connected:
            state = "connected"
        else:
            state = "reconnecting"
        report: dict[str, Any] = {
            "ok": state == "connected", "driver": self.name, "addr": self._where(),
            "stream": self.stream, "subject": self.subject, "state": state,
        }
        if self._last_error and state != "connected":
            report["error"] = self._last_error
        return report

    # ---- producing -------------------------------------------------------------------------

    async def push_batch(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        nc, js = await self._ready()
        async with self._errors("push"):
            now = time.time()
            messages = [(job, self._headers(job, now)) for job in jobs]
            big = [(job, h) for job, h in messages if self._too_big(nc, h, job.payload)]
            if big:  # their chunks are confirmed before any job points at them
                await self._publish_all(js, self.blob_stream, [
                    chunk for job, headers in big
                    for chunk in self._blob(self.blob_prefix, job, headers)
                ])
            await self._publish_all(js, self.stream, [(
                self.delayed_subject if job.delay > 0 else self.subject,
                b"" if H_BLOB in headers else job.payload, headers,
            ) for job, headers in messages])

    @staticmethod
    async def _publish_all(js: JetStreamContext, stream: str,
                           messages: list[tuple[str, bytes, dict[str, str] | None]]) -> None:
        """Publish all, then await every PubAck together: one round trip."""
        futures: list[asyncio.Future[Any]] = []
        try:
            for subject, payload, headers in messages:
                # No wait_stall: the client's pending limit (see _open) is far above any
                # batch, and its wait_for would cost a task per message (4x slower).
                futures.append(await js.publish_async(
                    subject, payload, stream=stream, headers=headers,
                ))
            await asyncio.gather(*futures)
        finally:
            for future in futures:  # release the client's pending slots on failure
                future.cancel()

    # ---- big payloads ----------------------------------------------------------------------

    @staticmethod
    def _too_big(nc: NATS, headers: dict[str, str], payload: bytes) -> bool:
        head = sum(len(k) + len(v) + 4 for k, v in headers.items()) + 64
        return len(payload) + head > nc.max_payload

    @staticmethod
    def _blob(prefix: str, job: Job,
              headers: dict[str, str]) -> list[tuple[str, bytes, dict[str, str] | None]]:
        """The payload's chunks, to publish; `headers` then point at them. The id comes from
        the job id, so that a retried push overwrites its own chunks."""
        blob = hashlib.sha256(job.id.encode()).hexdigest()[:32]
        chunks = [job.payload[i:i + BLOB_CHUNK]
                  for i in range(0, len(job.payload), BLOB_CHUNK)] or [b""]
        digest = hashlib.sha256(job.payload).hexdigest()
        headers[H_BLOB] = f"{blob} {len(chunks)} {len(job.payload)} {digest}"
        return [(f"{prefix}.{blob}.{n}", chunk, None) for n, chunk in enumerate(chunks)]

    async def _get_blob(self, js: JetStreamContext, prefix: str, ref: str) -> bytes | None:
        """The payload, None when its chunks are gone or damaged."""
        blob, count, size, digest = ref.split()
        try:
            raws = await asyncio.gather(*(
                js.get_msg(self.blob_stream, subject=f"{prefix}.{blob}.{n}", direct=True)
                for n in range(int(count))
            ))
        except nats.js.errors.NotFoundError:
            return None
        payload = b"".join(raw.data or b"" for raw in raws)
        if len(payload) != int(size) or hashlib.sha256(payload).hexdigest() != digest:
            return None
        return payload

    async def _drop_blob(self, prefix: str, ref: str) -> None:
        """Best effort: a blob left behind costs disk until the next purge, nothing else."""
        try:
            await self._purge(self.blob_stream, f"{prefix}.{ref.split()[0]}.>")
        except DriverError as exc:
            log.warning("nats %s: could not drop blob %s: %s", self.pipeline, ref, exc)

    @staticmethod
    def _headers(job: Job, now: float) -> dict[str, str]:
        if _BREAKS.search(job.id) or _BREAKS.search(job.name):
            raise DriverError("nats: a job id or name cannot contain line breaks")
        headers = {
            H_MSG_ID: job.id, H_ID: job.id, H_NAME: job.name, H_PRIORITY: str(job.priority),
            H_DELAY: repr(float(job.delay)), H_AUTO_ACK: "1" if job.auto_ack else "0",
        }
        if job.pipeline:
            headers[H_PIPELINE] = job.pipeline
        if job.headers:
            headers[H_HEADERS] = json.dumps(job.headers)  # ASCII-only, one line
        if job.delay > 0:
            headers[H_NOT_BEFORE] = f"{now + job.delay:.6f}"
        return headers

    # ---- consuming -------------------------------------------------------------------------

    async def receive(self, max_items: int, timeout: float) -> list[Delivery]:
        nc, js = await self._ready()
        self._start_promoter()
        async with self._errors("receive", limit=timeout + OP_TIMEOUT):
            msgs = await self._poll(nc, self.durable, max(max_items, 1), timeout)
            deliveries = [Delivery(self._job(m), m.metadata.num_delivered, m, self.subject)
                          for m in msgs]
            whole = await asyncio.gather(*(self._fill(js, d) for d in deliveries))
        return [d for d, ok in zip(deliveries, whole, strict=True) if ok]

    async def _fill(self, js: JetStreamContext, delivery: Delivery) -> bool:
        """Load a big job's payload from its blob; a job whose blob is gone (a late duplicate
        of a job done since, a blob removed by hand) goes to the dead letters, not to work."""
        ref = (delivery.ref.headers or {}).get(H_BLOB)
        if ref is None:
            return True
        payload = await self._get_blob(js, self.blob_prefix, ref)
        if payload is None:
            log.error("nats %s: job %s: payload blob missing", self.pipeline, delivery.job.id)
            try:
                await self.dead_letter(delivery, f"payload blob {ref.split()[0]} missing")
            except DriverError as exc:  # it comes back after the visibility timeout
                log.error("nats %s: job %s: %s", self.pipeline, delivery.job.id, exc)
            return False
        delivery.job.payload = payload
        return True

    async def _poll(self, nc: NATS, durable: str, batch: int, timeout: float,
                    poll_max: float = POLL_MAX) -> list[Msg]:
        """Pull until something comes or `timeout` passed, more often at first: a job pushed
        while we wait is seen within `poll_max`."""
        deadline = time.monotonic() + max(timeout, 0.0)
        interval = POLL_MIN
        puller = await self._take_puller(nc, durable)
        try:
            while True:
                if not nc.is_connected:
                    raise self._down()
                msgs = await puller.pull(batch, max(deadline - time.monotonic(), POLL_MAX))
                remaining = deadline - time.monotonic()
                if msgs or remaining <= 0:
                    return msgs
                await asyncio.sleep(min(interval, remaining))
                interval = min(interval * 2, poll_max)
        finally:
            await self._give_back(puller)

    async def _take_puller(self, nc: NATS, durable: str) -> _Puller:
        stale = [p for p in self._pullers if p.nc is not nc or p.epoch != self._epoch]
        for puller in stale:  # from before a reconnect: their inboxes are of no use any more
            self._pullers.remove(puller)
            await puller.stop()
        for puller in self._pullers:
            if puller.durable == durable:
                self._pullers.remove(puller)
                return puller
        puller = _Puller(nc, self.stream, durable, self._epoch, self._consumer_gone)
        await puller.start()
        return puller

    async def _give_back(self, puller: _Puller) -> None:
        if puller.nc is self._nc and puller.epoch == self._epoch:
            self._pullers.append(puller)
        else:  # from before a reconnect or a close: its inbox is of no use any more
            await puller.stop()

    def _consumer_gone(self) -> None:
        self._declared = False

    def _job(self, msg: Msg) -> Job:
        return self._decode(msg.data, msg.headers or {},
                            f"{self.stream}:{msg.metadata.sequence.stream}")

    @staticmethod
    def _decode(data: bytes, headers: dict[str, str], fallback_id: str) -> Job:
        # A message published by something else than mailpipe is still deliverable.
        return Job(
            id=headers.get(H_ID) or headers.get(H_MSG_ID) or fallback_id, payload=data,
            name=headers.get(H_NAME, JOB_NAME),
            headers=json.loads(headers[H_HEADERS]) if H_HEADERS in headers else {},
            pipeline=headers.get(H_PIPELINE, ""),
            priority=int(headers.get(H_PRIORITY, "10")),
            delay=float(headers.get(H_DELAY, "0")),
            auto_ack=headers.get(H_AUTO_ACK) == "1",
        )

    async def ack(self, delivery: Delivery) -> None:
        await self._answer(delivery, b"+ACK", "ack")
        await self._forget_blob(delivery)

    async def _forget_blob(self, delivery: Delivery) -> None:
        ref = (getattr(delivery.ref, "headers", None) or {}).get(H_BLOB)
        if ref is not None:
            await self._drop_blob(self.blob_prefix, ref)

    async def nack(self, delivery: Delivery, *, requeue: bool, delay: float = 0.0) -> None:
        if not requeue:
            await self.dead_letter(delivery, "nacked without requeue")
            return
        body = b"-NAK"
        if delay > 0:  # the server holds it back; this delivery still counts as an attempt
            body += b" " + json.dumps({"delay": int(delay * 1e9)}).encode()
        await self._answer(delivery, body, "nack")

    async def _answer(self, delivery: Delivery, body: bytes, what: str) -> None:
        """Ack, nak or term as a request, so that the server's reply confirms it. Sent on the
        current client: the message may have come through a connection since replaced."""
        msg: Msg = delivery.ref
        nc, _ = await self._ready()
        async with self._errors(what):
            await nc.request(msg.reply, body, timeout=OP_TIMEOUT)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        nc, js = await self._ready()
        job = delivery.job
        headers = self._headers(job, time.time())
        headers.pop(H_NOT_BEFORE, None)
        headers.update({
            H_REASON: _single_line(reason), H_ATTEMPT: str(delivery.attempt),
            H_DEAD_AT: f"{time.time():.6f}",
            # One dead copy per delivery, however often this call is retried.
            H_MSG_ID: f"{job.id}:dead:{delivery.ref.metadata.sequence.stream}",
        })
        payload = job.payload
        async with self._errors("dead-letter"):
            if self._too_big(nc, headers, payload):  # a copy of its own, kept with the letter
                await self._publish_all(js, self.blob_stream,
                                        self._blob(self.dead_blob_prefix, job, headers))
                payload = b""
            await js.publish(self.dead_subject, payload, timeout=OP_TIMEOUT,
                             stream=self.dead_stream, headers=headers)
        # +TERM removes it from a workqueue stream (as an ack would) and stops redelivery.
        await self._answer(delivery, b"+TERM", "dead-letter")
        await self._forget_blob(delivery)

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The oldest dead letters (they stay in the dead stream): job, attempts, reason,
        dead_at (unix time), seq (in the dead stream)."""
        _, js = await self._ready()
        found: list[dict[str, Any]] = []
        async with self._errors("dead letters", limit=OP_TIMEOUT * 4):
            state = (await js.stream_info(self.dead_stream)).state
            seq = state.first_seq
            while seq <= state.last_seq and len(found) < limit:
                with contextlib.suppress(nats.js.errors.NotFoundError):  # deleted: a gap
                    raw = await js.get_msg(self.dead_stream, seq)
                    headers = raw.headers or {}
                    data = raw.data or b""
                    if H_BLOB in headers:
                        data = await self._get_blob(js, self.dead_blob_prefix,
                                                    headers[H_BLOB]) or b""
                    found.append(self._dead(data, headers, seq))
                seq += 1
        return found

    def _dead(self, data: bytes, headers: dict[str, str], seq: int) -> dict[str, Any]:
        job = self._decode(data, headers, f"{self.dead_stream}:{seq}")
        return {"job": job, "attempts": int(headers.get(H_ATTEMPT, "0")),
                "reason": headers.get(H_REASON, ""),
                "dead_at": float(headers.get(H_DEAD_AT, "0")), "seq": seq}

    async def purge_dead(self) -> int:
        count = await self._purge(self.dead_stream)
        await self._purge(self.blob_stream, f"{self.dead_blob_prefix}.>")
        return count

    # ---- delayed jobs ----------------------------------------------------------------------

    def _start_promoter(self) -> None:
        # Only processes that consume move due jobs: a push-only node has nothing to wait for.
        if self._promoter is None or self._promoter.done():
            self._promoter = asyncio.create_task(self._promote_loop(),
                                                 name=f"nats-delayed:{self.pipeline}")

    async def _stop_promoter(self) -> None:
        task, self._promoter = self._promoter, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _promote_loop(self) -> None:
        while True:
            try:
                nc, js = await self._ready()
                msgs = await self._poll(nc, self.delay_durable, PROMOTE_BATCH, timeout=1.0,
                                        poll_max=PROMOTE_POLL)
                if msgs:
                    async with asyncio.timeout(OP_TIMEOUT * 2):
                        await self._promote(nc, js, msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker is away: try again, never die
                log.debug("nats %s: delayed jobs: %r", self.pipeline, exc)
                if isinstance(exc, nats.js.errors.APIError):
                    self._declared = False
                await asyncio.sleep(1.0)

    async def _promote(self, nc: NATS, js: JetStreamContext, msgs: list[Msg]) -> None:
        """Nak early jobs until they are due (the server's timer waits, not us); publish due
        ones to the main subject, then ack them here."""
        now = time.time()
        due = []
        for msg in msgs:
            remaining = float((msg.headers or {}).get(H_NOT_BEFORE, "0")) - now
            if remaining > 0:
                # Fire and forget: a lost nak only means another look after ack_wait.
                delay = json.dumps({"delay": int((remaining + 0.005) * 1e9)})
                await nc.publish(msg.reply, b"-NAK " + delay.encode())
            else:
                due.append(msg)
        if not due:
            return
        await self._publish_all(js, self.stream, [
            (self.subject, msg.data, self._due_headers(msg)) for msg in due
        ])
        # Only now: a crash in between leaves it here, and the copy's msg id dedupes the retry.
        await asyncio.gather(*(nc.request(m.reply, b"+ACK", timeout=OP_TIMEOUT) for m in due))

    @staticmethod
    def _due_headers(msg: Msg) -> dict[str, str]:
        headers = {k: v for k, v in (msg.headers or {}).items() if k.startswith("Mailpipe-")}
        headers.pop(H_NOT_BEFORE, None)
        # Not the job id: that one is still in the dedupe window from the original push.
        headers[H_MSG_ID] = f"{headers.get(H_ID, '')}:due:{msg.metadata.sequence.stream}"
        return headers

    # ---- admin -----------------------------------------------------------------------------

    async def stats(self) -> PipelineStats:
        _, js = await self._ready()
        async with self._errors("stats"):
            main, delayed, stream, dead, blobs = await asyncio.gather(
                js.consumer_info(self.stream, self.durable),
                js.consumer_info(self.stream, self.delay_durable),
                js.stream_info(self.stream),
                js.stream_info(self.dead_stream),
                js.stream_info(self.blob_stream),
            )
        return PipelineStats(
            pipeline=self.pipeline, driver=self.name, queue=self.stream,
            ready=main.num_pending or 0, reserved=main.num_ack_pending or 0,
            delayed=(delayed.num_pending or 0) + (delayed.num_ack_pending or 0),
            dead=dead.state.messages,
            extra={
                "subject": self.subject, "dead_stream": self.dead_stream,
                "redelivered": main.num_redelivered or 0, "waiting": main.num_waiting or 0,
                "messages": stream.state.messages, "bytes": stream.state.bytes,
                "blob_chunks": blobs.state.messages, "blob_bytes": blobs.state.bytes,
            },
        )

    async def purge(self) -> int:
        """Every job of the stream, delayed and reserved ones included; dead letters stay."""
        count = await self._purge(self.stream)
        await self._purge(self.blob_stream, f"{self.blob_prefix}.>")
        return count

    async def _purge(self, stream: str, subject: str | None = None) -> int:
        # The API's answer says how many went; nats-py's purge_stream only says "success".
        nc, _ = await self._ready()
        request = json.dumps({"filter": subject} if subject else {}).encode()
        async with self._errors("purge"):
            reply = await nc.request(f"{API_PREFIX}.STREAM.PURGE.{stream}", request,
                                     timeout=OP_TIMEOUT)
        answer = json.loads(reply.data)
        if "error" in answer:
            raise DriverError(f"nats purge {stream}: {answer['error']}")
        return int(answer.get("purged", 0))
