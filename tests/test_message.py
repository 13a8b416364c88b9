"""build_event: every message, however broken, becomes a valid EMAIL_RECEIVED event.

Events are checked as sinks see them (serialised, then parsed back) against the schema the
package ships (mailpipe/schema/email-event.schema.json), with format checking including
date-time, and against a strict copy of it, so that every field emitted is documented there.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import stat
import sysconfig
import time
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from conftest import CORPUS, CORPUS_MANIFEST
from mailpipe.capture import message as message_module
from mailpipe.capture.attachments import (
    AttachmentStorage,
    run_sweeper,
    store_attachment,
    sweep_attachments,
)
from mailpipe.capture.message import (
    EventOptions,
    SessionInfo,
    attachment_parts,
    attachment_payload,
    build_event,
    parse_message,
)
from mailpipe.capture.types import AuthInfo, Envelope
from mailpipe.schema import event_schema

MANIFEST = CORPUS_MANIFEST
CPYTHON_DATA = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"
CPYTHON_FILES = sorted(CPYTHON_DATA.iterdir()) if CPYTHON_DATA.is_dir() else []
GENERATED_NAME = re.compile(r"[0-9a-f]{32}(\.[a-z0-9]{1,16})?")

SESSION = SessionInfo(
    uuid="0b6f9d2e-8f43-4c4b-9a53-1f0e2d3c4b5a",
    remote_addr="192.0.2.7:40000",
    local_addr="127.0.0.1:1025",
    server="default",
    tls=False,
)
WHEN = datetime(2026, 11, 25, 8, 0, 0, 123456, tzinfo=UTC)

# jsonschema checks date-time only with an optional package installed; check it here.
FORMATS = FormatChecker(formats=())
FORMATS.checkers.update(Draft202012Validator.FORMAT_CHECKER.checkers)
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return RFC3339.fullmatch(value) is not None


def documented_only(schema: Any) -> Any:
    """A copy of the schema that also refuses any object member it does not declare."""
    if isinstance(schema, list):
        return [documented_only(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: documented_only(value) for key, value in schema.items()}
    if "properties" in strict and "additionalProperties" not in strict:
        strict["additionalProperties"] = False
    return strict


VALIDATOR = Draft202012Validator(event_schema(), format_checker=FORMATS)
DOCUMENTED = Draft202012Validator(documented_only(event_schema()))


def build(
    raw: bytes,
    *,
    storage: AttachmentStorage | None = None,
    include_raw: bool = True,
    envelope: Envelope | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The event as sinks receive it, after checking it against the schema."""
    options = EventOptions(include_raw=include_raw, attachments=storage or AttachmentStorage())
    captured = build_event(
        raw,
        envelope=envelope or Envelope(mail_from="from@example.test", rcpt_to=["to@example.test"]),
        auth=kwargs.pop("auth", AuthInfo()),
        session=SESSION,
        received_at=kwargs.pop("received_at", WHEN),
        options=options,
        **kwargs,
    )
    assert captured.raw == raw
    event = orjson.loads(captured.json())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(event)]
    assert errors == []
    undocumented = [f"{list(e.absolute_path)}: {e.message}" for e in DOCUMENTED.iter_errors(event)]
    assert undocumented == [], "a field the package's schema does not describe"
    return event


def content_of(attachment: dict[str, Any]) -> bytes:
    if "content" in attachment:
        return base64.b64decode(attachment["content"], validate=True)
    return Path(attachment["path"]).read_bytes()


def assert_consistent(raw: bytes, event: dict[str, Any]) -> None:
    """Attachments agree with their own hashes and with what the store serves by index."""
    message = event["message"]
    assert message["size"] == len(raw)
    if "raw" in message:
        assert message["raw"].encode(message["raw_encoding"]) == raw
    for attachment in event["attachments"]:
        data = content_of(attachment)
        assert len(data) == attachment["size"]
        assert hashlib.sha256(data).hexdigest() == attachment["sha256"]
    served = [attachment_payload(p) for p in attachment_parts(parse_message(raw))]
    assert [hashlib.sha256(d).hexdigest() for d in served] == [
        a["sha256"] for a in event["attachments"]
    ]


