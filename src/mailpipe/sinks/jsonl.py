"""Writes each event as one JSON line, to a file or to stdout (for piping into jq)."""

from __future__ import annotations

import asyncio
import sys
from typing import BinaryIO

from mailpipe.event import CapturedEmail
from mailpipe.sinks.base import Sink, SinkContext, SinkSettings
from mailpipe.sinks.results import ACCEPTED, Accepted


class JSONLSettings(SinkSettings):
    path: str  # "-": stdout


class JSONLSink(Sink):
    name = "jsonl"
    required = False
    timeout = 0.0  # a write to a file does not wait on anything a timer could cut short
    Settings = JSONLSettings

    @classmethod
    def create(cls, settings: SinkSettings, context: SinkContext) -> JSONLSink:
        assert isinstance(settings, JSONLSettings)
        return cls(settings.path)

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._lock = asyncio.Lock()
        self._last_error: str | None = None

    async def start(self) -> None:
        self._file = sys.stdout.buffer if self.path == "-" else open(self.path, "ab")  # noqa: SIM115

    async def submit(self, email: CapturedEmail) -> Accepted:
        assert self._file is not None, "JSONLSink.start() was not called"
        line = email.json() + b"\n"
        async with self._lock:
            # One write per line keeps lines whole even when another process appends too.
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                self._last_error = f"{self.path}: {exc.strerror or exc}"
                raise
            self._last_error = None
        return ACCEPTED

    def health(self) -> dict[str, object]:
        # An optional sink's failure leaves the service healthy; a required one's does not.
        if self._last_error is None:
            return {"ok": True, "path": self.path}
        return {"ok": not self.required, "path": self.path, "last_error": self._last_error}

    async def close(self) -> None:
        if self._file is not None and self.path != "-":
            self._file.close()
        self._file = None
