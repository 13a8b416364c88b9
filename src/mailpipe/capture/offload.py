"""Turning big messages into events away from the event loop.

The stdlib parser is pure Python and walks a message line by line: a 20 MB message holds the
interpreter for a few hundred milliseconds. In a thread it would still hold the GIL against
the event loop, and every other session would stall behind it; in a helper process it runs on
another core and the loop goes on serving. Small messages are parsed in place: for them the
round trip to another process costs more than the parse.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from mailpipe.capture.message import build_event
from mailpipe.capture.types import MessageBody
from mailpipe.event import CapturedEmail

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger("mailpipe.capture")

# Above this size a message is parsed in a helper process.
OFFLOAD_ABOVE = 512 * 1024


# How often a helper checks that the mailpipe that started it is still there.
PARENT_CHECK_INTERVAL = 1.0


def _exit_with_parent(parent: int) -> None:
    """A helper's initializer: end the helper when mailpipe is gone.

    Helpers are children of the forkserver, not of mailpipe, and each holds both ends of its
    own task queue, so a mailpipe killed with SIGKILL (no shutdown) would leave them, and
    through them the forkserver, waiting for ever.
    """

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_INTERVAL)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass  # the pid exists (owned by another user): mailpipe itself is alive

    threading.Thread(target=watch, name="mailpipe-parent-watch", daemon=True).start()


def _build_from_body(body: MessageBody, kwargs: dict[str, Any]) -> CapturedEmail:
    # Runs in the helper: a spooled body is read there from its file, not pickled across.
    return build_event(body.read(), **kwargs)


class EventBuilder:
    """Builds the event for each received message, in place or in the helper processes."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or max(1, min(2, os.cpu_count() or 1))
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        # Started on first use: a capture server that never sees a big message pays nothing.
        if self._pool is None:
            # multiprocessing and the process pool are imported with the first big message,
            # not with mailpipe: most servers never see one (idle memory, issue 13).
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("forkserver")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context,
                                             initializer=_exit_with_parent,
                                             initargs=(os.getpid(),))
        return self._pool

    async def build(self, body: MessageBody, **kwargs: Any) -> CapturedEmail:
        if body.size <= OFFLOAD_ABOVE:
            return build_event(body.read(), **kwargs)
        from concurrent.futures.process import BrokenProcessPool  # lazy, as in _executor

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), _build_from_body, body, kwargs)
        except BrokenProcessPool as exc:
            # A helper died (killed, out of memory): start afresh and parse here this once.
            log.warning("event helper process died (%s); parsing this %d-byte message in place",
                        exc, body.size)
            self._pool = None
            return await asyncio.to_thread(build_event, body.read(), **kwargs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
