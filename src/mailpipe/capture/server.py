"""The asyncio side of the SMTP server: listeners, one Protocol per connection, limits,
timeouts, STARTTLS and graceful shutdown. The SMTP conversation itself lives in the sans-I/O
`SMTPConnection`; this module only moves bytes and events between it and the world."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import cast

from mailpipe.capture.message import EventOptions, SessionInfo
from mailpipe.capture.offload import EventBuilder
from mailpipe.capture.protocol import ProtocolSettings, SMTPConnection
from mailpipe.capture.spool import SPOOL_FAILED, Spooler
from mailpipe.capture.tls import server_context
from mailpipe.capture.types import (
    PROCEED,
    BodyChunk,
    BodyDropped,
    Close,
    Envelope,
    Event,
    MessageReceived,
    Proceed,
    Reply,
    Send,
    Stage,
    StartTLS,
    Trace,
    Verdict,
    VerdictNeeded,
    Violation,
)
from mailpipe.capture.verdicts import VerdictContext, Verdicts
from mailpipe.config import ResolvedListener, split_host_port
from mailpipe.event import CapturedEmail, new_uuid
from mailpipe.metrics import Metrics
from mailpipe.sinks.dispatch import Dispatcher

log = logging.getLogger("mailpipe.capture")

REPLY_RETRY = Reply(451, "4.3.0 Temporary failure, please retry")
REPLY_TOO_MANY = Reply(421, "4.7.0 Too many connections, try again later")
REPLY_CLOSING = Reply(421, "4.3.2 Closing connection")
REPLY_CLOSED_BY_ADMIN = Reply(421, "4.3.2 Connection closed by administrator")
_now = partial(datetime.now, UTC)


def protocol_settings(
    listener: ResolvedListener, *, spool_threshold: int, transcript: bool, tls_available: bool
) -> ProtocolSettings:
    """The protocol core's settings for one listener: every limit comes from its config."""
    return ProtocolSettings(
        hostname=listener.hostname,
        max_message_size=listener.max_message_size,
        max_recipients=listener.max_recipients,
        max_line_length=listener.max_line_length,
        spool_threshold=spool_threshold,
        auth_mechanisms=tuple(listener.auth.mechanisms),
        tls_available=tls_available,
        transcript=transcript,
        trace=log.isEnabledFor(logging.DEBUG),
    )


def format_addr(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer or "")


