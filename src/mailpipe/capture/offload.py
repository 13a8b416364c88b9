"""Building each message's event in helper processes, off the event loop's thread.

Parsing a message into its event is pure Python (the stdlib parser, our analysis, the store's
index columns): ~200 us of the loop's thread for a 1 KB email, and a 20 MB message holds the
interpreter for a few hundred milliseconds. In a thread it would still hold the GIL against
the loop; in a helper process it runs on another core while the loop goes on serving.

The helpers (capture/indexer.py) are long-lived and started on the first message; until one
is ready, or whenever none is, messages are built in place as before, so nothing waits on a
spawn. They speak over their stdin and stdout, driven by the event loop itself (no reader
thread to contend for the GIL): the requests made during one loop iteration go out in one
write, and each helper answers what it read in one write. What comes back is the event's JSON
and the store's index columns, so for a store-only mailpipe the loop never decodes the event
(CapturedEmail decodes it on first read). A helper that dies or stops answering is replaced
on next use, and the messages it held are built in place: none is lost, and none gets its
250 unbuilt.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from mailpipe.capture.indexer import OPTIONS, READY, build_request, frame, unframe
from mailpipe.capture.message import EventOptions, build_event
from mailpipe.capture.types import MessageBody
from mailpipe.event import CapturedEmail, new_uuid

log = logging.getLogger("mailpipe.capture")

# Built in place (no helper ready), a message above this size is parsed in a thread: its
# parse would otherwise stall every session at once.
OFFLOAD_ABOVE = 512 * 1024
# A helper holding more than this many bytes of messages is busy: the next message goes to the
# least busy helper (another is started if `workers` allows), so a big message does not hold
# up the small ones, while small messages alone stay batched in the first helper.
BUSY_ABOVE = 256 * 1024
# A helper with work that has answered nothing for this long, plus HANG_PER_MB for each MB it
# holds, is taken as hung: it is killed and its messages are built in place.
HANG_AFTER = 10.0
HANG_PER_MB = 1.0
# A helper that died before it was ready is not started again sooner than this.
RESTART_AFTER = 1.0
# A helper with nothing to do for this long is stopped (its ~22 MB freed: a capture server is
# idle most of the time); the next message starts another, built in place while it starts.
IDLE_AFTER = 30.0
HELPER_MODULE = "mailpipe.capture.indexer"


class HelperLostError(Exception):
    """The helper died or hung before answering: the message is built in place."""


class _Helper(asyncio.SubprocessProtocol):
    """One helper process and its outstanding requests."""

    def __init__(self, builder: EventBuilder) -> None:
        self._builder = builder
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self.pid: int | None = None
        self.ready = False  # its READY frame came: requests are answered without a start-up wait
        self.gone = False
        self.pending: dict[int, tuple[asyncio.Future[tuple[Any, Any]], int]] = {}
        self.outstanding = 0  # bytes of the messages in `pending`
        self._last_id = 0
        self._out: list[bytes] = []  # frames to write at the end of this loop iteration
        self._in = bytearray()
        self._options: list[EventOptions] = []  # sent to this helper, by slot
        self._progress = 0.0  # loop time of its last answer, or of its first pending request
        self._watch: asyncio.TimerHandle | None = None

    # ---- asyncio.SubprocessProtocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._stdin = self.transport.get_pipe_transport(0)  # type: ignore[union-attr, assignment]

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._in += data
        self._progress = self._loop.time()
        for reply in unframe(self._in):
            if reply[0] == READY:
                self.pid, self.ready = reply[1], True
                self._watch = self._loop.call_later(self._builder.hang_after / 4, self._check)
                continue
            request_id, event_json, index = reply
            entry = self.pending.pop(request_id, None)
            if entry is None:  # given up on (hung), and built in place meanwhile
                continue
            future, size = entry
            self.outstanding -= size
            if not future.done():  # the session may have gone meanwhile
                future.set_result((event_json, index))

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.fail(f"closed its {'stdin' if fd == 0 else 'stdout'}")

    def process_exited(self) -> None:
        code = self.transport.get_returncode() if self.transport else None
        self.fail(f"exited (status {code})")

    # ---- requests --------------------------------------------------------------------

    def submit(self, body: MessageBody, kwargs: dict[str, Any]) -> asyncio.Future[Any]:
        slot = self._slot(kwargs["options"])
        self._last_id += 1
        request = build_request(self._last_id, slot, body, kwargs)
        future = self._loop.create_future()
        if not self.pending:
            self._progress = self._loop.time()  # idle time is not a hang
        self.pending[self._last_id] = (future, body.size)
        self.outstanding += body.size
        self._send(request)
        return future

    def _slot(self, options: EventOptions) -> int:
        for slot, known in enumerate(self._options):
            if known is options:
                return slot
        import pickle  # once per helper and options object

        self._options.append(options)
        self._send(frame((OPTIONS, len(self._options) - 1, pickle.dumps(options))))
        return len(self._options) - 1

    def _send(self, data: bytes) -> None:
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if not self.gone and self._stdin is not None:
            self._stdin.write(out[0] if len(out) == 1 else b"".join(out))

    def _check(self) -> None:
        """Every hang_after/4 while it runs: hung (work, no answer) or idle (no work)?"""
        self._watch = None
        if self.gone:
            return
        quiet = self._loop.time() - self._progress
        if self.pending:
            if quiet > self._builder.hang_after + HANG_PER_MB * self.outstanding / 1e6:
                self.fail(f"answered nothing for {quiet:.1f}s")
                return
        elif quiet > self._builder.idle_after:
            log.debug("event helper process %s idle for %.0fs; stopped", self.pid, quiet)
            self._builder.lost(self)
            self.close()
            return
        self._watch = self._loop.call_later(self._builder.hang_after / 4, self._check)

    # ---- the end ---------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Gone or hung: its messages are built in place, and a new helper replaces it."""
        if self.gone:
            return
        pending = self._end()
        log.warning("event helper process %s %s; building its %d messages in place",
                    self.pid, reason, len(pending))
        self._builder.lost(self)
        for future, _ in pending:
            if not future.done():
                future.set_exception(HelperLostError(reason))

    def close(self) -> None:
        for future, _ in self._end():
            if not future.done():
                future.set_exception(HelperLostError("closed"))

    def _end(self) -> list[tuple[asyncio.Future[Any], int]]:
        self.gone = True
        pending = list(self.pending.values())
        self.pending.clear()
        self.outstanding = 0
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.transport is not None:
            # Closing stdin ends a healthy helper; close() kills one that is stuck.
            if self._stdin is not None:
                self._stdin.close()
            self.transport.close()
        return pending


