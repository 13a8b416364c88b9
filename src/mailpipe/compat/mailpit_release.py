"""What Mailpit's release route does to a message before relaying it. Sans-I/O.

The recipients are checked against the relay's allowed/blocked patterns; the message loses
its Bcc headers, gets a fresh Date and (unless preserve_message_ids) a fresh Message-Id, and
the Return-Path and From that the relay settings impose; the envelope sender is the Sender
header's address, else the From header's, else return_path when set.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from email.utils import format_datetime, getaddresses, parseaddr

from mailpipe.config import RelayConfig


class ReleaseError(ValueError):
    """The release is refused: the text is Mailpit's wording."""


def check_recipients(relay: RelayConfig, recipients: object) -> list[str]:
    """The addresses to relay to, or ReleaseError naming the offending ones."""
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise ReleaseError("To must be an array of email addresses")
    allowed = re.compile(relay.allowed_recipients) if relay.allowed_recipients else None
    blocked = re.compile(relay.blocked_recipients) if relay.blocked_recipients else None
    addresses, not_allowed, on_blocklist = [], [], []
    for given in recipients:
        address = _address(given)
        if address is None:
            raise ReleaseError(f"Invalid email address: {given}")
        if allowed is not None and not allowed.search(address):
            not_allowed.append(given)
        elif blocked is not None and blocked.search(address):
            on_blocklist.append(given)
        addresses.append(address)
    if not_allowed:
        raise ReleaseError(f"Failed: {_plural(not_allowed)} do not match the allowlist: "
                           + ", ".join(not_allowed))
    if on_blocklist:
        raise ReleaseError(f"Failed: {_plural(on_blocklist)} found on blocklist: "
                           + ", ".join(on_blocklist))
    if not addresses:
        raise ReleaseError("No valid addresses found")
    return addresses


def prepare(relay: RelayConfig, raw: bytes, now: datetime) -> tuple[str, bytes]:
    """The envelope sender and the bytes to relay."""
    head, sep, body = _split(raw)
    lines = _fields(head)
    sender = _first_address(lines, "sender") or _first_address(lines, "from")
    if sender is None:
        raise ReleaseError("No From header found")
    drop = {"bcc", "date"}
    add = [("Date", format_datetime(now))]
    if not relay.preserve_message_ids:
        drop.add("message-id")
        add.append(("Message-Id", f"<{uuid.uuid4()}@mailpipe>"))
    if relay.override_from:
        drop.add("from")
        add.append(("From", relay.override_from))
        sender = _address(relay.override_from) or sender
    first = []
    if relay.return_path:
        drop.add("return-path")
        first.append(("Return-Path", f"<{relay.return_path}>"))
        sender = relay.return_path
    kept = [field for field in lines if _name(field) not in drop]
    header = [_line(*f) for f in first] + kept + [_line(*f) for f in add]
    return sender, b"".join(header) + (sep or b"\r\n") + body


def _address(text: str) -> str | None:
    _, address = parseaddr(text)
    if not address or "@" not in address or any(ch.isspace() for ch in address):
        return None
    return address


def _first_address(fields: list[bytes], name: str) -> str | None:
    values = [f.split(b":", 1)[1].decode("utf-8", "replace") for f in fields if _name(f) == name]
    found = [address for _, address in getaddresses(values) if address]
    return found[0] if found else None


def _split(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """Header block (with its last line break), the blank line, the body."""
    for blank in (b"\r\n\r\n", b"\n\n"):
        at = raw.find(blank)
        if at >= 0:
            cut = at + len(blank) // 2
            return raw[:cut], raw[cut : at + len(blank)], raw[at + len(blank):]
    return raw if raw.endswith(b"\n") else raw + b"\r\n", b"", b""


def _fields(head: bytes) -> list[bytes]:
    """The header block's fields, each with its continuation lines."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().lower().decode("ascii", "replace")


def _line(name: str, value: str) -> bytes:
    # Values come from config and from us; a line break in one must not add a header.
    clean = value.replace("\r", " ").replace("\n", " ")
    return f"{name}: {clean}\r\n".encode()


def _plural(items: list[str]) -> str:
    return "Address" if len(items) == 1 else "Addresses"
