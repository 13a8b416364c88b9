"""The asyncio side of the POP3 server: the listener, one session per connection, the
connection bound, timeouts and STLS. The conversation itself is the sans-I/O `POP3Session`
(protocol.py); this module moves bytes, and answers its events from the store."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

from mailpipe.capture.server import ReadDeadlines, format_addr
from mailpipe.capture.tls import server_context
from mailpipe.capture.types import Close, Send
from mailpipe.config import POP3Config, split_host_port
from mailpipe.pop3.protocol import (
    Delay,
    Event,
    FetchMessage,
    LoadMaildrop,
    POP3Session,
    POP3Settings,
    StartTLS,
    Update,
)
from mailpipe.store.sqlite import SQLiteStore

log = logging.getLogger("mailpipe.pop3")

TOO_MANY = b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
AUTOLOGOUT = b"-ERR autologout: idle for too long\r\n"
SHUTTING_DOWN = b"-ERR [SYS/TEMP] server shutting down\r\n"
# Received bytes queued but not yet processed: past this, reading from the client pauses.
INBOX_HIGH_WATER = 64 * 1024


class POP3Server:
    """The `pop3` listener over the store."""

    def __init__(self, config: POP3Config, store: SQLiteStore, data_dir: Path | None) -> None:
        self.config = config
        self.store = store
        # A self-signed pair of its own (<data_dir>/pop3/tls/): the SMTP listeners' one is
        # made for their hostname, and clients may have been told to trust that file.
        pop3_dir = data_dir / "pop3" if data_dir is not None else None
        self.ssl_context = (server_context(config.tls, config.hostname, pop3_dir)
                            if config.tls else None)
        self.implicit_tls = config.tls is not None and config.tls.mode == "implicit"
        self.settings = POP3Settings(
            hostname=config.hostname,
            users=config.users(),
            tls_available=self.ssl_context is not None and not self.implicit_tls,
            max_line_length=config.max_line_length,
            auth_failure_delay=config.auth_failure_delay,
            max_auth_failures=config.max_auth_failures,
        )
        self.sessions: set[POP3Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        assert self.config.addr is not None
        host, port = split_host_port(self.config.addr)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: POP3Connection(self), host, port,
            ssl=self.ssl_context if self.implicit_tls else None,
            ssl_handshake_timeout=self.config.read_timeout if self.implicit_tls else None,
            reuse_address=True,
        )
        log.info("POP3 listening on %s", self.address(),
                 extra={"tls": "implicit" if self.implicit_tls
                        else "starttls" if self.ssl_context else "off"})

    def address(self) -> str:
        """Where it listens (the real port when 0 was asked)."""
        assert self._server is not None and self._server.sockets
        return format_addr(self._server.sockets[0].getsockname())

    async def stop(self) -> None:
        """Stop listening and end every session: one cut before QUIT deletes nothing
        (RFC 1939: no UPDATE state without QUIT)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for session in list(self.sessions):
            session.shut_down()
        await server.wait_closed()


