"""Python SDK for mailpipe workers (RoadRunner's worker protocol, blocking and asyncio).

mailpipe sends each captured email, as one request, to a pool of long-lived worker processes.
A worker reads the EMAIL_RECEIVED event, does what it wants with it, and answers ``CONTINUE``
(the SMTP session goes on) or ``CLOSE`` (mailpipe answers 250, then closes the session with
221). A worker in 10 lines::

    import sys
    from mailpipe.sdk import Worker

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
    from mailpipe.sdk import AsyncWorker

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

Jobs consumers
--------------

With jobs delivery (``smtp.jobs``) each email becomes a job on a pipeline, and ``mailpipe jobs
consume`` (or ``serve`` with ``jobs.consume``) runs a pool of consumers with ``RR_MODE=jobs``.
A consumer answers each job, not each SMTP session::

    from mailpipe.sdk import Consumer

    consumer = Consumer.create()
    for job in consumer:                    # ReceivedJob: id, name, pipeline, queue, driver,
        email = job.email                   # headers, payload (bytes), email (typed Email)
        if handle(email):
            job.ack()                       # done: removed from the pipeline
        else:
            job.nack(requeue=True, delay=5) # again in 5 s (dead after max_attempts)

- ``job.ack()`` (type 2), ``job.nack(requeue=False, delay=0, message="")`` (type 3: requeued
  with ``requeue``, else dead-lettered), ``job.requeue(delay=0, message="")`` (type 4),
  ``job.fail(message, requeue=False, delay=0)`` (type 1, PHP's ``fail()``). Delays travel as
  whole seconds (RoadRunner's ``delay_seconds``): fractions round up.
- Answer each job exactly once, before asking for the next: a job still unanswered when the
  loop asks for the next one is a bug in the consumer; it is nacked with requeue (and a warning
  on stderr) so it is not lost. Answering a job twice, or after that, raises.
- An exception inside the ``for`` body ends the loop and the process (the job in hand comes
  back after the worker dies). ``consumer.process(handler)`` does the loop for you: ``handler
  (job)`` returning means ack (unless it answered itself); raising prints the traceback to
  stderr and fails the job with requeue.
- Delivery is at least once: the same job (same ``job.id`` = the email's uuid) may come twice.
- ``AsyncConsumer`` is the same over asyncio: ``async for job in consumer: await job.ack()``.

Wire details (docs/protocols.md section 2): mailpipe opens with a control frame
``{"pid":N}`` and the worker answers with its own pid (also any later ``{"pid":…}``). A request
has one option, the context length; its context is the event JSON and its body the raw message
(empty unless ``include_raw`` is on). A response has flags 0 and one option = len(context).
In jobs mode (section 3.3, 3.4) the request has flags CODEC_RAW, its context is the job's
metadata ``{"id","job","driver","queue","headers","pipeline"}`` and its body the job payload
(the event JSON); the answer is ``{"type":N,"data":{...}}`` in the response body, context empty.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.message
import email.policy
import inspect
import math
import os
import re
import socket
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Self

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
    "AsyncConsumer",
    "AsyncReceivedJob",
    "AsyncWorker",
    "Attachment",
    "Auth",
    "Consumer",
    "Email",
    "ReceivedJob",
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
    """The exact bytes received: mailpipe writes `raw` as UTF-8 text when the bytes are valid
    UTF-8, else as Latin-1 text (one code point a byte); base64 is accepted too."""
    text = message["raw"]
    encoding = message.get("raw_encoding") or "utf-8"
    if encoding == "base64":
        return base64.b64decode(text)
    if encoding == "latin-1":
        return text.encode("latin-1")
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


class _PipeChannel:
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


class _SocketChannel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self) -> bytes:
        return self.sock.recv(1 << 16)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _connect(address: str) -> _PipeChannel | _SocketChannel:
    kind, arg1, arg2 = _parse_relay(address)
    if kind == "pipes":
        return _PipeChannel(*_take_pipes())
    if kind == "tcp":
        assert arg1 is not None and arg2 is not None
        sock = socket.create_connection((arg1, int(arg2)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _SocketChannel(sock)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    assert arg1 is not None
    sock.connect(arg1)
    return _SocketChannel(sock)


# --------------------------------------------------------------------------- protocol core


class _Core:
    """The protocol state shared by every worker and consumer (sans-I/O): the pid handshake,
    the stop frame, stray stream frames; ``on_request`` reads one request."""

    def __init__(self) -> None:
        self.pending: Any = None
        self.done = False

    def on_frame(self, frame: Frame) -> tuple[bytes | None, Any]:
        """``(reply to send or None, request item or None)``; sets ``done`` on the stop frame."""
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
            document = orjson.loads(context)
            if not isinstance(document, dict):
                raise ValueError(f"the context is JSON {type(document).__name__}, not an object")
            # An object of the wrong shape ({"envelope": true}) fails here, with a
            # TypeError or AttributeError: a bad request too, not a reason to die.
            request = self.on_request(document, body)
        except (ValueError, TypeError, AttributeError) as exc:  # FrameError, JSONDecodeError too
            # Answer so that mailpipe moves on, instead of dying on one bad request.
            return encode_error(f"mailpipe.sdk: bad request: {exc}"), None
        self.pending = request
        return None, request

    def on_request(self, context: dict[str, Any], body: bytes) -> Any:
        """SMTP mode: the context is the event, the body the raw message."""
        return Email.from_event(context, body)

    def answer(self, data: bytes) -> bytes:
        if self.pending is None:
            raise WorkerProtocolError("no email to answer: call wait_email() (or iterate) first")
        self.pending = None
        return data

    def auto_answer(self) -> bytes | None:
        """The answer for a request the application left unanswered (SMTP mode: CONTINUE)."""
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


def _env_relay() -> tuple[str, str]:
    """RR_RELAY (default pipes) and RR_MODE, as PHP's ``Environment::fromGlobals()``."""
    return os.environ.get("RR_RELAY") or "pipes", os.environ.get("RR_MODE", "")


