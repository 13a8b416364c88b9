"""One lifecycle for the long-running commands (`serve`, `jobs consume`), on uvicorn's model.

The first SIGINT or SIGTERM (or a stop asked through the admin API) begins a graceful
shutdown: stop taking work, let the work in flight finish within its timeouts, then flush and
close. A second signal skips the waiting: work in flight is abandoned (its client got no 250
and sends it again), but everything is still flushed and closed. Only if that cleanup itself
hangs past CLEANUP_BOUND, or on a third signal, does the process exit at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable

log = logging.getLogger("mailpipe")

CLEANUP_BOUND = 10.0  # seconds a hurried cleanup may take before the process just exits
HUNG_EXIT_STATUS = 1

Start = Callable[[], Awaitable[None]]
Drain = Callable[[bool], Awaitable[None]]  # its argument: hurry (wait for nothing)
Close = Callable[[], Awaitable[None]]


class Lifecycle:
    """Starts a process's parts, waits for a stop, drains them and closes them."""

    def __init__(self, cleanup_bound: float = CLEANUP_BOUND) -> None:
        self.cleanup_bound = cleanup_bound
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self._signals = 0

    def stop(self) -> None:
        """A graceful shutdown, as the first signal begins one."""
        self.stopping.set()

    def signalled(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: shutting down (send it again to skip waiting for work in flight)",
                     sig.name)
            self.stop()
        elif self._signals == 2:
            log.warning("%s again: not waiting for work in flight; flushing and closing",
                        sig.name)
            self.hurry.set()
            self.stop()
            self._exit_if_cleanup_hangs()
        else:
            _exit_now(f"{sig.name} a third time: exiting without cleaning up")

    def _exit_if_cleanup_hangs(self) -> None:
        # A thread, not the event loop: the loop may be the thing that hangs.
        bound = self.cleanup_bound
        watchdog = threading.Timer(
            bound, _exit_now, (f"cleanup did not finish within {bound:g}s: exiting",))
        watchdog.daemon = True
        watchdog.start()

    async def run(self, start: Start, drain: Drain, close: Close) -> None:
        """start(), then on a stop drain(hurry) and close(). close() runs whatever happens,
        also when start() fails (to release what did start)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.signalled, sig)
        try:
            await start()
            await self.stopping.wait()
            await self._drain(drain)
        finally:
            await close()

    async def _drain(self, drain: Drain) -> None:
        if not self.hurry.is_set():
            graceful = asyncio.ensure_future(drain(False))
            hurried = asyncio.ensure_future(self.hurry.wait())
            await asyncio.wait((graceful, hurried), return_when=asyncio.FIRST_COMPLETED)
            hurried.cancel()
            if graceful.done():
                graceful.result()
                return
            graceful.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await graceful
        await drain(True)


def _exit_now(reason: str) -> None:
    log.error(reason)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(HUNG_EXIT_STATUS)
