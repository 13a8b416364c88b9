"""Group commit: one writer thread applies whatever is queued as one batch.

Callers on any event loop `submit()` an op and await its result. The thread takes the first op
queued, adds everything else already waiting (up to `batch_max`, without waiting for more) and
hands the group to `write`, typically one transaction and so one fsync: under load many ops
share a commit, while a lone op is written at once (no timer). Each result goes back to the loop
that submitted its op, with one wake-up per loop and batch.

Used by the message store and by the SQLite jobs driver; both own their connection and
transaction, this module only owns the thread, the queue and the futures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

OpT = TypeVar("OpT")

_STOP = object()


@dataclass(slots=True)
class _Pending(Generic[OpT]):
    op: OpT
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _nothing() -> None:
    return None


def _same(exc: Exception, ops: list[Any]) -> BaseException:
    return exc


class GroupCommitWriter(Generic[OpT]):
    """The writer thread of one connection.

    - `write(ops)` runs in the thread and returns one result per op; a result that is an
      exception fails its op alone. If `write` raises, `failed(exc, ops)` (run in the thread
      too) gives the exception that every op of the batch fails with, and `last_error` says
      what went wrong until a batch succeeds.
    - `setup` runs in the thread before anything else (`start()` raises what it raises),
      `teardown` when it stops; ops still queued then fail with `closed()`.
    - `idle` runs when nothing has been queued for `idle_timeout` seconds (None: never).
    """

    def __init__(
        self,
        name: str,
        write: Callable[[list[OpT]], list[Any]],
        *,
        batch_max: int,
        closed: Callable[[], BaseException],
        failed: Callable[[Exception, list[OpT]], BaseException] = _same,
        setup: Callable[[], None] = _nothing,
        teardown: Callable[[], None] = _nothing,
        idle: Callable[[], None] = _nothing,
        idle_timeout: float | None = None,
    ) -> None:
        self.name = name
        self.batch_max = batch_max
        self.last_error: str | None = None
        self._write = write
        self._closed = closed
        self._failed = failed
        self._setup = setup
        self._teardown = teardown
        self._idle = idle
        self._idle_timeout = idle_timeout
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Cleared by the thread as it ends: `alive` is asked on every submit, and
        # Thread.is_alive() takes a lock.
        self._alive = False

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def start(self) -> None:
        """Start a thread (anew after a stop); return once `setup` has run."""
        self._queue = queue.SimpleQueue()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._main, args=(self._queue, ready), name=self.name, daemon=True
        )
        self._alive = True
        self._thread.start()
        await asyncio.wrap_future(ready)

    async def stop(self) -> None:
        """Write what is queued, then stop the thread. The owner stops submitting first."""
        self._queue.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def submit(self, op: OpT) -> Any:
        """Queue `op` and wait for its result (or its exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Pending(op, future, loop))
        return await future

    # ---- the thread ----------------------------------------------------------------------

    def _main(self, ops: queue.SimpleQueue[Any], ready: concurrent.futures.Future[None]) -> None:
        try:
            self._serve(ops, ready)
        finally:
            self._alive = False

    def _serve(self, ops: queue.SimpleQueue[Any], ready: concurrent.futures.Future[None]) -> None:
        try:
            self._setup()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            self._run(ops)
        finally:
            self._teardown()
            self._fail_leftovers(ops)

    def _run(self, ops: queue.SimpleQueue[Any]) -> None:
        while True:
            try:
                first = ops.get(timeout=self._idle_timeout)
            except queue.Empty:
                try:
                    self._idle()
                except Exception as exc:
                    self.last_error = _describe(exc)
                continue
            if first is _STOP:
                return
            batch, stop = self._drain(ops, [first])
            self._write_batch(batch)
            if stop:
                return

    def _drain(
        self, ops: queue.SimpleQueue[Any], batch: list[_Pending[OpT]]
    ) -> tuple[list[_Pending[OpT]], bool]:
        """Add whatever else is already queued, without waiting for more."""
        while len(batch) < self.batch_max:
            try:
                item = ops.get_nowait()
            except queue.Empty:
                return batch, False
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _write_batch(self, batch: list[_Pending[OpT]]) -> None:
        ops = [pending.op for pending in batch]
        try:
            results = self._write(ops)
        except Exception as exc:
            self.last_error = _describe(exc)
            _resolve(batch, [self._failed(exc, ops)] * len(batch))
            return
        self.last_error = None
        _resolve(batch, results)

    def _fail_leftovers(self, ops: queue.SimpleQueue[Any]) -> None:
        # Empty after a clean stop (the owner stops submitting first); after a crash of the
        # loop this keeps callers from waiting forever.
        leftovers: list[_Pending[OpT]] = []
        while not ops.empty():
            item = ops.get_nowait()
            if item is not _STOP:
                leftovers.append(item)
        if leftovers:
            _resolve(leftovers, [self._closed()] * len(leftovers))


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _resolve(batch: list[_Pending[Any]], results: list[Any]) -> None:
    """Hand results back to each waiting loop with one wake-up per loop, not per op."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for pending, result in zip(batch, results, strict=True):
        by_loop.setdefault(pending.loop, []).append((pending.future, result))
    for loop, pairs in by_loop.items():
        # A loop that has gone away has nobody left waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, pairs)


def _settle(pairs: Iterable[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in pairs:
        if future.done():  # the caller gave up (cancelled, timed out); the write stands
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
