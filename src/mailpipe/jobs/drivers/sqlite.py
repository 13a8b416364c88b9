"""The embedded default pipeline: jobs as rows of a SQLite file under the data dir.

One row per job, in a `jobs` table that every pipeline of the file shares (column `pipeline`).
A row's life:

- pushed: state `ready`, `available_at` = commit time + the job's delay;
- received: the oldest most urgent rows (`priority`, then `id`) with `available_at <= now` are
  reserved in one UPDATE ... RETURNING: state `reserved`, `attempts += 1`, and
  `reserved_until = available_at = now + visibility_timeout`, so a reservation that expires
  (its consumer died) makes the row available again with no sweeper;
- acked: deleted; nacked: back to `ready` after the delay; dead-lettered: state `dead` with a
  reason, kept for inspection and counted by `stats()`.

A delivery's ref is (row id, attempt): nack and dead_letter only touch the row if that
reservation is still the current one, so a consumer whose reservation expired cannot undo the
work of the consumer that got the job next.

All SQLite work runs in one thread per driver with its own connection; whatever operations are
queued when it wakes (several push_batch calls, acks, reservations) share one transaction and so
one fsync. The file works across processes: WAL, and a busy_timeout for the write lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from mailpipe.config import PipelineOptions, SQLitePipelineOptions
from mailpipe.jobs.base import Delivery, Driver, DriverError, Job, PipelineStats
from mailpipe.store.writer import GroupCommitWriter

BUSY_TIMEOUT_MS = 5000  # waiting for another process's write lock; then DriverError
OP_TIMEOUT = BUSY_TIMEOUT_MS / 1000 + 5.0  # a stuck disk must not hang a caller forever
BATCH_MAX = 256  # operations sharing one transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    -- AUTOINCREMENT: ids are never reused, so a stale delivery ref never hits a newer job
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'reserved', 'dead')),
    priority INTEGER NOT NULL,  -- the order of delivery: the job's, or the pipeline's for 0
    available_at REAL NOT NULL,
    reserved_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    payload BLOB NOT NULL,
    headers BLOB NOT NULL,
    job_pipeline TEXT NOT NULL,
    job_priority INTEGER NOT NULL,
    delay REAL NOT NULL,
    auto_ack INTEGER NOT NULL,
    pushed_at REAL NOT NULL,
    reason TEXT,
    dead_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_next ON jobs (pipeline, priority, id) WHERE state != 'dead';
CREATE INDEX IF NOT EXISTS jobs_dead ON jobs (pipeline, id) WHERE state = 'dead';
"""

