"""Mailpit's JSON shapes made from mailpipe's stored events and raw messages. Sans-I/O.

Field names and order are Mailpit's (internal/storage's MessageSummary, Message and
Attachment). IDs are mailpipe's uuids; PartIDs are MIME paths as Mailpit's parser (enmime)
numbers them: the root's children 1, 2, ..., theirs 2.1, 2.2, ... What only mailpipe knows
(envelope, AUTH credentials, transcript, sink outcomes) is under `Mailpipe`, a field
Mailpit's clients ignore.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

Json = dict[str, Any]
_FOLD = re.compile(r"\r?\n[ \t]+")
_ANGLE = re.compile(r"<([^<>]*)>")


# ---- addresses and headers -------------------------------------------------------------


def header_values(event: Json, name: str) -> list[str]:
    """Every (decoded) value of header `name` in the stored event, in order."""
    message = event.get("message") or {}
    wanted = name.lower()
    listed = message.get("header_list")
    if listed is None:  # an event stored without the list: its first values
        listed = list((message.get("headers") or {}).items())
    return [value for key, value in listed if key.lower() == wanted]


def addresses(values: list[str]) -> list[Json]:
    """Mailpit's Address objects ({Name, Address}) of address headers."""
    return [{"Name": name, "Address": address}
            for name, address in getaddresses(values) if address or name]


def _first_address(event: Json) -> Json:
    found = addresses(header_values(event, "From"))
    if found:
        return found[0]
    # No From header: the envelope sender, so clients reading From.Address still find one.
    return {"Name": "", "Address": (event.get("envelope") or {}).get("from") or ""}


def bcc(event: Json) -> list[Json]:
    """The Bcc header's addresses, and (as Mailpit adds a Bcc header for them) every
    envelope recipient that no To, Cc or Bcc header names: how a blind copy arrives."""
    listed = addresses(header_values(event, "Bcc"))
    named = {a["Address"].lower() for name in ("To", "Cc")
             for a in addresses(header_values(event, name))}
    named.update(a["Address"].lower() for a in listed)
    for recipient in (event.get("envelope") or {}).get("to") or []:
        if recipient and recipient.lower() not in named:
            named.add(recipient.lower())
            listed.append({"Name": "", "Address": recipient})
    return listed


