"""Tags on stored emails: validation, where automatic tags come from, and the writes.

A message's tags are a JSON array in its `tags` column, in the order given. Tags are
case-preserving but matched case-insensitively (as Mailpit's are): adding "invoices" where
"Invoices" exists uses "Invoices", and no message holds two spellings of one tag.

Automatic tags, added as a message is stored: the event's `tags` (from plugins), the part
after `+` of each recipient's local part (`alice+signup@x.test` tags `signup`; config
`tags.plus_addressing`), and config's filter rules (`tags.filters`: a search query and the tags
it adds, applied with the store's own search, store/search.py). The write functions run in
the store's writer thread on its connection; the rest is sans-I/O.
"""

from __future__ import annotations

import sqlite3
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from mailpipe.store.search import LOWER, TAG_MATCH, compile_terms, parse

MAX_TAG_CHARS = 100
MAX_TAGS = 50  # on one message
MAX_IDS = 10_000  # messages in one bulk edit
# Control, format, surrogate, private-use and unassigned characters, and line and paragraph
# separators: nothing a tag name needs, and what forges log lines or hides text.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
TAGGED = "tags != '[]'"

Mode = Literal["set", "add", "remove"]
Changed = list[tuple[str, list[str]]]  # (uuid, its tags now) per message changed


class TagError(ValueError):
    """A tag name (or list of them) that is not acceptable; the message says why."""


def clean_tag(name: object) -> str:
    """`name` stripped of surrounding spaces, or TagError."""
    if not isinstance(name, str):
        raise TagError("a tag must be a string")
    name = name.strip()
    if not name:
        raise TagError("a tag must not be empty")
    if len(name) > MAX_TAG_CHARS:
        raise TagError(f"a tag must be at most {MAX_TAG_CHARS} characters")
    if any(unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in name):
        raise TagError("a tag must not contain control characters")
    return name


def clean_tags(names: object, *, strict: bool = True) -> list[str]:
    """Valid tags, each once (the first spelling), in order. `strict`: TagError for anything
    invalid; else invalid names are dropped (tags a plugin or an address gave)."""
    if not isinstance(names, list | tuple):
        raise TagError("tags must be a list of strings")
    found: dict[str, str] = {}
    for name in names:
        try:
            tag = clean_tag(name)
        except TagError:
            if strict:
                raise
            continue
        found.setdefault(tag.lower(), tag)
    if len(found) > MAX_TAGS:
        if strict:
            raise TagError(f"a message may have at most {MAX_TAGS} tags")
        return list(found.values())[:MAX_TAGS]
    return list(found.values())


def plus_tags(recipients: Iterable[str]) -> list[str]:
    """`tag` of every `user+tag@domain` among `recipients`."""
    tags = []
    for address in recipients:
        local = address.rpartition("@")[0] if "@" in address else ""
        _, plus, tag = local.partition("+")
        if plus and tag:
            tags.append(tag)
    return tags


@dataclass(frozen=True, slots=True)
class TagFilter:
    """Messages matching the search query `match` get `tags`."""

    match: str
    tags: tuple[str, ...]
    where: str = field(init=False)
    params: tuple[Any, ...] = field(init=False)

    def __post_init__(self) -> None:
        terms = parse(self.match)
        if not terms:
            raise TagError(f"tag filter {self.match!r} has no search terms")
        where, params = compile_terms(terms)
        object.__setattr__(self, "tags", tuple(clean_tags(list(self.tags))))
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "params", tuple(params))