def has_defect(event: dict[str, Any], fragment: str) -> bool:
    return any(fragment in d for d in event["message"]["defects"])


def mime(*lines: str, body: bytes = b"") -> bytes:
    return "".join(line + "\r\n" for line in lines).encode() + b"\r\n" + body


# ---- the corpus of real mailers (tests/data/corpus) -------------------------------------


def attachment_keys(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = [(a["filename"], a["size"], a["sha256"], a["content_type"]) for a in items]
    return sorted(keys, key=repr)


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_corpus_message_matches_manifest(entry: dict[str, Any]) -> None:
    raw = (CORPUS / entry["file"]).read_bytes()
    envelope = Envelope(mail_from=entry["mail_from"], rcpt_to=entry["rcpt"], helo="client.test")
    event = build(raw, envelope=envelope)
    message = event["message"]

    assert message["subject"] == entry["subject"]
    assert entry["text_contains"] in message["text"]
    assert message["body"] == message["text"]
    if "html_contains" in entry:
        assert entry["html_contains"] in message["html"]
    for name, values in entry.get("headers_multi", {}).items():
        assert [v for n, v in message["header_list"] if n == name] == values
        assert message["headers"][name] == values[0]
    assert message["raw"] == raw.decode("utf-8")
    assert message["raw_encoding"] == "utf-8"
    assert attachment_keys(event["attachments"]) == attachment_keys(entry["attachments"])
    assert event["envelope"] == {
        "from": entry["mail_from"],
        "to": entry["rcpt"],
        "helo": "client.test",
        "mail_options": [],
        "rcpt_options": [],
    }
    assert_consistent(raw, event)


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_corpus_attachments_in_tempfiles(entry: dict[str, Any], tmp_path: Path) -> None:
    raw = (CORPUS / entry["file"]).read_bytes()
    directory = tmp_path / "not-yet" / "attachments"
    event = build(raw, storage=AttachmentStorage(mode="tempfile", temp_dir=str(directory)))

    expected_sha256 = {a["filename"]: a["sha256"] for a in entry["attachments"]}
    assert sorted(a["filename"] for a in event["attachments"]) == sorted(expected_sha256)
    for attachment in event["attachments"]:
        assert "content" not in attachment
        path = Path(attachment["path"])
        assert path.is_absolute()
        assert path.parent == directory  # "../../etc/passwd" included
        assert GENERATED_NAME.fullmatch(path.name)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == expected_sha256[attachment["filename"]]
    if event["attachments"]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert_consistent(raw, event)


def test_symfony_related_message_details() -> None:
    raw = (CORPUS / "symfony-related-attachments.eml").read_bytes()
    event = build(raw)
    message = event["message"]

    assert message["headers"]["From"] == "Sënder Ñame <sender@example.test>"
    assert message["message_id"] == "<8c66b2e6bb32f573215ee3462917f3c3@example.test>"
    assert message["text"] == "Hello plain SYM1-corpus\r\nLine two ünïcödé"
    assert message["html"].startswith("<p>Hello <b>html</b> SYM1-corpus <img src=")
    by_name = {a["filename"]: a for a in event["attachments"]}
    assert by_name["logo"]["disposition"] == "inline"
    assert by_name["logo"]["content_id"] == "e140c0319d5c91975e5d9e6957949159@symfony"
    assert by_name["résumé 📎.pdf"]["disposition"] == "attachment"
    assert by_name["résumé 📎.pdf"]["content_id"] is None
    # Encoded words inside a quoted parameter: decoded anyway, and reported.
    assert has_defect(event, "part 2 header Content-Type: InvalidHeaderDefect")


def test_long_folded_recipient_list_is_unfolded() -> None:
    raw = (CORPUS / "symfony-60-recipients.eml").read_bytes()
    message = build(raw)["message"]
    assert message["headers"]["To"] == ", ".join(f"r{i}@example.test" for i in range(60))
    # The header keeps the trailing blank the mailer folded in; `subject` is trimmed.
    assert message["headers"]["Subject"].endswith("subject ")
    assert message["defects"] == []


# ---- the CPython email test corpus: odd and broken messages ---------------------------


@pytest.mark.skipif(not CPYTHON_FILES, reason="this Python ships without its test suite")
@pytest.mark.parametrize("path", CPYTHON_FILES, ids=[p.name for p in CPYTHON_FILES])
def test_cpython_corpus_file_builds_a_valid_event(path: Path) -> None:
    raw = path.read_bytes()
    event = build(raw)
    assert_consistent(raw, event)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert event["message"]["raw_encoding"] == "latin-1"
    else:
        assert event["message"]["raw_encoding"] == "utf-8"


@pytest.mark.skipif(not CPYTHON_FILES, reason="this Python ships without its test suite")
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("msg_07.txt", [("dingusfish.gif", "image/gif", "attachment")]),
        ("msg_45.txt", [("signature.asc", "application/pgp-signature", "attachment")]),
        (
            "msg_16.txt",
            [
                (None, "message/delivery-status", "attachment"),
                (None, "message/rfc822", "attachment"),
            ],
        ),
        (
            "msg_02.txt",  # a digest between two plain parts
            [(None, "text/plain", "attachment")]
            + [(None, "message/rfc822", "attachment")] * 5
            + [(None, "text/plain", "attachment")],
        ),
    ],
)
def test_cpython_corpus_attachments(name: str, expected: list[tuple[Any, ...]]) -> None:
    event = build((CPYTHON_DATA / name).read_bytes())
    got = [(a["filename"], a["content_type"], a["disposition"]) for a in event["attachments"]]
    assert got == expected