# --------------------------------------------------------------------------- blocking channel


class _Channel:
    """A blocking frame channel over the relay, driven by a protocol core."""

    def __init__(self, relay: str, mode: str, core: _Core) -> None:
        self.relay_address = relay
        self.mode = mode
        self._relay = _connect(relay)
        self._decoder = FrameDecoder()
        self._core = core

    @classmethod
    def create(cls) -> Self:
        """From the environment, like PHP's ``Worker::create()``: RR_RELAY (default pipes)."""
        relay, mode = _env_relay()
        return cls(relay, mode=mode)

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

    def _send(self, data: bytes) -> None:
        self._relay.send(data)

    def _receive(self) -> Any:
        """The next request item, or None once mailpipe stops this process."""
        if (auto := self._core.auto_answer()) is not None:
            self._send(auto)
        while not self._core.done:
            frame = self._next_frame()
            if frame is None:
                self._core.done = True
                break
            reply, item = self._core.on_frame(frame)
            if reply is not None:
                self._send(reply)
            if item is not None:
                return item
        return None

    def stop(self) -> None:
        """Ask to be replaced (RoadRunner's ``Worker::stop()``); the request in hand, if any,
        goes to another process. Iteration ends."""
        self._core.pending = None
        self._send(encode_payload(STOP_CONTEXT, b""))
        self._core.done = True

    def close(self) -> None:
        self._relay.close()


# --------------------------------------------------------------------------- blocking worker


class Worker(_Channel):
    """A blocking worker. ``Worker.create()`` connects the relay named by RR_RELAY."""

    def __init__(self, relay: str = "pipes", *, mode: str = "") -> None:
        super().__init__(relay, mode, _Core())

    def wait_email(self) -> Email | None:
        """The next email, or None when mailpipe stops this worker (the loop should end)."""
        mail: Email | None = self._receive()
        return mail

    def __iter__(self) -> Iterator[Email]:
        while (mail := self.wait_email()) is not None:
            yield mail

    def respond(self, context: bytes | str, body: bytes | str = b"") -> None:
        """A raw response frame (context, body); prefer respond_continue()/respond_close()."""
        self._send(self._core.answer(_response(context, body)))

    def respond_continue(self) -> None:
        """250, and the SMTP session stays open for the next email."""
        self.respond(CONTINUE)

    def respond_close(self) -> None:
        """250, then mailpipe closes the SMTP session (221)."""
        self.respond(CLOSE)

    def error(self, message: str) -> None:
        """Report a failure for this email: mailpipe logs it, and still answers 250."""
        self._send(self._core.answer(encode_error(message)))


