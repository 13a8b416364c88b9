"""The embedded message store: SQLite in WAL mode with group commit.

One writer thread owns the only write connection. `add()` queues its row and waits; the
writer takes everything queued (up to `batch_max`), writes it in one transaction and commits
once, so under load many emails share one fsync while a lone email is committed at once (no
timer). Reads run on a small pool of separate connections: WAL lets them proceed while the
writer commits.
"""

from __future__ import annotations

import asyncio
import math
import queue
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from mailpipe.event import CapturedEmail
from mailpipe.metrics import Metrics
from mailpipe.sinks.base import STORE, Sink, SinkContext, SinkSettings
from mailpipe.sinks.results import ACCEPTED, Accepted
from mailpipe.store import tags as tag_ops
from mailpipe.store.feed import ChangeFeed
from mailpipe.store.index import RCPT_SEP, index_columns
from mailpipe.store.search import LOWER, Term, compile_terms, like_escape, parse
from mailpipe.store.tags import TagRules
from mailpipe.store.writer import GroupCommitWriter

T = TypeVar("T")

READERS = 4
SYNCHRONOUS_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
# Without writes, age retention still has to run now and then; never sleep longer than this.
MAX_PRUNE_INTERVAL = 60.0
# Retention by count lets the store grow past max_messages by 5% (rounded down), at most
# PRUNE_CHUNK_MAX rows, before it deletes back down to max_messages in one range delete from
# the low-water mark: the commits in between run no query for it. The cap bounds the one
# commit that pays for the chunk (250 rows of 1 KB emails: 5-10 ms more, measured), which
# is what a p99 sees; more than a few hundred rows a chunk saves no more per email.
PRUNE_SLACK_DIVISOR = 20
PRUNE_CHUNK_MAX = 256
# The age sweep runs with a write at most this often (seconds).
AGE_PRUNE_INTERVAL = 1.0
# uuids per query of get_many(), well under SQLite's limit on bound parameters.
GET_MANY_CHUNK = 500

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
    raw BLOB NOT NULL,
    read INTEGER NOT NULL DEFAULT 0,
    header_to TEXT,
    header_cc TEXT,
    header_bcc TEXT,
    reply_to TEXT,
    message_id TEXT,
    inline_count INTEGER NOT NULL DEFAULT 0,
    tags TEXT NOT NULL DEFAULT '[]'
);
"""
# Added by later versions: (column, its definition), added to a database made before them.
COLUMNS_ADDED = (
    ("read", "INTEGER NOT NULL DEFAULT 0"),
    ("header_to", "TEXT"),
    ("header_cc", "TEXT"),
    ("header_bcc", "TEXT"),
    ("reply_to", "TEXT"),
    ("message_id", "TEXT"),
    ("inline_count", "INTEGER NOT NULL DEFAULT 0"),
    ("tags", "TEXT NOT NULL DEFAULT '[]'"),
)
# Index columns (store/index.py) added after the first version: a database that lacked them
# has them computed from each stored event as it is upgraded.
REINDEXED = ("header_to", "header_cc", "header_bcc", "reply_to", "message_id", "inline_count")
# Created after COLUMNS_ADDED, since they may index those columns. The partial index makes the
# unread count and `is:unread` read the unread rows only.
INDEXES = """
CREATE INDEX IF NOT EXISTS messages_received_ts ON messages (received_ts);
CREATE INDEX IF NOT EXISTS messages_unread ON messages (id) WHERE read = 0;
CREATE INDEX IF NOT EXISTS messages_tagged ON messages (id) WHERE tags != '[]';
"""

INSERT = """
INSERT INTO messages (uuid, received_at, received_ts, mail_from, rcpt, header_from, subject,
                      snippet, size, attachment_count, search, header_to, header_cc,
                      header_bcc, reply_to, message_id, inline_count, event, outcomes, raw, tags)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# POP3's maildrop (pop3/): each message's uuid and its size with every line ending CRLF, as
