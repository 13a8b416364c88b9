"""The store's index columns of one email, computed from its event. Sans-I/O.

One implementation for both places it runs: the store, for an event changed after it was
built (or built in place), and the event-building helper process (capture/indexer.py), which
sends the columns back beside the event's JSON so the event loop never walks the event.
Imports only what computing them needs: the helper pays for nothing else.
"""

from __future__ import annotations

import html
import re
import time
from datetime import datetime
from typing import Any

import orjson

SNIPPET_CHARS = 120
# The body text a search looks through: its first 64 K characters. A 20 MB text body would
# otherwise be written a second time (lower-cased) and scanned by every search, for words
# that a developer looking for an email finds near its top.
SEARCH_BODY_CHARS = 64 * 1024
# Addresses never contain a newline, so it is a safe separator for the recipient list.
RCPT_SEP = "\n"

_HIDDEN = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def index_columns(event: dict[str, Any], raw_size: int) -> tuple[Any, ...]:
    """(uuid, received_at, received_ts, mail_from, rcpt, header_from, subject, snippet, size,
    attachment_count, search, header_to, header_cc, header_bcc, reply_to, message_id,
    inline_count, event_tags): the messages table's index columns, in the order INSERT names
    them, and the event's own tags as JSON (the store adds its automatic ones to them)."""
    message = event.get("message") or {}
    envelope = event.get("envelope") or {}
    headers = message.get("headers") or {}
    rcpt = list(envelope.get("to") or [])
    header_from = _header(headers, "From")
    subject = message.get("subject")
    body = _body_text(message)[:SEARCH_BODY_CHARS]
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
    return (
        event["uuid"],
        event.get("received_at", ""),
        _timestamp(event.get("received_at")),
        envelope.get("from") or "",
        RCPT_SEP.join(rcpt),
        header_from,
        subject,
        " ".join(body[: SNIPPET_CHARS * 4].split())[:SNIPPET_CHARS],
        size if isinstance(size := message.get("size"), int) else raw_size,
        len(event.get("attachments") or ()),
        search,
        # For the search's field terms (store/search.py): cc:, bcc:, reply-to:, message-id:.
        _header(headers, "To"),
        _header(headers, "Cc"),
        _header(headers, "Bcc"),
        _header(headers, "Reply-To"),
        message.get("message_id") or _header(headers, "Message-ID"),
        sum(1 for a in event.get("attachments") or () if a.get("disposition") == "inline"),
        orjson.dumps(event.get("tags") or []).decode(),
    )


def _header(headers: dict[str, str], name: str) -> str | None:
    # Header names keep the sender's spelling ("FROM", "from"), so match case-insensitively.
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def _body_text(message: dict[str, Any]) -> str:
    """Readable body text: the text part, else the HTML part with its markup removed."""
    if message.get("text"):
        return str(message["text"])
    body = str(message.get("body") or "")
    if message.get("html") and body == message["html"]:
        # Whitespace in HTML is not significant; collapsing it lets phrases match. Markup
        # takes room: four times the searched length of HTML is enough text to search.
        body = body[: SEARCH_BODY_CHARS * 4]
        body = " ".join(html.unescape(_TAG.sub(" ", _HIDDEN.sub(" ", body))).split())
    return body


def _timestamp(received_at: object) -> float:
    try:
        return datetime.fromisoformat(str(received_at).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()
