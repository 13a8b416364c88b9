"""Turn a received message into the EMAIL_RECEIVED event.

Robustness first: whatever bytes arrive, `build_event` returns a valid event; what the
parser disliked is listed in `message.defects` instead of raised. Speed second: the
stdlib header parser is thorough but slow (and quadratic on long values), so plain
values that it would return unchanged skip it, and decoded headers are memoised. The
message tree is the one `BytesParser(policy=policy.default)` builds, but plain messages
are split here instead of by its line-by-line feed parser, and big ones are walked with
their base64 runs stood in for (`_FastParser`; tests/test_message_fast.py holds it to the
stdlib's tree and to the events built before it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import logging
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import errors, policy
from email._encoded_words import decode_b  # get_payload's own base64 decoder
from email.generator import BytesGenerator
from email.header import decode_header, make_header
from email.headerregistry import HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage, Message
from email.parser import BytesParser
from functools import lru_cache
from io import BytesIO
from typing import Any

from mailpipe.capture.attachments import AttachmentStorage, store_attachment
from mailpipe.capture.types import AuthInfo, Envelope
from mailpipe.event import CapturedEmail, new_uuid

log = logging.getLogger(__name__)

_MAX_DEFECTS = 200
# Past this many characters a header skips the stdlib parser, whose cost grows
# quadratically (a 200 KiB Subject of encoded words takes seconds).
_MAX_PARSED_HEADER = 8192
_MAX_CACHED_HEADER = 1024
# What the decoded-header and MIME-header memos keep: values that repeat are short, and
# at 512 entries of at most this size the memos stay well under a megabyte.
_MAX_MEMO_VALUE = 256


class _MemoisedHeaderFactory:
    """policy.default's HeaderRegistry with an LRU in front.

    The feed parser alone asks for each part's Content-Type four times, and values such as
    `MIME-Version: 1.0` repeat across messages. Header objects are immutable, so sharing
    them is safe; long values bypass the cache to bound its memory.
    """

    def __init__(self) -> None:
        self._registry = HeaderRegistry()
        self._cached = lru_cache(maxsize=512)(self._registry.__call__)

    def __call__(self, name: str, value: str) -> Any:
        if len(value) > _MAX_CACHED_HEADER:
            return self._registry(name, value)
        return self._cached(name, value)


_POLICY = policy.default.clone(header_factory=_MemoisedHeaderFactory())
_STDLIB_PARSER = BytesParser(policy=_POLICY)
# Regenerates encapsulated messages as close to the received bytes as the stdlib allows:
# headers are written as received (no refolding) and 8-bit bodies are kept as they are.
_GENERATOR_POLICY = _POLICY.clone(refold_source="none", cte_type="8bit", utf8=True, linesep="\r\n")
# Decodes encoded words the way policy.default does for unstructured headers.
_UNSTRUCTURED = HeaderRegistry(use_default_map=False)

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_ADDR_SPEC = rf"{_DOT_ATOM}@{_DOT_ATOM}"
_MAILBOX = rf"(?:{_ATEXT}(?: {_ATEXT})* <{_ADDR_SPEC}>|{_ADDR_SPEC})"
# Values these match come back from policy.default unchanged and without defects (see the
# equivalence tests), so they need not be parsed.
_PLAIN_TEXT = re.compile(r"[\t -~]*")  # printable ASCII: nothing to decode or flag
_PLAIN_MAILBOX = re.compile(_MAILBOX)
_PLAIN_MAILBOX_LIST = re.compile(rf"{_MAILBOX}(?:, {_MAILBOX})*")
_PLAIN_MESSAGE_ID = re.compile(rf"<{_ADDR_SPEC}>")
_PLAIN_HEADERS = {
    **dict.fromkeys(("sender", "resent-sender"), _PLAIN_MAILBOX),
    **dict.fromkeys(
        ("from", "to", "cc", "bcc", "reply-to", "resent-from", "resent-to", "resent-cc"),
        _PLAIN_MAILBOX_LIST,
    ),
    "resent-bcc": _PLAIN_MAILBOX_LIST,
    "message-id": _PLAIN_MESSAGE_ID,
}
_STRUCTURED = frozenset(
    name
    for name, cls in HeaderRegistry().registry.items()
    if not issubclass(cls, UnstructuredHeader)
)
_MIME_TYPE = re.compile(r"[a-z0-9!#$%&'*+.^_`{|}~-]+/[a-z0-9!#$%&'*+.^_`{|}~-]+")
# What get_payload(decode=True) knows; anything else is passed through undecoded.
_KNOWN_CTES = frozenset(
    {"", "7bit", "8bit", "binary", "base64", "quoted-printable"}
    | {"uuencode", "x-uuencode", "uue", "x-uue"}
)
# Transfer encodings `_decoded_payload` leaves to get_payload.
_STDLIB_DECODED = frozenset(("quoted-printable", "uuencode", "x-uuencode", "uue", "x-uue"))
_ASCII_CHARSETS = frozenset(("us-ascii", "ascii", "ansi_x3.4-1968", "646", "us"))


# ---- parsing: the stdlib's tree, without its line-by-line walk where that is safe -------

# A header block the feed parser splits exactly as `_split_part` does: fields whose name
# is what its headerRE takes for one (so no "From " line, no line without a colon), folded
# lines starting with a blank, all lines ending alike.
_CRLF_FIELDS = re.compile(r"(?:[\041-\071\073-\176]+:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*+\r\n)++")
_LF_FIELDS = re.compile(r"(?:[\041-\071\073-\176]+:[^\r\n]*(?:\n[ \t][^\r\n]*)*+\n)++")
# Below this size the line-by-line walk costs less than looking for base64 runs.
_SKELETON_MIN = 32 * 1024
# 32 or more lines of base64 alphabet, each ended by CRLF or LF. The feed parser treats every
# such line alike (not a header, a blank, a boundary or a continuation), so a run of them can
# stand in for another line of that kind while it walks the message.
_BASE64_RUN = re.compile(rb"(?m)^(?:[A-Za-z0-9+/=]++\r?\n){32}")
_BASE64_LINES = re.compile(rb"(?:[A-Za-z0-9+/=]++\r?\n)*+")
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_RUN_CHUNK = 64 * 1024
_RUN_MARK = "\x00mailpipe-run:"  # a stand-in: the mark, the run's index, NUL
_RUN_TOKEN = re.compile(r"\x00mailpipe-run:(\d+)\x00")
# Deeper multiparts are left to the stdlib (this splitter recurses).
_MAX_SPLIT_DEPTH = 8
# Multipart transfer encodings the feed parser takes without a defect (RFC 2045 6.4).
_MULTIPART_CTES = frozenset(("7bit", "8bit", "binary"))


class _FastParser:
    """`BytesParser(policy=_POLICY)`: the same tree, with less of its line-by-line walk.

    A message with plain header blocks, single-part or multipart with well-formed
    boundaries, is split here; a big one is first cut down to a skeleton whose long base64
    runs stand as one line each, and the runs are put back into the tree.
    Anything else goes to the stdlib, which then walks it line by line as usual.
    """

    def parsebytes(self, raw: bytes) -> EmailMessage:
        if len(raw) >= _SKELETON_MIN and _RUN_MARK.encode() not in raw:
            return _parse_skeleton(raw)
        return _parse_tree(raw)


def _parse_tree(raw: bytes) -> EmailMessage:
    text = raw.decode("ascii", "surrogateescape")  # as BytesParser hands it to the feed parser
    first = text.find("\n")
    eol = "\r\n" if first > 0 and text[first - 1] == "\r" else "\n"
    try:
        msg = _split_message(text, eol)
    except Exception:
        msg = None  # e.g. a Content-Type the header parser trips over: the stdlib's call
    return msg if msg is not None else _STDLIB_PARSER.parsebytes(raw)


def _split_message(text: str, eol: str) -> EmailMessage | None:
    """The feed parser's tree of a plain message, or None to leave it to the feed parser."""
    split = _split_part(text, eol)
    if split is None:
        return None
    msg, body = split
    content_type = msg.get_content_type()
    if content_type.startswith("message/"):
        return None
    if content_type.startswith("multipart/"):
        return _split_multipart(msg, content_type, body, eol)
    msg.set_payload(body)
    return msg