INSERT = (
    "INSERT INTO jobs (pipeline, priority, available_at, job_id, name, payload, headers,"
    " job_pipeline, job_priority, delay, auto_ack, pushed_at)"
    " VALUES (?, ?, ? + ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The probe lets an idle poll stay a plain read: no write lock taken when there is nothing.
PROBE = (
    "SELECT 1 FROM jobs WHERE pipeline = ? AND state != 'dead' AND available_at <= ? LIMIT 1"
)
RESERVE = """
UPDATE jobs SET state = 'reserved', attempts = attempts + 1,
    available_at = :until, reserved_until = :until
WHERE id IN (
    SELECT id FROM jobs
    WHERE pipeline = :pipeline AND state != 'dead' AND available_at <= :now
    ORDER BY priority, id LIMIT :limit
)
RETURNING id, attempts, priority, job_id, name, payload, headers, job_pipeline, job_priority,
    delay, auto_ack
"""
REQUEUE = (
    "UPDATE jobs SET state = 'ready', available_at = ?, reserved_until = NULL"
    " WHERE id = ? AND attempts = ? AND state = 'reserved'"
)
BURY = (
    "UPDATE jobs SET state = 'dead', reason = ?, dead_at = ?, reserved_until = NULL"
    " WHERE id = ? AND attempts = ? AND state = 'reserved'"
)
STATS = """
SELECT
    COALESCE(SUM(state != 'dead' AND available_at <= :now), 0),
    COALESCE(SUM(state = 'ready' AND available_at > :now), 0),
    COALESCE(SUM(state = 'reserved' AND available_at > :now), 0),
    COALESCE(SUM(state = 'dead'), 0)
FROM jobs WHERE pipeline = :pipeline
"""
DEAD = (
    "SELECT id, attempts, priority, job_id, name, payload, headers, job_pipeline, job_priority,"
    " delay, auto_ack, reason, dead_at FROM jobs WHERE pipeline = ? AND state = 'dead'"
    " ORDER BY id LIMIT ?"
)

# An operation runs in the SQLite thread: (connection, the transaction's clock) -> result.
OpFn = Callable[[sqlite3.Connection, float], Any]

# Drivers of this process by (file, pipeline): a commit that makes jobs available wakes all of
# their receivers at once instead of leaving them to the next poll.
_LOCAL: dict[tuple[str, str], weakref.WeakSet[SQLiteDriver]] = {}
_LOCAL_LOCK = threading.Lock()


@dataclass(slots=True)
class _Op:
    fn: OpFn
    write: bool
    wakes: bool  # makes jobs available now: wake this process's receivers after the commit


class SQLiteDriver(Driver):
    name = "sqlite"

    def __init__(self, pipeline: str, options: PipelineOptions, *, data_dir: Path) -> None:
        if not isinstance(options, SQLitePipelineOptions):
            options = SQLitePipelineOptions.model_validate(options.model_dump())
        super().__init__(pipeline, options, data_dir=data_dir)
        self.opts: SQLitePipelineOptions = options
        self.path = Path(options.path) if options.path else Path(data_dir) / "jobs.db"
        self._key = (str(self.path.resolve()), pipeline)
        self._writer: GroupCommitWriter[_Op] = GroupCommitWriter(
            f"mailpipe-jobs-{pipeline}",
            self._execute,
            batch_max=BATCH_MAX,
            closed=lambda: DriverError(f"sqlite pipeline {self.pipeline!r} is closed"),
            failed=self._failed,
            teardown=self._disconnect,
        )
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._running = False
        self.counters = {"commits": 0, "pushed": 0, "max_ops_per_commit": 0}

    # ---- lifecycle -----------------------------------------------------------------------

    async def connect(self) -> None:
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        await self._writer.start()
        self._running = True
        try:
            await self._call(lambda conn, now: None, write=False)  # opens and declares
        except BaseException:
            await self.close()
            raise
        with _LOCAL_LOCK:
            _LOCAL.setdefault(self._key, weakref.WeakSet()).add(self)

    async def close(self) -> None:
        if not self._running:
            return
        self._running = False  # set first: nothing can be queued behind the stop marker
        with _LOCAL_LOCK:
            _LOCAL.get(self._key, weakref.WeakSet()).discard(self)
        await self._writer.stop()
        self._wake()  # receivers still waiting return at once

    def health(self) -> dict[str, Any]:
        alive = self._running and self._writer.alive
        return {
            "ok": alive and self._writer.last_error is None,
            "driver": self.name,
            "path": str(self.path),
            "last_error": self._writer.last_error,
        }

    # ---- the Driver interface ------------------------------------------------------------

    async def push_batch(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        # Rows are built here so that a malformed job fails its own caller, not the whole
        # group of batches it would share a transaction with.
        rows = [self._row(job) for job in jobs]

        def insert(conn: sqlite3.Connection, now: float) -> None:
            conn.executemany(INSERT, [(*row[:2], now, *row[2:], now) for row in rows])

        await self._call(insert, write=True, wakes=True)
        self.counters["pushed"] += len(rows)

    async def receive(self, max_items: int, timeout: float) -> list[Delivery]:
        if max_items < 1:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            # Taken before looking, so a push committed meanwhile is not slept through.
            wakeup = self._wakeup
            deliveries = await self._reserve(max_items)
            remaining = deadline - time.monotonic()
            if deliveries or remaining <= 0:
                return deliveries
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), min(self.opts.poll_interval, remaining))
            if not self._running:  # closed while waiting
                return []

    async def ack(self, delivery: Delivery) -> None:
        row_id, _ = delivery.ref
        # Whoever holds it now: the job is done, so a late ack still spares a redelivery.
        await self._call(
            lambda conn, now: conn.execute(
                "DELETE FROM jobs WHERE id = ? AND state != 'dead'", (row_id,)
            ),
            write=True,
        )

    async def nack(self, delivery: Delivery, *, requeue: bool, delay: float = 0.0) -> None:
        if not requeue:
            await self.dead_letter(delivery, "nacked without requeue")
            return
        row_id, attempt = delivery.ref
        delay = max(delay, 0.0)
        await self._call(
            lambda conn, now: conn.execute(REQUEUE, (now + delay, row_id, attempt)),
            write=True,
            wakes=delay == 0,
        )

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        row_id, attempt = delivery.ref
        await self._call(
            lambda conn, now: conn.execute(BURY, (reason, now, row_id, attempt)), write=True
        )

    async def stats(self) -> PipelineStats:
        counts = await self._call(
            lambda conn, now: conn.execute(
                STATS, {"now": now, "pipeline": self.pipeline}
            ).fetchone(),
            write=False,
        )
        ready, delayed, reserved, dead = (int(n) for n in counts)
        return PipelineStats(
            pipeline=self.pipeline, driver=self.name, queue=self.pipeline,
            ready=ready, delayed=delayed, reserved=reserved, dead=dead,
            extra={"path": str(self.path)},
        )

    async def purge(self) -> int:
        """Delete the pipeline's live jobs (waiting, delayed and reserved); dead letters stay,
        see `purge_dead()`."""
        return int(
            await self._call(
                lambda conn, now: conn.execute(
                    "DELETE FROM jobs WHERE pipeline = ? AND state != 'dead'", (self.pipeline,)
                ).rowcount,
                write=True,
            )
        )

    # ---- dead letters --------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The oldest dead letters: job, attempts, reason, dead_at (unix time)."""
        rows = await self._call(
            lambda conn, now: conn.execute(DEAD, (self.pipeline, limit)).fetchall(),
            write=False,
        )
        return [
            {"job": _job(row), "attempts": row[1], "reason": row[11], "dead_at": row[12]}
            for row in rows
        ]

    async def purge_dead(self) -> int:
        return int(
            await self._call(
                lambda conn, now: conn.execute(
                    "DELETE FROM jobs WHERE pipeline = ? AND state = 'dead'", (self.pipeline,)
                ).rowcount,
                write=True,
            )
        )

    # ---- helpers on the loop -------------------------------------------------------------

    def _row(self, job: Job) -> tuple[Any, ...]:
        # Lower priority values go first; 0 takes the pipeline's (as RoadRunner's jobs do).
        rank = int(job.priority) or self.opts.priority
        return (
            self.pipeline, rank, float(job.delay), str(job.id), str(job.name),
            bytes(job.payload), orjson.dumps(job.headers), str(job.pipeline), int(job.priority),
            float(job.delay), int(bool(job.auto_ack)),
        )

    async def _reserve(self, max_items: int) -> list[Delivery]:
        probe = (self.pipeline,)
        found = await self._call(
            lambda conn, now: conn.execute(PROBE, (*probe, now)).fetchone(), write=False
        )
        if found is None:
            return []
        visibility = self.opts.visibility_timeout

        def reserve(conn: sqlite3.Connection, now: float) -> list[Any]:
            params = {
                "pipeline": self.pipeline, "now": now, "until": now + visibility,
                "limit": max_items,
            }
            return conn.execute(RESERVE, params).fetchall()

        rows = await self._call(reserve, write=True)
        rows.sort(key=lambda row: (row[2], row[0]))  # RETURNING's order is unspecified
        return [
            Delivery(job=_job(row), attempt=row[1], ref=(row[0], row[1]), queue=self.pipeline)
            for row in rows
        ]

    async def _call(self, fn: OpFn, *, write: bool, wakes: bool = False) -> Any:
        if not self._running or self._loop is None:
            raise DriverError(f"sqlite pipeline {self.pipeline!r} is not connected")
        try:
            return await asyncio.wait_for(self._writer.submit(_Op(fn, write, wakes)), OP_TIMEOUT)
        except TimeoutError:
            raise DriverError(
                f"sqlite pipeline {self.pipeline!r}: no answer from {self.path} "
                f"within {OP_TIMEOUT:g}s"
            ) from None

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    # ---- the SQLite thread ---------------------------------------------------------------

    def _execute(self, batch: list[_Op]) -> list[Any]:
        results = self._transaction(self._connection(), batch)
        if any(op.wakes for op in batch):
            _wake_local(self._key)
        return results

    def _failed(self, exc: Exception, batch: list[_Op]) -> BaseException:
        if not _is_busy(exc):
            self._disconnect()  # reopened by the next batch: recovers a replaced file
        return DriverError(f"sqlite pipeline {self.pipeline!r} ({self.path}): {exc}")

    def _transaction(self, conn: sqlite3.Connection, batch: list[_Op]) -> list[Any]:
        now = time.time()  # wall clock: reservations are compared across processes
        if not any(op.write for op in batch):
            return [op.fn(conn, now) for op in batch]  # plain reads, each its own snapshot
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [op.fn(conn, now) for op in batch]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.counters["commits"] += 1
        self.counters["max_ops_per_commit"] = max(self.counters["max_ops_per_commit"], len(batch))
        return results

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are begun explicitly, never implicitly.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {self.opts.synchronous}")
                conn.executescript(SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None


def _job(row: Any) -> Job:
    return Job(
        id=row[3], payload=bytes(row[5]), name=row[4], headers=orjson.loads(row[6]),
        pipeline=row[7], priority=row[8], delay=row[9], auto_ack=bool(row[10]),
    )


def _is_busy(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()


def _wake_local(key: tuple[str, str]) -> None:
    with _LOCAL_LOCK:
        drivers = list(_LOCAL.get(key, ()))
    for driver in drivers:
        if driver._loop is not None:
            with contextlib.suppress(RuntimeError):
                driver._loop.call_soon_threadsafe(driver._wake)
