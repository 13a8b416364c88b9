"""Fuzz: the MIME-to-event path (`capture.message.build_event`) fed the CPython email test
corpus and tests/data/corpus/ (messages real mailers sent), mutated: bit flips, insertions,
deletions, truncations, CRLF/LF swaps, repeated ranges, SMTP and MIME tokens.

Every result must be an event the packaged schema accepts, with the raw bytes preserved
exactly (in `captured.raw` and in the event's `raw`), and without falling back on the "internal
error" path that build_event keeps so that a bug of ours never loses an email.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import CORPUS, CORPUS_MANIFEST
from mailpipe.capture.attachments import AttachmentStorage
from mailpipe.capture.message import EventOptions, SessionInfo, build_event
from mailpipe.capture.types import AuthInfo, Envelope

from .strategies import fuzz_settings, mutated

SESSION = SessionInfo(uuid="0b6f9d2e-8f43-4c4b-9a53-1f0e2d3c4b5a", remote_addr="192.0.2.7:4000",
                      local_addr="127.0.0.1:1025", server="default", tls=False)
RECEIVED_AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
ENVELOPE = Envelope(mail_from="from@example.test", rcpt_to=["to@example.test"], helo="c.test")
# MIME structure a byte mutation rarely builds on its own.
MIME_TOKENS = [
    b"\r\n--", b"--\r\n", b"Content-Type: multipart/mixed; boundary=\"b\"\r\n", b"\r\n--b\r\n",
    b"\r\n--b--\r\n", b"Content-Transfer-Encoding: base64\r\n", b"=?utf-8?b?w6k=?=",
    b"Content-Type: message/rfc822\r\n\r\n", b"filename*=utf-8''%C3%A9.txt", b"=\r\n", b"=XX",
]


@pytest.fixture(scope="module")
def seeds(cpython_email_files: list[Path]) -> list[bytes]:
    mailers = [(CORPUS / entry["file"]).read_bytes() for entry in CORPUS_MANIFEST]
    return mailers + [path.read_bytes() for path in cpython_email_files]


@st.composite
def damaged_messages(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    raw = draw(st.sampled_from(seeds))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(MIME_TOKENS)) + raw[at:]
    return draw(mutated(raw))


@fuzz_settings()
@given(data=st.data())
def test_damaged_messages_give_valid_events_and_keep_the_raw_bytes(
    data: st.DataObject,
    seeds: list[bytes],
    validate_event: Callable[[dict[str, Any]], None],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    raw = data.draw(damaged_messages(seeds))
    mode = data.draw(st.sampled_from(["memory", "tempfile"]))
    storage = AttachmentStorage(mode, str(tmp_path_factory.mktemp("attachments")))
    options = EventOptions(include_raw=True, attachments=storage)
    captured = build_event(raw, envelope=ENVELOPE, auth=AuthInfo(), session=SESSION,
                           received_at=RECEIVED_AT, options=options)
    event = orjson.loads(captured.json())  # as every sink gets it
    validate_event(event)
    message = event["message"]
    assert captured.raw == raw
    assert message["raw"].encode(message["raw_encoding"]) == raw
    assert not [d for d in message["defects"] if d.startswith("internal error")], message["defects"]

