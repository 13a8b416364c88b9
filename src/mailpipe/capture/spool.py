"""Where a body too big for memory goes: the core hands it out in BodyChunk events, the
transport writes them here, and the file becomes the message's MessageBody.

Spool files live in the system's temp dir (`TMPDIR`); the MessageBody's owner removes them.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import IO

from .types import MessageBody, MessageReceived, Respond

PREFIX = "mailpipe-spool-"


class BodySpool:
    """One body being written to a temp file. An I/O error is remembered, not raised: the
    core goes on reading the body, and `finish()` then says the body was lost."""

    __slots__ = ("_file", "directory", "failed", "path", "size")

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        self._file: IO[bytes] | None = None
        self.path: str | None = None
        self.size = 0
        self.failed = False

    def write(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            if self._file is None:
                self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open on purpose
                    delete=False, dir=self.directory, prefix=PREFIX
                )
                self.path = self._file.name
            self._file.write(data)
            self.size += len(data)
        except OSError:
            self.discard()
            self.failed = True

    def finish(self, rest: bytes = b"") -> MessageBody | None:
        """The whole body (the file, then `rest`), owned by the caller from now on; None when
        an I/O error lost part of it."""
        if rest:
            self.write(rest)
        if self.failed:
            return None
        if self._file is None:
            return MessageBody(data=b"", size=0)
        try:
            self._file.close()
        except OSError:
            self.discard()
            return None
        body = MessageBody(path=self.path, size=self.size)
        self._file = None
        self.path = None
        return body

    def discard(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        MessageBody(path=self.path).discard()
        self.path = None


# What a client hears when its body could not be stored: retry later, nothing was kept.
SPOOL_FAILED = Respond(451, "4.3.0", "Error: local error in processing")


class Spooler:
    """A session's side of chunked bodies: BodyChunk and BodyDropped events in, the
    MessageBody of a chunked MessageReceived out."""

    __slots__ = ("_spool", "directory")

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        self._spool: BodySpool | None = None

    def chunk(self, data: bytes) -> None:
        if self._spool is None:
            self._spool = BodySpool(self.directory)
        self._spool.write(data)

    def drop(self) -> None:
        if self._spool is not None:
            self._spool.discard()
            self._spool = None

    def attach(self, received: MessageReceived) -> bool:
        """Give a chunked message its spooled body; False when storing it failed (answer
        SPOOL_FAILED then)."""
        spool, self._spool = self._spool, None
        body = spool.finish() if spool is not None else None
        if body is None:
            return False
        received.body = body
        return True