# ---- hostile input -----------------------------------------------------------------------

BROKEN_BOUNDARY = mime(
    "Content-Type: multipart/mixed; boundary=nope",
    body=b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n",
)

HOSTILE: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "empty message"),
    "garbage bytes": (bytes(range(256)) * 8, "MissingHeaderBodySeparatorDefect"),
    "header without colon": (
        mime("From: a@example.test", "this line has no colon", "Subject: lost", body=b"x"),
        "MissingHeaderBodySeparatorDefect",
    ),
    "broken base64 body": (
        mime("Content-Transfer-Encoding: base64", body=b"aGVsbG8gd29ybGQ!!!*\r\n"),
        "InvalidBase64CharactersDefect",
    ),
    "unknown charset": (
        mime("Content-Type: text/plain; charset=x-no-such-charset", body=b"hello \xff\r\n"),
        "charset 'x-no-such-charset' unusable",
    ),
    "charset naming a bytes codec": (
        mime("Content-Type: text/plain; charset=base64", body=b"hello\r\n"),
        "charset 'base64' unusable",
    ),
    "bad encoded words": (
        mime("Subject: =?utf-8?B?!!!?= =?no-such-charset?Q?x?= =?utf-8?Q?ok?=", body=b"x"),
        "Unknown charset 'no-such-charset'",
    ),
    "bad address headers": (
        mime("From: <<<>>>@@@", "To: ,,,", "Date: yesterday", body=b"x"),
        "header Date: InvalidDateDefect",
    ),
    "control characters in a header": (
        mime("Subject: a\x00b\x07c", body=b"x"),
        "NonPrintableDefect",
    ),
    "missing boundary": (
        mime("Content-Type: multipart/mixed", body=b"--x\r\n\r\nhi\r\n--x--\r\n"),
        "NoBoundaryInMultipartDefect",
    ),
    "boundary never found": (BROKEN_BOUNDARY, "StartBoundaryNotFoundDefect"),
    "unknown transfer encoding": (
        mime("Content-Transfer-Encoding: x-weird", body=b"hi\r\n"),
        "unknown Content-Transfer-Encoding 'x-weird'",
    ),
    "address the stdlib parser crashes on": (
        mime("From: 0@", body=b"x"),
        "header From: unparseable (IndexError",
    ),
    "invalid content type": (mime("Content-Type: /", body=b"x"), "invalid content type '/'"),
    "bad parameters": (
        mime(
            'Content-Type: text/plain; charset="utf-8; name=',
            "Content-Disposition: attachment; filename*=utf-8''%ZZ; filename*0=a",
            body=b"x",
        ),
        "end of header inside quoted string",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_message_is_captured_with_its_defects(name: str) -> None:
    raw, defect = HOSTILE[name]
    event = build(raw)
    assert has_defect(event, defect), event["message"]["defects"]
    assert_consistent(raw, event)


def test_only_headers_is_a_message_without_body() -> None:
    event = build(b"From: a@example.test\r\nSubject: only headers")
    message = event["message"]
    assert message["subject"] == "only headers"
    assert (message["text"], message["html"], message["body"]) == ("", None, "")
    assert message["defects"] == []
    assert event["attachments"] == []


def test_broken_base64_attachment_keeps_what_decodes() -> None:
    raw = mime(
        "Content-Type: multipart/mixed; boundary=Q",
        body=b"--Q\r\nContent-Type: image/png\r\nContent-Disposition: attachment; filename=a.png"
        b"\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=AAAA$$$\r\n--Q--\r\n",
    )
    event = build(raw)
    (attachment,) = event["attachments"]
    assert content_of(attachment).startswith(b"\x89PNG\r\n\x1a\n")
    assert has_defect(event, "part 1: InvalidBase64CharactersDefect")
    assert_consistent(raw, event)


def test_bad_encoded_words_decode_what_they_can() -> None:
    event = build(HOSTILE["bad encoded words"][0])
    assert event["message"]["subject"] == "xok"
    assert has_defect(event, "header Subject: InvalidBase64CharactersDefect")


def test_huge_headers_stay_fast() -> None:
    encoded = " ".join(["=?utf-8?q?caf=C3=A9?="] * 20000)  # 400 KB; stdlib parsing: minutes
    plain = "a" * 1_000_000
    raw = mime(f"Subject: {encoded}", f"X-Big: {plain}", body=b"x")
    started = time.monotonic()
    event = build(raw)
    assert time.monotonic() - started < 5
    assert event["message"]["subject"].startswith("cafécafé")
    assert event["message"]["headers"]["X-Big"] == plain
    assert has_defect(event, "header Subject: 439999 characters, too long to parse")


def test_defects_are_capped() -> None:
    raw = mime(*[f"X-Bad-{i}: a\x00b" for i in range(500)], body=b"x")
    defects = build(raw)["message"]["defects"]
    assert len(defects) == 201
    assert defects[-1] == "300 more defects not listed"


def test_deep_nesting_falls_back_to_the_raw_text() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for depth in range(3000):
        raw += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (depth, depth + 1)
    raw += b"--b3000\r\nContent-Type: text/plain\r\n\r\ndeep\r\n"
    event = build(raw)
    assert has_defect(event, "UnparseableMessageDefect: parser gave up (RecursionError")
    assert "--b2999" in event["message"]["body"]
    assert_consistent(raw, event)


def test_parser_failure_keeps_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exploding:
        def parsebytes(self, raw: bytes) -> None:
            raise ValueError("boom")

    monkeypatch.setattr(message_module, "_PARSER", Exploding())
    event = build("Subject: s\r\n\r\nbody é".encode())
    assert event["message"]["body"] == "Subject: s\r\n\r\nbody é"
    assert event["message"]["defects"] == [
        "UnparseableMessageDefect: parser gave up (ValueError: boom)"
    ]


def test_internal_error_still_yields_an_event(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(message_module, "_walk", broken)
    event = build(b"Subject: s\r\n\r\nbody")
    assert event["message"]["body"] == ""
    assert event["attachments"] == []
    assert has_defect(event, "internal error while analysing the message (RuntimeError: bug)")


def test_nested_message_is_one_attachment_not_a_body() -> None:
    inner = mime(
        "From: inner@example.test",
        "Subject: inner",
        "Content-Type: multipart/alternative; boundary=XX",
        body=b"--XX\r\nContent-Type: text/plain\r\n\r\ninner text\r\n"
        b"--XX\r\nContent-Type: image/gif\r\nContent-Transfer-Encoding: base64\r\n\r\nR0lG!\r\n"
        b"--XX--\r\n",
    )
    raw = mime(
        "Subject: outer",
        "Content-Type: multipart/mixed; boundary=OO",
        body=b"--OO\r\nContent-Type: text/plain\r\n\r\nouter text\r\n"
        b"--OO\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment; filename=f.eml"
        b"\r\n\r\n"
        + inner
        + b"\r\n--OO\r\nContent-Type: message/rfc822\r\n\r\n"
        + BROKEN_BOUNDARY
        + b"\r\n--OO--\r\n",
    )
    event = build(raw)
    assert event["message"]["text"] == "outer text"
    got = [(a["filename"], a["content_type"]) for a in event["attachments"]]
    assert got == [("f.eml", "message/rfc822"), (None, "message/rfc822")]
    assert content_of(event["attachments"][0]) == inner
    # Defects inside an encapsulated message are still reported.
    assert has_defect(event, "part 3 (encapsulated): StartBoundaryNotFoundDefect")
    assert_consistent(raw, event)


def test_base64_encoded_message_part_is_decoded() -> None:
    inner = b"From: a@example.test\r\n\r\nhi\r\n"
    raw = mime(
        "Content-Type: message/rfc822",
        "Content-Transfer-Encoding: base64",
        body=base64.encodebytes(inner),
    )
    event = build(raw)
    assert content_of(event["attachments"][0]) == inner
    assert has_defect(event, "base64-encoded message part")
    assert_consistent(raw, event)


def test_eight_bit_headers_and_bodies() -> None:
    raw = (
        "From: Jörg <joerg@example.test>\r\nSubject: héllo wörld\r\nX-Legacy: caf\udce9\r\n"
        "Content-Type: text/plain; charset=iso-8859-1\r\n\r\nna\udcefve\r\n"
    ).encode("utf-8", "surrogateescape")
    event = build(raw)
    message = event["message"]
    assert message["headers"]["From"] == "Jörg <joerg@example.test>"
    assert message["subject"] == "héllo wörld"
    assert message["headers"]["X-Legacy"] == "café"
    assert message["text"] == "naïve\r\n"
    assert message["defects"] == [
        "header X-Legacy: 8-bit bytes that are not UTF-8; read as Latin-1"
    ]
    assert message["raw_encoding"] == "latin-1"
    assert_consistent(raw, event)


def test_undecodable_text_becomes_valid_unicode() -> None:
    raw = mime("Content-Type: text/plain; charset=unicode_escape", body=b"\\ud800 hi")
    assert build(raw)["message"]["text"] == "\ufffd\ufffd\ufffd hi"


def test_unquoted_encoded_word_filename() -> None:
    raw = mime(
        "Content-Type: multipart/mixed; boundary=Q",
        body=b"--Q\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename==?utf-8?B?w6kucGRm?=\r\n\r\n%PDF\r\n--Q--\r\n",
    )
    (attachment,) = build(raw)["attachments"]
    assert attachment["filename"] == "é.pdf"


def test_inline_image_without_disposition_is_an_inline_attachment() -> None:
    raw = mime(
        "Content-Type: multipart/related; boundary=R",
        body=b"--R\r\nContent-Type: text/html\r\n\r\n<img src=cid:img1>\r\n"
        b"--R\r\nContent-Type: image/png\r\nContent-ID: <img1>\r\n\r\nPNG\r\n--R--\r\n",
    )
    event = build(raw)
    assert event["message"]["body"] == "<img src=cid:img1>"
    (attachment,) = event["attachments"]
    assert (attachment["disposition"], attachment["content_id"], attachment["filename"]) == (
        "inline",
        "img1",
        None,
    )


# ---- headers: the fast path agrees with policy.default ----------------------------------

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
atom = st.text(alphabet=ATEXT, min_size=1, max_size=5)
addr_spec = st.builds("{}@{}".format, st.lists(atom, min_size=1, max_size=3).map(".".join), atom)
mailbox = addr_spec | st.builds(
    "{} <{}>".format, st.lists(atom, max_size=3).map(" ".join), addr_spec
)
header_value = (
    st.lists(mailbox, min_size=1, max_size=4).map(", ".join)
    | st.lists(mailbox, min_size=1, max_size=3).map(",".join)
    | addr_spec.map("<{}>".format)
    | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=126, exclude_characters="\r\n"))
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["From", "To", "Sender", "Message-ID", "Subject", "X-Custom", "Date"]),
    value=header_value,
)
def test_header_values_and_defects_match_policy_default(name: str, value: str) -> None:
    raw = f"{name}: {value}\r\n\r\nbody".encode("ascii")
    msg = parse_message(raw)
    headers = msg.raw_items()
    if not headers:  # a value the parser did not take as a header at all
        return
    ((stored_name, stored),) = headers
    event = build(raw)
    try:
        reference = policy.default.header_factory(stored_name, stored)
    except Exception:  # the stdlib trips over some values, e.g. "From: 0@"
        assert event["message"]["header_list"] == [[stored_name, stored]]
        assert has_defect(event, f"header {stored_name}: unparseable")
        return
    expected = reference.defects or reference._parse_tree.all_defects
    header_defects = [d for d in event["message"]["defects"] if d.startswith("header ")]
    assert event["message"]["header_list"] == [[stored_name, str(reference)]]
    assert len(header_defects) == len(expected)