# --------------------------------------------------------------------------- asyncio channel


class _AsyncChannel:
    """The same over asyncio. Create it anywhere; it connects on first use in the running loop."""

    def __init__(self, relay: str, mode: str, core: _Core) -> None:
        self.relay_address = relay
        self.mode = mode
        self._kind = _parse_relay(relay)
        if self._kind[0] == "pipes":
            _take_pipes()  # protect stdout at once, not on first use
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._core = core

    @classmethod
    def create(cls) -> Self:
        """From the environment (RR_RELAY, default pipes)."""
        relay, mode = _env_relay()
        return cls(relay, mode=mode)

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

    async def _receive(self) -> Any:
        """The next request item, or None once mailpipe stops this process."""
        await self.connect()
        assert self._reader is not None
        if (auto := self._core.auto_answer()) is not None:
            await self._send(auto)
        while not self._core.done:
            try:
                frame = await read_frame(self._reader)
            except (EOFError, ConnectionError):
                self._core.done = True
                break
            reply, item = self._core.on_frame(frame)
            if reply is not None:
                await self._send(reply)
            if item is not None:
                return item
        return None

    async def stop(self) -> None:
        """Ask to be replaced; the request in hand, if any, goes to another process."""
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


# --------------------------------------------------------------------------- asyncio worker


class AsyncWorker(_AsyncChannel):
    """The worker over asyncio. Create it anywhere; it connects on first use in the running loop.

    ::

        worker = AsyncWorker.create()
        async for email in worker:
            await worker.respond_continue()
    """

    def __init__(self, relay: str = "pipes", *, mode: str = "") -> None:
        super().__init__(relay, mode, _Core())

    async def wait_email(self) -> Email | None:
        """The next email, or None when mailpipe stops this worker."""
        mail: Email | None = await self._receive()
        return mail

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


# --------------------------------------------------------------------------- jobs consumers

# The jobs response protocol's types (protocols.md 3.4; mailpipe.jobs.consumer reads them).
JOB_NO_ERROR, JOB_ERROR, JOB_ACK, JOB_NACK, JOB_REQUEUE = 0, 1, 2, 3, 4

UNANSWERED = "mailpipe.sdk: job left unanswered by the consumer"


def _delay_seconds(delay: float) -> int:
    """RoadRunner's ``delay_seconds`` is an integer: fractions round up, never down to 0."""
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay!r}")
    return math.ceil(delay)


def _answer_body(kind: int, data: Mapping[str, Any]) -> bytes:
    return orjson.dumps({"type": kind, "data": data})


def _headers_of(value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict):
        return {}
    return {
        str(k): [str(x) for x in v] if isinstance(v, list) else [str(v)] for k, v in value.items()
    }


