"""Logging setup: human console lines or one JSON object per line."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from types import TracebackType

import orjson

# Attributes every LogRecord has; anything else was passed with `extra=` and is context.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

# Characters a client can put in what gets logged (an address, a HELO name, a username) that
# a console or a log viewer would act on: C0 and C1 controls and DEL (escape sequences that
# recolour or rewrite the terminal, a CR or LF that forges a log line), Unicode's line and
# paragraph separators and the bidi overrides (text shown in another order than written).
_UNSAFE = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
           *range(0x2066, 0x206A)]
_ESCAPES = {code: ascii(chr(code))[1:-1] for code in _UNSAFE}  # \x1b, \r, \u2028...


def escape_controls(text: str) -> str:
    """`text` with every unsafe character written as its Python escape."""
    return text.translate(_ESCAPES)


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_context(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    """One line per record; whatever the message and its context hold is escaped here, once,
    so that no call site can forget it (JSON escapes them by itself)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        context = _context(record)
        if context:
            line += " " + " ".join(f"{k}={v}" for k, v in context.items())
        return escape_controls(line)

    def formatException(self, ei: ExcInfo) -> str:
        return _escape_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _escape_lines(super().formatStack(stack_info))


def _escape_lines(text: str) -> str:
    """A traceback keeps its lines; an exception's message may carry a client's value."""
    return "\n".join(escape_controls(line) for line in text.split("\n"))


def setup_logging(level: str = "info", fmt: str = "console") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is off; its other loggers stay at WARNING to keep DEBUG readable.
    logging.getLogger("aiohttp").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("asyncio").setLevel(max(logging.WARNING, root.level))
