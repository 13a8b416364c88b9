"""The inbox search syntax (`q`), parsed and compiled to an SQL condition. Sans-I/O.

    invoice "order 42" from:shop to:alice -subject:receipt tag:invoices after:2024-01-02

Every term must match (AND), case-insensitively; a leading `-` or `!` negates a term. Free
words and "quoted phrases" are substrings of the message's search text (subject, addresses,
body). Field terms are substrings of that field: `from:` (the envelope sender or the From
header), `to:` (an envelope recipient or the To header), `cc:`, `bcc:`, `reply-to:`,
`addressed:` (any of those), `subject:`, `message-id:`. `tag:NAME` is one tag (the whole name).
Filters: `is:read`, `is:unread`, `is:tagged`, `has:attachment`, `has:inline`; dates
`before:` / `after:` (ISO 8601: 2024-01-02 or 2024-01-02T10:30, local time unless it says
otherwise); sizes `larger:` / `smaller:` (bytes, or 10K, 2.5MB, 1G). This is Mailpit's query
syntax (its search filters) plus mailpipe's own: a Mailpit query can be passed as it is.

A prefix or value not listed here makes the whole token a plain word, so `http://x`, `re:` or
`after:yesterday` still search as typed. Values are always SQL parameters, never SQL text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

# The name the store registers for Python's str.lower on its connections: SQLite's own
# lower() and LIKE fold ASCII only, and the search column is folded by Python when written.
LOWER = "mailpipe_lower"

# Field terms: the columns a value may be a substring of (any one matches).
_ADDRESS_COLUMNS = ("mail_from", "header_from", "rcpt", "header_to", "header_cc",
                    "header_bcc", "reply_to")
COLUMNS: dict[str, tuple[str, ...]] = {
    "from": ("mail_from", "header_from"),
    "to": ("rcpt", "header_to"),
    "cc": ("header_cc",),
    "bcc": ("header_bcc",),
    "reply-to": ("reply_to",),
    "addressed": _ADDRESS_COLUMNS,
    "subject": ("subject",),
    "message-id": ("message_id",),
}
# Fields whose every column is part of the search column (store/index.py): a plain LIKE on
# it first lets SQLite skip most rows before calling into Python for the field itself.
_IN_SEARCH_COLUMN = frozenset({"text", "from", "to", "cc", "subject"})
FLAGS: dict[tuple[str, str], str] = {
    ("has", "attachment"): "attachment_count > 0",
    ("has", "attachments"): "attachment_count > 0",
    ("has", "inline"): "inline_count > 0",
    ("has", "inlines"): "inline_count > 0",
    ("is", "unread"): "read = 0",
    ("is", "read"): "read = 1",
    ("is", "tagged"): "tags != '[]'",
}
# Comparisons with a parsed value: dates (a timestamp) and sizes (bytes).
COMPARISONS = {
    "after": "received_ts >= ?",
    "before": "received_ts < ?",
    "larger": "size > ?",
    "smaller": "size < ?",
}
TAG_MATCH = f"EXISTS (SELECT 1 FROM json_each(messages.tags) WHERE {LOWER}(json_each.value) = ?)"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s?([kmg]?)b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
NEGATIONS = "-!"


@dataclass(frozen=True, slots=True)
class Term:
    """One term: `field` is "text", a key of COLUMNS, "tag", "has", "is" or a key of
    COMPARISONS (whose `value` is then a timestamp or a byte count)."""

    field: str
    value: str | float
    negated: bool = False


def parse(q: str) -> list[Term]:
    """The terms of `q`, in order; empty words are dropped."""
    return [term for token in _tokens(q) if (term := _term(*token)) is not None]


def compile_terms(terms: Iterable[Term]) -> tuple[str, list[str | float]]:
    """An SQL condition on the messages table ("1" when there are no terms) and its params."""
    clauses: list[str] = []
    params: list[str | float] = []
    for term in terms:
        clause, values = _clause(term)
        if term.negated:
            # A NULL column (no Cc header) does not match, so its negation does.
            clause = f"NOT COALESCE(({clause}), 0)"
        clauses.append(clause)
        params.extend(values)
    return (" AND ".join(clauses) or "1"), params


def _clause(term: Term) -> tuple[str, list[str | float]]:
    if term.field in ("has", "is"):
        return FLAGS[(term.field, str(term.value))], []
    if term.field in COMPARISONS:
        return COMPARISONS[term.field], [term.value]
    if term.field == "tag":
        return TAG_MATCH, [str(term.value).lower()]
    pattern = f"%{like_escape(str(term.value).lower())}%"
    clauses, params = [], []
    if term.field in _IN_SEARCH_COLUMN and not term.negated:
        clauses.append("search LIKE ? ESCAPE '\\'")
        params.append(pattern)
    if term.field != "text":
        columns = COLUMNS[term.field]
        alternatives = [f"{LOWER}({column}) LIKE ? ESCAPE '\\'" for column in columns]
        clauses.append("(" + " OR ".join(alternatives) + ")")
        params.extend([pattern] * len(columns))
    elif term.negated:
        clauses.append("search LIKE ? ESCAPE '\\'")
        params.append(pattern)
    return " AND ".join(clauses), params


def like_escape(text: str) -> str:
    """`text` as a literal inside a LIKE pattern with ESCAPE '\\'."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def parse_size(text: str) -> int | None:
    """Bytes from "2048", "10K", "10kb", "2.5MB", "1g"; None if it is not a size."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        return None
    return int(float(match[1]) * _SIZE_UNITS[match[2].lower()])


def parse_date(text: str) -> float | None:
    """A timestamp from an ISO 8601 date or date and time (local time unless it gives an
    offset or Z); None if it is not one."""
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


_PARSERS = {"after": parse_date, "before": parse_date, "larger": parse_size,
            "smaller": parse_size}


def _term(negated: bool, prefix: str | None, value: str, quoted: bool) -> Term | None:
    if prefix is not None:
        name = prefix.lower()
        if (name in COLUMNS or name == "tag") and value:
            return Term(name, value, negated)
        if (name, value.lower()) in FLAGS and not quoted:
            return Term(name, value.lower(), negated)
        if name in _PARSERS and (number := _PARSERS[name](value)) is not None:
            return Term(name, number, negated)
        value = f"{prefix}:{value}"  # not ours: the token is a word as typed
    return Term("text", value, negated) if value.strip() else None


def _tokens(q: str) -> Iterator[tuple[bool, str | None, str, bool]]:
    """(negated, prefix or None, value, quoted) per token; a quote left open runs to the
    end. A `-` or `!` before anything but a space negates the token."""
    i, n = 0, len(q)
    while i < n:
        if q[i].isspace():
            i += 1
            continue
        negated = q[i] in NEGATIONS and i + 1 < n and not q[i + 1].isspace()
        if negated:
            i += 1
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
            yield negated, prefix, q[i + 1 : end], True
            i = end + 1
            continue
        end = i
        while end < n and not q[end].isspace():
            end += 1
        yield negated, prefix, q[i:end], False
        i = end