@dataclass(eq=False)
class _JobBase:
    """One delivered job: RoadRunner's job context (protocols.md 3.3) and the payload."""

    id: str
    name: str
    pipeline: str
    queue: str
    driver: str
    headers: dict[str, list[str]]
    payload: bytes
    context: dict[str, Any] = field(repr=False)
    answered: bool = field(default=False, init=False)
    nacked_for_you: bool = field(default=False, init=False, repr=False)  # left unanswered

    @classmethod
    def from_request(cls, context: dict[str, Any], payload: bytes) -> Self:
        pipeline = str(context.get("pipeline") or "")
        return cls(
            id=str(context.get("id") or ""),
            name=str(context.get("job") or ""),
            pipeline=pipeline,
            queue=str(context.get("queue") or pipeline),
            driver=str(context.get("driver") or "unknown"),
            headers=_headers_of(context.get("headers")),
            payload=payload,
            context=context,
        )

    @cached_property
    def email(self) -> Email:
        """The EMAIL_RECEIVED event in the payload, typed (ValueError if it is not one)."""
        event = orjson.loads(self.payload)
        if not isinstance(event, dict):
            raise ValueError(f"job {self.id}: the payload is not an EMAIL_RECEIVED event")
        return Email.from_event(event)

    def header(self, name: str) -> str | None:
        """The first value of a job header, or None."""
        values = self.headers.get(name)
        return values[0] if values else None

    def _ack_body(self) -> bytes:
        return _answer_body(JOB_ACK, {})

    def _nack_body(self, requeue: bool, delay: float, message: str) -> bytes:
        data = {"message": message, "requeue": requeue, "delay_seconds": _delay_seconds(delay)}
        return _answer_body(JOB_NACK, data)

    def _requeue_body(self, delay: float, message: str) -> bytes:
        data: dict[str, Any] = {"message": message, "delay_seconds": _delay_seconds(delay)}
        if self.headers:
            data["headers"] = self.headers  # as PHP's requeue(): the copy keeps its headers
        return _answer_body(JOB_REQUEUE, data)

    def _fail_body(self, message: str, requeue: bool, delay: float) -> bytes:
        data: dict[str, Any] = {
            "message": message, "requeue": requeue, "delay_seconds": _delay_seconds(delay),
        }
        if self.headers:
            data["headers"] = self.headers  # as PHP's fail()
        return _answer_body(JOB_ERROR, data)


class _JobsCore(_Core):
    """Jobs mode: the context is the job's metadata, the body its payload; the answer goes in
    the response body with an empty context; an unanswered job is nacked with requeue."""

    def __init__(self, factory: Callable[[dict[str, Any], bytes], _JobBase]) -> None:
        super().__init__()
        self.factory = factory

    def on_request(self, context: dict[str, Any], body: bytes) -> Any:
        return self.factory(context, body)

    def answer_job(self, job: _JobBase, body: bytes) -> bytes:
        if self.pending is not job:
            how = " (nacked with requeue when the next job was requested)" if job.nacked_for_you \
                else ""
            raise WorkerProtocolError(f"job {job.id} is already answered{how}" if job.answered
                                      else f"job {job.id} is not the job in hand")
        job.answered = True
        self.pending = None
        return encode_payload(b"", body)

    def auto_answer(self) -> bytes | None:
        job = self.pending
        if job is None:
            return None
        print(f"mailpipe.sdk: job {job.id} was not answered before the next one was "
              "requested: nacked with requeue", file=sys.stderr, flush=True)
        job.nacked_for_you = True
        return self.answer_job(job, job._nack_body(True, 0, UNANSWERED))


def _check_jobs_mode(mode: str) -> None:
    if mode and mode != "jobs":
        print(f"mailpipe.sdk: RR_MODE is {mode!r}, not 'jobs': is this consumer started by "
              "jobs.pool (or mailpipe jobs consume)?", file=sys.stderr, flush=True)


