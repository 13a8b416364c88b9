"""GroupCommitWriter on a real SQLite file: concurrent submits (from one loop or several) share
transactions, each caller learns of its own failure, stop() drains what is queued, and a process
killed -9 in the middle of a write leaves only whole committed batches.

`Ledger` owns a writer the way SQLiteStore does (one connection, one transaction per batch) and
numbers its transactions in the file itself (table `commits`), so the grouping is read back from
the database, not from timing. Run as a script, this file is the child of the kill -9 test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mailpipe.store.writer import GroupCommitWriter

BOUND = 60.0  # every wait here ends well within this, or something hangs
BATCH_MAX = 64
Op = tuple[str, bytes]  # (key, value)

SCHEMA = """
CREATE TABLE IF NOT EXISTS commits (id INTEGER PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    commit_id INTEGER NOT NULL
);
"""


class LedgerClosedError(RuntimeError):
    pass


class Ledger:
    """A key-value file written through a GroupCommitWriter; each op's result is the id of
    the transaction that committed it, or its own IntegrityError (a duplicate key)."""

    def __init__(self, path: Path, *, batch_max: int = BATCH_MAX, room_pages: int | None = None,
                 halfway: Callable[[int, list[Op]], None] | None = None) -> None:
        self.path = path
        self.room_pages = room_pages  # pages the file may still grow by (a "full disk")
        self.halfway = halfway  # called in the writer thread mid-transaction
        self.entered = threading.Event()  # a write began: the writer has taken its batch
        self.conn: sqlite3.Connection | None = None
        self.writer: GroupCommitWriter[Op] = GroupCommitWriter(
            "ledger-writer", self.write, batch_max=batch_max,
            closed=lambda: LedgerClosedError("ledger closed"),
            setup=self.open, teardown=self.close_connection,
        )

    def open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        # A small page cache: a big transaction spills its pages to the WAL before COMMIT.
        conn.execute("PRAGMA cache_size = -64")
        conn.executescript(SCHEMA)
        if self.room_pages is not None:
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            conn.execute(f"PRAGMA max_page_count = {pages + self.room_pages}")
        self.conn = conn

    def close_connection(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def write(self, ops: list[Op]) -> list[Any]:
        self.entered.set()
        conn = self.conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            commit_id = conn.execute("INSERT INTO commits (size) VALUES (0)").lastrowid
            assert commit_id is not None
            results: list[Any] = []
            for index, op in enumerate(ops):
                if index == len(ops) // 2 and self.halfway is not None:
                    self.halfway(commit_id, ops)
                results.append(self._insert(conn, commit_id, op))
            written = sum(1 for r in results if not isinstance(r, Exception))
            conn.execute("UPDATE commits SET size = ? WHERE id = ?", (written, commit_id))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    @staticmethod
    def _insert(conn: sqlite3.Connection, commit_id: int, op: Op) -> Any:
        # A savepoint per op: a duplicate key undoes its own row only. Anything else (a full
        # disk) escapes and fails the whole batch.
        conn.execute("SAVEPOINT op")
        try:
            conn.execute("INSERT INTO items VALUES (?, ?, ?)", (*op, commit_id))
        except sqlite3.IntegrityError as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            return exc
        conn.execute("RELEASE op")
        return commit_id


def read_file(path: Path) -> tuple[list[tuple[int, int]], dict[str, int], dict[int, int]]:
    """From the file: (commits as (id, size)), commit id per key, rows per commit id."""
    conn = sqlite3.connect(path)
    try:
        commits = conn.execute("SELECT id, size FROM commits ORDER BY id").fetchall()
        keys = dict(conn.execute("SELECT key, commit_id FROM items").fetchall())
        rows = dict(conn.execute("SELECT commit_id, COUNT(*) FROM items GROUP BY commit_id"))
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()
    return commits, keys, rows


def value(key: str, size: int = 16) -> bytes:
    return (key.encode() * (size // len(key) + 1))[:size]


async def bounded(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, BOUND)


async def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class WriteLock:
    """Another connection's write transaction: the writer blocks in BEGIN until release()."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")
        self.conn.close()


async def pile_up(ledger: Ledger, first: Op, then: list[Op]) -> tuple[Any, list[Any]]:
    """`first` taken by the writer alone, `then` all queued behind it while the file is locked,
    then the lock released: the writer's grouping of `then` is up to it alone."""
    lock = WriteLock(ledger.path)
    try:
        ledger.entered.clear()
        head = asyncio.create_task(ledger.writer.submit(first))
        assert await asyncio.to_thread(ledger.entered.wait, BOUND), "the writer took nothing"
        rest = [asyncio.create_task(ledger.writer.submit(op)) for op in then]
        await wait_until(lambda: ledger.writer.pending == len(then), "every op to be queued")
    finally:
        lock.release()
    return await bounded(head), await bounded(asyncio.gather(*rest, return_exceptions=True))


