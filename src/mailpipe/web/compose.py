"""The send API's JSON made into a message and its envelope.

Two shapes come in: a raw RFC 5322 message (`raw` or `raw_base64`, envelope optional) and a
structured one (from, to, subject, text, html, attachments...) built into MIME by the stdlib's
`EmailMessage`. Both end as a `Submission`: bytes, envelope, tags. Mailpit's send JSON maps
onto the structured `SendRequest` (`from_mailpit`), so its compatible route shares the builder.

Everything here is pure: bad input raises `SendError` naming the field it is about.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import formatdate, getaddresses
from typing import Any
from uuid import uuid4

# RFC 5321 4.5.3.1: the longest local part and path; an address longer is refused.
MAX_LOCAL_PART = 64
MAX_ADDRESS = 254
MAX_TAGS = 50
MAX_TAG_LENGTH = 100
# atext (RFC 5322 3.2.3) plus UTF-8 (RFC 6531): a dot-atom's characters.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]"
_LOCAL = re.compile(rf'(?:{_ATEXT}+(?:\.{_ATEXT}+)*|"(?:[^"\\\x00-\x1f\x7f]|\\[ -~])*")')
_ALNUM = r"A-Za-z0-9\u0080-\U0010ffff"  # a domain label's letters, IDNs' included
_LABEL = rf"[{_ALNUM}](?:[{_ALNUM}-]*[{_ALNUM}])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[!-Z^-~]+\])")
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 2.2: printable ASCII but ":"
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*", re.IGNORECASE)
_CONTENT_ID = re.compile(r"[!-;=?-~]{1,250}")  # printable ASCII but "<" and ">"
# Headers the MIME structure is made of: the builder writes them, a caller cannot.
_STRUCTURE = frozenset({"content-type", "content-transfer-encoding", "mime-version",
                        "content-disposition"})
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but TAB
_HEADER_PARSER = BytesHeaderParser(policy=policy.default)


class SendError(ValueError):
    """Bad input to the send API: `field` names what is wrong (e.g. "to[1]")."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class Mailbox:
    email: str
    name: str = ""


@dataclass(frozen=True)
class Part:
    """An attachment; with a content_id, an inline part the HTML refers to as cid:..."""

    content: bytes
    filename: str | None
    content_type: str
    content_id: str | None = None


@dataclass
class SendRequest:
    """A structured message, every field checked: what the builder takes."""

    sender: Mailbox
    to: list[Mailbox] = field(default_factory=list)
    cc: list[Mailbox] = field(default_factory=list)
    bcc: list[Mailbox] = field(default_factory=list)
    reply_to: list[Mailbox] = field(default_factory=list)
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    attachments: list[Part] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Submission:
    """What is injected: the message's bytes, its envelope and the event's tags."""

    raw: bytes
    mail_from: str
    rcpt_to: list[str]
    tags: list[str]


# ---- JSON in -----------------------------------------------------------------------------


def parse_send(body: Any) -> Submission:
    """The send API's JSON object (raw or structured) as a Submission."""
    if not isinstance(body, dict):
        raise SendError("body", "expected a JSON object")
    if "raw" in body or "raw_base64" in body:
        return parse_raw(body)
    return submission(parse_request(body))


def parse_raw(body: dict[str, Any]) -> Submission:
    """`{"raw": "...", "from": "a@x", "to": [...], "tags": [...]}` (or `raw_base64`); the
    envelope, when not given, from the message's From (or Sender) and To, Cc, Bcc."""
    _only(body, {"raw", "raw_base64", "from", "to", "tags"}, "")
    if "raw" in body and "raw_base64" in body:
        raise SendError("raw", "give raw or raw_base64, not both")
    if "raw" in body:
        raw = _text(body["raw"], "raw").encode("utf-8")
    else:
        raw = _base64(body["raw_base64"], "raw_base64")
    if not raw.strip():
        raise SendError("raw" if "raw" in body else "raw_base64", "the message is empty")
    headers = _HEADER_PARSER.parsebytes(raw)
    if body.get("from") is not None:
        mail_from = _mailbox(body["from"], "from").email
    else:
        found = _header_addresses(headers, ("sender",)) or _header_addresses(headers, ("from",))
        if not found:
            raise SendError("from", "not given, and the message has no From address")
        mail_from = found[0]
    if body.get("to") is not None:
        rcpt_to = [m.email for m in _mailboxes(body["to"], "to", required=True)]
    else:
        rcpt_to = _header_addresses(headers, ("to", "cc", "bcc"))
        if not rcpt_to:
            raise SendError("to", "not given, and the message has no To, Cc or Bcc address")
    return Submission(raw, mail_from, _unique(rcpt_to), _tags(body.get("tags"), "tags"))


