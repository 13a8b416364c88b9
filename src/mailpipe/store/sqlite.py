"""The embedded message store: SQLite in WAL mode with group commit.

One writer thread owns the only write connection. `add()` queues its row and waits; the
writer takes everything queued (up to `batch_max`), writes it in one transaction and commits
once, so under load many emails share one fsync while a lone email is committed at once (no
timer). Reads run on a small pool of separate connections: WAL lets them proceed while the
writer commits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import html
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from mailpipe.event import CapturedEmail
from mailpipe.metrics import Metrics
from mailpipe.sinks.base import Sink

T = TypeVar("T")

SNIPPET_CHARS = 120
READERS = 4
SYNCHRONOUS_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
# Without writes, age retention still has to run now and then; never sleep longer than this.
MAX_PRUNE_INTERVAL = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    received_at TEXT NOT NULL,
    received_ts REAL NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    header_from TEXT,
    subject TEXT,
    snippet TEXT NOT NULL,
    size INTEGER NOT NULL,
    attachment_count INTEGER NOT NULL,
    search TEXT NOT NULL,
    event BLOB NOT NULL,
    outcomes BLOB,
    raw BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_received_ts ON messages (received_ts);
"""

INSERT = """
INSERT INTO messages (uuid, received_at, received_ts, mail_from, rcpt, header_from, subject,
                      snippet, size, attachment_count, search, event, outcomes, raw)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

SUMMARY_COLUMNS = (
    "uuid, subject, mail_from, rcpt, header_from, received_at, size, attachment_count, snippet"
)

# Addresses never contain a newline, so it is a safe separator for the recipient list.
RCPT_SEP = "\n"


class StoreClosedError(RuntimeError):
    """The store is not running (not started yet, or closed)."""


@dataclass(slots=True)
class _Op:
    kind: Literal["insert", "delete", "clear"]
    arg: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


_STOP = object()

# Aliases, because inside SQLiteStore the name `list` is the method, not the builtin.
Batch = list[_Op]
Results = list[Any]
Summaries = list[dict[str, Any]]


class SQLiteStore:
    def __init__(
        self,
        path: Path,
        *,
        max_messages: int = 5000,
        max_age: float | None = None,
        synchronous: str = "FULL",
        batch_max: int = 512,
        metrics: Metrics | None = None,
    ) -> None:
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {sorted(SYNCHRONOUS_MODES)}")
        if max_messages < 1 or batch_max < 1:
            raise ValueError("max_messages and batch_max must be at least 1")
        if max_age is not None and max_age <= 0:
            raise ValueError("max_age must be positive")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_age = max_age
        self.synchronous = synchronous
        self.batch_max = batch_max
        self.metrics = metrics
        self.stats: dict[str, int] = {"commits": 0, "written": 0, "failed": 0, "max_batch": 0}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._running = False
        self._messages = 0
        self._last_error: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._writer_main, args=(ready,), name="mailpipe-store-writer", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(ready)
        try:
            # Readers are opened after the writer has switched the file to WAL.
            for _ in range(READERS):
                self._readers.put(await asyncio.to_thread(self._open_reader))
        except BaseException:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._close_readers()
            raise
        self._running = True

    async def close(self) -> None:
        if not self._running:
            return
        # Set first: add() runs on the loop, so nothing can be queued behind the stop marker.
        self._running = False
        self._queue.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._close_readers()

    def _close_readers(self) -> None:
        while not self._readers.empty():
            self._readers.get_nowait().close()

    def health(self) -> dict[str, object]:
        alive = self._running and self._thread is not None and self._thread.is_alive()
        return {
            "ok": alive and self._last_error is None,
            "messages": self._messages,
            "pending": self._queue.qsize(),
            "commits": self.stats["commits"],
            "last_error": self._last_error,
        }

    # ---- writes (through the writer thread) ----------------------------------------------

    async def add(self, email: CapturedEmail) -> None:
        """Return once the email is committed; raise if its batch failed."""
        await self._submit("insert", _row(email))

    async def delete(self, uuid: str) -> bool:
        return bool(await self._submit("delete", uuid))

    async def clear(self) -> int:
        return int(await self._submit("clear", None))

    async def _submit(self, kind: Literal["insert", "delete", "clear"], arg: Any) -> Any:
        if not self._running or self._thread is None or not self._thread.is_alive():
            raise StoreClosedError("store is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Op(kind, arg, future, loop))
        return await future

    # ---- reads (pool of read connections, off the loop) ----------------------------------

    async def list(
        self, *, limit: int = 50, offset: int = 0, q: str | None = None
    ) -> tuple[Summaries, int]:
        """Summaries newest first, and how many messages match `q` in all."""
        where, params = "", ()
        if q:
            where, params = "WHERE search LIKE ? ESCAPE '\\'", (f"%{_like_escape(q.lower())}%",)

        def query(conn: sqlite3.Connection) -> tuple[Summaries, int]:
            # One read transaction, so the page and the total come from the same snapshot.
            conn.execute("BEGIN")
            try:
                rows = conn.execute(
                    f"SELECT {SUMMARY_COLUMNS} FROM messages {where} "
                    "ORDER BY id DESC LIMIT ? OFFSET ?",
                    (*params, limit, offset),
                ).fetchall()
                (total,) = conn.execute(f"SELECT COUNT(*) FROM messages {where}", params).fetchone()
            finally:
                conn.execute("COMMIT")
            return [_summary(row) for row in rows], total

        return await self._read(query)

    async def get(self, uuid: str) -> dict[str, Any] | None:
        """The stored event; what sinks noted about it is under event["mailpipe"]["outcomes"]."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT event, outcomes FROM messages WHERE uuid = ?", (uuid,)
            ).fetchone()
        )
        if row is None:
            return None
        event: dict[str, Any] = orjson.loads(row[0])
        if row[1] is not None:
            event["mailpipe"] = {"outcomes": orjson.loads(row[1])}
        return event

    async def raw(self, uuid: str) -> bytes | None:
        row = await self._read(
            lambda c: c.execute("SELECT raw FROM messages WHERE uuid = ?", (uuid,)).fetchone()
        )
        return None if row is None else bytes(row[0])

    async def count(self) -> int:
        return int(
            await self._read(lambda c: c.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        )

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._running:
            raise StoreClosedError("store is not running")
        return await asyncio.to_thread(self._with_reader, fn)

    def _with_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._readers.get()
        try:
            return fn(conn)
        finally:
            self._readers.put(conn)

    def _open_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only = ON")
        return conn

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun explicitly, never implicitly.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    # ---- the writer thread ---------------------------------------------------------------

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._open_writer()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            self._writer_loop(conn)
        finally:
            conn.close()
            self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        # Empty after a clean close (close() stops new ops first); after a crash of the loop
        # this keeps callers from waiting forever.
        leftovers: Batch = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not _STOP:
                leftovers.append(item)
        _resolve(leftovers, [StoreClosedError("store writer stopped")] * len(leftovers))

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.executescript(SCHEMA)
        self._messages = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        self._last_age_prune = -1e9
        self._transaction(conn, [])  # apply retention to what an earlier run left
        return conn

    def _writer_loop(self, conn: sqlite3.Connection) -> None:
        timeout = None if self.max_age is None else min(self.max_age / 2, MAX_PRUNE_INTERVAL)
        while True:
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._prune_only(conn)
                continue
            if first is _STOP:
                return
            batch, stop = self._drain([first])
            self._write_batch(conn, batch)
            if stop:
                return

    def _drain(self, batch: Batch) -> tuple[Batch, bool]:
        """Add whatever else is already queued, without waiting for more."""
        while len(batch) < self.batch_max:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _write_batch(self, conn: sqlite3.Connection, batch: Batch) -> None:
        try:
            results = self._transaction(conn, batch)
        except Exception as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            self.stats["failed"] += len(batch)
            _resolve(batch, [exc] * len(batch))
            return
        self._last_error = None
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        _resolve(batch, results)

    def _apply(self, conn: sqlite3.Connection, op: _Op) -> Any:
        if op.kind == "insert":
            conn.execute(INSERT, op.arg)
            self._messages += 1
            return None
        if op.kind == "delete":
            deleted = conn.execute("DELETE FROM messages WHERE uuid = ?", (op.arg,)).rowcount
            self._messages -= deleted
            return deleted > 0
        deleted = conn.execute("DELETE FROM messages").rowcount
        self._messages -= deleted
        return deleted

    def _prune_only(self, conn: sqlite3.Connection) -> None:
        try:
            self._transaction(conn, [])
        except Exception as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"

    def _transaction(self, conn: sqlite3.Connection, batch: Batch) -> Results:
        """Apply the batch and retention in one transaction; one result per op.

        A constraint error (a duplicate uuid) only undoes its own statement, so it fails
        that op alone; anything else fails the whole batch.
        """
        results: Results = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                try:
                    results.append(self._apply(conn, op))
                except sqlite3.IntegrityError as exc:
                    if not conn.in_transaction:  # RAISE(ROLLBACK) undid the whole batch
                        raise
                    results.append(exc)
            self._prune(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # Undone rows were counted as they went in; a rare full recount puts that right.
            self._messages = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            raise
        if batch:  # retention-only transactions are not counted
            self.stats["commits"] += 1
        self.stats["written"] += sum(1 for op in batch if op.kind == "insert")
        if self.metrics is not None:
            self.metrics.store_messages.set(self._messages)
        return results

    def _prune(self, conn: sqlite3.Connection) -> None:
        # The row count is kept in memory (counted once at start) so that a batch costs no
        # table scan; the age sweep runs at most once a second, it needs none per batch.
        now = time.monotonic()
        if self.max_age is not None and now - self._last_age_prune >= 1.0:
            self._last_age_prune = now
            self._messages -= conn.execute(
                "DELETE FROM messages WHERE received_ts < ?", (time.time() - self.max_age,)
            ).rowcount
        if self._messages > self.max_messages:
            self._messages -= conn.execute(
                "DELETE FROM messages WHERE id <= "
                "(SELECT id FROM messages ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.max_messages,),
            ).rowcount


class StoreSink(Sink):
    """The store as a sink: an email gets its 250 only once its row is committed."""

    name = "store"
    required = True

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    async def start(self) -> None:
        await self.store.start()

    async def submit(self, email: CapturedEmail) -> None:
        await self.store.add(email)

    async def close(self) -> None:
        await self.store.close()

    def health(self) -> dict[str, object]:
        return self.store.health()


# ---- helpers ------------------------------------------------------------------------------




def _resolve(batch: list[_Op], results: list[Any]) -> None:
    """Hand results back to each waiting loop with one wake-up per loop, not per op."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for op, result in zip(batch, results, strict=True):
        by_loop.setdefault(op.loop, []).append((op.future, result))
    for loop, pairs in by_loop.items():
        # A loop that has gone away has nobody left waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, pairs)


def _settle(pairs: Iterable[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in pairs:
        if future.done():  # the caller was cancelled; the write stands regardless
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _row(email: CapturedEmail) -> tuple[Any, ...]:
    event = email.event
    message = event.get("message") or {}
    envelope = event.get("envelope") or {}
    headers = message.get("headers") or {}
    rcpt = list(envelope.get("to") or [])
    header_from = _header(headers, "From")
    subject = message.get("subject")
    body = _body_text(message)
    search = RCPT_SEP.join(
        s
        for s in (
            subject,
            envelope.get("from"),
            *rcpt,
            header_from,
            _header(headers, "To"),
            _header(headers, "Cc"),
            body,
        )
        if s
    ).lower()
    outcomes = orjson.dumps(email.outcomes, default=str) if email.outcomes else None
    return (
        event["uuid"],
        event.get("received_at", ""),
        _timestamp(event.get("received_at")),
        envelope.get("from") or "",
        RCPT_SEP.join(rcpt),
        header_from,
        subject,
        " ".join(body[: SNIPPET_CHARS * 4].split())[:SNIPPET_CHARS],
        size if isinstance(size := message.get("size"), int) else len(email.raw),
        len(event.get("attachments") or ()),
        search,
        email.json(),
        outcomes,
        email.raw,
    )


def _summary(row: tuple[Any, ...]) -> dict[str, Any]:
    uuid, subject, mail_from, rcpt, header_from, received_at, size, attachments, snippet = row
    return {
        "uuid": uuid,
        "subject": subject,
        "from": mail_from,
        "to": rcpt.split(RCPT_SEP) if rcpt else [],
        "header_from": header_from,
        "received_at": received_at,
        "size": size,
        "attachments": attachments,
        "snippet": snippet,
    }


def _header(headers: dict[str, str], name: str) -> str | None:
    # Header names keep the sender's spelling ("FROM", "from"), so match case-insensitively.
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


_HIDDEN = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def _body_text(message: dict[str, Any]) -> str:
    """Readable body text: the text part, else the HTML part with its markup removed."""
    if message.get("text"):
        return str(message["text"])
    body = str(message.get("body") or "")
    if message.get("html") and body == message["html"]:
        # Whitespace in HTML is not significant; collapsing it lets phrases match.
        body = " ".join(html.unescape(_TAG.sub(" ", _HIDDEN.sub(" ", body))).split())
    return body


def _timestamp(received_at: object) -> float:
    try:
        return datetime.fromisoformat(str(received_at).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