def _split_part(text: str, eol: str) -> tuple[EmailMessage, str] | None:
    """A part's headers (a plain block of them) and the text after its blank line."""
    end = text.find(eol * 2)
    if end <= 0:
        return None
    head = text[: end + len(eol)]
    fields = _CRLF_FIELDS if eol == "\r\n" else _LF_FIELDS
    if not head.isascii() or not fields.fullmatch(head):
        return None
    msg = EmailMessage(policy=_POLICY)
    for name, value in _fields(head[: -len(eol)].split(eol), eol):
        msg.set_raw(name, value)
    return msg, text[end + 2 * len(eol) :]


def _split_multipart(
    msg: EmailMessage, content_type: str, body: str, eol: str, depth: int = 0
) -> EmailMessage | None:
    """Parts between boundaries, nested a few levels deep, as the feed parser splits them.

    Left to the stdlib: whatever it flags as a defect (no boundary, no start or close
    boundary, an encoded multipart), repeated boundary lines (it skips them), message/*
    parts, digests (their parts default to message/rfc822), deep nesting, and line breaks
    other than the message's own (the feed parser breaks lines at any of CR, LF and CRLF,
    so a boundary could hide behind one). A line that would end an enclosing multipart
    ends it here too: the enclosing one is split first.
    """
    boundary = msg.get_boundary()
    if boundary is None or content_type == "multipart/digest" or depth > _MAX_SPLIT_DEPTH:
        return None
    if str(msg.get("content-transfer-encoding", "8bit")).lower() not in _MULTIPART_CTES:
        return None
    if eol == "\r\n" and not body.count("\r") == body.count("\n") == body.count("\r\n"):
        return None
    if eol == "\n" and "\r" in body:
        return None
    lines = _boundary_lines(body, "--" + boundary, eol)
    if lines is None:
        return None
    if lines[0][0] > 0:  # the last line break belongs to the boundary (RFC 2046)
        msg.preamble = body[: lines[0][0] - len(eol)]
    for (_, start), (stop, _) in itertools.pairwise(lines):
        child = _split_child(body[start:stop], eol, depth + 1)
        if child is None:
            return None
        msg.attach(child)
    msg.epilogue = body[lines[-1][1] :]
    return msg


