"""Python SDK for mailpipe workers (RoadRunner's worker protocol, blocking and asyncio).

mailpipe sends each captured email, as one request, to a pool of long-lived worker processes.
A worker reads the EMAIL_RECEIVED event, does what it wants with it, and answers ``CONTINUE``
(the SMTP session goes on) or ``CLOSE`` (mailpipe answers 250, then closes the session with
221). A worker in 10 lines::

    import sys
    from mailpipe.worker import Worker

    worker = Worker.create()  # RR_RELAY from the environment: pipes (default), tcp://, unix://
    for email in worker:
        print(email.subject, email.mail_from, email.rcpt_to, file=sys.stderr)
        if "[close]" in (email.subject or ""):
            worker.respond_close()
        else:
            worker.respond_continue()

and point mailpipe at it (``server.command: "python3 worker.py"`` in the config). The same with
asyncio::

    import asyncio
    from mailpipe.worker import AsyncWorker

    async def main() -> None:
        worker = AsyncWorker.create()
        async for email in worker:
            await worker.respond_continue()

    asyncio.run(main())

Rules worth knowing:

- ``print()`` is safe: on the pipes relay the worker's stdout carries frames, so the SDK moves
  the frame channel to a private copy of the stdout descriptor and points file descriptor 1 and
  ``sys.stdout`` at stderr when the worker is created (mailpipe logs stderr). Standard input is
  likewise replaced by /dev/null. Create the worker before printing anything.
- Iterating asks for the next email; an email left unanswered is answered ``CONTINUE`` first.
- ``error(message)`` sends an error frame: mailpipe logs it, and still answers 250.
- ``stop()`` asks mailpipe to replace this worker (RoadRunner's ``Worker::stop()``): the email
  in hand is handed to another worker, and the iteration ends.
- Iteration also ends, cleanly, when mailpipe sends the stop control frame or closes the relay.
- If the worker dies or hangs (``exec_ttl``) mailpipe answers 451 to the client and starts a
  new worker.

Wire details (shared/spec/protocols.md section 2): mailpipe opens with a control frame
``{"pid":N}`` and the worker answers with its own pid (also any later ``{"pid":…}``). A request
has one option, the context length; its context is the event JSON and its body the raw message
(empty unless ``include_raw`` is on). A response has flags 0 and one option = len(context).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.message
import email.policy
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import orjson

from mailpipe.workers.goridge import (
    BYTE10_PONG,
    BYTE10_STOP,
    CONTROL,
    Frame,
    FrameDecoder,
    encode_error,
    encode_frame,
    encode_payload,
    read_frame,
)

__all__ = [
    "CLOSE",
    "CONTINUE",
    "AsyncWorker",
    "Attachment",
    "Auth",
    "Email",
    "Worker",
    "WorkerProtocolError",
]

CONTINUE = b"CONTINUE"
CLOSE = b"CLOSE"
STOP_CONTEXT = b'{"stop":true}'

_RELAY_RE = re.compile(r"^(?P<protocol>[^:/]+)://(?P<arg1>[^:]+)(?::(?P<arg2>[^:]+))?$")


class WorkerProtocolError(RuntimeError):
    """Misuse of the protocol (answering with no email in hand) or an unusable relay address."""


# --------------------------------------------------------------------------- the email


@dataclass(slots=True)
class Auth:
    """What the SMTP client sent in AUTH (all None / False when it did not authenticate)."""

    username: str | None = None
    password: str | None = None
    mechanism: str | None = None
    attempted: bool = False


@dataclass(slots=True)
class Attachment:
    filename: str | None
    content_type: str
    size: int
    disposition: str | None = None
    content_id: str | None = None
    sha256: str | None = None
    content: bytes | None = None  # attachment_storage.mode = memory
    path: str | None = None  # attachment_storage.mode = tempfile

    def read(self) -> bytes:
        """The decoded bytes, from the event or from the temp file mailpipe wrote."""
        if self.content is not None:
            return self.content
        if self.path is not None:
            with open(self.path, "rb") as fh:
                return fh.read()
        return b""

    @classmethod
    def from_event(cls, item: Mapping[str, Any]) -> Attachment:
        content = item.get("content")
        return cls(
            filename=item.get("filename"),
            content_type=item.get("content_type", "application/octet-stream"),
            size=item.get("size", 0),
            disposition=item.get("disposition"),
            content_id=item.get("content_id"),
            sha256=item.get("sha256"),
            content=base64.b64decode(content) if content is not None else None,
            path=item.get("path"),
        )


@dataclass
class Email:
    """A typed view of one EMAIL_RECEIVED event (``event`` keeps the whole document)."""

    uuid: str
    event: dict[str, Any]
    raw: bytes
    mail_from: str
    rcpt_to: list[str]
    helo: str
    subject: str | None
    text: str | None
    html: str | None
    headers: dict[str, str]
    attachments: list[Attachment]
    auth: Auth
    received_at: str
    remote_addr: str

    @classmethod
    def from_event(cls, event: dict[str, Any], raw: bytes = b"") -> Email:
        envelope = event.get("envelope") or {}
        message = event.get("message") or {}
        auth = event.get("authentication") or {}
        if not raw and isinstance(message.get("raw"), str):
            raw = _raw_from_event(message)
        return cls(
            uuid=event.get("uuid", ""),
            event=event,
            raw=raw,
            mail_from=envelope.get("from", ""),
            rcpt_to=list(envelope.get("to") or ()),
            helo=envelope.get("helo", ""),
            subject=message.get("subject"),
            text=message.get("text"),
            html=message.get("html"),
            headers=dict(message.get("headers") or {}),
            attachments=[Attachment.from_event(a) for a in event.get("attachments") or ()],
            auth=Auth(
                username=auth.get("username"),
                password=auth.get("password"),
                mechanism=auth.get("mechanism"),
                attempted=bool(auth.get("attempted", False)),
            ),
            received_at=event.get("received_at", ""),
            remote_addr=event.get("remote_addr", ""),
        )

    @cached_property
    def message(self) -> email.message.EmailMessage:
        """The message parsed with the stdlib, from the raw bytes when mailpipe sent them
        (``include_raw``), else rebuilt from the event's headers and bodies."""
        policy = email.policy.default
        if self.raw:
            msg = email.message_from_bytes(self.raw, policy=policy)
            assert isinstance(msg, email.message.EmailMessage)
            return msg
        msg = email.message.EmailMessage(policy=policy)
        for name, value in self.event.get("message", {}).get("header_list") or self.headers.items():
            if name.lower() in ("content-type", "content-transfer-encoding", "mime-version"):
                continue
            with contextlib.suppress(Exception):
                msg[name] = value
        if self.text is not None:
            msg.set_content(self.text)
        if self.html is not None:
            if self.text is None:
                msg.set_content(self.html, subtype="html")
            else:
                msg.add_alternative(self.html, subtype="html")
        return msg


