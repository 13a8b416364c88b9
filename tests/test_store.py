"""SQLiteStore against a real database file: group commit, durability, retention, queries."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import make_email
from mailpipe.event import CapturedEmail
from mailpipe.metrics import Metrics
from mailpipe.store.index import SEARCH_BODY_CHARS
from mailpipe.store.sqlite import PRUNE_CHUNK_MAX, SQLiteStore, StoreClosedError, StoreSink


@contextlib.contextmanager
def writer_blocked(path: Path) -> Iterator[None]:
    """Hold the database's write lock, so the store's writer waits and ops pile up."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("COMMIT")
        conn.close()


async def add_in_one_batch(store: SQLiteStore, emails: list[CapturedEmail]) -> list[Any]:
    """Queue `emails` while the writer is stuck on a first email, so they form one batch."""
    with writer_blocked(store.path):
        first = asyncio.create_task(store.add(make_email("first")))
        await asyncio.sleep(0.1)  # the writer has taken `first` and waits for the lock
        tasks = [asyncio.create_task(store.add(e)) for e in emails]
        await asyncio.sleep(0.05)
    await first
    return await asyncio.gather(*tasks, return_exceptions=True)


def external_uuids(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT uuid FROM messages")}
    finally:
        conn.close()


# ---- group commit and durability -----------------------------------------------------------


async def test_concurrent_adds_share_commits(store: SQLiteStore) -> None:
    emails = [make_email(f"load {i}") for i in range(1000)]
    await asyncio.gather(*(store.add(e) for e in emails))

    assert external_uuids(store.path) == {e.uuid for e in emails}
    assert await store.count() == 1000
    assert store.stats["written"] == 1000
    # One fsync per batch, not per email.
    assert store.stats["commits"] <= 100
    assert store.stats["max_batch"] > 1
    assert store.metrics is not None
    assert store.metrics.store_messages._value.get() == 1000


async def test_lone_add_commits_without_waiting(store: SQLiteStore) -> None:
    start = time.perf_counter()
    await store.add(make_email())
    assert time.perf_counter() - start < 0.5
    assert store.stats["commits"] == 1


async def test_added_row_is_visible_to_another_process(store: SQLiteStore) -> None:
    email = make_email("durable")
    await store.add(email)
    script = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
        "print(c.execute('SELECT subject FROM messages WHERE uuid = ?', (sys.argv[2],))"
        ".fetchone()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(store.path), email.uuid],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    assert out.stdout.strip() == "durable"


async def test_messages_survive_reopen_and_data_dir_is_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store.db"
    first = SQLiteStore(path)
    await first.start()
    email = make_email("kept")
    await first.add(email)
    await first.close()

    second = SQLiteStore(path)
    await second.start()
    try:
        assert (await second.get(email.uuid))["message"]["subject"] == "kept"
    finally:
        await second.close()


async def test_close_flushes_pending_adds(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "store.db")
    await s.start()
    emails = [make_email(f"pending {i}") for i in range(50)]
    tasks = [asyncio.create_task(s.add(e)) for e in emails]
    await asyncio.sleep(0)  # every add has queued its row
    await s.close()
    await asyncio.gather(*tasks)
    assert external_uuids(s.path) == {e.uuid for e in emails}
    with pytest.raises(StoreClosedError):
        await s.add(make_email())
    with pytest.raises(StoreClosedError):
        await s.count()


async def test_failed_batch_fails_every_add_then_recovers(store: SQLiteStore) -> None:
    conn = sqlite3.connect(store.path, isolation_level=None)
    conn.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN NEW.subject = 'boom' "
        "BEGIN SELECT RAISE(ROLLBACK, 'disk on fire'); END"
    )
    conn.close()
    good, bad = make_email("good"), make_email("boom")

    results = await add_in_one_batch(store, [good, bad])

    assert all(isinstance(r, sqlite3.Error) for r in results), results
    assert good.uuid not in external_uuids(store.path)
    assert store.health()["ok"] is False
    await store.add(make_email("after"))  # the writer carries on
    assert store.health()["ok"] is True


async def test_duplicate_uuid_fails_only_itself(store: SQLiteStore) -> None:
    a = make_email("a")
    dup = make_email("dup", uuid=a.uuid)
    b = make_email("b")

    results = await add_in_one_batch(store, [a, dup, b])

    assert results[0] is None and results[2] is None
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert (await store.get(a.uuid))["message"]["subject"] == "a"
    assert await store.get(b.uuid) is not None