def _log_failure(job: _JobBase) -> str:
    """Print the traceback of the exception being handled; the message for fail()."""
    exc = sys.exc_info()[1]
    print(f"mailpipe.sdk: job {job.id} failed:", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    sys.stderr.flush()
    return f"{type(exc).__name__}: {exc}"


class ReceivedJob(_JobBase):
    """A job from a blocking :class:`Consumer`. Answer it exactly once."""

    _owner: Consumer

    def _respond(self, body: bytes) -> None:
        self._owner._send(self._owner._core.answer_job(self, body))

    def ack(self) -> None:
        """Done: the job is removed from the pipeline (type 2, ACK)."""
        self._respond(self._ack_body())

    def nack(self, requeue: bool = False, delay: float = 0, message: str = "") -> None:
        """Failed (type 3, NACK): back in the queue after ``delay`` seconds with ``requeue``,
        else dead-lettered at once. mailpipe dead-letters after ``max_attempts`` either way."""
        self._respond(self._nack_body(requeue, delay, message))

    def requeue(self, delay: float = 0, message: str = "") -> None:
        """Put the job back, to be delivered again after ``delay`` seconds (type 4, REQUEUE)."""
        self._respond(self._requeue_body(delay, message))

    def fail(self, message: str, requeue: bool = False, delay: float = 0) -> None:
        """PHP's ``fail()`` (type 1, ERROR): requeued after ``delay``, else dead-lettered."""
        self._respond(self._fail_body(message, requeue, delay))


class Consumer(_Channel):
    """A blocking jobs consumer (RR_MODE=jobs), for ``jobs.pool`` / ``mailpipe jobs consume``.

    ::

        consumer = Consumer.create()
        for job in consumer:
            handle(job.email)
            job.ack()
    """

    _core: _JobsCore

    def __init__(self, relay: str = "pipes", *, mode: str = "jobs") -> None:
        _check_jobs_mode(mode)
        super().__init__(relay, mode, _JobsCore(self._make_job))

    def _make_job(self, context: dict[str, Any], payload: bytes) -> ReceivedJob:
        job = ReceivedJob.from_request(context, payload)
        job._owner = self
        return job

    def wait_job(self) -> ReceivedJob | None:
        """The next job (PHP's ``waitTask()``), or None when mailpipe stops this consumer.
        A previous job left unanswered is nacked with requeue first."""
        job: ReceivedJob | None = self._receive()
        return job

    def __iter__(self) -> Iterator[ReceivedJob]:
        while (job := self.wait_job()) is not None:
            yield job

    def process(self, handler: Callable[[ReceivedJob], object]) -> None:
        """Run ``handler(job)`` on every job until stopped: ack when it returns without
        answering; on an exception, the traceback goes to stderr and the job is failed with
        requeue (mailpipe dead-letters it after ``max_attempts``)."""
        for job in self:
            try:
                handler(job)
            except Exception:
                message = _log_failure(job)
                if not job.answered:
                    job.fail(message, requeue=True)
                continue
            if not job.answered:
                job.ack()


class AsyncReceivedJob(_JobBase):
    """A job from an :class:`AsyncConsumer`; the same answers as :class:`ReceivedJob`, awaited."""

    _owner: AsyncConsumer

    async def _respond(self, body: bytes) -> None:
        await self._owner._send(self._owner._core.answer_job(self, body))

    async def ack(self) -> None:
        await self._respond(self._ack_body())

    async def nack(self, requeue: bool = False, delay: float = 0, message: str = "") -> None:
        await self._respond(self._nack_body(requeue, delay, message))

    async def requeue(self, delay: float = 0, message: str = "") -> None:
        await self._respond(self._requeue_body(delay, message))

    async def fail(self, message: str, requeue: bool = False, delay: float = 0) -> None:
        await self._respond(self._fail_body(message, requeue, delay))


class AsyncConsumer(_AsyncChannel):
    """The jobs consumer over asyncio.

    ::

        consumer = AsyncConsumer.create()
        async for job in consumer:
            await handle(job.email)
            await job.ack()
    """

    _core: _JobsCore

    def __init__(self, relay: str = "pipes", *, mode: str = "jobs") -> None:
        _check_jobs_mode(mode)
        super().__init__(relay, mode, _JobsCore(self._make_job))

    def _make_job(self, context: dict[str, Any], payload: bytes) -> AsyncReceivedJob:
        job = AsyncReceivedJob.from_request(context, payload)
        job._owner = self
        return job

    async def wait_job(self) -> AsyncReceivedJob | None:
        """The next job, or None when mailpipe stops this consumer."""
        job: AsyncReceivedJob | None = await self._receive()
        return job

    async def __aiter__(self) -> AsyncIterator[AsyncReceivedJob]:
        while (job := await self.wait_job()) is not None:
            yield job

    async def process(self, handler: Callable[[AsyncReceivedJob], object]) -> None:
        """As :meth:`Consumer.process`; ``handler`` may be a coroutine function."""
        async for job in self:
            try:
                result = handler(job)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                message = _log_failure(job)
                if not job.answered:
                    await job.fail(message, requeue=True)
                continue
            if not job.answered:
                await job.ack()
