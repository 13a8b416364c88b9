"""A plugin's stderr into mailpipe's logging, read as go-plugin's host reads it (hclog)."""

from __future__ import annotations

import logging
from typing import Any

import orjson

# Attributes of a LogRecord that a plugin's key cannot take as `extra`.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_LEVELS = {
    "trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
    "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR,
}
_PREFIXES = {f"[{name.upper()}]": level for name, level in _LEVELS.items() if name != "warning"}


def log_stderr_line(logger: logging.Logger, plugin: str, raw: bytes) -> None:
    """One stderr line: hclog JSON (@message, @level, other keys as context), or text with a
    [LEVEL] prefix; `panic:` and `fatal error:` at ERROR; anything else at DEBUG."""
    line = raw.decode("utf-8", "replace").rstrip("\r\n")
    if not line.strip():
        return
    entry = _json(line)
    if entry is not None:
        level = _LEVELS.get(str(entry.pop("@level", "")).lower(), logging.DEBUG)
        message = str(entry.pop("@message", ""))
        entry.pop("@timestamp", None)  # mailpipe stamps its own
        logger.log(level, "%s", message, extra={"plugin": plugin, **_extra(entry)})
        return
    logger.log(_text_level(line), "%s", line, extra={"plugin": plugin})


def _json(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) and "@message" in entry else None


def _extra(entry: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in entry.items():
        name = key.lstrip("@")
        if name in _RESERVED or name == "plugin":
            name = f"plugin_{name}"
        out[name] = value
    return out


def _text_level(line: str) -> int:
    for prefix, level in _PREFIXES.items():
        if line.startswith(prefix):
            return level
    if line.startswith(("panic: ", "fatal error: ")):
        return logging.ERROR
    return logging.DEBUG