def canonical_key(name: str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey: Mailpit's header keys ("Message-Id")."""
    return "-".join(word[:1].upper() + word[1:].lower() for word in name.split("-"))


def raw_headers(raw: bytes) -> dict[str, list[str]]:
    """The message's header block as Mailpit's /headers answers it: canonical keys in
    alphabetical order, each with its values as written (unfolded, not decoded)."""
    parsed = BytesHeaderParser(policy=compat32).parsebytes(raw)
    found: dict[str, list[str]] = {}
    for name, value in parsed.items():
        text = value if isinstance(value, str) else str(value)
        found.setdefault(canonical_key(name), []).append(_FOLD.sub(" ", text).strip())
    return dict(sorted(found.items()))


def _message_id(event: Json) -> str:
    value = (event.get("message") or {}).get("message_id") or ""
    return value.strip().removeprefix("<").removesuffix(">")


def _date(event: Json) -> str:
    """The Date header as RFC 3339 when it parses, else the time received."""
    for value in header_values(event, "Date")[:1]:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            break
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.isoformat().replace("+00:00", "Z")
    return str(event.get("received_at") or "")


def _username(event: Json) -> str | None:
    auth = event.get("authentication") or {}
    return auth.get("username") if auth.get("attempted") else None


# ---- summaries and messages ------------------------------------------------------------


def summary(row: Json, event: Json | None, tags: list[str]) -> Json:
    """A MessageSummary from the store's summary `row` and the message's event (None when
    it went between the two reads: what the row says is still worth showing)."""
    event = event or {}
    shown: Json = {
        "ID": row["uuid"],
        "MessageID": _message_id(event),
        "Read": row["read"],
        "From": _first_address(event) if event else {"Name": "", "Address": row["from"]},
        "To": addresses(header_values(event, "To")),
        "Cc": addresses(header_values(event, "Cc")),
        "Bcc": bcc(event),
        "ReplyTo": addresses(header_values(event, "Reply-To")),
        "Subject": row["subject"] or "",
        "Created": row["received_at"],
    }
    if (username := _username(event)) is not None:
        shown["Username"] = username
    shown.update({
        "Tags": tags,
        "Size": row["size"],
        "Attachments": _attached(event) if event else row["attachments"],
        "Snippet": row["snippet"],
        "Mailpipe": {"envelope": {"from": row["from"], "to": row["to"]}},
    })
    return shown


def _attached(event: Json) -> int:
    """Attachments proper: Mailpit counts the inline parts apart."""
    return sum(1 for meta in event.get("attachments") or []
               if meta.get("disposition") != "inline")


@dataclass(slots=True)
class Part:
    """One of event["attachments"] found in the raw message: its PartID and its bytes."""

    part_id: str
    payload: bytes


def attachment_json(meta: Json, part: Part) -> Json:
    """Mailpit's Attachment from mailpipe's description of it and its bytes."""
    content_id = meta.get("content_id") or ""
    return {
        "PartID": part.part_id,
        "FileName": meta.get("filename") or content_id,
        "ContentType": meta.get("content_type") or "application/octet-stream",
        "ContentID": content_id,
        "Size": len(part.payload),
        "Checksums": {
            "MD5": hashlib.md5(part.payload, usedforsecurity=False).hexdigest(),
            "SHA1": hashlib.sha1(part.payload, usedforsecurity=False).hexdigest(),
            "SHA256": hashlib.sha256(part.payload).hexdigest(),
        },
    }


def message(uuid: str, event: Json, parts: list[Part], tags: list[str]) -> Json:
    """Mailpit's Message (GET /api/v1/message/{ID}), with mailpipe's extras."""
    body = event.get("message") or {}
    inline: list[Json] = []
    attached: list[Json] = []
    for meta, part in zip(event.get("attachments") or [], parts, strict=False):
        is_inline = meta.get("disposition") == "inline"
        (inline if is_inline else attached).append(attachment_json(meta, part))
    envelope = event.get("envelope") or {}
    return_path = next(iter(header_values(event, "Return-Path")), None)
    shown: Json = {
        "ID": uuid,
        "MessageID": _message_id(event),
        # Older Mailpits had it (always true: reading marks read); older clients require it.
        "Read": True,
        "From": _first_address(event),
        "To": addresses(header_values(event, "To")),
        "Cc": addresses(header_values(event, "Cc")),
        "Bcc": bcc(event),
        "ReplyTo": addresses(header_values(event, "Reply-To")),
        "ReturnPath": _ANGLE.sub(r"\1", return_path).strip() if return_path is not None
        else envelope.get("from") or "",
        "Subject": body.get("subject") or "",
        "ListUnsubscribe": list_unsubscribe(event),
        "Date": _date(event),
        "Tags": tags,
    }
    if (username := _username(event)) is not None:
        shown["Username"] = username
    shown.update({
        "Text": body.get("text") or "",
        "HTML": body.get("html") or "",
        "Size": body.get("size", 0),
        "Inline": inline,
        "Attachments": attached,
        "Mailpipe": extras(event),
    })
    return shown


def extras(event: Json) -> Json:
    """What mailpipe knows beyond Mailpit: the session, the envelope, AUTH and sinks."""
    session = event.get("session") or {}
    return {
        "received_at": event.get("received_at"),
        "remote_addr": event.get("remote_addr"),
        "envelope": event.get("envelope"),
        "authentication": event.get("authentication"),
        "tls": session.get("tls"),
        "transcript": session.get("transcript"),
        "violations": session.get("violations"),
        "defects": (event.get("message") or {}).get("defects"),
        "outcomes": (event.get("mailpipe") or {}).get("outcomes"),
    }


def list_unsubscribe(event: Json) -> Json:
    """Mailpit's summary of List-Unsubscribe: its links (one mailto:, one http(s): at most)."""
    header = next(iter(header_values(event, "List-Unsubscribe")), "")
    post = next(iter(header_values(event, "List-Unsubscribe-Post")), "")
    links = [link.strip() for link in _ANGLE.findall(header)]
    errors = []
    if header and not links:
        errors.append("No link found")
    for link in links:
        if not link.lower().startswith(("mailto:", "http://", "https://")):
            errors.append(f"Unsupported link: {link}")
    return {"Header": header, "Links": links, "Errors": "\n".join(errors), "HeaderPost": post}


# ---- MIME parts ----------------------------------------------------------------------


def part_paths(root: Message) -> dict[int, str]:
    """id(part) -> its MIME path, numbered as enmime numbers PartIDs (the root is "0")."""
    paths: dict[int, str] = {}
    stack: list[tuple[Message, str]] = [(root, "0")]
    while stack:
        part, path = stack.pop()
        paths[id(part)] = path
        if part.is_multipart():
            children = part.get_payload()
            for index, child in enumerate(children if isinstance(children, list) else [], 1):
                if isinstance(child, Message):
                    stack.append((child, str(index) if path == "0" else f"{path}.{index}"))
    return paths


def parts_of(raw: bytes) -> list[Part]:
    """The message's attachments (event["attachments"]'s order) with PartIDs and bytes.
    CPU work on big messages: call it in a thread."""
    from mailpipe.capture.message import attachment_parts, attachment_payload, parse_message

    root = parse_message(raw)
    paths = part_paths(root)
    return [Part(paths.get(id(part), "0"), attachment_payload(part))
            for part in attachment_parts(root)]


def link_inline_images(html: str, parts: list[tuple[str, str]], prefix: str) -> str:
    """cid: references to attached parts made API URLs, as Mailpit's /view/{ID}.html does:
    `parts` are (Content-ID, its URL path under `prefix`)."""
    for content_id, path in parts:
        if not content_id:
            continue
        pattern = re.compile(r"""(?i)(=["']?)(cid:""" + re.escape(content_id) + r""")(["'\s/>;])""")
        html = pattern.sub(lambda m, path=path: m.group(1) + prefix + path + m.group(3), html)
    return html