class EventBuilder:
    """Builds the event for each received message, in a helper process or in place."""

    def __init__(self, workers: int | None = None, *, hang_after: float = HANG_AFTER,
                 idle_after: float = IDLE_AFTER) -> None:
        self.workers = workers or max(1, min(2, os.cpu_count() or 1))
        self.hang_after = hang_after
        self.idle_after = idle_after
        self._helpers: list[_Helper] = []  # started or starting
        self._spawning: set[asyncio.Task[None]] = set()
        self._start_after = 0.0

    async def build(self, body: MessageBody, **kwargs: Any) -> CapturedEmail:
        helper = self._helper()
        if helper is not None:
            email = await self._build_in(helper, body, kwargs)
            if email is not None:
                return email
        return await self._build_in_place(body, kwargs)

    def helper_pids(self) -> list[int]:
        """The helper processes running now (for tests and diagnostics)."""
        return [h.pid for h in self._helpers if h.pid is not None and not h.gone]

    def close(self) -> None:
        """Stop the helpers (a builder used again starts new ones)."""
        helpers, self._helpers = self._helpers, []
        for helper in helpers:
            helper.close()

    def lost(self, helper: _Helper) -> None:
        if helper in self._helpers:
            self._helpers.remove(helper)
        if not helper.ready:  # died while starting: do not respawn in a loop
            self._start_after = asyncio.get_running_loop().time() + RESTART_AFTER

    def _helper(self) -> _Helper | None:
        """The first helper that is not busy; else the least busy (and start another)."""
        for helper in self._helpers:
            if helper.ready and helper.outstanding <= BUSY_ABOVE:
                return helper
        ready = [helper for helper in self._helpers if helper.ready]
        if len(ready) == len(self._helpers) < self.workers:  # none starting: start one
            self._start()
        return min(ready, key=lambda helper: helper.outstanding) if ready else None

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._start_after:
            return
        helper = _Helper(self)
        self._helpers.append(helper)
        task = loop.create_task(self._spawn(helper))
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _spawn(self, helper: _Helper) -> None:
        import subprocess

        try:
            await asyncio.get_running_loop().subprocess_exec(
                lambda: helper, sys.executable, "-m", HELPER_MODULE,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=_helper_env(),
            )
        except Exception as exc:
            helper.fail(f"could not start ({exc})")
            return
        if helper not in self._helpers:  # closed while it started
            helper.close()

    async def _build_in(self, helper: _Helper, body: MessageBody,
                        kwargs: dict[str, Any]) -> CapturedEmail | None:
        # The uuid is chosen here, so reading email.uuid does not decode the event.
        email_uuid = kwargs["email_uuid"] = kwargs.get("email_uuid") or new_uuid()
        try:
            event_json, index = await helper.submit(body, kwargs)
        except HelperLostError:
            return None  # logged by the helper, once for all its messages
        except ValueError as exc:  # a value marshal cannot carry (never seen)
            log.warning("cannot send a message to the event helper (%s); building it in place",
                        exc)
            return None
        if event_json is None:
            log.warning("event helper could not build a %d-byte message (%s); building it in "
                        "place", body.size, index)
            return None
        return CapturedEmail(None, body.read(), _json=event_json, uuid=email_uuid, index=index)

    async def _build_in_place(self, body: MessageBody, kwargs: dict[str, Any]) -> CapturedEmail:
        if body.size <= OFFLOAD_ABOVE:
            return build_event(body.read(), **kwargs)
        return await asyncio.to_thread(build_event, body.read(), **kwargs)


def _helper_env() -> dict[str, str]:
    """This environment, with the mailpipe this process runs importable by the helper."""
    import mailpipe

    source = os.path.dirname(os.path.dirname(os.path.abspath(mailpipe.__file__)))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": source + (os.pathsep + path if path else "")}
