"""The search syntax (store/search.py): parsed terms, and the SQL they compile to run against a
real store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from conftest import make_email
from mailpipe.store.search import Term, compile_terms, parse
from mailpipe.store.sqlite import SQLiteStore


@pytest.mark.parametrize(
    ("q", "terms"),
    [
        ("", []),
        ("  ", []),
        ("Hello world", [Term("text", "Hello"), Term("text", "world")]),
        ('"order 42" x', [Term("text", "order 42"), Term("text", "x")]),
        ('"open quote', [Term("text", "open quote")]),
        ('""', []),
        ("from:shop@x.test", [Term("from", "shop@x.test")]),
        ("FROM:Shop", [Term("from", "Shop")]),
        ('subject:"two words"', [Term("subject", "two words")]),
        ("to:alice subject:hi", [Term("to", "alice"), Term("subject", "hi")]),
        ("has:attachment is:unread is:READ",
         [Term("has", "attachment"), Term("is", "unread"), Term("is", "read")]),
        # Unknown prefixes and values stay words, as typed.
        ("re:hello", [Term("text", "re:hello")]),
        ("http://x.test/a", [Term("text", "http://x.test/a")]),
        ("has:pdf is:starred", [Term("text", "has:pdf"), Term("text", "is:starred")]),
        ("from:", [Term("text", "from:")]),
        (":x a:", [Term("text", ":x"), Term("text", "a:")]),
        ('say"hi"', [Term("text", 'say"hi"')]),
    ],
)
def test_parse(q: str, terms: list[Term]) -> None:
    assert parse(q) == terms


def test_values_are_parameters_never_sql() -> None:
    evil = "x' OR 1=1 --"
    sql, params = compile_terms(parse(f'{evil} from:"{evil}" subject:%_\\'))
    assert "OR 1=1" not in sql and "'x'" not in sql
    assert params[0] == "%x'%"
    assert params[-1] == "%\\%\\_\\\\%"  # LIKE wildcards are literal
    assert compile_terms([]) == ("1", [])


async def test_search_against_the_store(store: SQLiteStore) -> None:
    shop = make_email("Your Receipt", mail_from="shop@store.test", to=("alice@x.test",),
                      header_from="Shop <orders@store.test>", text="order 42 shipped")
    news = make_email("Weekly news", mail_from="news@x.test", to=("bob@x.test",),
                      text="shipped order soon 42",
                      attachments=[{"filename": "a.pdf", "content_type": "application/pdf"}])
    accent = make_email("ÉTÉ sale", mail_from="promo@x.test", to=("Zoë@x.test",), text="sun")
    for email in (shop, news, accent):
        await store.add(email)
    await store.mark_read(news.uuid)

    async def found(q: str) -> list[str]:
        return [m["subject"] for m in (await store.page(q=q)).messages]

    assert await found("order 42") == ["Weekly news", "Your Receipt"]
    assert await found('"order 42"') == ["Your Receipt"]
    assert await found("from:orders@") == ["Your Receipt"]  # the From header counts
    assert await found("from:SHOP@") == ["Your Receipt"]
    assert await found("to:bob") == ["Weekly news"]
    assert await found("to:zoË") == ["ÉTÉ sale"]  # case folded beyond ASCII
    assert await found("subject:été") == ["ÉTÉ sale"]
    assert await found("subject:shipped") == []  # in the body, not the subject
    assert await found("has:attachment") == ["Weekly news"]
    assert await found("is:unread") == ["ÉTÉ sale", "Your Receipt"]
    assert await found("is:read shipped") == ["Weekly news"]
    assert await found("re:x") == []


async def test_read_flags_and_unread_count(store: SQLiteStore) -> None:
    emails = [make_email(f"m{i}") for i in range(3)]
    for email in emails:
        await store.add(email)
    assert (await store.page()).unread == 3

    summary = await store.mark_read(emails[0].uuid)
    assert summary is not None and summary["read"] and summary["uuid"] == emails[0].uuid
    page = await store.page(q="is:unread", limit=1)
    assert (page.total, page.unread, len(page.messages)) == (2, 2, 1)
    assert await store.mark_read("nope") is None

    assert await store.mark_all_read() == 2
    assert (await store.page()).unread == 0
    assert await store.mark_all_read(False) == 3
    summary = await store.mark_read(emails[1].uuid, False)  # unchanged still answers
    assert summary is not None and not summary["read"]


async def test_old_database_gains_the_read_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    # The schema as the first release wrote it, with one message.
    conn.executescript("""
        CREATE TABLE messages (id INTEGER PRIMARY KEY, uuid TEXT NOT NULL UNIQUE,
            received_at TEXT NOT NULL, received_ts REAL NOT NULL, mail_from TEXT NOT NULL,
            rcpt TEXT NOT NULL, header_from TEXT, subject TEXT, snippet TEXT NOT NULL,
            size INTEGER NOT NULL, attachment_count INTEGER NOT NULL, search TEXT NOT NULL,
            event BLOB NOT NULL, outcomes BLOB, raw BLOB NOT NULL);
        INSERT INTO messages VALUES (1, 'u-1', '2026-01-01T00:00:00Z', 0, 'a@x', 'b@x', NULL,
            'old', '', 3, 0, 'old', '{}', NULL, 'raw');
    """)
    conn.close()
    store = SQLiteStore(path)
    await store.start()
    try:
        page = await store.page()
        assert page.unread == 1 and page.messages[0]["read"] is False
        assert (await store.mark_read("u-1")) is not None
        await store.add(make_email("new"))
        assert (await store.page(q="is:read")).messages[0]["uuid"] == "u-1"
    finally:
        await store.close()
    indexes = {row[1] for row in sqlite3.connect(path).execute("PRAGMA index_list(messages)")}
    assert "messages_unread" in indexes


# ---- the change feed ------------------------------------------------------------------------


async def test_change_feed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "feed.db", max_messages=2)
    await store.start()
    emails = [make_email(f"f{i}") for i in range(3)]
    with store.changes.subscribe() as changes:
        for email in emails[:2]:
            await store.add(email)
        await store.mark_read(emails[0].uuid)
        await store.mark_all_read()
        await store.add(emails[2])  # retention removes emails[0]
        await store.delete(emails[1].uuid)
        await store.delete(emails[1].uuid)  # nothing deleted: nothing published
        await store.clear()
        await store.close()
        seen = []
        while (change := await changes.get()) is not None:
            seen.append((change.kind, change.data.get("uuid") or change.data))
    assert seen == [
        ("new", emails[0].uuid),
        ("new", emails[1].uuid),
        ("read", emails[0].uuid),
        ("read", {"all": True, "read": True}),
        ("deleted", emails[0].uuid),
        ("new", emails[2].uuid),
        ("deleted", emails[1].uuid),
        ("cleared", {}),
    ]
    assert store.changes.subscribers == 0


async def test_a_subscriber_too_far_behind_is_ended(store: SQLiteStore) -> None:
    store.changes.backlog = 3
    with store.changes.subscribe() as slow, store.changes.subscribe() as fast:
        for i in range(5):
            await store.add(make_email(f"s{i}"))
            assert (await fast.get()) is not None
        kinds = [(await slow.get()) for _ in range(4)]
    assert [c.kind if c else None for c in kinds] == ["new", "new", "new", None]
    assert slow.ended and not fast.ended