def parse_request(body: dict[str, Any]) -> SendRequest:
    """mailpipe's structured send JSON as a SendRequest."""
    _only(body, {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers",
                 "attachments", "tags"}, "")
    if body.get("from") is None:
        raise SendError("from", "required")
    attachments = body.get("attachments") or []
    if not isinstance(attachments, list):
        raise SendError("attachments", "expected a list")
    return SendRequest(
        sender=_mailbox(body["from"], "from"),
        to=_mailboxes(body.get("to"), "to"),
        cc=_mailboxes(body.get("cc"), "cc"),
        bcc=_mailboxes(body.get("bcc"), "bcc"),
        reply_to=_mailboxes(body.get("reply_to"), "reply_to"),
        subject=_optional_text(body.get("subject"), "subject", header=True),
        text=_optional_text(body.get("text"), "text"),
        html=_optional_text(body.get("html"), "html"),
        headers=_headers(body.get("headers"), "headers"),
        attachments=[_part(item, f"attachments[{n}]") for n, item in enumerate(attachments)],
        tags=_tags(body.get("tags"), "tags"),
    )


def from_mailpit(body: Any) -> SendRequest:
    """Mailpit's `POST /api/v1/send` JSON (From{Email,Name}, To[{Email,Name}], Cc, Bcc,
    ReplyTo, Subject, Text, HTML, Attachments[{Content,Filename,ContentType,ContentID}],
    Headers{}, Tags[]) as a SendRequest, with the same checks and Mailpit's field names in
    errors. As Mailpit (Go's JSON decoding) does: names in any case, unknown fields ignored,
    an empty string the same as no value."""
    if not isinstance(body, dict):
        raise SendError("body", "expected a JSON object")
    ours: dict[str, Any] = {}
    for key, value in body.items():
        name = _MAILPIT_FIELDS.get(key.lower().replace("_", ""))
        if name is None or value is None or value == "":
            continue
        if name in _ADDRESS_FIELDS:
            value = ([_mailpit_object(v, _MAILPIT_MAILBOX) for v in value]
                     if isinstance(value, list) else _mailpit_object(value, _MAILPIT_MAILBOX))
        elif name == "attachments" and isinstance(value, list):
            value = [_mailpit_object(v, _MAILPIT_PART) for v in value]
        ours[name] = value
    try:
        return parse_request(ours)
    except SendError as exc:  # named as the caller wrote it
        raise _as_mailpit(exc) from None


_MAILPIT_FIELDS = {"from": "from", "to": "to", "cc": "cc", "bcc": "bcc", "replyto": "reply_to",
                   "subject": "subject", "text": "text", "html": "html", "headers": "headers",
                   "attachments": "attachments", "tags": "tags"}
_ADDRESS_FIELDS = frozenset({"from", "to", "cc", "bcc", "reply_to"})
_MAILPIT_MAILBOX = {"email": "email", "name": "name"}
_MAILPIT_PART = {"content": "content", "filename": "filename", "contenttype": "content_type",
                 "contentid": "content_id"}
# Our field names as Mailpit spells them, for its errors.
_MAILPIT_NAMES = {"from": "From", "to": "To", "cc": "Cc", "bcc": "Bcc", "reply_to": "ReplyTo",
                  "subject": "Subject", "text": "Text", "html": "HTML", "headers": "Headers",
                  "attachments": "Attachments", "tags": "Tags", "email": "Email", "name": "Name",
                  "content": "Content", "filename": "Filename", "content_type": "ContentType",
                  "content_id": "ContentID"}


def _mailpit_object(value: Any, names: dict[str, str]) -> Any:
    """An object of Mailpit's, its known keys (in any case) as ours; anything else as it is
    (the checks that follow say what is wrong with it)."""
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        name = names.get(key.lower().replace("_", ""))
        if name is not None and item is not None and item != "":
            out[name] = item
    return out


def _as_mailpit(exc: SendError) -> SendError:
    message = str(exc).split(": ", 1)[1]
    if exc.field.startswith("headers."):  # what follows is the caller's header name
        return SendError("Headers." + exc.field.removeprefix("headers."), message)
    name = re.sub(r"(^|[.\]])([a-z_]+)",
                  lambda m: m[1] + _MAILPIT_NAMES.get(m[2], m[2]), exc.field)
    return SendError(name, message)


# ---- the message out ---------------------------------------------------------------------