# ---- event fields -----------------------------------------------------------------------


def test_event_fields() -> None:
    event = build(
        b"Subject: s\r\n\r\nbody",
        include_raw=False,
        envelope=Envelope(
            mail_from="",
            mail_options=["SIZE=20", "BODY=8BITMIME"],
            rcpt_to=["a@example.test", "b@example.test"],
            rcpt_options=[["NOTIFY=NEVER"], []],
            helo="client.test",
        ),
        auth=AuthInfo(attempted=True, mechanism="PLAIN", username="u", password="p"),
        received_at=datetime(2026, 11, 25, 10, 0, 0, 5, tzinfo=timezone(timedelta(hours=2))),
        violations=["bare LF in DATA"],
        email_uuid="5d3a2f10-0000-4000-8000-000000000001",
    )
    assert event["event"] == "EMAIL_RECEIVED"
    assert event["uuid"] == "5d3a2f10-0000-4000-8000-000000000001"
    assert event["remote_addr"] == "192.0.2.7:40000"
    assert event["received_at"] == "2026-11-25T08:00:00.000005Z"
    assert event["envelope"] == {
        "from": "",
        "to": ["a@example.test", "b@example.test"],
        "helo": "client.test",
        "mail_options": ["SIZE=20", "BODY=8BITMIME"],
        "rcpt_options": [["NOTIFY=NEVER"], []],
    }
    assert event["authentication"] == {
        "attempted": True,
        "mechanism": "PLAIN",
        "username": "u",
        "password": "p",
    }
    assert event["session"] == {
        "uuid": SESSION.uuid,
        "local_addr": "127.0.0.1:1025",
        "server": "default",
        "tls": False,
        "violations": ["bare LF in DATA"],
    }
    assert "raw" not in event["message"]
    assert "raw_encoding" not in event["message"]
    assert event["message"]["message_id"] is None


