"""A stored email as MailHog's JSON message (github.com/mailhog/data, message.go). Sans-I/O.

MailHog clients read the message as MailHog splits it, not as a MIME library would decode
it: `Content.Headers` maps each header name, as written, to its values (folded lines joined);
`Content.Body` is the body still transfer-encoded (the npm client decodes quoted-printable and
base64 itself); `MIME.Parts` are the parts between the top-level boundary, each a Content of
its own with its own `MIME` when it is a multipart. `Raw` is the SMTP transaction. So this
module splits the raw bytes the way MailHog does, a little more leniently (bare LF line
breaks, any case of `Content-Type`), and never fails on what a sender wrote.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from email.message import Message
from typing import Any

# Nested multiparts deeper than this are left unsplit (their Body is still all there): a
# hostile message must not recurse without bound.
MAX_DEPTH = 20
# MailHog's Received line names its host; ours names mailpipe.
HOSTNAME = "mailpipe"
_LINE_BREAK = re.compile(r"\r?\n")


def message_json(event: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """MailHog's Message for a stored event and its raw bytes, with mailpipe's own record of
    the email under `Mailpipe`, which MailHog clients ignore."""
    envelope = event.get("envelope") or {}
    mail_from = envelope.get("from") or ""
    rcpt_to = list(envelope.get("to") or [])
    rcpt_options = envelope.get("rcpt_options") or []
    uuid = str(event.get("uuid", ""))
    data = raw.decode("utf-8", "replace")  # as Go's encoding/json writes invalid UTF-8
    content = content_from_string(data)
    content["Size"] = len(raw)
    mime = parse_mime_body(content) if is_mime(content) else None
    _add_mailhog_headers(content["Headers"], uuid, mail_from, envelope.get("helo") or "",
                         event.get("received_at") or "")
    return {
        "ID": uuid,
        "From": path_from_string(mail_from, envelope.get("mail_options") or []),
        "To": [
            path_from_string(address, rcpt_options[i] if i < len(rcpt_options) else [])
            for i, address in enumerate(rcpt_to)
        ],
        "Content": content,
        "Created": event.get("received_at"),
        "MIME": mime,
        "Raw": {"From": mail_from, "To": rcpt_to, "Data": data,
                "Helo": envelope.get("helo") or ""},
        "Mailpipe": _extras(event),
    }


def path_from_string(path: str, options: list[str] | None = None) -> dict[str, Any]:
    """MailHog's Path: `@relay1,@relay2:mailbox@domain` in parts (data.PathFromString).
    MailHog leaves Params empty; here they are the command's ESMTP parameters."""
    relays: list[str] | None = None
    address = path
    if ":" in path:
        route, address = path.split(":", 1)
        relays = route.split(",")
    mailbox, _, domain = address.partition("@")
    return {"Relays": relays, "Mailbox": mailbox, "Domain": domain,
            "Params": " ".join(options or [])}


def content_from_string(data: str) -> dict[str, Any]:
    """Headers and the still-encoded body of a message or part (data.ContentFromString)."""
    head, body = _split_head(data)
    headers: dict[str, list[str]] = {}
    last: str | None = None
    for line in _LINE_BREAK.split(head) if head else []:
        if last is not None and line[:1] in (" ", "\t"):
            # Unfolded as MailHog does: the line break goes, the blank that began the line stays.
            headers[last][-1] += line
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not name or " " in name:
            last = None  # not a header line: MailHog logs and skips it
            continue
        headers.setdefault(name, []).append(value.lstrip(" \t"))
        last = name
    return {"Headers": headers, "Body": body, "Size": len(data.encode("utf-8", "replace")),
            "MIME": None}


def is_mime(content: dict[str, Any]) -> bool:
    """A multipart: its parts are split into MIME.Parts."""
    return header(content, "Content-Type").lower().startswith("multipart/")