def submission(request: SendRequest) -> Submission:
    """The request built into a message, its envelope: the sender, every To, Cc and Bcc."""
    recipients = [m.email for m in (*request.to, *request.cc, *request.bcc)]
    if not recipients:
        raise SendError("to", "at least one recipient (to, cc or bcc) is required")
    return Submission(build_message(request), request.sender.email, _unique(recipients),
                      request.tags)


def build_message(request: SendRequest) -> bytes:
    """The MIME message: text and HTML as alternatives, inline parts related to the HTML,
    attachments around them; Bcc stays in the envelope, as a mailer leaves it."""
    addresses = [request.sender, *request.to, *request.cc, *request.reply_to]
    utf8 = not all(m.email.isascii() for m in (*addresses, *request.bcc))
    # SMTPUTF8's policy writes UTF-8 addresses as they are (RFC 6532); otherwise headers
    # are RFC 2047 encoded. CRLF line ends either way, as SMTP carries them.
    msg = EmailMessage(policy=policy.SMTPUTF8 if utf8 else policy.SMTP)
    _set_address(msg, "From", [request.sender], "from")
    _set_address(msg, "To", request.to, "to")
    _set_address(msg, "Cc", request.cc, "cc")
    _set_address(msg, "Reply-To", request.reply_to, "reply_to")
    if request.subject is not None:
        msg["Subject"] = request.subject
    msg["Date"] = formatdate(localtime=True)
    domain = request.sender.email.rpartition("@")[2].strip("[]") or "mailpipe.local"
    msg["Message-ID"] = f"<{uuid4()}@{domain}>"
    _set_body(msg, request)
    for name, value in request.headers:  # the caller's, over the builder's of the same name
        del msg[name]
        msg[name] = value
    return msg.as_bytes()


def _set_body(msg: EmailMessage, request: SendRequest) -> None:
    html = request.html
    inline = [p for p in request.attachments if p.content_id and html is not None]
    if request.text is not None or html is None:
        msg.set_content(request.text or "")
        if html is not None:
            msg.add_alternative(html, subtype="html")
    else:
        msg.set_content(html, subtype="html")
    if inline:
        html_part = msg.get_body(("html",))
        assert html_part is not None  # html was set just above
        for part in inline:
            maintype, subtype = part.content_type.split("/", 1)
            html_part.add_related(part.content, maintype, subtype, cid=f"<{part.content_id}>",
                                  filename=part.filename, disposition="inline")
    for part in request.attachments:
        if part in inline:
            continue
        maintype, subtype = part.content_type.split("/", 1)
        cid = f"<{part.content_id}>" if part.content_id else None
        msg.add_attachment(part.content, maintype, subtype, filename=part.filename, cid=cid,
                           disposition="inline" if cid else "attachment")


def _set_address(msg: EmailMessage, name: str, mailboxes: list[Mailbox], where: str) -> None:
    if not mailboxes:
        return
    values = []
    for n, mailbox in enumerate(mailboxes):
        local, _, domain = mailbox.email.rpartition("@")
        if local.startswith('"'):  # Address quotes it again as needed
            local = re.sub(r"\\(.)", r"\1", local[1:-1])
        try:
            values.append(Address(display_name=mailbox.name, username=local, domain=domain))
        except (ValueError, IndexError) as exc:
            raise SendError(f"{where}[{n}]" if where != "from" else where, str(exc)) from None
    msg[name] = values


# ---- field checks ------------------------------------------------------------------------


def _only(body: dict[str, Any], known: set[str], where: str) -> None:
    for key in body:
        if key not in known:
            name = f"{where}.{key}" if where else key
            raise SendError(name, f"unknown field (expected one of: {', '.join(sorted(known))})")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SendError(where, f"expected a string, got {_json_type(value)}")
    return value


def _optional_text(value: Any, where: str, *, header: bool = False) -> str | None:
    if value is None:
        return None
    text = _text(value, where)
    if header and _CONTROL.search(text):
        raise SendError(where, "control characters (line breaks included) are not allowed")
    return text


def _base64(value: Any, where: str) -> bytes:
    text = "".join(_text(value, where).split())  # line-wrapped base64 is common
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SendError(where, "not valid base64") from None


def check_address(value: str, where: str) -> str:
    """An addr-spec (local@domain, UTF-8 allowed), else SendError naming `where`."""
    local, at, domain = value.rpartition("@")
    if (
        not at
        or len(value) > MAX_ADDRESS
        or len(local.encode()) > MAX_LOCAL_PART
        or not _LOCAL.fullmatch(local)
        or not _DOMAIN.fullmatch(domain)
    ):
        raise SendError(where, f"{value!r} is not an email address (local@domain)")
    return value


