"""The richer search syntax (store/search.py), Mailpit's query syntax included: negation,
field terms (cc:, bcc:, reply-to:, addressed:, message-id:), tag:, is:tagged, has:inline,
dates and sizes. Parsed terms, then the SQL they compile to run against a real store."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from conftest import make_email
from mailpipe.store.search import Term, compile_terms, parse, parse_size
from mailpipe.store.sqlite import SQLiteStore

JAN_2 = datetime(2024, 1, 2).timestamp()  # local time, as a naive date means


@pytest.mark.parametrize(
    ("q", "terms"),
    [
        ("-word !word", [Term("text", "word", True), Term("text", "word", True)]),
        ('-"two words"', [Term("text", "two words", True)]),
        ("-from:shop !TAG:Urgent", [Term("from", "shop", True), Term("tag", "Urgent", True)]),
        ("- ! a-b", [Term("text", "-"), Term("text", "!"), Term("text", "a-b")]),
        ("--x", [Term("text", "-x", True)]),
        ("cc:ann bcc:bo reply-to:r addressed:z message-id:<m@x>",
         [Term("cc", "ann"), Term("bcc", "bo"), Term("reply-to", "r"), Term("addressed", "z"),
          Term("message-id", "<m@x>")]),
        ('tag:"two words"', [Term("tag", "two words")]),
        ("is:tagged has:inline has:attachments has:inlines",
         [Term("is", "tagged"), Term("has", "inline"), Term("has", "attachments"),
          Term("has", "inlines")]),
        ("after:2024-01-02 -before:2024-01-02",
         [Term("after", JAN_2), Term("before", JAN_2, True)]),
        ("after:2024-01-02T00:00:00Z",
         [Term("after", datetime(2024, 1, 2, tzinfo=UTC).timestamp())]),
        ("larger:10K smaller:2MB larger:1.5m smaller:100 larger:1GB",
         [Term("larger", 10240), Term("smaller", 2 * 1024**2), Term("larger", 1572864),
          Term("smaller", 100), Term("larger", 1024**3)]),
        # Values that do not parse leave the token a plain word, as typed.
        ("after:yesterday larger:huge tag: is:starred",
         [Term("text", "after:yesterday"), Term("text", "larger:huge"), Term("text", "tag:"),
          Term("text", "is:starred")]),
    ],
)
def test_parse(q: str, terms: list[Term]) -> None:
    assert parse(q) == terms


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("2048", 2048), ("10k", 10240), ("10 KB", 10240), ("2.5mb", 2621440),
    ("1G", 1024**3), ("", None), ("k", None), ("-1", None), ("10tb", None), ("1e3", None)])
def test_sizes(text: str, size: int | None) -> None:
    assert parse_size(text) == size


def test_negated_values_are_parameters_never_sql() -> None:
    evil = "x' OR 1=1 --"
    sql, params = compile_terms(parse(f'-"{evil}" !tag:"{evil}" -cc:%_ larger:1k'))
    assert "OR 1=1" not in sql and "'x'" not in sql
    assert params[0] == f"%{evil.lower()}%"
    assert params[1] == evil.lower()  # a tag is compared whole
    assert params[2] == "%\\%\\_%"
    assert params[-1] == 1024


async def test_mailpit_terms_against_the_store(store: SQLiteStore) -> None:
    old = make_email("Old receipt", mail_from="shop@store.test", to=("ann@x.test",),
                     text="small", received_at=datetime(2024, 1, 1, 12, tzinfo=UTC))
    big = make_email("Big report", mail_from="reports@x.test", to=("bob@x.test",),
                     text="x" * 30_000, received_at=datetime(2024, 3, 1, tzinfo=UTC),
                     attachments=[{"filename": "logo.png", "content_type": "image/png",
                                   "size": 3, "disposition": "inline", "content_id": "<l>"}])
    cc = make_email("Copied", mail_from="boss@x.test", to=("carl@x.test",), text="fyi",
                    received_at=datetime(2024, 2, 1, tzinfo=UTC))
    headers = cc.event["message"]["headers"]
    headers.update({"Cc": "Zoë <zoe@x.test>", "Bcc": "hidden@x.test",
                    "Reply-To": "desk@x.test"})
    cc.event["message"]["message_id"] = "<id-42@x.test>"
    for email in (old, big, cc):
        await store.add(email)
    await store.set_tags([old.uuid], ["Billing"])

    async def found(q: str) -> list[str]:
        return sorted(m["subject"] for m in (await store.page(q=q)).messages)

    assert await found("cc:ZOË") == ["Copied"]
    assert await found("-cc:zoe") == ["Big report", "Old receipt"]  # no Cc header: not a match
    assert await found("bcc:hidden") == ["Copied"]
    assert await found("reply-to:desk") == ["Copied"]
    assert await found("addressed:desk") == ["Copied"]
    assert await found("addressed:shop@") == ["Old receipt"]
    assert await found("message-id:id-42") == ["Copied"]
    assert await found("to:carl") == ["Copied"]
    assert await found("has:inline") == ["Big report"]
    assert await found("-has:inline") == ["Copied", "Old receipt"]
    assert await found("larger:10K") == ["Big report"]
    assert await found("smaller:10k") == ["Copied", "Old receipt"]
    assert await found("after:2024-01-15T00:00:00Z") == ["Big report", "Copied"]
    assert await found("before:2024-02-01T00:00:00Z") == ["Old receipt"]
    assert await found("after:2024-01-15T00:00:00Z -before:2024-02-15T00:00:00Z") == [
        "Big report"]
    assert await found("is:tagged") == ["Old receipt"]
    assert await found("-is:tagged") == ["Big report", "Copied"]
    assert await found("tag:billing receipt") == ["Old receipt"]
    assert await found("-receipt !report") == ["Copied"]
    assert await found('-"big report"') == ["Copied", "Old receipt"]