# pop3.protocol.pop3_size counts it: a line ends at LF, a CR before it is part of the end,
# a last line without LF gets a CRLF. Counted in SQL, so a login reads no message body.
MAILDROP = """
SELECT uuid, length(raw)
    + (length(raw) - length(CAST(replace(raw, X'0A', X'') AS BLOB)))
    - (length(raw) - length(CAST(replace(raw, X'0D0A', X'') AS BLOB))) / 2
    - (substr(raw, -1) IS X'0D')
    + 2 * (length(raw) > 0 AND substr(raw, -1) IS NOT X'0A')
FROM messages ORDER BY id
"""

SUMMARY_COLUMNS = (
    "uuid, subject, mail_from, rcpt, header_from, received_at, size, attachment_count, snippet,"
    " read, tags"
)


class StoreClosedError(RuntimeError):
    """The store is not running (not started yet, or closed)."""


OpKind = Literal["insert", "delete", "clear", "read", "tags"]


@dataclass(slots=True)
class _Op:
    kind: OpKind
    arg: Any


@dataclass(slots=True)
class Page:
    """One page of summaries; `total` matched the query, `unread` is the whole store's."""

    messages: list[dict[str, Any]]
    total: int
    unread: int


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
        tag_rules: TagRules | None = None,
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
        self.tag_rules = tag_rules or TagRules()
        self._tag_writer = tag_ops.TagWriter(self.tag_rules)  # used in the writer thread
        self.stats: dict[str, int] = {"commits": 0, "written": 0, "failed": 0, "max_batch": 0}
        self._writer: GroupCommitWriter[_Op] = GroupCommitWriter(
            "mailpipe-store-writer",
            self._write_batch,
            batch_max=batch_max,
            closed=lambda: StoreClosedError("store writer stopped"),
            failed=self._batch_failed,
            setup=self._open_writer,
            teardown=self._close_writer,
            # Without writes, age retention still has to run now and then.
            idle=self._prune_only,
            idle_timeout=None if max_age is None else min(max_age / 2, MAX_PRUNE_INTERVAL),
        )
        self._conn: sqlite3.Connection | None = None  # the writer's, used in its thread only
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._running = False
        # Retention state, kept in memory by the writer thread so that a batch under the
        # limits runs no query for it: the row count (counted once at start), the smallest id
        # that may still be stored (a lower bound; exact after a prune by count) and the
        # oldest received_ts that may still be stored (a lower bound; exact after an age
        # sweep).
        self._messages = 0
        self._low_id = 0
        self._oldest_ts = -math.inf
        self._prune_above = max_messages + min(max_messages // PRUNE_SLACK_DIVISOR,
                                               PRUNE_CHUNK_MAX)
        self._pruned: list[str] = []  # uuids retention deleted in the current transaction
        self.changes = ChangeFeed()

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._writer.start()
        try:
            # Readers are opened after the writer has switched the file to WAL.
            for _ in range(READERS):
                self._readers.put(await asyncio.to_thread(self._open_reader))
        except BaseException:
            await self._writer.stop()
            self._close_readers()
            raise
        self._running = True

    async def close(self) -> None:
        if not self._running:
            return
        # Set first: add() runs on the loop, so nothing can be queued behind the stop marker.
        self._running = False
        await self._writer.stop()
        self._close_readers()
        self.changes.close()

    def _close_readers(self) -> None:
        while not self._readers.empty():
            self._readers.get_nowait().close()

    def health(self) -> dict[str, object]:
        alive = self._running and self._writer.alive
        return {
            "ok": alive and self._writer.last_error is None,
            "messages": self._messages,
            "pending": self._writer.pending,
            "commits": self.stats["commits"],
            "last_error": self._writer.last_error,
        }

    # ---- writes (through the writer thread) ----------------------------------------------

    async def add(self, email: CapturedEmail) -> None:
        """Return once the email is committed; raise if its batch failed."""
        row = _row(email, self.tag_rules)
        tags = await self._submit("insert", row)
        if self.changes.subscribers:  # a summary nobody watches is not worth making
            self.changes.publish("new", _summary_of_insert(row, tags))

    async def delete(self, uuid: str) -> bool:
        deleted = bool(await self._submit("delete", uuid))
        if deleted:
            self.changes.publish("deleted", {"uuid": uuid})
        return deleted

    async def clear(self) -> int:
        deleted = int(await self._submit("clear", None))
        self.changes.publish("cleared", {})
        return deleted

    async def mark_read(self, uuid: str, read: bool = True) -> dict[str, Any] | None:
        """Set one message's read flag; its summary, or None when there is no such message."""
        row = await self._submit("read", (uuid, read))
        if row is None:
            return None
        self.changes.publish("read", {"uuid": uuid, "read": read})
        return _summary(row)

    async def mark_all_read(self, read: bool = True) -> int:
        """Set every message's read flag; how many changed."""
        updated = int(await self._submit("read", (None, read)))
        self.changes.publish("read", {"all": True, "read": read})
        return updated

    # ---- tags (store/tags.py) -------------------------------------------------------------

    async def tags(self) -> list[dict[str, Any]]:
        """Every tag in use: {"name", "count"} (messages with it), by name."""
        return await self._read(tag_ops.counts)

    async def set_tags(self, uuids: Sequence[str], tags: Sequence[str]) -> dict[str, list[str]]:
        """Replace the tags of each message of `uuids`; the tags now of each that exists.
        TagError for invalid tags or ids."""
        return await self._edit_tags("set", uuids, tags)

    async def add_tags(self, uuids: Sequence[str], tags: Sequence[str]) -> dict[str, list[str]]:
        """Add `tags` to each message of `uuids` (as set_tags)."""
        return await self._edit_tags("add", uuids, tags)

    async def remove_tags(self, uuids: Sequence[str],
                          tags: Sequence[str]) -> dict[str, list[str]]:
        """Remove `tags` from each message of `uuids` (as set_tags)."""
        return await self._edit_tags("remove", uuids, tags)

    async def rename_tag(self, old: str, new: str) -> int:
        """Rename tag `old` to `new` on every message; how many changed (0: no such tag)."""
        old, new = tag_ops.clean_tag(old), tag_ops.clean_tag(new)
        return await self._tag_op(self._tag_writer.rename, old, new)

    async def delete_tag(self, name: str) -> int:
        """Remove tag `name` from every message; how many had it."""
        return await self._tag_op(self._tag_writer.delete, tag_ops.clean_tag(name))

    async def _edit_tags(self, mode: tag_ops.Mode, uuids: Sequence[str],
                         tags: Sequence[str]) -> dict[str, list[str]]:
        if isinstance(uuids, str) or not isinstance(uuids, Sequence) or not all(
                isinstance(uuid, str) for uuid in uuids):
            raise tag_ops.TagError("ids must be a list of message ids")
        if len(uuids) > tag_ops.MAX_IDS:
            raise tag_ops.TagError(f"at most {tag_ops.MAX_IDS} ids at once")
        clean = tag_ops.clean_tags(tags)
        current: dict[str, list[str]] = {}
        await self._tag_op(self._tag_writer.edit, mode, list(uuids), clean, current)
        return current

    async def _tag_op(self, fn: Callable[..., tag_ops.Changed], *args: Any) -> int:
        result = await self._submit("tags", (fn, args))
        if isinstance(result, tag_ops.TagError):
            raise result
        self.changes.publish_many("tags", [{"uuid": uuid, "tags": tags}
                                           for uuid, tags in result])
        return len(result)

    async def _submit(self, kind: OpKind, arg: Any) -> Any:
        if not self._running or not self._writer.alive:
            raise StoreClosedError("store is not running")
        return await self._writer.submit(_Op(kind, arg))

    # ---- reads (pool of read connections, off the loop) ----------------------------------

    async def list(
        self, *, limit: int = 50, offset: int = 0, q: str | None = None
    ) -> tuple[Summaries, int]:
        """Summaries newest first, and how many messages match `q` in all."""
        page = await self.page(limit=limit, offset=offset, q=q)
        return page.messages, page.total

    async def page(self, *, limit: int = 50, offset: int = 0, q: str | None = None) -> Page:
        """Summaries newest first matching `q` (store/search.py), how many match in all, and
        how many messages are unread."""
        return await self.page_of(parse(q or ""), limit=limit, offset=offset)

    async def page_of(self, terms: list[Term], *, limit: int = 50, offset: int = 0,
                      or_raw: str | None = None) -> Page:
        """`page()` for parsed `terms`; with `or_raw`, a message whose raw bytes contain that
        text (ASCII case-insensitively: as sent, still quoted-printable or base64) matches
        too (MailHog's `containing` search, compat/mailhog.py)."""
        where, params = compile_terms(terms)
        if or_raw:
            where = f"(({where}) OR CAST(raw AS TEXT) LIKE ? ESCAPE '\\')"
            params = [*params, f"%{like_escape(or_raw)}%"]

        def query(conn: sqlite3.Connection) -> Page:
            # One read transaction, so the page and the counts come from the same snapshot.
            conn.execute("BEGIN")
            try:
                if params:
                    rows, total = _search_page(conn, where, params, limit, offset)
                else:  # no text to scan: the page by rowid, the count from an index
                    rows = conn.execute(
                        f"SELECT {SUMMARY_COLUMNS} FROM messages WHERE {where} "
                        "ORDER BY id DESC LIMIT ? OFFSET ?",
                        (limit, offset),
                    ).fetchall()
                    (total,) = conn.execute(
                        f"SELECT COUNT(*) FROM messages WHERE {where}"
                    ).fetchone()
                (unread,) = conn.execute("SELECT COUNT(*) FROM messages WHERE read = 0").fetchone()
            finally:
                conn.execute("COMMIT")
            return Page([_summary(row) for row in rows], total, unread)

        return await self._read(query)

    async def newest(self, terms: list[Term], *, after_id: int = 0,
                     after_ts: float | None = None) -> str | None:
        """The uuid of the newest message matching `terms` stored after message id `after_id`
        and received after `after_ts`, or None."""
        where, params = compile_terms(terms)
        sql = f"SELECT uuid FROM messages WHERE {where} AND id > ? AND received_ts > ? "
        args = (*params, after_id, -1.0 if after_ts is None else after_ts)
        row = await self._read(
            lambda c: c.execute(sql + "ORDER BY id DESC LIMIT 1", args).fetchone()
        )
        return None if row is None else str(row[0])

    async def id_of(self, uuid: str) -> int | None:
        """The message's row id: its place in the order of arrival."""
        row = await self._read(
            lambda c: c.execute("SELECT id FROM messages WHERE uuid = ?", (uuid,)).fetchone()
        )
        return None if row is None else int(row[0])

    async def get(self, uuid: str) -> dict[str, Any] | None:
        """The stored event; what sinks noted about it is under event["mailpipe"]["outcomes"]."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT event, outcomes, tags FROM messages WHERE uuid = ?", (uuid,)
            ).fetchone()
        )
        if row is None:
            return None
        event: dict[str, Any] = orjson.loads(row[0])
        # The current tags, not only the plugins' ones: present when it has any.
        event.pop("tags", None)
        if tags := tag_ops.loads(row[2]):
            event["tags"] = tags
        if row[1] is not None:
            event["mailpipe"] = {"outcomes": orjson.loads(row[1])}
        return event

    async def get_many(self, uuids: list[str]) -> dict[str, dict[str, Any]]:
        """The stored events of those of `uuids` that exist, by uuid, in one read (as `get`
        gives them): a page of summaries that needs more than the summary columns."""

        def query(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            rows: list[tuple[Any, ...]] = []
            for start in range(0, len(uuids), GET_MANY_CHUNK):
                chunk = uuids[start : start + GET_MANY_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows += conn.execute(
                    f"SELECT uuid, event, outcomes FROM messages WHERE uuid IN ({marks})", chunk
                ).fetchall()
            return rows

        events: dict[str, dict[str, Any]] = {}
        for uuid, event_json, outcomes in await self._read(query):
            event = orjson.loads(event_json)
            if outcomes is not None:
                event["mailpipe"] = {"outcomes": orjson.loads(outcomes)}
            events[uuid] = event
        return events

    async def raw(self, uuid: str) -> bytes | None:
        row = await self._read(
            lambda c: c.execute("SELECT raw FROM messages WHERE uuid = ?", (uuid,)).fetchone()
        )
        return None if row is None else bytes(row[0])

    async def maildrop(self) -> list[tuple[str, int]]:
        """Every message, oldest first, as POP3 lists it: (uuid, size; see MAILDROP)."""
        rows = await self._read(lambda c: c.execute(MAILDROP).fetchall())
        return [(str(uuid), int(size)) for uuid, size in rows]

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
        conn.create_function(LOWER, 1, _lower, deterministic=True)
        return conn

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun explicitly, never implicitly.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    # ---- the writer thread ---------------------------------------------------------------

    def _open_writer(self) -> None:
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.create_function(LOWER, 1, _lower, deterministic=True)  # filters, tags
            conn.executescript(SCHEMA)
            added = _add_missing_columns(conn)
            if added.intersection(REINDEXED):
                self._reindex(conn)
            conn.executescript(INDEXES)
            self._recount(conn)
            self._last_age_prune = -1e9
            # Apply retention to what an earlier run left, down to max_messages exactly.
            self._transaction(conn, [], strict=True)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_writer(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _write_batch(self, batch: Batch) -> Results:
        assert self._conn is not None
        return self._transaction(self._conn, batch)

    def _batch_failed(self, exc: Exception, batch: Batch) -> BaseException:
        self.stats["failed"] += len(batch)
        return exc

    def _apply(self, conn: sqlite3.Connection, op: _Op) -> Any:
        if op.kind == "insert":
            rowid = conn.execute(INSERT, op.arg).lastrowid
            assert rowid is not None
            self._messages += 1
            # An emptied table gives ids from 1 again: the low-water mark must stay below.
            if rowid < self._low_id:
                self._low_id = rowid
            self._oldest_ts = min(self._oldest_ts, op.arg[2])  # received_ts
            return self._tag_writer.on_insert(conn, rowid, tag_ops.loads(op.arg[-1]))
        if op.kind == "tags":
            fn, args = op.arg
            try:
                return fn(conn, *args)
            except tag_ops.TagError as exc:  # raised before writing: fails this op alone
                return exc
        if op.kind == "delete":
            deleted = conn.execute("DELETE FROM messages WHERE uuid = ?", (op.arg,)).rowcount
            self._messages -= deleted
            return deleted > 0
        if op.kind == "read":
            uuid, read = op.arg
            if uuid is None:
                sql = "UPDATE messages SET read = ? WHERE read != ?"
                return conn.execute(sql, (int(read), int(read))).rowcount
            sql = f"UPDATE messages SET read = ? WHERE uuid = ? RETURNING {SUMMARY_COLUMNS}"
            return conn.execute(sql, (int(read), uuid)).fetchone()
        deleted = conn.execute("DELETE FROM messages").rowcount
        self._messages -= deleted
        return deleted

    def _reindex(self, conn: sqlite3.Connection) -> None:
        """Compute the index columns and tags a database from an older version lacks, from
        each stored event (once, as it is upgraded)."""
        sets = ", ".join(f"{column} = ?" for column in REINDEXED)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for rowid, uuid, event_json, raw_size in conn.execute(
                    "SELECT id, uuid, event, length(raw) FROM messages").fetchall():
                try:
                    event = {"uuid": uuid, **orjson.loads(event_json)}
                except (orjson.JSONDecodeError, TypeError):  # not an event: keep defaults
                    continue
                *columns, event_tags = index_columns(event, raw_size)
                rcpt = (event.get("envelope") or {}).get("to") or ()
                tags = self.tag_rules.initial(tag_ops.loads(event_tags), rcpt)
                columns = columns[-len(REINDEXED):]
                conn.execute(f"UPDATE messages SET {sets}, tags = ? WHERE id = ?",
                             (*columns, tag_ops.dumps(tags), rowid))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _prune_only(self) -> None:
        assert self._conn is not None
        self._transaction(self._conn, [])

    def _transaction(
        self, conn: sqlite3.Connection, batch: Batch, *, strict: bool = False
    ) -> Results:
        """Apply the batch and retention in one transaction; one result per op.

        A constraint error (a duplicate uuid) only undoes its own statement, so it fails
        that op alone; anything else fails the whole batch.
        """
        results: Results = []
        self._pruned = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                try:
                    results.append(self._apply(conn, op))
                except sqlite3.IntegrityError as exc:
                    if not conn.in_transaction:  # RAISE(ROLLBACK) undid the whole batch
                        raise
                    results.append(exc)
            self._prune(conn, strict=strict)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # Undone rows were counted as they went in (and undone prunes moved the marks);
            # a rare full recount puts that right.
            self._recount(conn)
            raise
        if batch:  # retention-only transactions are not counted
            self.stats["commits"] += 1
            self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        self.stats["written"] += sum(1 for op in batch if op.kind == "insert")
        if self.metrics is not None:
            self.metrics.store_messages.set(self._messages)
        if self._pruned:  # before the batch's results, so before its "new" changes
            self.changes.publish_many("deleted", [{"uuid": uuid} for uuid in self._pruned])
        return results

    def _recount(self, conn: sqlite3.Connection) -> None:
        """Read the retention state from the table: a full count, and the smallest id."""
        self._messages = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        self._low_id = conn.execute("SELECT COALESCE(MIN(id), 0) FROM messages").fetchone()[0]
        self._oldest_ts = -math.inf  # unknown: the next age sweep looks

    def _prune(self, conn: sqlite3.Connection, *, strict: bool = False) -> None:
        """Retention, amortised: under both limits a batch runs no query for it.

        By count: once the store holds more than max_messages + 5% (at most PRUNE_CHUNK_MAX;
        `strict`, at start: more than max_messages), the oldest rows down to max_messages go
        in one range delete by id, from the low-water mark. By age: at most once a second,
        and only when the oldest received_ts that may be stored is past max_age, one delete
        through the received_ts index.
        """
        if self.max_age is not None:
            now = time.monotonic()
            cutoff = time.time() - self.max_age
            if now - self._last_age_prune >= AGE_PRUNE_INTERVAL and self._oldest_ts < cutoff:
                self._last_age_prune = now
                self._delete_pruned(conn, "received_ts < ?", cutoff)
                (oldest,) = conn.execute("SELECT MIN(received_ts) FROM messages").fetchone()
                self._oldest_ts = math.inf if oldest is None else oldest
        if self._messages > (self.max_messages if strict else self._prune_above):
            self._prune_by_count(conn)

    def _prune_by_count(self, conn: sqlite3.Connection) -> None:
        excess = self._messages - self.max_messages
        # The oldest row to keep: `excess` rows on from the low-water mark, read from the
        # table's own b-tree (the rows about to be deleted, so their pages are read once).
        row = conn.execute(
            "SELECT id FROM messages WHERE id >= ? ORDER BY id LIMIT 1 OFFSET ?",
            (self._low_id, excess),
        ).fetchone()
        if row is None:  # the count was off: there are not that many rows
            self._recount(conn)
            return
        keep_from = int(row[0])
        self._delete_pruned(conn, "id < ?", keep_from)
        self._low_id = keep_from

    def _delete_pruned(self, conn: sqlite3.Connection, where: str, arg: float) -> None:
        # RETURNING: the change feed tells watchers which messages retention removed.
        uuids = [row[0] for row in conn.execute(
            f"DELETE FROM messages WHERE {where} RETURNING uuid", (arg,))]
        self._messages -= len(uuids)
        self._pruned.extend(uuids)


class StoreSink(Sink):
    """The store as a sink: an email gets its 250 only once its row is committed. It runs
    last, so its row holds what every other sink made of the email (a refusal included)."""

    name = "store"
    required = True
    stage = STORE
    timeout = 0.0  # none by default: a commit waits for the disk (set sinks.store.timeout)
    needs_section = False  # on unless `store.enabled: false`; `sinks.store` is optional

    @classmethod
    def create(cls, settings: SinkSettings, context: SinkContext) -> StoreSink | None:
        config = context.config
        if not config.store.enabled:
            return None
        return cls(SQLiteStore(
            config.store_path,
            tag_rules=TagRules.from_config(config.tags),
            max_messages=config.store.max_messages,
            max_age=config.store.max_age,
            synchronous=config.store.synchronous,
            metrics=context.metrics,
        ))

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    async def start(self) -> None:
        await self.store.start()

    async def submit(self, email: CapturedEmail) -> Accepted:
        await self.store.add(email)
        return ACCEPTED

    async def close(self) -> None:
        await self.store.close()

    def health(self) -> dict[str, object]:
        return self.store.health()


# ---- helpers ------------------------------------------------------------------------------


def _row(email: CapturedEmail, rules: TagRules) -> tuple[Any, ...]:
    # json() first: re-encoding an event changed since it was built drops the index columns
    # computed with it, so they are computed afresh from the event.
    event_json = email.json()
    *index, event_tags = email.index or index_columns(email.event, len(email.raw))
    outcomes = orjson.dumps(email.outcomes, default=str) if email.outcomes else None
    # From the index columns, not the event: decoding an event built elsewhere costs.
    tags = rules.initial(tag_ops.loads(event_tags), index[4].split(RCPT_SEP))
    return (*index, event_json, outcomes, email.raw, tag_ops.dumps(tags))


def _search_page(
    conn: sqlite3.Connection, where: str, params: list[str], limit: int, offset: int
) -> tuple[list[tuple[Any, ...]], int]:
    """A page of matching rows and how many match, from one scan of the text: the ids of
    every match (integers, cheap to hold), then the summaries of the page's ids alone. A page
    query plus a COUNT would scan the text twice when matches are rare."""
    ids = [row[0] for row in conn.execute(
        f"SELECT id FROM messages WHERE {where} ORDER BY id DESC", params)]
    page = ids[offset : offset + limit]
    if not page:
        return [], len(ids)
    marks = ",".join("?" * len(page))
    rows = conn.execute(
        f"SELECT {SUMMARY_COLUMNS} FROM messages WHERE id IN ({marks}) ORDER BY id DESC", page
    ).fetchall()
    return rows, len(ids)


def _summary_of_insert(row: tuple[Any, ...], tags: list[str]) -> dict[str, Any]:
    """The summary of a row as INSERT writes it (a new message is unread), with its tags."""
    (uuid, received_at, _, mail_from, rcpt, header_from, subject, snippet, size,
     attachments, *_) = row
    return _summary((uuid, subject, mail_from, rcpt, header_from, received_at, size,
                     attachments, snippet, 0, tag_ops.dumps(tags)))


def _summary(row: tuple[Any, ...]) -> dict[str, Any]:
    """A row of SUMMARY_COLUMNS as the API shows it."""
    (uuid, subject, mail_from, rcpt, header_from, received_at, size, attachments, snippet,
     read, tags) = row
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
        "read": bool(read),
        "tags": tag_ops.loads(tags),
    }


def _add_missing_columns(conn: sqlite3.Connection) -> set[str]:
    """Bring a database made by an older version up to SCHEMA (SQLite adds columns in place;
    existing rows take the default); the columns added."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    added = set()
    for name, definition in COLUMNS_ADDED:
        if name not in have:
            conn.execute(f"ALTER TABLE messages ADD COLUMN {name} {definition}")
            added.add(name)
    return added


def _lower(value: str | None) -> str | None:
    return None if value is None else value.lower()


