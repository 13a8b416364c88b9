"""The event-building helper process, and the frames it speaks with mailpipe over its pipes.

`python -m mailpipe.capture.indexer` reads requests on stdin and answers on stdout. Each frame
is a 4-byte little-endian length and a `marshal`ed tuple: flat tuples of str, bytes and
numbers cost a microsecond or two to encode, where pickling the dataclasses would cost tens.

    to the helper:  (OPTIONS, slot, pickled EventOptions)    once per options object
                    (BUILD, id, slot, body bytes or None, spool path or None, envelope...,
                     auth..., session..., received_at (seconds, microseconds), violations,
                     transcript, uuid)
    from it:        (READY, pid)                              once its imports are done
                    (id, event JSON, store index columns)     built
                    (id, None, error text)                    could not build it

The helper answers everything it read in one go with one write, so a busy mailpipe pays one
wake-up per batch, not per email. It exits when its stdin closes: mailpipe closed it, or
died (even by SIGKILL), so no helper outlives it.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import sys
from datetime import UTC, datetime
from typing import Any

from mailpipe.capture.message import EventOptions, SessionInfo, build_event
from mailpipe.capture.types import AuthInfo, Envelope, MessageBody
from mailpipe.store.index import index_columns

OPTIONS = 0
BUILD = 1
READY = 0  # the only reply whose first item is not a request id (ids start at 1)

_LENGTH = 4
# Version 2 writes no back-references: about half the time of the default for these flat
# tuples, which hold no object twice that matters.
_MARSHAL_VERSION = 2
# A frame smaller than this is copied out of the buffer: cheaper than a memoryview of it.
_COPY_BELOW = 64 * 1024
_READ_SIZE = 1 << 20


def frame(item: tuple[Any, ...]) -> bytes:
    payload = marshal.dumps(item, _MARSHAL_VERSION)
    return len(payload).to_bytes(_LENGTH, "little") + payload


def unframe(buf: bytearray) -> list[Any]:
    """The complete frames at the start of `buf`, decoded and removed from it."""
    items = []
    pos, end = 0, len(buf)
    while end - pos >= _LENGTH:
        start = pos + _LENGTH
        stop = start + int.from_bytes(buf[pos:start], "little")
        if stop > end:
            break
        if stop - start < _COPY_BELOW:
            items.append(marshal.loads(buf[start:stop]))
        else:  # a big message or event: read where it lies
            with memoryview(buf) as view, view[start:stop] as payload:
                items.append(marshal.loads(payload))
        pos = stop
    del buf[:pos]
    return items


def build_request(request_id: int, slot: int, body: MessageBody, kwargs: dict[str, Any]) -> bytes:
    """A BUILD frame: build_event's arguments, flattened (a spooled body goes as its path)."""
    envelope: Envelope = kwargs["envelope"]
    auth: AuthInfo = kwargs["auth"]
    session: SessionInfo = kwargs["session"]
    return frame((
        BUILD, request_id, slot, body.data, body.path if body.data is None else None,
        envelope.mail_from, envelope.mail_options, envelope.rcpt_to, envelope.rcpt_options,
        envelope.helo, auth.attempted, auth.mechanism, auth.username, auth.password,
        session.uuid, session.remote_addr, session.local_addr, session.server, session.tls,
        *_instant(kwargs["received_at"]), kwargs.get("violations", ()),
        kwargs.get("transcript"), kwargs["email_uuid"],
    ))


def _instant(moment: datetime) -> tuple[int, int]:
    """(whole seconds since the epoch, microseconds): the moment the event's UTC received_at
    shows, cheaper to take apart than isoformat() (naive is UTC, as build_event takes it)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()), moment.microsecond


def _build(request: tuple[Any, ...], options: dict[int, EventOptions]) -> tuple[Any, ...]:
    (_, request_id, slot, data, path, mail_from, mail_options, rcpt_to, rcpt_options, helo,
     attempted, mechanism, username, password, session_uuid, remote_addr, local_addr, server,
     tls, seconds, microseconds, violations, transcript, email_uuid) = request
    raw = data if data is not None else MessageBody(path=path).read()
    email = build_event(
        raw,
        envelope=Envelope(mail_from, mail_options, rcpt_to, rcpt_options, helo),
        auth=AuthInfo(attempted, mechanism, username, password),
        session=SessionInfo(session_uuid, remote_addr, local_addr, server, tls),
        received_at=datetime.fromtimestamp(seconds, UTC).replace(microsecond=microseconds),
        options=options[slot],
        violations=violations,
        transcript=transcript,
        email_uuid=email_uuid,
    )
    return request_id, email.json(), index_columns(email.event, len(raw))


def _answer(request: tuple[Any, ...], options: dict[int, EventOptions]) -> tuple[Any, ...] | None:
    if request[0] == OPTIONS:
        import pickle  # what mailpipe sent: its own EventOptions

        options[request[1]] = pickle.loads(request[2])
        return None
    try:
        return _build(request, options)
    except Exception as exc:  # mailpipe builds this one in place, where it is logged
        return request[1], None, f"{type(exc).__name__}: {exc}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve(stdin: int, stdout: int) -> None:
    options: dict[int, EventOptions] = {}
    buf = bytearray()
    _write_all(stdout, frame((READY, os.getpid())))
    while chunk := os.read(stdin, _READ_SIZE):
        buf += chunk
        replies = [frame(reply) for request in unframe(buf)
                   if (reply := _answer(request, options)) is not None]
        if replies:
            _write_all(stdout, b"".join(replies))


def main() -> None:
    import signal

    # Ctrl-C in a terminal reaches the whole process group: mailpipe decides when this ends
    # (by closing stdin), after the emails in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdout = os.dup(1)
    os.dup2(2, 1)  # a stray print must not corrupt the frames
    sys.stdout = sys.stderr
    with contextlib.suppress(BrokenPipeError):  # mailpipe is gone
        serve(0, stdout)


if __name__ == "__main__":
    main()