def _mailbox(value: Any, where: str) -> Mailbox:
    """"a@x", "Name <a@x>" or {"email": "a@x", "name": "Name"}."""
    if isinstance(value, dict):
        _only(value, {"email", "name"}, where)
        email = _text(value.get("email"), f"{where}.email")
        name = _optional_text(value.get("name"), f"{where}.name", header=True) or ""
        return Mailbox(check_address(email.strip(), f"{where}.email"), name)
    text = _text(value, where).strip()
    if _CONTROL.search(text):
        raise SendError(where, "control characters (line breaks included) are not allowed")
    if "<" in text:
        parsed = getaddresses([text])
        if len(parsed) != 1 or not parsed[0][1]:
            raise SendError(where, f"{text!r} is not one address like 'Name <a@example.com>'")
        name, email = parsed[0]
        return Mailbox(check_address(email, where), name)
    return Mailbox(check_address(text, where))


def _mailboxes(value: Any, where: str, *, required: bool = False) -> list[Mailbox]:
    """One address or a list of them (each as _mailbox takes it); None is none."""
    if value is None:
        if required:
            raise SendError(where, "required")
        return []
    if isinstance(value, str | dict):
        return [_mailbox(value, where)]
    if not isinstance(value, list):
        raise SendError(where, f"expected an address or a list of them, got {_json_type(value)}")
    if required and not value:
        raise SendError(where, "at least one address is required")
    return [_mailbox(item, f"{where}[{n}]") for n, item in enumerate(value)]


def _headers(value: Any, where: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise SendError(where, f"expected an object of names to values, got {_json_type(value)}")
    headers = []
    for name, text in value.items():
        here = f"{where}.{name}"
        if not _HEADER_NAME.fullmatch(name):
            raise SendError(here, "not a header name (printable ASCII without ':' or spaces)")
        if name.lower() in _STRUCTURE:
            raise SendError(here, "the MIME structure's headers are set by the builder")
        text = _optional_text(text, here, header=True)
        headers.append((name, text or ""))
    return headers


def _part(value: Any, where: str) -> Part:
    """An attachment: base64 content, a filename (or a content_id: inline), a type."""
    if not isinstance(value, dict):
        raise SendError(where, f"expected an object, got {_json_type(value)}")
    _only(value, {"content", "filename", "content_type", "content_id"}, where)
    if value.get("content") is None:
        raise SendError(f"{where}.content", "required (base64)")
    content = _base64(value["content"], f"{where}.content")
    filename = _optional_text(value.get("filename"), f"{where}.filename", header=True) or None
    content_id = _optional_text(value.get("content_id"), f"{where}.content_id")
    if content_id is not None:
        content_id = content_id.strip().removeprefix("<").removesuffix(">") or None
        if content_id is not None and not _CONTENT_ID.fullmatch(content_id):
            raise SendError(f"{where}.content_id", "printable ASCII without spaces, '<' or '>'")
    if filename is None and content_id is None:
        raise SendError(f"{where}.filename",
                        "required unless the part is inline (has a content id)")
    content_type = _optional_text(value.get("content_type"), f"{where}.content_type")
    if not content_type:
        content_type = mimetypes.guess_type(filename or "")[0] or "application/octet-stream"
    elif not _MIME_TYPE.fullmatch(content_type.strip()):
        raise SendError(f"{where}.content_type",
                        f"{content_type!r} is not a media type like image/png")
    return Part(content, filename, content_type.strip().lower(), content_id)


def _tags(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
        raise SendError(where, "expected a list of strings")
    if len(value) > MAX_TAGS:
        raise SendError(where, f"at most {MAX_TAGS} tags")
    tags: list[str] = []
    for n, tag in enumerate(value):
        tag = tag.strip()
        if not tag or len(tag) > MAX_TAG_LENGTH or _CONTROL.search(tag):
            raise SendError(f"{where}[{n}]", f"a tag is 1 to {MAX_TAG_LENGTH} characters "
                            "without control characters")
        if tag not in tags:
            tags.append(tag)
    return tags


def _header_addresses(headers: EmailMessage, names: Iterable[str]) -> list[str]:
    """The addresses in these headers of a raw message, checked (a bad one is an error:
    the caller meant it as a recipient)."""
    found: list[str] = []
    for name in names:
        for value in headers.get_all(name) or []:
            for address in getattr(value, "addresses", ()):
                found.append(check_address(address.addr_spec, f"raw: {name.title()} header"))
    return found


def _unique(addresses: list[str]) -> list[str]:
    """Each recipient once (case aside), in order: one RCPT per mailbox, as mailers do."""
    seen: set[str] = set()
    out = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            out.append(address)
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