class POP3Connection(asyncio.Protocol):
    """One client: bytes in through an inbox, worked through in order by one task, since
    some answers wait for the store."""

    def __init__(self, server: POP3Server) -> None:
        self.server = server
        self.core = POP3Session(server.settings, tls_active=server.implicit_tls)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._queued = 0  # bytes in the inbox
        self._reading_paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._task: asyncio.Task[None] | None = None

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = format_addr(transport.get_extra_info("peername"))
        if len(self.server.sessions) >= self.server.config.max_connections:
            log.warning("POP3 connection from %s refused: max_connections (%d) reached",
                        self.peer, self.server.config.max_connections)
            transport.write(TOO_MANY)  # type: ignore[attr-defined]
            transport.close()
            return
        self.server.sessions.add(self)
        self._task = asyncio.ensure_future(self._run())

    def data_received(self, data: bytes) -> None:
        self._inbox.put_nowait(data)
        self._queued += len(data)
        if self._queued > INBOX_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool | None:
        self._inbox.put_nowait(b"")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._inbox.put_nowait(b"")
        self._can_write.set()
        self.server.sessions.discard(self)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # ---- the session ----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            if await self._act(self.core.greeting()):
                await self._serve()
        except Exception:
            log.exception("POP3 session with %s failed", self.peer)
        finally:
            self._close()

    async def _serve(self) -> None:
        timeout = self.server.config.read_timeout
        deadlines = ReadDeadlines(timeout, 0.0, 0, self._loop.time())
        while True:
            wait = deadlines.next_check(self._loop.time(), False)
            try:
                data = await asyncio.wait_for(self._take(), wait)
            except TimeoutError:
                self._write(AUTOLOGOUT)
                log.info("POP3 client %s idle for %gs: closed", self.peer, timeout)
                return
            if not data:
                return  # the client went away: no QUIT, so nothing is deleted
            events = self.core.receive_data(data)
            deadlines.command_read(self._loop.time(), bool(events), self.core.partial_line)
            if not await self._act(events):
                return

    async def _take(self) -> bytes:
        data = await self._inbox.get()
        self._queued -= len(data)
        if self._reading_paused and self._queued < INBOX_HIGH_WATER // 2 and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def _act(self, events: list[Event]) -> bool:
        """Carry out the core's events in order (each may bring more); False once closed."""
        queue = list(events)
        while queue:
            event = queue.pop(0)
            if isinstance(event, Send):
                self._write(event.data)
                await self._drain()
            elif isinstance(event, Close):
                return False
            elif isinstance(event, Delay):
                await asyncio.sleep(event.seconds)
            else:
                queue[:0] = await self._answer(event)
            if self.transport is None or self.transport.is_closing():
                return False
        return True

    async def _answer(self, event: Event) -> list[Event]:
        """The core's answer to an event that needs the store or the transport."""
        store = self.server.store
        try:
            if isinstance(event, LoadMaildrop):
                log.info("POP3 login by %r from %s", event.username, self.peer)
                return self.core.maildrop_loaded(await store.maildrop())
            if isinstance(event, FetchMessage):
                return self.core.message_loaded(await store.raw(event.uuid))
            if isinstance(event, Update):
                results = await asyncio.gather(*(store.delete(u) for u in event.uuids))
                log.info("POP3 client %s deleted %d messages", self.peer, sum(results))
                return self.core.update_done(True)
        except Exception as exc:  # the store failed or closed: the client may try again
            log.warning("POP3 session with %s: store error: %s", self.peer, exc)
            if isinstance(event, LoadMaildrop):
                return self.core.maildrop_loaded(None)
            if isinstance(event, FetchMessage):
                return self.core.store_failed()
            return self.core.update_done(False)
        assert isinstance(event, StartTLS)
        return await self._start_tls()

    async def _start_tls(self) -> list[Event]:
        context = self.server.ssl_context
        assert context is not None and self.transport is not None
        # Clear text the client sent after STLS, before the handshake, is dropped: it must
        # not pass for encrypted input (the core dropped what it had buffered too). Nothing
        # can arrive between this and start_tls(), which stops reading before it awaits.
        while not self._inbox.empty():
            self._queued -= len(self._inbox.get_nowait())
        try:
            self.transport = await self._loop.start_tls(  # type: ignore[assignment]
                self.transport, self, context, server_side=True,
                ssl_handshake_timeout=self.server.config.read_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.warning("POP3 TLS handshake with %s failed: %s", self.peer,
                        exc or type(exc).__name__)
            return [Close()]
        return self.core.tls_started()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _drain(self) -> None:
        """Wait while the client reads slower than we write (a big RETR), within
        read_timeout: a client that stops reading is cut."""
        if not self._can_write.is_set():
            try:
                await asyncio.wait_for(self._can_write.wait(), self.server.config.read_timeout)
            except TimeoutError:
                log.info("POP3 client %s stopped reading: closed", self.peer)
                if self.transport is not None:
                    self.transport.abort()

    def _close(self) -> None:
        self.server.sessions.discard(self)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def shut_down(self) -> None:
        self._write(SHUTTING_DOWN)
        if self._task is not None:
            self._task.cancel()
        self._close()