class ListenerMetrics:
    """One listener's labelled metrics, looked up once: `.labels()` is not free per email."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.accepted = metrics.emails_accepted.labels(name)
        self.rejected_sink = metrics.emails_rejected.labels(name, "sink")
        self.rejected_error = metrics.emails_rejected.labels(name, "error")
        self.bytes = metrics.bytes_received.labels(name)
        self.active = metrics.connections_active.labels(name)
        self.total = metrics.connections_total.labels(name)
        self.refused = metrics.connections_refused.labels(name)
        self.violations = metrics.protocol_violations.labels(name)
        self.parse_latency = metrics.parse_latency


@dataclass
class Listener:
    """One configured SMTP listener and what its sessions share."""

    config: ResolvedListener
    settings: ProtocolSettings
    ssl_context: ssl.SSLContext | None
    metrics: ListenerMetrics
    sessions: set[SMTPSession] = field(default_factory=set)
    server: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def implicit_tls(self) -> bool:
        return self.config.tls is not None and self.config.tls.mode == "implicit"


class CaptureServer:
    """All listeners and their live sessions."""

    def __init__(
        self,
        listeners: list[ResolvedListener],
        *,
        dispatcher: Dispatcher,
        metrics: Metrics,
        event_options: EventOptions,
        transcript: bool,
        spool_threshold: int,
        data_dir: Path | None = None,
        verdicts: Verdicts | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.verdicts = verdicts if verdicts is not None else Verdicts()
        self.metrics = metrics
        self.event_options = event_options
        self.listeners = [
            self._make_listener(item, transcript, spool_threshold, data_dir) for item in listeners
        ]
        self.stopping = False
        self.builder = EventBuilder()

    def _make_listener(
        self,
        item: ResolvedListener,
        transcript: bool,
        spool_threshold: int,
        data_dir: Path | None,
    ) -> Listener:
        context = server_context(item.tls, item.hostname, data_dir) if item.tls else None
        settings = protocol_settings(
            item,
            spool_threshold=spool_threshold,
            transcript=transcript,
            tls_available=context is not None and item.tls is not None
            and item.tls.mode == "starttls",
        )
        return Listener(
            config=item,
            settings=settings,
            ssl_context=context,
            metrics=ListenerMetrics(self.metrics, item.name),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            host, port = split_host_port(listener.config.addr)
            listener.server = await loop.create_server(
                lambda lst=listener: SMTPSession(self, lst),
                host,
                port,
                ssl=listener.ssl_context if listener.implicit_tls else None,
                # A client that never starts the handshake is idle like any other.
                ssl_handshake_timeout=listener.config.read_timeout if listener.implicit_tls
                else None,
                reuse_address=True,
                backlog=1024,
            )
            bound = listener.server.sockets[0].getsockname()
            log.info(
                "SMTP listening on %s",
                format_addr(bound),
                extra={"server": listener.name, "tls": _tls_label(listener)},
            )

    def addresses(self) -> dict[str, str]:
        """Listener name to the address it is bound to (the real port when 0 was asked)."""
        out = {}
        for listener in self.listeners:
            if listener.server and listener.server.sockets:
                out[listener.name] = format_addr(listener.server.sockets[0].getsockname())
        return out

    def sessions(self) -> Iterable[SMTPSession]:
        for listener in self.listeners:
            yield from listener.sessions

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let messages in flight finish, 421 the idle sessions."""
        self.stopping = True
        for listener in self.listeners:
            if listener.server:
                listener.server.close()
        for session in list(self.sessions()):
            session.request_close()
        deadline = time.monotonic() + timeout
        while any(True for _ in self.sessions()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for session in list(self.sessions()):
            log.warning("closing session still busy at shutdown", extra={"session": session.id})
            session.abort()
        for listener in self.listeners:
            if listener.server:
                await listener.server.wait_closed()
        self.builder.close()


def _tls_label(listener: Listener) -> str:
    if listener.ssl_context is None:
        return "off"
    return "implicit" if listener.implicit_tls else "starttls"


class SMTPSession(asyncio.Protocol):
    """One SMTP connection: feeds received bytes to the protocol core and acts on its events."""

    def __init__(self, server: CaptureServer, listener: Listener) -> None:
        self.server = server
        self.listener = listener
        self.id = new_uuid()
        self.conn = SMTPConnection(listener.settings, clock=_now, tls_active=listener.implicit_tls,
                                   held=server.verdicts.held)
        self.transport: asyncio.Transport | None = None
        self.remote_addr = ""
        self.local_addr = ""
        self.since = datetime.now(UTC)
        self.emails = 0
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._delivering: asyncio.Future[None] | None = None
        self._tls_task: asyncio.Future[None] | None = None
        self._closing = False
        self._write_blocked = False
        self._closing_after_reply = False
        self.spooler = Spooler()
        self._asking: asyncio.Future[None] | None = None
        self._store: dict[str, object] | None = None  # for verdict callables, made on demand
        self._close_reply: Reply | None = None  # why the server closes it, when not shutdown

    # ---- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.remote_addr = format_addr(transport.get_extra_info("peername"))
        self.local_addr = format_addr(transport.get_extra_info("sockname"))
        metrics = self.listener.metrics
        if len(self.listener.sessions) >= self.listener.config.max_connections:
            metrics.refused.inc()
            log.warning("refusing connection: max_connections reached",
                        extra={"remote": self.remote_addr, "server": self.listener.name})
            transport.write(REPLY_TOO_MANY.encode())
            transport.close()
            return
        self.listener.sessions.add(self)
        metrics.total.inc()
        metrics.active.inc()
        log.info("connection opened", extra={"session": self.id, "remote": self.remote_addr,
                                              "server": self.listener.name})
        self._arm_idle_timer(self.listener.config.read_timeout)
        self._handle(self.conn.start())
        if self.server.stopping:
            self.request_close()

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        self._handle(self.conn.receive(data))
        if self._closing:
            self.request_close()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost()
        self.spooler.drop()
        for timer in (self._idle_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        if self in self.listener.sessions:
            self.listener.sessions.discard(self)
            self.listener.metrics.active.dec()
            log.info("connection closed", extra={"session": self.id, "emails": self.emails})

    def pause_writing(self) -> None:
        # The client is not reading our replies: stop reading its commands (or replies would
        # pile up in memory) and give it write_timeout to catch up.
        self._write_blocked = True
        self._update_reading()
        self._write_timer = self._loop.call_later(
            self.listener.config.write_timeout, self._write_timed_out
        )

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._update_reading()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _update_reading(self) -> None:
        """Read only while no email awaits its verdict and the client reads our replies."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._write_blocked or self.conn.awaiting_reply:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # ---- events from the protocol core --------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        transport = self.transport
        for event in events:
            if type(event) is Send:
                if transport is not None:
                    transport.write(event.data)
            elif type(event) is MessageReceived:
                self._update_reading()
                if event.chunked and not self.spooler.attach(event):
                    log.error("could not spool a message body", extra={"session": self.id})
                    self.listener.metrics.rejected_error.inc()
                    self._handle(self.conn.verdict(SPOOL_FAILED))
                    self._update_reading()
                    continue
                self._delivering = asyncio.ensure_future(self._deliver(event))
            elif type(event) is Close:
                if transport is not None:
                    transport.close()
            elif type(event) is StartTLS:
                self._tls_task = asyncio.ensure_future(self._start_tls())
            elif type(event) is Violation:
                self.listener.metrics.violations.inc()
                log.warning("protocol violation: %s", event.text,
                            extra={"session": self.id, "remote": self.remote_addr})
            elif type(event) is Trace:
                log.debug("%s: %s", event.direction, event.line, extra={"session": self.id})
            elif type(event) is BodyChunk:
                self.spooler.chunk(event.data)
            elif type(event) is BodyDropped:
                self.spooler.drop()
            elif type(event) is VerdictNeeded:
                self._update_reading()
                self._asking = asyncio.ensure_future(self._ask(event))

    # ---- verdicts -----------------------------------------------------------------

    def _context(self, stage: Stage, args: dict[str, object], envelope: Envelope | None,
                 email: CapturedEmail | None = None) -> VerdictContext:
        if self._store is None:
            self._store = {}
        return VerdictContext(
            stage=stage, session=self.id, server=self.listener.name,
            remote_addr=self.remote_addr, local_addr=self.local_addr,
            tls=self.conn.tls_active, helo=self.conn.helo, auth=self.conn.auth,
            envelope=envelope, args=args, store=self._store, email=email,
        )

    async def _ask(self, needed: VerdictNeeded) -> None:
        context = self._context(needed.stage, needed.args, needed.envelope)
        verdict = await self.server.verdicts.decide(context)
        self._asking = None
        self._answer(verdict)

    async def _message_verdict(self, received: MessageReceived,
                               email: CapturedEmail) -> Verdict:
        """The MESSAGE stage's callables, before the sinks see the message."""
        if Stage.MESSAGE not in self.conn.held:
            return PROCEED
        context = self._context(Stage.MESSAGE, {}, received.envelope, email)
        return await self.server.verdicts.decide(context)

    def _answer(self, verdict: Verdict) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._handle(self.conn.verdict(verdict))
        self._update_reading()
        if self._closing:
            self.request_close()

    async def _deliver(self, received: MessageReceived) -> None:
        reply = REPLY_RETRY
        try:
            email = await self._capture(received)
            verdict = await self._message_verdict(received, email)
            if type(verdict) is not Proceed:  # refused before any sink saw it
                self._delivering = None
                self._answer(verdict)
                return
            delivery = await self.server.dispatcher.deliver(email)
            reply = Reply(delivery.code, f"{delivery.enhanced} {delivery.text}")
            if delivery.accepted:
                self._count_accepted(email)
                if delivery.close:
                    self._closing_after_reply = True
            else:
                self.listener.metrics.rejected_sink.inc()
        except Exception:
            log.exception("could not capture a message", extra={"session": self.id})
            self.listener.metrics.rejected_error.inc()
        finally:
            received.body.discard()
        self._delivering = None
        self._reply(reply)

    def _count_accepted(self, email: CapturedEmail) -> None:
        self.emails += 1
        metrics = self.listener.metrics
        metrics.accepted.inc()
        metrics.bytes.inc(len(email.raw))
        if log.isEnabledFor(logging.INFO):
            envelope = email.event["envelope"]
            log.info("email accepted", extra={
                "uuid": email.uuid, "session": self.id, "from": envelope["from"],
                "to": ",".join(envelope["to"]), "size": len(email.raw)})

    async def _capture(self, received: MessageReceived) -> CapturedEmail:
        started = time.perf_counter()
        session = SessionInfo(
            uuid=self.id,
            remote_addr=self.remote_addr,
            local_addr=self.local_addr,
            server=self.listener.name,
            tls=received.tls,
        )
        email = await self.server.builder.build(
            received.body,
            envelope=received.envelope,
            auth=received.auth,
            session=session,
            received_at=received.received_at,
            options=self.server.event_options,
            violations=received.violations,
            transcript=received.transcript,
        )
        self.listener.metrics.parse_latency.observe(time.perf_counter() - started)
        return email

    def _reply(self, reply: Reply) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        # Closed by the server (shutdown, admin): 421 after the reply; by a worker's CLOSE: 221.
        closing = (self._close_reply or REPLY_CLOSING) if self._closing else None
        close_after = self._closing or self._closing_after_reply
        self._handle(self.conn.reply_to_message(reply, close_after=close_after,
                                                close_reply=closing))
        self._update_reading()

    async def _start_tls(self) -> None:
        context = self.listener.ssl_context
        if self.transport is None or context is None:
            return
        try:
            transport = await self._loop.start_tls(
                self.transport, self, context, server_side=True,
                ssl_handshake_timeout=self.listener.config.read_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.warning("TLS handshake failed: %s", exc, extra={"session": self.id})
            self.abort()
            return
        self.transport = transport  # type: ignore[assignment]
        self._handle(self.conn.tls_started())

    # ---- timers and shutdown ------------------------------------------------------

    def _arm_idle_timer(self, delay: float) -> None:
        if delay > 0:
            self._idle_timer = self._loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        timeout = self.listener.config.read_timeout
        idle = self._loop.time() - self._last_activity
        if self.conn.closed:
            return
        if self.conn.awaiting_reply or idle < timeout:
            # A slow sink is our delay, not the client's.
            self._arm_idle_timer(timeout if self.conn.awaiting_reply else timeout - idle)
            return
        log.warning("read timeout, closing", extra={"session": self.id,
                                                     "remote": self.remote_addr})
        self._handle(self.conn.idle_timeout())

    def _write_timed_out(self) -> None:
        log.warning("write timeout, client stopped reading", extra={"session": self.id})
        self.abort()

    def request_close(self, reply: Reply | None = None) -> None:
        """Close now if idle, else right after the message in flight gets its reply. With a
        `reply` (an administrator's close) a message awaiting its verdict does not hold the
        session: its delivery (a hanging worker, say) is cancelled and the client told."""
        self._closing = True
        if reply is not None:
            self._close_reply = reply
            pending = self._delivering or self._asking  # a message's or a stage's verdict
            if self.conn.awaiting_reply and pending is not None:
                pending.cancel()
                self._delivering = self._asking = None
                self._handle(self.conn.close_now(reply))
                return
        if not (self.conn.closed or self.conn.in_transaction or self.conn.awaiting_reply):
            reason = self._close_reply
            self._handle(self.conn.close_now(reason) if reason else self.conn.shutdown())

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def info(self) -> dict[str, object]:
        if self.conn.awaiting_reply:
            state = "delivering"
        elif self.conn.in_data:
            state = "data"
        elif self.conn.in_transaction:
            state = "transaction"
        else:
            state = "idle"
        return {
            "uuid": self.id,
            "remote_addr": self.remote_addr,
            "server": self.listener.name,
            "since": self.since.isoformat(),
            "state": state,
            "emails": self.emails,
            "tls": self.conn.tls_active,
        }