def parse_mime_body(content: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """MailHog's MIMEBody: the parts between the boundaries (data.ParseMIMEBody), each split
    into headers and body, multiparts among them split in turn."""
    boundary = _boundary(header(content, "Content-Type"))
    parts: list[dict[str, Any]] = []
    if boundary:
        pieces = content["Body"].split("--" + boundary)[1:-1]  # preamble and closing go
        for piece in pieces:
            text = piece.strip("\r\n")
            if not text:
                continue
            part = content_from_string(text)
            if is_mime(part) and depth < MAX_DEPTH:
                part["MIME"] = parse_mime_body(part, depth + 1)
            parts.append(part)
    return {"Parts": parts}


def header(content: dict[str, Any], name: str) -> str:
    """The first value of header `name` (any case), or ""."""
    wanted = name.lower()
    for key, values in content["Headers"].items():
        if key.lower() == wanted and values:
            return str(values[0])
    return ""


def part_at(mime: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
    """MIME.Parts[index] (the top level, as MailHog's part download counts), or None."""
    parts = (mime or {}).get("Parts") or []
    return parts[index] if 0 <= index < len(parts) else None


def part_filename(part: dict[str, Any]) -> str | None:
    """The filename a part's Content-Disposition or Content-Type gives, decoded (RFC 2231)."""
    holder = Message()
    for name in ("Content-Disposition", "Content-Type"):
        if value := header(part, name):
            holder[name] = value
    return holder.get_filename()


def decoded_body(part: dict[str, Any]) -> bytes:
    """A part's body with its transfer encoding undone (MailHog's part download undoes
    base64 only; quoted-printable too here)."""
    body: str = part["Body"]
    encoding = header(part, "Content-Transfer-Encoding").strip().lower()
    if encoding == "base64":
        try:
            return base64.b64decode("".join(body.split()), validate=False)
        except (binascii.Error, ValueError):
            pass  # as MailHog: undecodable base64 is served as it is
    if encoding == "quoted-printable":
        return quopri.decodestring(body.encode("utf-8", "replace"))
    return body.encode("utf-8", "replace")


def _split_head(data: str) -> tuple[str, str]:
    """Header block and body, at the first blank line (CRLF, or a bare LF as some mailers
    write); without one, MailHog takes it all as the body."""
    crlf = data.find("\r\n\r\n")
    lf = data.find("\n\n")
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        return data[:crlf], data[crlf + 4:]
    if lf >= 0:
        return data[:lf], data[lf + 2:]
    return "", data


def _boundary(content_type: str) -> str | None:
    # The stdlib's parameter parser: quoting, RFC 2231 and stray blanks as mailers write them.
    message = Message()
    message["Content-Type"] = content_type
    return message.get_boundary()


def _add_mailhog_headers(headers: dict[str, list[str]], uuid: str, mail_from: str, helo: str,
                         received_at: str) -> None:
    """What MailHog adds as it stores a message: a Message-ID when there is none, its
    Received line and the Return-Path (appended to any the message has)."""
    names = {name.lower(): name for name in headers}
    if "message-id" not in names:
        headers["Message-ID"] = [f"{uuid}@{HOSTNAME}"]
    received = f"from {helo} by {HOSTNAME} (mailpipe)\r\n          id {uuid}; {received_at}"
    headers.setdefault(names.get("received", "Received"), []).append(received)
    headers.setdefault(names.get("return-path", "Return-Path"), []).append(f"<{mail_from}>")


def _extras(event: dict[str, Any]) -> dict[str, Any]:
    """mailpipe's record beyond MailHog's: envelope, AUTH, the session with its transcript,
    what each sink made of the email."""
    session = event.get("session") or {}
    return {
        "envelope": event.get("envelope"),
        "authentication": event.get("authentication"),
        "remote_addr": event.get("remote_addr"),
        "session": session,
        "transcript": session.get("transcript"),
        "outcomes": (event.get("mailpipe") or {}).get("outcomes"),
        "attachments": event.get("attachments") or [],
    }