@dataclass(frozen=True, slots=True)
class TagRules:
    """Where a new message's automatic tags come from (config `tags`)."""

    plus_addressing: bool = True
    filters: tuple[TagFilter, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> TagRules:
        """From config's `tags` section (config.TagsConfig)."""
        return cls(config.plus_addressing,
                   tuple(TagFilter(f.match, tuple(f.tags)) for f in config.filters))

    def initial(self, event_tags: list[str], recipients: Iterable[str]) -> list[str]:
        """A new message's tags before its filters: the event's own (from plugins), then
        its recipients' plus-address tags."""
        tags = list(event_tags)
        if self.plus_addressing:
            tags += plus_tags(recipients)
        return clean_tags(tags, strict=False)


def dumps(tags: Sequence[str]) -> str:
    return orjson.dumps(list(tags)).decode()


def loads(text: str | None) -> list[str]:
    return list(orjson.loads(text)) if text else []


# ---- writes, in the store's writer thread ------------------------------------------------


class TagWriter:
    """The store's tag writes, run by its writer thread on its connection.

    It keeps the spelling the store uses for each tag (by its lower-case name) in memory, so
    that a tagged insert looks it up rather than scanning every tagged row: loaded from the
    table on first use, updated by each write. A rolled-back write or a deleted message may
    leave a spelling behind, which costs nothing but a spelling; past MAX_SPELLINGS of them
    (a peer inventing plus-addresses) they are loaded afresh from the messages stored.
    """

    MAX_SPELLINGS = 20_000

    def __init__(self, rules: TagRules) -> None:
        self.rules = rules
        self._spellings: dict[str, str] | None = None

    def on_insert(self, conn: sqlite3.Connection, rowid: int, tags: list[str]) -> list[str]:
        """The new message's tags once its filters have run, in order, and its spellings
        are the store's (its row was inserted with `tags`); written when that changed them."""
        final = written = tags
        for rule in self.rules.filters:
            sql = f"SELECT 1 FROM messages WHERE id = ? AND {rule.where}"
            if conn.execute(sql, (rowid, *rule.params)).fetchone() is None:
                continue
            final = clean_tags([*final, *rule.tags], strict=False)
            if final != written:  # written now: the rules after it may ask for its tags
                _update(conn, rowid, final)
                written = final
        if final:
            final = self._respell(conn, final)
        if final != written:
            _update(conn, rowid, final)
        return final

    def edit(self, conn: sqlite3.Connection, mode: Mode, uuids: Sequence[str],
             tags: list[str], current: dict[str, list[str]]) -> Changed:
        """Set, add or remove `tags` (already clean) on each message of `uuids` that exists,
        and put its tags now in `current`. Raises TagError (having written nothing) when a
        message would get too many tags."""
        if mode != "remove":
            tags = self._respell(conn, tags)
        unwanted = {tag.lower() for tag in tags}
        plan = []
        for uuid in dict.fromkeys(uuids):
            row = conn.execute("SELECT id, tags FROM messages WHERE uuid = ?",
                               (uuid,)).fetchone()
            if row is None:
                continue
            before = loads(row[1])
            if mode == "set":
                after = tags
            elif mode == "add":
                after = clean_tags(before + tags)
            else:
                after = [tag for tag in before if tag.lower() not in unwanted]
            plan.append((row[0], uuid, before, after))
        changed = [_write(conn, *item) for item in plan]
        current.update((uuid, after) for _, uuid, _, after in plan)
        return [item for item in changed if item[0]]

    def rename(self, conn: sqlite3.Connection, old: str, new: str) -> Changed:
        """`old` becomes `new` on every message; so does any other spelling of `new`."""
        keys = {old.lower(), new.lower()}
        changed: Changed = []
        for rowid, uuid, text in _rows_with(conn, keys):
            before = loads(text)
            after = clean_tags([new if tag.lower() in keys else tag for tag in before])
            changed.append(_write(conn, rowid, uuid, before, after))
        if self._spellings is not None:
            self._spellings.pop(old.lower(), None)
            self._spellings[new.lower()] = new
        return [item for item in changed if item[0]]

    def delete(self, conn: sqlite3.Connection, name: str) -> Changed:
        """`name` removed from every message."""
        changed: Changed = []
        for rowid, uuid, text in _rows_with(conn, {name.lower()}):
            before = loads(text)
            after = [tag for tag in before if tag.lower() != name.lower()]
            changed.append(_write(conn, rowid, uuid, before, after))
        if self._spellings is not None:
            self._spellings.pop(name.lower(), None)
        return [item for item in changed if item[0]]

    def _respell(self, conn: sqlite3.Connection, tags: list[str]) -> list[str]:
        """`tags` in the spelling the store already uses for each, where it has one (and
        the store's spelling of the others from now on)."""
        spellings = self._spellings
        if spellings is None or len(spellings) > self.MAX_SPELLINGS:
            spellings = self._spellings = {}
            for (name,) in conn.execute(
                    f"SELECT json_each.value FROM messages, json_each(messages.tags) "
                    f"WHERE {TAGGED} ORDER BY messages.id"):
                spellings.setdefault(name.lower(), name)
        return [spellings.setdefault(tag.lower(), tag) for tag in tags]


def counts(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every tag in use, {"name", "count"}, by name (case-insensitively)."""
    rows = conn.execute(
        f"SELECT MIN(json_each.value), COUNT(DISTINCT messages.id) FROM messages, "
        f"json_each(messages.tags) WHERE {TAGGED} GROUP BY {LOWER}(json_each.value)"
    ).fetchall()
    return sorted(({"name": name, "count": count} for name, count in rows),
                  key=lambda item: (item["name"].lower(), item["name"]))


def _rows_with(conn: sqlite3.Connection, keys: set[str]) -> list[tuple[int, str, str]]:
    marks = " OR ".join([TAG_MATCH] * len(keys))
    return conn.execute(
        f"SELECT id, uuid, tags FROM messages WHERE {TAGGED} AND ({marks})", tuple(keys)
    ).fetchall()


def _write(conn: sqlite3.Connection, rowid: int, uuid: str, before: list[str],
           after: list[str]) -> tuple[str, list[str]]:
    """Write `after` when it differs from `before`; ("", []) when nothing changed."""
    if after == before:
        return "", []
    _update(conn, rowid, after)
    return uuid, after


def _update(conn: sqlite3.Connection, rowid: int, tags: list[str]) -> None:
    conn.execute("UPDATE messages SET tags = ? WHERE id = ?", (dumps(tags), rowid))