def _split_child(text: str, eol: str, depth: int) -> EmailMessage | None:
    """One part of a multipart; the line break before the next boundary is the boundary's."""
    split = _split_part(text, eol)
    if split is None:
        return None
    child, body = split
    content_type = child.get_content_type()
    if content_type.startswith("message/"):
        return None
    if not content_type.startswith("multipart/"):
        child.set_payload(body[: -len(eol)])
        return child
    if _split_multipart(child, content_type, body, eol, depth) is None:
        return None
    child.epilogue = child.epilogue[: -len(eol)] if child.epilogue else None
    return child


def _boundary_lines(body: str, separator: str, eol: str) -> list[tuple[int, int]] | None:
    """Where each boundary line starts and where the line after it starts, up to the
    close boundary; None without one, or when one boundary line follows another."""
    lines: list[tuple[int, int]] = []
    for start in _line_starts(body, separator):
        end = body.find(eol, start)
        end = len(body) if end < 0 else end
        # The feed parser's boundaryre: the separator, "--" if it closes, then blanks.
        rest = body[start + len(separator) : end]
        close = rest.startswith("--")
        if (rest[2:] if close else rest).strip(" \t"):
            continue
        if lines and lines[-1][1] == start:
            return None
        lines.append((start, min(end + len(eol), len(body))))
        if close:
            return lines if len(lines) > 1 else None
    return None


def _line_starts(text: str, prefix: str) -> Iterator[int]:
    """Where the lines that start with `prefix` start."""
    if text.startswith(prefix):
        yield 0
    at = text.find("\n" + prefix)
    while at >= 0:
        yield at + 1
        at = text.find("\n" + prefix, at + 1)


def _fields(lines: list[str], eol: str) -> Iterable[tuple[str, str]]:
    """(name, value) as the policy's header_source_parse makes them from these lines.

    Folded lines keep their line break in the value, as the feed parser keeps it.
    """
    name, parts = "", []
    for line in lines:
        if line[0] in " \t":
            parts.append(line)
            continue
        if name:
            yield name, eol.join(parts).lstrip(" \t")
        name, _, value = line.partition(":")
        parts = [value]
    if name:
        yield name, eol.join(parts).lstrip(" \t")


def _parse_skeleton(raw: bytes) -> EmailMessage:
    """The stdlib's tree of a message whose long base64 runs it walked as one line each."""
    pieces: list[bytes] = []
    runs: list[str] = []
    pos = 0
    for start, end in _base64_runs(raw):
        eol = 2 if raw[end - 2] == 0x0D else 1
        # The stand-in keeps the run's last line break: the parser strips that one at times.
        token = f"{_RUN_MARK}{len(runs)}\x00".encode()
        pieces += (raw[pos:start], token, raw[end - eol : end])
        runs.append(raw[start : end - eol].decode("ascii"))
        pos = end
    if not runs:
        return _parse_tree(raw)
    pieces.append(raw[pos:])
    msg = _parse_tree(b"".join(pieces))
    _put_back(msg, runs)
    return msg


def _base64_runs(raw: bytes) -> Iterable[tuple[int, int]]:
    pos = 0
    while (found := _BASE64_RUN.search(raw, pos)) is not None:
        pos = _run_end(raw, found.start(), found.end())
        yield found.start(), pos


def _run_end(raw: bytes, start: int, end: int) -> int:
    """Where the run of base64 lines from `start` (checked up to `end`) stops.

    The regex takes 5 ns a byte. Encoders write lines of one width, so whole chunks of
    such lines are checked with bytes methods at a tenth of that, and only the rest of
    the run goes through the regex.
    """
    width = raw.index(b"\n", start) + 1 - start
    eol = b"\r\n" if raw[start + width - 2] == 0x0D else b"\n"
    lines = _RUN_CHUNK // width
    while len(chunk := raw[end : end + lines * width]) == lines * width:
        # Only the alphabet but for the line breaks, and those where lines of `width` end.
        if (
            chunk.translate(None, _BASE64_ALPHABET) != eol * lines
            or chunk[width - 1 :: width] != b"\n" * lines
            or (eol == b"\r\n" and chunk[width - 2 :: width] != b"\r" * lines)
        ):
            break
        end += len(chunk)
    return _BASE64_LINES.match(raw, end).end()