def _raw_from_event(message: Mapping[str, Any]) -> bytes:
    text = message["raw"]
    if message.get("raw_encoding") == "base64":
        return base64.b64decode(text)
    return text.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- relays


def _parse_relay(address: str) -> tuple[str, str | None, str | None]:
    """``("pipes", None, None)``, ``("tcp", host, port)``, ``("unix", path, None)``, as PHP's
    ``Relay::create()`` reads RR_RELAY."""
    if address == "pipes":
        return "pipes", None, None
    match = _RELAY_RE.match(address)
    if match is None:
        raise WorkerProtocolError(f"unknown relay address {address!r} (RR_RELAY)")
    protocol, arg1, arg2 = match["protocol"], match["arg1"], match["arg2"]
    if protocol == "tcp" and arg2 is not None:
        return "tcp", arg1, arg2
    if protocol == "unix":
        return "unix", arg1, None
    if protocol == "pipes" and arg2 is not None:
        if (arg1, arg2) != ("stdin", "stdout"):
            raise WorkerProtocolError(f"unsupported pipes relay {address!r}: only stdin:stdout")
        return "pipes", None, None
    raise WorkerProtocolError(f"unknown relay address {address!r} (RR_RELAY)")


_pipes_taken: tuple[int, int] | None = None


def _take_pipes() -> tuple[int, int]:
    """Private copies of stdin/stdout for frames; fds 0/1 become /dev/null and stderr.

    Done once per process: ``print()``, C extensions and child processes all write to fd 1,
    which from now on is stderr, so nothing can slip between two frames.
    """
    global _pipes_taken
    if _pipes_taken is not None:
        return _pipes_taken
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd in (in_fd, out_fd):
        os.set_inheritable(fd, False)
    sys.stdout = sys.stderr
    with contextlib.suppress(Exception):
        sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    _pipes_taken = (in_fd, out_fd)
    return _pipes_taken


