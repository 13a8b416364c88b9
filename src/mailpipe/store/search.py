"""The inbox search syntax (`q`), parsed and compiled to an SQL condition. Sans-I/O.

    invoice "order 42" from:shop to:alice subject:receipt has:attachment is:unread

Every term must match (AND), case-insensitively. Free words and "quoted phrases" are
substrings of the message's search text (subject, addresses, body); `from:`, `to:` and
`subject:` are substrings of that field (`from:` the envelope sender or the From header, `to:`
an envelope recipient); `has:attachment`, `is:unread` and `is:read` filter. A prefix or value
not listed here makes the whole token a plain word, so `http://x` or `re:` still search as
typed. Values are always SQL parameters, never part of the SQL text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

Field = Literal["text", "from", "to", "subject", "has", "is"]
FIELDS: frozenset[str] = frozenset({"from", "to", "subject"})
FLAGS: dict[tuple[str, str], str] = {
    ("has", "attachment"): "attachment_count > 0",
    ("is", "unread"): "read = 0",
    ("is", "read"): "read = 1",
}
# The name the store registers for Python's str.lower on its read connections: SQLite's own
# lower() and LIKE fold ASCII only, and the search column is folded by Python when written.
LOWER = "mailpipe_lower"


@dataclass(frozen=True, slots=True)
class Term:
    field: Field
    value: str


def parse(q: str) -> list[Term]:
    """The terms of `q`, in order; empty words are dropped."""
    return [term for token in _tokens(q) if (term := _term(*token)) is not None]


def compile_terms(terms: Iterable[Term]) -> tuple[str, list[str]]:
    """An SQL condition on the messages table ("1" when there are no terms) and its params."""
    clauses: list[str] = []
    params: list[str] = []
    for term in terms:
        if term.field in ("has", "is"):
            clauses.append(FLAGS[(term.field, term.value)])
            continue
        pattern = f"%{like_escape(term.value.lower())}%"
        # The search column holds every field folded: checking it first lets SQLite skip most
        # rows with a plain LIKE before calling into Python for the field itself.
        clauses.append("search LIKE ? ESCAPE '\\'")
        params.append(pattern)
        if term.field != "text":
            columns = {"from": ("mail_from", "header_from"), "to": ("rcpt",),
                       "subject": ("subject",)}[term.field]
            alternatives = [f"{LOWER}({column}) LIKE ? ESCAPE '\\'" for column in columns]
            clauses.append("(" + " OR ".join(alternatives) + ")")
            params.extend([pattern] * len(columns))
    return (" AND ".join(clauses) or "1"), params


def like_escape(text: str) -> str:
    """`text` as a literal inside a LIKE pattern with ESCAPE '\\'."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _term(prefix: str | None, value: str, quoted: bool) -> Term | None:
    if prefix is not None:
        name = prefix.lower()
        if name in FIELDS and value:
            return Term(name, value)  # type: ignore[arg-type]
        if (name, value.lower()) in FLAGS and not quoted:
            return Term(name, value.lower())  # type: ignore[arg-type]
        value = f"{prefix}:{value}"  # not ours: the token is a word as typed
    return Term("text", value) if value.strip() else None


def _tokens(q: str) -> Iterator[tuple[str | None, str, bool]]:
    """(prefix or None, value, quoted) per token; a quote left open runs to the end."""
    i, n = 0, len(q)
    while i < n:
        if q[i].isspace():
            i += 1
            continue
        prefix = None
        start = i
        while i < n and not q[i].isspace() and q[i] not in ':"':
            i += 1
        if i < n and q[i] == ":" and i > start:
            prefix = q[start:i]
            i += 1
        else:
            i = start
        if i < n and q[i] == '"':
            end = q.find('"', i + 1)
            end = n if end < 0 else end
            yield prefix, q[i + 1 : end], True
            i = end + 1
            continue
        end = i
        while end < n and not q[end].isspace():
            end += 1
        yield prefix, q[i:end], False
        i = end