# ---- retention ------------------------------------------------------------------------------


async def test_retention_keeps_newest_max_messages(tmp_path: Path) -> None:
    metrics = Metrics()
    s = SQLiteStore(tmp_path / "store.db", max_messages=5, metrics=metrics)
    await s.start()
    try:
        emails = [make_email(f"n{i}") for i in range(8)]
        for e in emails:
            await s.add(e)
        summaries, total = await s.list()
        assert total == 5
        assert [m["uuid"] for m in summaries] == [e.uuid for e in reversed(emails[3:])]
        assert metrics.store_messages._value.get() == 5

        await asyncio.gather(*(s.add(make_email(f"burst {i}")) for i in range(20)))
        assert await s.count() == 5
    finally:
        await s.close()


async def test_retention_drops_messages_older_than_max_age(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    old = make_email("old", received_at=datetime.now(UTC) - timedelta(hours=2))
    s = SQLiteStore(path, max_age=3600)
    await s.start()
    try:
        await s.add(old)
        fresh = make_email("fresh")
        await s.add(fresh)
        # The age sweep runs with a write at most once a second, and while idle.
        deadline = time.monotonic() + 5
        while await s.get(old.uuid) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            await s.add(make_email("nudge"))
        assert await s.get(old.uuid) is None
        assert fresh.uuid in external_uuids(path)
    finally:
        await s.close()


async def test_age_retention_applies_at_start_and_while_idle(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    keep_all = SQLiteStore(path)
    await keep_all.start()
    await keep_all.add(make_email("old", received_at=datetime.now(UTC) - timedelta(hours=2)))
    await keep_all.close()

    s = SQLiteStore(path, max_age=0.3)
    await s.start()
    try:
        assert await s.count() == 0  # pruned on start
        await s.add(make_email("short-lived"))
        assert await s.count() == 1
        deadline = time.monotonic() + 3
        while await s.count() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await s.count() == 0  # pruned with no further writes
    finally:
        await s.close()


async def test_retention_by_count_is_amortised(tmp_path: Path) -> None:
    # max_messages 40: the store may grow to 42 (5%), then drops back to 40 in one delete.
    path = tmp_path / "store.db"
    s = SQLiteStore(path, max_messages=40)
    await s.start()
    try:
        emails = [make_email(f"a{i}") for i in range(130)]
        counts = []
        with s.changes.subscribe() as changes:
            for e in emails:
                await s.add(e)
                counts.append(len(external_uuids(path)))
            await asyncio.sleep(0.05)
            seen = []
            while changes._queue.qsize():
                change = await changes.get()
                assert change is not None
                seen.append((change.kind, change.data["uuid"]))
        assert max(counts) == 42 and min(counts[40:]) == 40
        # The margin: 5% rounded down (none under 20), at most PRUNE_CHUNK_MAX rows.
        margins = {n: SQLiteStore(path, max_messages=n)._prune_above - n
                   for n in (1, 19, 20, 5000, 100_000)}
        assert margins == {1: 0, 19: 0, 20: 1, 5000: 250, 100_000: PRUNE_CHUNK_MAX}
        assert counts[:45] == [*range(1, 43), 40, 41, 42]
        # Exactly the oldest went, and the newest are all there.
        assert external_uuids(path) == {e.uuid for e in emails[-counts[-1]:]}
        assert await s.count() == counts[-1] == s.health()["messages"]
        # Each pruned email was announced, oldest first, before the new email that pushed it.
        deleted = [uuid for kind, uuid in seen if kind == "deleted"]
        assert deleted == [e.uuid for e in emails[: 130 - counts[-1]]]
        # (A commit's deletions come before its new emails.)
        assert seen[42:46] == [("deleted", emails[0].uuid), ("deleted", emails[1].uuid),
                               ("deleted", emails[2].uuid), ("new", emails[42].uuid)]
    finally:
        await s.close()


async def test_retention_by_count_with_holes_and_batches(tmp_path: Path) -> None:
    # Ids deleted by hand leave holes: the prune still keeps exactly the newest max_messages.
    path = tmp_path / "store.db"
    s = SQLiteStore(path, max_messages=100)
    await s.start()
    try:
        emails = [make_email(f"h{i}") for i in range(100)]
        await asyncio.gather(*(s.add(e) for e in emails))
        order = [e.uuid for e in emails]  # gather queues them in order: ids follow it
        for uuid in order[3:60:2]:
            assert await s.delete(uuid)
        kept = [u for u in order if u not in set(order[3:60:2])]
        more = [make_email(f"m{i}") for i in range(300)]
        first = make_email("first")
        with writer_blocked(path):  # 201 emails in one transaction, far over the limit
            tasks = [asyncio.create_task(s.add(first))]
            await asyncio.sleep(0.1)  # the writer has taken `first` and waits for the lock
            tasks += [asyncio.create_task(s.add(e)) for e in more[:200]]
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        assert len(external_uuids(path)) == 100  # pruned in that transaction, to the limit
        for e in more[200:]:
            await s.add(e)
            assert 100 <= len(external_uuids(path)) <= 105
        arrival = [*kept, first.uuid, *(e.uuid for e in more)]
        stored = external_uuids(path)
        assert stored == set(arrival[-len(stored):])  # exactly the oldest went
    finally:
        await s.close()


async def test_retention_by_count_after_the_store_was_emptied(tmp_path: Path) -> None:
    # Cleared, SQLite hands out ids from 1 again, below the low-water mark of before.
    path = tmp_path / "store.db"
    s = SQLiteStore(path, max_messages=40)
    await s.start()
    try:
        for i in range(130):
            await s.add(make_email(f"before {i}"))
        await s.clear()
        emails = [make_email(f"after {i}") for i in range(43)]
        for e in emails:
            await s.add(e)
        assert external_uuids(path) == {e.uuid for e in emails[3:]}
    finally:
        await s.close()


async def test_restart_with_an_over_full_table_prunes_to_max_messages(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    big = SQLiteStore(path, max_messages=1000)
    await big.start()
    emails = [make_email(f"r{i}") for i in range(50)]
    for e in emails:
        await big.add(e)
    await big.close()

    # 50 is within 48's 5% margin (50), yet at start the store prunes down to the limit.
    s = SQLiteStore(path, max_messages=48)
    await s.start()
    try:
        assert external_uuids(path) == {e.uuid for e in emails[2:]}
        assert await s.count() == 48
    finally:
        await s.close()
    s = SQLiteStore(path, max_messages=10)
    await s.start()
    try:
        assert external_uuids(path) == {e.uuid for e in emails[-10:]}
        await s.add(newer := make_email("after restart"))
        assert external_uuids(path) == {*(e.uuid for e in emails[-9:]), newer.uuid}
    finally:
        await s.close()


async def test_age_retention_sweeps_a_late_old_email(tmp_path: Path) -> None:
    # After a sweep found nothing left to do, an email that arrives already old (its
    # received_at in the past) must still go: the store's oldest-timestamp mark follows it.
    path = tmp_path / "store.db"
    s = SQLiteStore(path, max_age=3600, max_messages=1000)
    await s.start()
    try:
        fresh = [make_email(f"fresh {i}") for i in range(30)]
        for e in fresh:
            await s.add(e)
        old = make_email("late old", received_at=datetime.now(UTC) - timedelta(hours=2))
        await s.add(old)
        deadline = time.monotonic() + 5
        while await s.get(old.uuid) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            await s.add(make_email("nudge"))
        assert await s.get(old.uuid) is None
        assert {e.uuid for e in fresh} <= external_uuids(path)
    finally:
        await s.close()


# ---- queries ----------------------------------------------------------------------------------


async def test_list_is_newest_first_with_pagination(store: SQLiteStore) -> None:
    emails = [make_email(f"m{i}") for i in range(7)]
    for e in emails:
        await store.add(e)
    newest_first = [e.uuid for e in reversed(emails)]

    page, total = await store.list(limit=3)
    assert total == 7 and [m["uuid"] for m in page] == newest_first[:3]
    page, total = await store.list(limit=3, offset=3)
    assert [m["uuid"] for m in page] == newest_first[3:6]
    page, total = await store.list(limit=3, offset=6)
    assert [m["uuid"] for m in page] == newest_first[6:]
    page, total = await store.list(offset=50)
    assert page == [] and total == 7


async def test_summary_fields(store: SQLiteStore) -> None:
    email = make_email(
        "Summary",
        mail_from="bounce@app.test",
        to=("a@x.test", "b@y.test"),
        header_from="Ann <ann@app.test>",
        text="  first   line\n\nsecond " + "x" * 300,
    )
    await store.add(email)
    (summary,), _ = await store.list()
    assert summary == {
        "uuid": email.uuid,
        "subject": "Summary",
        "from": "bounce@app.test",
        "to": ["a@x.test", "b@y.test"],
        "header_from": "Ann <ann@app.test>",
        "received_at": email.event["received_at"],
        "size": len(email.raw),
        "attachments": 0,
        "snippet": ("first line second " + "x" * 300)[:120],
        "read": False,
        "tags": [],
    }


async def test_search(store: SQLiteStore) -> None:
    invoice = make_email("Your Invoice", to=("billing@shop.test",), text="Total due: 42 EUR")
    percent = make_email("100% done", text="nothing")
    plain = make_email("100 percent done", text="nothing")
    underscore = make_email("ticket a_b", text="nothing")
    lookalike = make_email("ticket axb", text="nothing")
    html_only = make_email(
        "newsletter", text=None, html="<style>p{}</style><p>Caf&eacute; <b>opening</b></p>"
    )
    sender = make_email("from header", header_from="Zoë <zoe@people.test>")
    for e in (invoice, percent, plain, underscore, lookalike, html_only, sender):
        await store.add(e)

    async def found(q: str) -> set[str]:
        summaries, total = await store.list(q=q)
        assert total == len(summaries)
        return {m["uuid"] for m in summaries}

    assert await found("INVOICE") == {invoice.uuid}
    assert await found("billing@SHOP") == {invoice.uuid}
    assert await found("due: 42") == {invoice.uuid}
    assert await found("100%") == {percent.uuid}
    assert await found("a_b") == {underscore.uuid}
    assert await found("café opening") == {html_only.uuid}
    assert await found("ZOË") == {sender.uuid}
    assert await found("p{}") == set()  # stylesheet text is not body text
    assert await found("no such thing") == set()
    (summary,), _ = await store.list(q="newsletter")
    assert summary["snippet"] == "Café opening"


async def test_search_reads_the_first_64k_characters_of_a_body(store: SQLiteStore) -> None:
    # A body is searched up to SEARCH_BODY_CHARS: a 20 MB one is not written twice.
    filler = "lorem ipsum " * (SEARCH_BODY_CHARS // 12)
    big = make_email("big", text=f"early-word {filler[: SEARCH_BODY_CHARS - 40]} near-end {filler}"
                     " late-word")
    await store.add(big)
    for q, expected in (("early-word", {big.uuid}), ("near-end", {big.uuid}), ("late-word", set())):
        summaries, _ = await store.list(q=q)
        assert {m["uuid"] for m in summaries} == expected, q
    assert await store.raw(big.uuid) is not None  # the whole message is still kept


async def test_get_raw_and_outcomes(store: SQLiteStore) -> None:
    raw = (
        b"Subject: bytes\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"\xff\xfe\x80 caf\xc3\xa9\r\n.\r\n"
    )
    email = make_email("bytes", raw=raw)
    noted = make_email("noted")
    noted.outcomes["relay"] = {"status": "sent"}
    await store.add(email)
    await store.add(noted)

    assert await store.get(email.uuid) == email.event
    assert await store.raw(email.uuid) == raw
    assert (await store.get(noted.uuid))["mailpipe"] == {"outcomes": {"relay": {"status": "sent"}}}
    assert await store.get("missing") is None
    assert await store.raw("missing") is None


async def test_delete_and_clear(store: SQLiteStore) -> None:
    emails = [make_email(f"d{i}") for i in range(4)]
    for e in emails:
        await store.add(e)

    assert await store.delete(emails[0].uuid) is True
    assert await store.delete(emails[0].uuid) is False
    assert await store.get(emails[0].uuid) is None
    assert await store.count() == 3
    assert await store.clear() == 3
    assert await store.count() == 0
    assert external_uuids(store.path) == set()
    assert store.metrics is not None and store.metrics.store_messages._value.get() == 0


async def test_store_sink(tmp_path: Path) -> None:
    sink = StoreSink(SQLiteStore(tmp_path / "store.db"))
    assert (sink.name, sink.required) == ("store", True)
    await sink.start()
    try:
        email = make_email("via sink")
        await sink.submit(email)
        assert external_uuids(sink.store.path) == {email.uuid}
        assert sink.health()["ok"] is True and sink.health()["messages"] == 1
    finally:
        await sink.close()
    assert sink.health()["ok"] is False


def test_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / "x.db", synchronous="FULL; DROP TABLE messages")
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / "x.db", max_messages=0)