def test_each_email_gets_its_own_uuid_and_naive_times_are_utc() -> None:
    first = build(b"\r\nx", received_at=datetime(2026, 1, 2, 3, 4, 5))
    second = build(b"\r\nx")
    assert first["uuid"] != second["uuid"]
    assert first["received_at"] == "2026-01-02T03:04:05.000000Z"


def test_transcript_and_undecodable_session_text_are_kept_as_valid_unicode() -> None:
    event = build(
        b"\r\nx",
        envelope=Envelope(mail_from="j\udcc3\udcb6rg@example.test", helo="h\udcff"),
        auth=AuthInfo(attempted=True, mechanism="LOGIN", username="u", password="p\udce4ss"),
        transcript=["C: EHLO h\udcff", "S: 250 ok"],
    )
    assert event["envelope"]["from"] == "jörg@example.test"
    assert event["envelope"]["helo"] == "h\ufffd"
    assert event["authentication"]["password"] == "p\ufffdss"
    assert event["session"]["transcript"] == ["C: EHLO h\ufffd", "S: 250 ok"]


def test_unwritable_temp_dir_keeps_attachments_in_the_event(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    raw = (CORPUS / "symfony-60-recipients.eml").read_bytes()
    event = build(raw, storage=AttachmentStorage(mode="tempfile", temp_dir=str(not_a_dir)))
    (attachment,) = event["attachments"]
    assert attachment["content"] == ""
    assert has_defect(event, "cannot write attachment file")


# ---- attachment storage -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "content_type", "suffix"),
    [
        ("../../etc/passwd", "application/x-no-such-type", ""),
        ("résumé 📎.pdf", "application/pdf", ".pdf"),
        ("..\\..\\boot.INI", "text/plain", ".ini"),
        ("a.tar.gz", "application/gzip", ".gz"),
        ("evil.p hp/", "image/png", ".png"),
        (".bashrc", "application/x-no-such-type", ""),
        (None, "text/plain", ".txt"),
    ],
)
def test_tempfile_names_never_come_from_the_sender(
    tmp_path: Path, filename: str | None, content_type: str, suffix: str
) -> None:
    storage = AttachmentStorage(mode="tempfile", temp_dir=str(tmp_path))
    stored = store_attachment(storage, b"data", filename, content_type)
    path = Path(stored["path"])
    assert path.parent == tmp_path
    assert GENERATED_NAME.fullmatch(path.name)
    assert path.suffix == suffix
    assert path.read_bytes() == b"data"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_memory_storage_inlines_base64() -> None:
    assert store_attachment(AttachmentStorage(), b"\x00\xff", "x", "a/b") == {"content": "AP8="}


