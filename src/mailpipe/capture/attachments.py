"""Where the decoded bytes of an attachment go: inline in the event, or a private temp file.

Temp files get generated names (uuid + a sanitised extension) so a sender-chosen filename
such as ``../../etc/passwd`` can never pick the path. The sweeper deletes old files, and
only files whose name has that generated shape, so a temp_dir pointed at a shared
directory by mistake loses nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import mimetypes
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

_EXTENSION = re.compile(r"[A-Za-z0-9]{1,16}")
_GENERATED_NAME = re.compile(r"[0-9a-f]{32}(?:\.[a-z0-9]{1,16})?")
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


@dataclass(frozen=True)
class AttachmentStorage:
    """Config `attachment_storage`."""

    mode: Literal["memory", "tempfile"] = "memory"
    temp_dir: str | None = None  # tempfile mode; default <system tmp>/mailpipe-attachments
    cleanup_after: float = 3600.0  # seconds; older files get swept

    def __post_init__(self) -> None:
        if self.mode not in ("memory", "tempfile"):
            raise ValueError(f"attachment_storage.mode: memory or tempfile, not {self.mode!r}")

    @property
    def directory(self) -> str:
        """Absolute directory of tempfile mode."""
        base = self.temp_dir or os.path.join(tempfile.gettempdir(), "mailpipe-attachments")
        return os.path.abspath(base)


def store_attachment(
    storage: AttachmentStorage, data: bytes, filename: str | None, content_type: str
) -> dict[str, str]:
    """`{"content": base64}` in memory mode, `{"path": absolute path}` in tempfile mode.

    Raises OSError when the file cannot be written; the caller decides the fallback.
    """
    if storage.mode == "memory":
        return {"content": base64.b64encode(data).decode("ascii")}
    path = os.path.join(storage.directory, uuid.uuid4().hex + _extension(filename, content_type))
    _write_private(path, data)
    return {"path": path}


def _extension(filename: str | None, content_type: str) -> str:
    """A short alphanumeric extension so the file opens with the right program, or ''."""
    if filename:
        base = re.split(r"[\\/]", filename)[-1]
        stem, dot, ext = base.rpartition(".")
        if dot and stem and _EXTENSION.fullmatch(ext):
            return "." + ext.lower()
    guessed = mimetypes.guess_extension(content_type, strict=True) if "/" in content_type else None
    if guessed and _EXTENSION.fullmatch(guessed[1:]):
        return guessed.lower()
    return ""


def _write_private(path: str, data: bytes) -> None:
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o600)
    except FileNotFoundError:
        # The directory is created lazily (and again if someone removed it meanwhile).
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, _OPEN_FLAGS, 0o600)
    try:
        with open(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        _unlink_quietly(path)
        raise


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def sweep_attachments(storage: AttachmentStorage, now: float | None = None) -> int:
    """Delete generated files older than `cleanup_after`; return how many went.

    Runs in either mode: files left by an earlier tempfile run are swept too.
    """
    cutoff = (time.time() if now is None else now) - storage.cleanup_after
    try:
        entries = os.scandir(storage.directory)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = 0
    with entries:
        for entry in entries:
            if not _GENERATED_NAME.fullmatch(entry.name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue  # raced with another sweeper or a manual clean-up
            except OSError as exc:
                log.warning("cannot sweep attachment file %s: %s", entry.path, exc)
    return removed


async def run_sweeper(storage: AttachmentStorage, interval: float) -> None:
    """Sweep now and then every `interval` seconds, until cancelled."""
    # Imported here: the event-building helper process imports this module and pays ~11 MB
    # of RSS for asyncio (and the ssl it brings) otherwise.
    import asyncio

    if interval <= 0:
        raise ValueError("sweeper interval must be positive")
    while True:
        try:
            removed = await asyncio.to_thread(sweep_attachments, storage)
        except Exception:
            # A sweep failure (permissions, odd file system) must not stop later sweeps.
            log.exception("attachment sweep failed")
        else:
            if removed:
                log.debug("swept %d attachment files from %s", removed, storage.directory)
        await asyncio.sleep(interval)