def _put_back(msg: Message, runs: list[str]) -> None:
    """Replace each stand-in with its run, wherever the parser put body text."""

    def restore(text: str) -> str:
        return _RUN_TOKEN.sub(lambda found: runs[int(found[1])], text)

    stack = [msg]
    while stack:  # iterative: hostile nesting must not overflow the stack
        part = stack.pop()
        # The payload as the parser stored it; get_payload() would decode 8-bit text.
        payload = part._payload
        if isinstance(payload, list):
            stack.extend(payload)
        elif isinstance(payload, str) and _RUN_MARK in payload:
            part._payload = restore(payload)
        for attr in ("preamble", "epilogue"):
            value = getattr(part, attr)
            if value and _RUN_MARK in value:
                setattr(part, attr, restore(value))


_PARSER = _FastParser()


@dataclass(frozen=True)
class EventOptions:
    include_raw: bool = False
    attachments: AttachmentStorage = field(default_factory=AttachmentStorage)


@dataclass(frozen=True)
class SessionInfo:
    uuid: str
    remote_addr: str
    local_addr: str
    server: str
    tls: bool


# ---- public API ------------------------------------------------------------------------


def parse_message(raw: bytes) -> EmailMessage:
    """The message tree, as `BytesParser(policy=policy.default)` builds it; never raises."""
    try:
        return _PARSER.parsebytes(raw)
    except Exception as exc:  # e.g. RecursionError on absurd nesting
        msg = EmailMessage(policy=_POLICY)
        # Keep the bytes reachable as a text/plain body rather than losing them.
        msg.set_payload(raw.decode("ascii", "surrogateescape"))
        msg.defects.append(UnparseableMessageDefect(f"parser gave up ({_exc_text(exc)})"))
        return msg


def attachment_parts(msg: Message) -> list[Message]:
    """The parts that become event["attachments"], in that order."""
    return [leaf.part for leaf in _walk(msg, _Defects()).attachments]


def attachment_payload(part: Message) -> bytes:
    """Decoded bytes of one part returned by `attachment_parts`."""
    return _attachment_bytes(part, _Defects(), "")


def build_event(
    raw: bytes,
    *,
    envelope: Envelope,
    auth: AuthInfo,
    session: SessionInfo,
    received_at: datetime,
    options: EventOptions,
    violations: Iterable[str] = (),
    transcript: list[str] | None = None,
    email_uuid: str | None = None,
) -> CapturedEmail:
    """The EMAIL_RECEIVED event for one message; never raises on message content."""
    defects = _Defects()
    try:
        message, attachments = _analyse(raw, options, defects)
    except Exception as exc:
        # A bug of ours must not lose the email: the raw bytes still reach every sink.
        log.exception("cannot analyse message of %d bytes", len(raw))
        defects.add(f"internal error while analysing the message ({_exc_text(exc)})")
        message, attachments = _bare_message(raw), []
    message["defects"] = defects.result()
    if options.include_raw:
        message["raw"], message["raw_encoding"] = _raw_text(raw)
    session_doc: dict[str, Any] = {
        "uuid": session.uuid,
        "local_addr": session.local_addr,
        "server": session.server,
        "tls": session.tls,
        "violations": [_clean(v) for v in violations],
    }
    if transcript is not None:
        session_doc["transcript"] = [_clean(line) for line in transcript]
    event = {
        "event": "EMAIL_RECEIVED",
        "uuid": email_uuid or new_uuid(),
        "remote_addr": session.remote_addr,
        "received_at": _rfc3339(received_at),
        "envelope": {
            "from": _clean(envelope.mail_from),
            "to": [_clean(a) for a in envelope.rcpt_to],
            "helo": _clean(envelope.helo),
            "mail_options": [_clean(o) for o in envelope.mail_options],
            "rcpt_options": [[_clean(o) for o in opts] for opts in envelope.rcpt_options],
        },
        "authentication": {
            k: _clean(v) if isinstance(v, str) else v for k, v in auth.as_event().items()
        },
        "session": session_doc,
        "message": message,
        "attachments": attachments,
    }
    return CapturedEmail(event=event, raw=raw)


# ---- message analysis ------------------------------------------------------------------


class UnparseableMessageDefect(errors.MessageDefect):
    """The parser itself gave up (it normally records defects and carries on)."""


class _Defects:
    """Defect descriptions, capped so a hostile message cannot bloat the event."""

    __slots__ = ("_dropped", "_items", "_structural")

    def __init__(self) -> None:
        self._structural: list[str] = []  # the parser's, listed first
        self._items: list[str] = []  # header defects and our fallbacks
        self._dropped = 0

    def add(self, text: str, *, structural: bool = False) -> None:
        if len(self._structural) + len(self._items) >= _MAX_DEFECTS:
            self._dropped += 1
            return
        (self._structural if structural else self._items).append(_clean(text))

    def add_all(self, where: str, found: Iterable[Exception], *, structural: bool = False) -> None:
        for defect in found:
            detail = str(defect)
            text = f"{type(defect).__name__}: {detail}" if detail else type(defect).__name__
            self.add(f"{where}: {text}" if where else text, structural=structural)

    def result(self) -> list[str]:
        out = self._structural + self._items
        if self._dropped:
            out.append(f"{self._dropped} more defects not listed")
        return out