def test_default_temp_dir_is_under_the_system_temp_dir() -> None:
    storage = AttachmentStorage(mode="tempfile")
    assert storage.directory.endswith(os.sep + "mailpipe-attachments")
    assert os.path.isabs(storage.directory)


def test_storage_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="memory or tempfile"):
        AttachmentStorage(mode="disk")  # type: ignore[arg-type]


def make_aged_files(directory: Path, now: float) -> dict[str, Path]:
    files = {
        "old": directory / ("a" * 32 + ".pdf"),
        "fresh": directory / ("b" * 32),
        "foreign": directory / "notes.txt",
        "dir": directory / ("c" * 32),
    }
    for key, path in files.items():
        if key == "dir":
            path.mkdir()
        else:
            path.write_bytes(b"x")
        age = 10 if key == "fresh" else 7200
        os.utime(path, (now - age, now - age))
    return files


def test_sweep_deletes_only_old_generated_files(tmp_path: Path) -> None:
    now = time.time()
    files = make_aged_files(tmp_path, now)
    storage = AttachmentStorage(mode="tempfile", temp_dir=str(tmp_path), cleanup_after=3600)
    assert sweep_attachments(storage, now=now) == 1
    assert not files["old"].exists()
    assert all(files[k].exists() for k in ("fresh", "foreign", "dir"))
    assert sweep_attachments(storage, now=now + 3600) == 1
    assert not files["fresh"].exists()