def group_sizes(count: int, batch_max: int = BATCH_MAX) -> list[int]:
    return [batch_max] * (count // batch_max) + ([count % batch_max] if count % batch_max else [])


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    made = Ledger(tmp_path / "ledger.db")
    await made.writer.start()
    yield made
    await made.writer.stop()


# ---- group commit ---------------------------------------------------------------------------


async def test_ops_queued_behind_a_write_share_commits(ledger: Ledger) -> None:
    then = [(f"k{i}", value(f"k{i}")) for i in range(200)]

    first, results = await pile_up(ledger, ("first", b"1"), then)

    commits, keys, rows = read_file(ledger.path)
    # One transaction for the lone first op (no waiting for company), then full groups.
    assert [size for _, size in commits] == [1, *group_sizes(200)]
    assert keys == {"first": first, **{key: r for (key, _), r in zip(then, results, strict=True)}}
    assert rows == dict(commits)
    assert ledger.writer.last_error is None


async def test_submits_from_several_loops_share_commits_and_get_their_own_results(
    ledger: Ledger,
) -> None:
    """Four threads, each with its own event loop, 250 submits each: every result goes back
    to the loop that asked, and the 1,000 ops share a handful of transactions."""
    per_loop, loops = 250, 4
    results: dict[int, list[Any]] = {}

    def submit_from_own_loop(n: int) -> None:
        async def run() -> list[Any]:
            ops = [(f"loop{n}-{i}", value(f"loop{n}-{i}")) for i in range(per_loop)]
            return await bounded(asyncio.gather(*(ledger.writer.submit(op) for op in ops)))

        results[n] = asyncio.run(run())

    lock = WriteLock(ledger.path)
    try:
        ledger.entered.clear()
        first = asyncio.create_task(ledger.writer.submit(("first", b"1")))
        assert await asyncio.to_thread(ledger.entered.wait, BOUND)
        threads = [threading.Thread(target=submit_from_own_loop, args=(n,)) for n in range(loops)]
        for thread in threads:
            thread.start()
        await wait_until(lambda: ledger.writer.pending == per_loop * loops, "1,000 queued ops")
    finally:
        lock.release()
    await bounded(first)
    for thread in threads:
        await asyncio.to_thread(thread.join, BOUND)

    commits, keys, _ = read_file(ledger.path)
    assert [size for _, size in commits] == [1, *group_sizes(per_loop * loops)]
    assert sorted(results) == list(range(loops))
    for n, got in results.items():
        assert got == [keys[f"loop{n}-{i}"] for i in range(per_loop)]


async def test_a_lone_op_is_committed_without_company(ledger: Ledger) -> None:
    for i in range(3):
        assert await bounded(ledger.writer.submit((f"lone{i}", b"x"))) == i + 1
    commits, _, _ = read_file(ledger.path)
    assert commits == [(1, 1), (2, 1), (3, 1)]


# ---- failures ---------------------------------------------------------------------------------


async def test_a_duplicate_key_fails_only_its_own_op(ledger: Ledger) -> None:
    then = [("a", b"1"), ("first", b"again"), ("b", b"2"), ("a", b"again")]

    first, results = await pile_up(ledger, ("first", b"1"), then)

    assert first == 1
    assert results[0] == results[2] == 2
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert isinstance(results[3], sqlite3.IntegrityError)
    commits, keys, _ = read_file(ledger.path)
    assert commits == [(1, 1), (2, 2)]
    assert keys == {"first": 1, "a": 2, "b": 2}
    assert ledger.writer.last_error is None  # the batch itself went through


async def test_a_full_database_fails_every_op_of_its_batch_then_recovers(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "full.db", room_pages=16)
    await ledger.writer.start()
    try:
        big = ("big", bytes(1_000_000))  # far more than 16 pages
        then = [("small1", b"1"), big, ("small2", b"2")]

        first, results = await pile_up(ledger, ("first", b"1"), then)

        assert first == 1
        assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
        assert all("full" in str(r) for r in results), results
        assert ledger.writer.last_error is not None and "full" in ledger.writer.last_error
        # Small writes still fit: the writer carries on and forgets the error.
        assert await bounded(ledger.writer.submit(("after", b"3"))) == 2
        assert ledger.writer.last_error is None
    finally:
        await ledger.writer.stop()
    commits, keys, _ = read_file(ledger.path)
    assert commits == [(1, 1), (2, 1)]
    assert keys == {"first": 1, "after": 2}


async def test_setup_failure_is_raised_by_start(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "missing-dir" / "ledger.db")
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        await bounded(ledger.writer.start())


# ---- stop -------------------------------------------------------------------------------------


async def test_stop_writes_everything_queued_first(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.writer.start()
    then = [(f"k{i}", value(f"k{i}")) for i in range(100)]
    lock = WriteLock(ledger.path)
    try:
        head = asyncio.create_task(ledger.writer.submit(("first", b"1")))
        assert await asyncio.to_thread(ledger.entered.wait, BOUND)
        rest = [asyncio.create_task(ledger.writer.submit(op)) for op in then]
        await wait_until(lambda: ledger.writer.pending == len(then), "every op to be queued")
        stopping = asyncio.create_task(ledger.writer.stop())
        await wait_until(lambda: ledger.writer.pending == len(then) + 1, "the stop marker")
    finally:
        lock.release()

    await bounded(stopping)

    assert not ledger.writer.alive and ledger.conn is None  # teardown ran
    assert await bounded(head) == 1
    assert await bounded(asyncio.gather(*rest)) == [2] * 64 + [3] * 36
    commits, keys, _ = read_file(ledger.path)
    assert [size for _, size in commits] == [1, 64, 36]
    assert len(keys) == 101


async def test_a_stopped_writer_starts_again(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.writer.start()
    assert await bounded(ledger.writer.submit(("one", b"1"))) == 1
    await ledger.writer.stop()
    await ledger.writer.start()
    assert await bounded(ledger.writer.submit(("two", b"2"))) == 2
    await ledger.writer.stop()
    assert read_file(ledger.path)[1] == {"one": 1, "two": 2}


# ---- kill -9 mid-write ------------------------------------------------------------------------

KILL_AFTER = 20  # the child blocks halfway through a big transaction after this many
CHILD_SUBMITTERS = 48
CHILD_VALUE_SIZE = 16_384


def child_main(path: Path) -> None:
    """The killed process: submits without end, prints `acked KEY COMMIT` per result, and
    halfway through the first transaction of 16 ops or more after KILL_AFTER prints
    `half COMMIT KEYS...` and blocks there, its rows so far spilled to the WAL (the page cache
    holds 64 KB) but not committed."""
    out = sys.stdout
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            out.write(line + "\n")
            out.flush()

    def halfway(commit_id: int, ops: list[Op]) -> None:
        if commit_id > KILL_AFTER and len(ops) >= 16:
            say(f"half {commit_id} {' '.join(key for key, _ in ops)}")
            sys.stdin.read()  # the parent never writes: killed here

    async def submitter(ledger: Ledger, n: int) -> None:
        for i in range(10**9):
            key = f"s{n}-{i}"
            commit_id = await ledger.writer.submit((key, os.urandom(CHILD_VALUE_SIZE)))
            say(f"acked {key} {commit_id}")

    async def main() -> None:
        ledger = Ledger(path, batch_max=32, halfway=halfway)
        await ledger.writer.start()
        await asyncio.gather(*(submitter(ledger, n) for n in range(CHILD_SUBMITTERS)))

    asyncio.run(main())


def test_kill_9_mid_write_leaves_only_whole_committed_batches(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    child = subprocess.Popen(
        [sys.executable, __file__, "child", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    acked: dict[str, int] = {}
    interrupted: list[str] = []
    killed_in = 0
    try:
        assert child.stdout is not None
        for line in child.stdout:
            kind, *fields = line.split()
            if kind == "acked":
                acked[fields[0]] = int(fields[1])
            elif kind == "half":
                killed_in, interrupted = int(fields[0]), fields[1:]
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(BOUND)
    assert child.returncode == -signal.SIGKILL
    assert interrupted, "the child never reached the transaction it is killed in"
    # The interrupted transaction had put pages on disk: recovery must leave them out.
    spilled = uncommitted_wal_frames(path.with_name(path.name + "-wal"))
    assert spilled > 0

    commits, keys, rows = read_file(path)  # recovers the WAL, checks integrity

    # Exactly the transactions before the interrupted one, each whole, nothing of that one.
    assert [commit_id for commit_id, _ in commits] == list(range(1, killed_in))
    assert rows == dict(commits)
    assert all(size > 0 for _, size in commits)
    assert not set(interrupted) & set(keys)
    # Every op the child was told is committed is there, in the transaction it was told.
    assert acked and all(keys.get(key) == commit_id for key, commit_id in acked.items())
    print(f"kill -9 in commit {killed_in}: {len(keys)} rows in {len(commits)} whole batches; "
          f"{len(interrupted)} ops and {spilled} WAL frames of the interrupted one left out")


def uncommitted_wal_frames(wal: Path) -> int:
    """Frames at the end of a WAL file that no commit frame covers: the pages a transaction
    wrote before its COMMIT (sqlite.org/fileformat.html#the_write_ahead_log)."""
    data = wal.read_bytes()
    page_size, salts = int.from_bytes(data[8:12], "big"), data[16:24]
    offset, since_commit = 32, 0
    while offset + 24 + page_size <= len(data) and data[offset + 8 : offset + 16] == salts:
        is_commit = int.from_bytes(data[offset + 4 : offset + 8], "big") != 0
        since_commit = 0 if is_commit else since_commit + 1
        offset += 24 + page_size
    return since_commit


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child_main(Path(sys.argv[2]))