class _Recording(_Defects):
    """Keeps defect texts in order and marked, uncapped, for memoised results to replay."""

    __slots__ = ("_header_defect", "_log")

    def __init__(self, log: list[tuple[str, bool]], *, header_defect: bool) -> None:
        super().__init__()
        self._log = log
        self._header_defect = header_defect

    def add(self, text: str, *, structural: bool = False) -> None:
        self._log.append((_clean(text), self._header_defect))


@dataclass(slots=True)
class _Leaf:
    part: Message
    where: str  # names the part in defect texts, e.g. "part 1.2"
    content_type: str
    disposition: str | None
    filename: str | None
    content_id: str | None
    charset: str | None  # from Content-Type, as get_content_charset() reads it


@dataclass(slots=True)
class _Layout:
    text: _Leaf | None = None
    html: _Leaf | None = None
    attachments: list[_Leaf] = field(default_factory=list)
    # Every part seen, for collecting the parser's defects once payloads are decoded
    # (decoding base64 adds defects to the part).
    visited: list[tuple[str, Message]] = field(default_factory=list)


def _analyse(
    raw: bytes, options: EventOptions, defects: _Defects
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    msg = parse_message(raw)
    if not raw or raw.isspace():
        defects.add("empty message: no headers, no body")
    headers, header_list, first = _headers(msg, defects)
    layout = _walk(msg, defects)
    text = _text(layout.text, defects) if layout.text else None
    html = _text(layout.html, defects) if layout.html else None
    attachments = [_attachment(leaf, options.attachments, defects) for leaf in layout.attachments]
    for where, part in layout.visited:
        defects.add_all("" if part is msg else where, part.defects, structural=True)
    message = {
        "headers": headers,
        "header_list": header_list,
        # Trimmed as mail clients show them; headers/header_list keep the exact values.
        "subject": _strip(first.get("subject")),
        "message_id": _strip(first.get("message-id")),
        "text": text,
        "html": html,
        "body": text if text is not None else html if html is not None else "",
        "size": len(raw),
    }
    return message, attachments


def _bare_message(raw: bytes) -> dict[str, Any]:
    return {
        **{"headers": {}, "header_list": [], "subject": None, "message_id": None},
        **{"text": None, "html": None, "body": "", "size": len(raw)},
    }


def _strip(value: str | None) -> str | None:
    return value.strip() if value is not None else None


def _headers(
    msg: Message, defects: _Defects
) -> tuple[dict[str, str], list[list[str]], dict[str, str]]:
    """headers (first of each name), header_list (all), and the first by lowercase name."""
    header_list: list[list[str]] = []
    headers: dict[str, str] = {}
    first: dict[str, str] = {}
    for name, raw_value in msg.raw_items():
        value = _header_value(name, raw_value, defects, "header")
        header_list.append([name, value])
        key = name.lower()
        if key not in first:
            first[key] = value
            headers[name] = value
    return headers, header_list, first


def _header_value(name: str, raw_value: str, defects: _Defects, where: str) -> str:
    """The decoded value policy.default gives, with fallbacks instead of exceptions."""
    if len(raw_value) > _MAX_MEMO_VALUE:
        value, notes = _decoded_header(name, raw_value, where)
    else:
        value, notes = _cached_header(name, raw_value, where)
    for note in notes:
        defects.add(note)
    return value


def _decoded_header(name: str, raw_value: str, where: str) -> tuple[str, tuple[str, ...]]:
    """The value and the defect texts of one header: depends on nothing else, so memoised.

    Values such as `MIME-Version: 1.0`, a sender's From or a Date of this second repeat
    across messages, and each is decoded once.
    """
    log: list[tuple[str, bool]] = []
    value = _decode_header(name, raw_value, _Recording(log, header_defect=True), where)
    return value, tuple(text for text, _ in log)


_cached_header = lru_cache(maxsize=512)(_decoded_header)


def _decode_header(name: str, raw_value: str, defects: _Defects, where: str) -> str:
    value = raw_value.replace("\r", "").replace("\n", "")  # unfold, as policy.default does
    lname = name.lower()
    if "=?" not in value and _PLAIN_TEXT.fullmatch(value):
        if lname not in _STRUCTURED:
            return value
        plain = _PLAIN_HEADERS.get(lname)
        if plain is not None and plain.fullmatch(value):
            return value
    label = f"{where} {name}"
    if not value.isascii():
        value = _decode_8bit(value, label, defects)
    if len(value) > _MAX_PARSED_HEADER:
        defects.add(f"{label}: {len(value)} characters, too long to parse; decoded leniently")
        return _lenient_decode(value)
    try:
        header = _POLICY.header_factory(name, value)
        defects.add_all(label, _header_defects(header))
        return _clean(str(header))
    except Exception as exc:
        defects.add(f"{label}: unparseable ({_exc_text(exc)}); value kept as unstructured text")
    try:
        return _clean(str(_UNSTRUCTURED(name, value)))
    except Exception:
        return _clean(value)


def _decode_8bit(value: str, label: str, defects: _Defects) -> str:
    """Raw 8-bit header bytes: UTF-8 as SMTPUTF8 mail sends them, else Latin-1.

    Handing the parser real text rather than escaped bytes spares a flood of
    UndecodableBytesDefects for perfectly good SMTPUTF8 headers.
    """
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return _clean(value)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        defects.add(f"{label}: 8-bit bytes that are not UTF-8; read as Latin-1")
        return data.decode("latin-1")


def _header_defects(header: Any) -> Iterable[Exception]:
    if header.defects or not isinstance(header, UnstructuredHeader):
        return header.defects  # structured headers copy their parse tree's defects here
    # UnstructuredHeader leaves the defects of its encoded words (bad base64, unknown
    # charset) in its parse tree only.
    return getattr(getattr(header, "_parse_tree", None), "all_defects", ())


def _lenient_decode(value: str) -> str:
    """Encoded words decoded in linear time; the raw value when even that fails."""
    if "=?" not in value:
        return _clean(value)
    try:
        return _clean(str(make_header(decode_header(value))))
    except Exception:
        return _clean(value)


def _walk(msg: Message, defects: _Defects) -> _Layout:
    """Sort the leaves into text body, html body and attachments, depth first.

    Iterative, so hostile nesting cannot overflow the stack. Encapsulated messages
    (message/*) are attachments; their insides are visited for defects only.
    """
    layout = _Layout()
    stack: list[tuple[Message, str, bool]] = [(msg, "message", True)]
    while stack:
        part, where, sorting = stack.pop()
        layout.visited.append((where, part))
        children = part.get_payload() if part.is_multipart() else None
        if not sorting:
            if children:
                stack.extend((c, f"{where}.{i}", False) for i, c in _numbered_reversed(children))
            continue
        leaf = _describe(part, where, defects, is_root=part is msg)
        if children is not None and leaf.content_type.startswith("multipart/"):
            prefix = "part " if part is msg else f"{where}."
            stack.extend((c, f"{prefix}{i}", True) for i, c in _numbered_reversed(children))
        elif children is not None:
            layout.attachments.append(leaf)
            stack.extend((c, f"{where} (encapsulated)", False) for c in reversed(children))
        else:
            _place(layout, leaf)
    return layout


def _numbered_reversed(children: list[Message]) -> list[tuple[int, Message]]:
    # The stack pops last-in first, so push in reverse to visit in document order.
    return list(reversed(list(enumerate(children, 1))))


def _place(layout: _Layout, leaf: _Leaf) -> None:
    if leaf.disposition == "attachment" or leaf.filename is not None:
        layout.attachments.append(leaf)
    elif leaf.content_type == "text/plain" and layout.text is None:
        layout.text = leaf
    elif leaf.content_type == "text/html" and layout.html is None:
        layout.html = leaf
    else:
        layout.attachments.append(leaf)


def _describe(part: Message, where: str, defects: _Defects, *, is_root: bool) -> _Leaf:
    ctype, disposition, has_id = _mime_fields(part)
    info = _mime_headers(part.get_default_type(), ctype, disposition)
    for text, header_defect in info.notes:
        # The root's headers were already parsed (and their defects listed) by _headers.
        if not (is_root and header_defect):
            defects.add(where + text)
    return _Leaf(
        part=part,
        where=where,
        content_type=info.content_type,
        disposition=info.disposition,
        filename=info.filename,
        content_id=_content_id(part, where, defects) if has_id else None,
        charset=info.charset,
    )


Field = tuple[str, str]  # (name, value) as the parser stored the header


def _mime_fields(part: Message) -> tuple[Field | None, Field | None, bool]:
    """The first Content-Type and Content-Disposition, and whether a Content-ID is there."""
    ctype = disposition = None
    has_id = False
    for name, value in part.raw_items():
        lname = name.lower()
        if lname == "content-type":
            ctype = ctype or (name, value)
        elif lname == "content-disposition":
            disposition = disposition or (name, value)
        elif lname == "content-id":
            has_id = True
    return ctype, disposition, has_id


@dataclass(frozen=True, slots=True)
class _MimeHeaders:
    """What a part's Content-Type and Content-Disposition make of it."""

    content_type: str
    disposition: str | None
    filename: str | None
    charset: str | None
    # Defect texts, each to follow the part's name; True marks the headers' own defects.
    notes: tuple[tuple[str, bool], ...]


def _mime_headers(
    default_type: str, ctype: Field | None, disposition: Field | None
) -> _MimeHeaders:
    if any(h and len(h[1]) > _MAX_MEMO_VALUE for h in (ctype, disposition)):
        return _read_mime_headers(default_type, ctype, disposition)
    return _cached_mime_headers(default_type, ctype, disposition)


def _read_mime_headers(
    default_type: str, ctype: Field | None, disposition: Field | None
) -> _MimeHeaders:
    """Read off a part holding only these two headers, so the result can be memoised.

    The stdlib methods used read the first of each header only (and the default type),
    and parts repeat the same few values, e.g. `text/plain; charset=utf-8`.
    """
    probe = EmailMessage(policy=_POLICY)
    probe.set_default_type(default_type)
    for header in (ctype, disposition):
        if header is not None:
            probe.set_raw(*header)
    log: list[tuple[str, bool]] = []
    defects, notes = _Recording(log, header_defect=False), _Recording(log, header_defect=True)
    content_type, disposition_type = _content_headers(probe, "", defects, notes)
    filename = _filename(probe, "", defects)
    try:
        charset = probe.get_content_charset()
    except Exception:
        charset = None
    return _MimeHeaders(content_type, disposition_type, filename, charset, tuple(log))


_cached_mime_headers = lru_cache(maxsize=256)(_read_mime_headers)


def _content_headers(
    part: Message, where: str, defects: _Defects, notes: _Defects
) -> tuple[str, str | None]:
    """Content type and disposition, with fallbacks; header defects go to `notes`."""
    try:
        content_type = part.get_content_type()
        _note_header_defects(part, "Content-Type", where, notes)
    except Exception as exc:
        defects.add(f"{where}: bad Content-Type ({_exc_text(exc)}); taken as octet-stream")
        content_type = "application/octet-stream"
    if not _MIME_TYPE.fullmatch(content_type):
        # Sinks and the web page hand this on as a Content-Type: it must be a real one.
        defects.add(f"{where}: invalid content type {content_type!r}; taken as octet-stream")
        content_type = "application/octet-stream"
    try:
        disposition = part.get_content_disposition()
        _note_header_defects(part, "Content-Disposition", where, notes)
    except Exception as exc:
        defects.add(f"{where}: bad Content-Disposition ({_exc_text(exc)}); taken as attachment")
        disposition = "attachment"
    return content_type, disposition


def _note_header_defects(part: Message, name: str, where: str, defects: _Defects) -> None:
    header = part.get(name)
    if header is not None:
        defects.add_all(f"{where} header {name}", _header_defects(header))


def _filename(part: Message, where: str, defects: _Defects) -> str | None:
    try:
        name = _param(part, "content-disposition", "filename") or _param(
            part, "content-type", "name"
        )
        if name is None:
            name = _compat_filename(part)
    except Exception as exc:
        defects.add(f"{where}: unreadable filename ({_exc_text(exc)})")
        return None
    if name is None:
        return None
    if "=?" in name:
        # Some mailers put RFC 2047 encoded words in unquoted parameters.
        name = _lenient_decode(name)
    name = _clean(name).strip()
    return name or None


def _param(part: Message, header_name: str, param: str) -> str | None:
    header = part.get(header_name)
    params = getattr(header, "params", None)
    if not params:
        return None
    value = params.get(param)
    return value if isinstance(value, str) else None


def _compat_filename(part: Message) -> str | None:
    """Parameters policy.default rejected (e.g. `name==?utf-8?B?...?=`), read leniently."""
    wanted = ("content-disposition", "content-type")
    raw = [(k, v) for k, v in part.raw_items() if k.lower() in wanted]
    if not any("name" in v.lower() for _, v in raw):
        return None
    lenient = Message()  # compat32 takes header values as they are
    for key, value in raw:
        lenient[key] = value
    name = lenient.get_filename()
    return name if isinstance(name, str) else None


def _content_id(part: Message, where: str, defects: _Defects) -> str | None:
    for name, raw_value in part.raw_items():
        if name.lower() == "content-id":
            value = _header_value(name, raw_value, defects, f"{where} header").strip()
            if value.startswith("<") and value.endswith(">"):
                value = value[1:-1].strip()
            return value or None
    return None


def _text(leaf: _Leaf, defects: _Defects) -> str:
    data = _leaf_bytes(leaf.part, defects, leaf.where)
    charset = leaf.charset or "utf-8"
    if charset in _ASCII_CHARSETS:
        # UTF-8 is a superset, and mislabelled UTF-8 is common; pure ASCII is unchanged.
        charset = "utf-8"
    try:
        text = data.decode(charset, "replace")
    except Exception as exc:  # LookupError, or a codec that is not a text codec
        defects.add(f"{leaf.where}: charset {charset!r} unusable ({_exc_text(exc)}); read as UTF-8")
        text = data.decode("utf-8", "replace")
    return _clean(text)


def _attachment(leaf: _Leaf, storage: AttachmentStorage, defects: _Defects) -> dict[str, Any]:
    data = _attachment_bytes(leaf.part, defects, leaf.where)
    disposition = leaf.disposition
    if disposition is None:
        # No disposition: a part referenced by Content-ID is shown inline by mail clients.
        disposition = "inline" if leaf.content_id else "attachment"
    entry: dict[str, Any] = {
        "filename": leaf.filename,
        "content_type": leaf.content_type,
        "size": len(data),
        "disposition": "inline" if disposition == "inline" else "attachment",
        "content_id": leaf.content_id,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    try:
        entry.update(store_attachment(storage, data, leaf.filename, leaf.content_type))
    except OSError as exc:
        defects.add(f"{leaf.where}: cannot write attachment file ({exc}); kept in the event")
        entry.update(store_attachment(AttachmentStorage(), data, None, leaf.content_type))
    return entry


def _attachment_bytes(part: Message, defects: _Defects, where: str) -> bytes:
    if part.is_multipart():  # message/*: the encapsulated message(s)
        return _message_bytes(part, defects, where)
    return _leaf_bytes(part, defects, where)


def _leaf_bytes(part: Message, defects: _Defects, where: str) -> bytes:
    try:
        cte = _transfer_encoding(part)
        if cte not in _KNOWN_CTES:
            defects.add(f"{where}: unknown Content-Transfer-Encoding {cte!r}; body taken as is")
        data = _decoded_payload(part, cte)
    except Exception as exc:
        defects.add(f"{where}: cannot decode the body ({_exc_text(exc)}); kept undecoded")
        payload = part.get_payload()
        data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""
    return data if isinstance(data, bytes) else b""


def _decoded_payload(part: Message, cte: str) -> Any:
    """get_payload(decode=True), doing what it does for the common encodings more directly.

    It looks the encoding up again, and splits a base64 body into a list of lines to join
    them again (6 of a 2 MB attachment's 40 ms); here line breaks go in one pass. The same
    decoder, the same defects; quoted-printable and uuencode are left to it.
    """
    payload = part._payload  # as parsed: what get_payload encodes back to bytes
    if not isinstance(payload, str) or cte in _STDLIB_DECODED:
        return part.get_payload(decode=True)
    try:
        data = payload.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:  # not from the parser; the stdlib has its own way with it
        return part.get_payload(decode=True)
    if cte != "base64":
        return data  # 7bit, 8bit, binary or unknown: the bytes as received
    decoded, found = decode_b(data.translate(None, b"\r\n"))
    for defect in found:
        part.policy.handle_defect(part, defect)
    return decoded


def _transfer_encoding(part: Message) -> str:
    # The same reading get_payload(decode=True) makes.
    return str(part.get("content-transfer-encoding", "")).lower()


def _message_bytes(part: Message, defects: _Defects, where: str) -> bytes:
    out = BytesIO()
    try:
        generator = BytesGenerator(out, mangle_from_=False, policy=_GENERATOR_POLICY)
        for inner in part.get_payload():
            generator.flatten(inner)
        cte = _transfer_encoding(part)
    except Exception as exc:
        defects.add(f"{where}: cannot regenerate the encapsulated message ({_exc_text(exc)})")
        return b""
    if cte not in ("base64", "quoted-printable"):
        return out.getvalue()
    # RFC 2046 forbids encoding message/* parts, yet some mailers base64 them; the parser
    # then took the encoded text for a message, so decode what it regenerates.
    defects.add(f"{where}: {cte}-encoded message part (not allowed by RFC 2046); decoded")
    return _decode_transfer(out.getvalue(), cte, defects, where)


def _decode_transfer(data: bytes, cte: str, defects: _Defects, where: str) -> bytes:
    if cte == "quoted-printable":
        return quopri.decodestring(data)
    compact = b"".join(data.split())
    try:
        return base64.b64decode(compact + b"=" * (-len(compact) % 4))
    except binascii.Error as exc:
        defects.add(f"{where}: undecodable base64 ({exc}); kept as received")
        return data


# ---- small helpers ---------------------------------------------------------------------


def _clean(text: str) -> str:
    """Valid Unicode for JSON: lone surrogates (undecodable bytes) become U+FFFD.

    Surrogate-escaped bytes are decoded as UTF-8 first, so raw UTF-8 (SMTPUTF8) survives.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _raw_text(raw: bytes) -> tuple[str, str]:
    """The raw message as JSON text plus the codec that gives the exact bytes back.

    UTF-8 when the bytes are valid UTF-8 (all 7-bit and SMTPUTF8 mail), else Latin-1, which
    maps every byte to one code point: `raw.encode(raw_encoding)` is always the original.
    """
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def _rfc3339(moment: datetime) -> str:
    # Naive datetimes are taken as UTC, the clock the SMTP core stamps with.
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _exc_text(exc: BaseException) -> str:
    detail = str(exc)
    return f"{type(exc).__name__}: {detail[:200]}" if detail else type(exc).__name__