def test_sweep_of_a_missing_directory_is_a_no_op(tmp_path: Path) -> None:
    storage = AttachmentStorage(mode="tempfile", temp_dir=str(tmp_path / "absent"))
    assert sweep_attachments(storage) == 0


async def test_run_sweeper_sweeps_until_cancelled(tmp_path: Path) -> None:
    files = make_aged_files(tmp_path, time.time())
    storage = AttachmentStorage(mode="tempfile", temp_dir=str(tmp_path), cleanup_after=3600)
    task = asyncio.create_task(run_sweeper(storage, interval=0.01))
    try:
        for _ in range(200):
            if not files["old"].exists():
                break
            await asyncio.sleep(0.01)
        assert not files["old"].exists()
        assert files["fresh"].exists()
        assert not task.done()
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_sweeper_rejects_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        await run_sweeper(AttachmentStorage(), interval=0)


def test_the_sdk_gets_back_the_exact_bytes_of_a_non_utf8_message() -> None:
    """8-bit mail that is not UTF-8 travels as Latin-1 text in the event: a worker's
    `Email.raw` must still be the bytes the client sent."""
    from mailpipe.sdk import Email

    raw = b"Subject: caf\xe9\r\nContent-Type: text/plain; charset=latin-1\r\n\r\nd\xe9j\xe0 vu\r\n"
    event = build(raw)
    assert event["message"]["raw_encoding"] == "latin-1"
    assert Email.from_event(event).raw == raw