class _FdRelay:
    def __init__(self, in_fd: int, out_fd: int) -> None:
        self.in_fd, self.out_fd = in_fd, out_fd

    def recv(self) -> bytes:
        return os.read(self.in_fd, 1 << 16)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.out_fd, view) :]

    def close(self) -> None:
        pass  # the descriptors belong to the process


class _SocketRelay:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self) -> bytes:
        return self.sock.recv(1 << 16)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _connect(address: str) -> _FdRelay | _SocketRelay:
    kind, arg1, arg2 = _parse_relay(address)
    if kind == "pipes":
        return _FdRelay(*_take_pipes())
    if kind == "tcp":
        assert arg1 is not None and arg2 is not None
        sock = socket.create_connection((arg1, int(arg2)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _SocketRelay(sock)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    assert arg1 is not None
    sock.connect(arg1)
    return _SocketRelay(sock)


# --------------------------------------------------------------------------- protocol core


class _Core:
    """The protocol state shared by Worker and AsyncWorker (sans-I/O)."""

    def __init__(self) -> None:
        self.pending: Email | None = None
        self.done = False

    def on_frame(self, frame: Frame) -> tuple[bytes | None, Email | None]:
        """``(reply to send or None, email or None)``; sets ``done`` on the stop frame."""
        if frame.is_control:
            try:
                document = orjson.loads(frame.payload) if frame.payload else {}
            except orjson.JSONDecodeError:
                return None, None
            if not isinstance(document, dict):
                return None, None
            if document.get("stop"):
                self.done = True
                return None, None
            if document.get("pid"):
                reply = orjson.dumps({"pid": os.getpid()})
                return encode_frame(Frame(CONTROL, reply)), None  # as PHP: flags CONTROL only
            return None, None
        if frame.byte10 & (BYTE10_STOP | BYTE10_PONG):
            return None, None  # stream cancel / pong: nothing is streaming between requests
        try:
            context, body = frame.split()
            event = orjson.loads(context)
            if not isinstance(event, dict):
                raise ValueError(f"the context is JSON {type(event).__name__}, not an object")
        except ValueError as exc:  # FrameError and JSONDecodeError are ValueErrors
            # Answer so that mailpipe moves on, instead of dying on one bad request.
            return encode_error(f"mailpipe.worker: bad request: {exc}"), None
        self.pending = Email.from_event(event, body)
        return None, self.pending

    def answer(self, data: bytes) -> bytes:
        if self.pending is None:
            raise WorkerProtocolError("no email to answer: call wait_email() (or iterate) first")
        self.pending = None
        return data

    def auto_continue(self) -> bytes | None:
        """CONTINUE for an email the application left unanswered."""
        if self.pending is None:
            return None
        self.pending = None
        return encode_payload(CONTINUE, b"")


def _response(context: bytes | str, body: bytes | str) -> bytes:
    if isinstance(context, str):
        context = context.encode()
    if isinstance(body, str):
        body = body.encode()
    return encode_payload(context, body)


# --------------------------------------------------------------------------- blocking worker


class Worker:
    """A blocking worker. ``Worker.create()`` connects the relay named by RR_RELAY."""

    def __init__(self, relay: str = "pipes", *, mode: str = "") -> None:
        self.relay_address = relay
        self.mode = mode
        self._relay = _connect(relay)
        self._decoder = FrameDecoder()
        self._core = _Core()

    @classmethod
    def create(cls) -> Worker:
        """From the environment, like PHP's ``Worker::create()``: RR_RELAY (default pipes)."""
        return cls(os.environ.get("RR_RELAY") or "pipes", mode=os.environ.get("RR_MODE", ""))

    # -- receiving

    def _next_frame(self) -> Frame | None:
        while (frame := self._decoder.next_frame()) is None:
            try:
                data = self._relay.recv()
            except (ConnectionError, OSError):
                data = b""
            if not data:
                return None
            self._decoder.feed(data)
        return frame

    def wait_email(self) -> Email | None:
        """The next email, or None when mailpipe stops this worker (the loop should end)."""
        if (auto := self._core.auto_continue()) is not None:
            self._relay.send(auto)
        while not self._core.done:
            frame = self._next_frame()
            if frame is None:
                self._core.done = True
                break
            reply, mail = self._core.on_frame(frame)
            if reply is not None:
                self._relay.send(reply)
            if mail is not None:
                return mail
        return None

    def __iter__(self) -> Iterator[Email]:
        while (mail := self.wait_email()) is not None:
            yield mail

    # -- answering

    def respond(self, context: bytes | str, body: bytes | str = b"") -> None:
        """A raw response frame (context, body); prefer respond_continue()/respond_close()."""
        self._relay.send(self._core.answer(_response(context, body)))

    def respond_continue(self) -> None:
        """250, and the SMTP session stays open for the next email."""
        self.respond(CONTINUE)

    def respond_close(self) -> None:
        """250, then mailpipe closes the SMTP session (221)."""
        self.respond(CLOSE)

    def error(self, message: str) -> None:
        """Report a failure for this email: mailpipe logs it and still answers 250."""
        self._relay.send(self._core.answer(encode_error(message)))

    def stop(self) -> None:
        """Ask to be replaced (RoadRunner's ``Worker::stop()``); the email in hand, if any,
        goes to another worker. Iteration ends."""
        self._core.pending = None
        self._relay.send(encode_payload(STOP_CONTEXT, b""))
        self._core.done = True

    def close(self) -> None:
        self._relay.close()


# --------------------------------------------------------------------------- asyncio worker


class AsyncWorker:
    """The same over asyncio. Create it anywhere; it connects on first use in the running loop.

    ::

        worker = AsyncWorker.create()
        async for email in worker:
            await worker.respond_continue()
    """

    def __init__(self, relay: str = "pipes", *, mode: str = "") -> None:
        self.relay_address = relay
        self.mode = mode
        self._kind = _parse_relay(relay)
        if self._kind[0] == "pipes":
            _take_pipes()  # protect stdout at once, not on first use
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._core = _Core()

    @classmethod
    def create(cls) -> AsyncWorker:
        """From the environment (RR_RELAY, default pipes)."""
        return cls(os.environ.get("RR_RELAY") or "pipes", mode=os.environ.get("RR_MODE", ""))

    async def connect(self) -> None:
        if self._reader is not None:
            return
        kind, arg1, arg2 = self._kind
        if kind == "tcp":
            assert arg1 is not None and arg2 is not None
            self._reader, self._writer = await asyncio.open_connection(arg1, int(arg2))
            return
        if kind == "unix":
            assert arg1 is not None
            self._reader, self._writer = await asyncio.open_unix_connection(arg1)
            return
        in_fd, out_fd = _take_pipes()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        # File objects over the private descriptors; closing them leaves the fds open.
        stdin = open(in_fd, "rb", 0, closefd=False)  # noqa: SIM115
        stdout = open(out_fd, "wb", 0, closefd=False)  # noqa: SIM115
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, stdout
        )
        self._reader = reader
        self._writer = asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def wait_email(self) -> Email | None:
        """The next email, or None when mailpipe stops this worker."""
        await self.connect()
        assert self._reader is not None
        if (auto := self._core.auto_continue()) is not None:
            await self._send(auto)
        while not self._core.done:
            try:
                frame = await read_frame(self._reader)
            except (EOFError, ConnectionError):
                self._core.done = True
                break
            reply, mail = self._core.on_frame(frame)
            if reply is not None:
                await self._send(reply)
            if mail is not None:
                return mail
        return None

    async def __aiter__(self) -> AsyncIterator[Email]:
        while (mail := await self.wait_email()) is not None:
            yield mail

    async def respond(self, context: bytes | str, body: bytes | str = b"") -> None:
        await self._send(self._core.answer(_response(context, body)))

    async def respond_continue(self) -> None:
        await self.respond(CONTINUE)

    async def respond_close(self) -> None:
        await self.respond(CLOSE)

    async def error(self, message: str) -> None:
        await self._send(self._core.answer(encode_error(message)))

    async def stop(self) -> None:
        await self.connect()
        self._core.pending = None
        await self._send(encode_payload(STOP_CONTEXT, b""))
        self._core.done = True

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer.drain()
            if self._kind[0] != "pipes":
                self._writer.close()
