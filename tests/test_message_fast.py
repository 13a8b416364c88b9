"""The fast parse path gives exactly what the stdlib's BytesParser gives, and events as before.

`message._PARSER` splits plain messages itself (single-part, or multipart with well-formed
boundaries) and walks big messages with their base64 runs stood in for;
`message._STDLIB_PARSER` is the plain stdlib parser. For every message of both corpora (ours
and CPython's email test data) and the synthetic ones below:

- the two trees are the same, node by node (headers as stored, payloads, preamble, epilogue,
  defects, unix-from, default type);
- the events built with either parser are equal;
- the event equals the one the code before the fast path built, saved as a digest per
  message in tests/data/event_digests.json. To make that file again (only when an event is
  meant to change), run with the old code first on the path:
  `PYTHONPATH=<old checkout>/src python tests/test_message_fast.py`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import sys
import sysconfig
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

import orjson
import pytest

from mailpipe.capture import message as message_module
from mailpipe.capture.message import EventOptions, SessionInfo, build_event
from mailpipe.capture.types import AuthInfo, Envelope

ROOT = Path(__file__).resolve().parent
DIGESTS = ROOT / "data" / "event_digests.json"
CORPORA = [
    ROOT / "data" / "corpus",
    Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data",
]


def b64_lines(size: int, eol: bytes = b"\r\n", width: int = 76) -> bytes:
    data = base64.b64encode(random.Random(1).randbytes(size))
    return b"".join(data[i : i + width] + eol for i in range(0, len(data), width))


def mixed(*parts: bytes, boundary: bytes = b"b1") -> bytes:
    head = b"Subject: parts\r\nContent-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n"
    inner = b"".join(b"--" + boundary + b"\r\n" + part for part in parts)
    return head + inner + b"--" + boundary + b"--\r\n"


def mp(body: bytes, head: bytes = b"") -> bytes:
    return b"Content-Type: multipart/mixed; boundary=b\r\n" + head + b"\r\n" + body


ATTACHED = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
RUN = b64_lines(60_000)

SYNTHETIC: dict[str, bytes] = {
    # single part, the fast split's own cases and the ones it must leave to the stdlib
    "plain crlf": b"From: a@b.test\r\nSubject: hi\r\n\r\nbody\r\n",
    "plain lf": b"From: a@b.test\nSubject: hi\n\nbody\n",
    "no body": b"Subject: hi\r\n\r\n",
    "headers only": b"Subject: hi\r\nTo: x@y.test\r\n",
    "empty": b"",
    "blank first": b"\r\nSubject: not a header\r\n\r\nbody",
    "8-bit headers": "Subject: héllo\r\nFrom: Zoë <z@b.test>\r\n\r\nbödy\r\n".encode(),
    "latin-1 header": b"Subject: h\xe9llo\r\n\r\nbody",
    "encoded words": b"Subject: =?utf-8?q?h=C3=A9llo?= =?utf-8?b?d29ybGQ=?=\r\n\r\nx",
    "bad encoded word": b"Subject: =?x-unknown?q?abc?=\r\nTo: =?utf-8?b?!!!?=\r\n\r\nx",
    "folded": b"Subject: one\r\n two\r\n\tthree\r\nTo: a@b.test,\r\n c@d.test\r\n\r\nx",
    "fold after empty value": b"Subject:\r\n folded only\r\nX-Empty:\r\nX-Blank: \t \r\n\r\nx",
    "fold of blanks": b"Subject: a  \r\n  \r\n\t\r\n\r\nx",
    "first line folded": b" Subject: cont\r\nTo: a@b.test\r\n\r\nx",
    "missing blank line": b"Subject: hi\r\nthis is body\r\nmore\r\n",
    "colon first": b":no name\r\nSubject: hi\r\n\r\nx",
    "unix from": b"From someone Tue Dec  1 00:00:00 2026\r\nSubject: hi\r\n\r\nx",
    "from line later": b"Subject: hi\r\nFrom x@y Tue\r\n\r\nx",
    "space in name": b"Subject: hi\r\nX Bad: y\r\n\r\nx",
    "bare lf in crlf head": b"Subject: hi\r\nTo: a@b.test\nX: y\r\n\r\nx",
    "bare cr in head": b"Subject: hi\rX: y\r\n\r\nx",
    "crlf head, lf blank": b"Subject: hi\r\n\nstill body?\r\n\r\nx",
    "lf head, crlf blank": b"Subject: hi\n\r\nbody\n\nx",
    "nul bytes": b"Subject: a\x00b\r\nX-N\x00: v\r\n\r\nbo\x00dy\r\n",
    "control chars": b"Subject: a\x0bb\x0cc\x1cd\x85\r\n\r\nx\x0by\x1cz\r\n",
    "ascii controls": b"Subject: a\x0bb\x0cc\x1cd\x1e\r\nX-Y: \x7f\x01\r\n\r\nx\x0by\x1cz\x1d\r\n",
    "huge header line": b"Subject: " + b"word " * 40_000 + b"\r\n\r\nx",
    "huge body line": b"Subject: hi\r\n\r\n" + b"x" * 300_000,
    "8-bit body": b"Subject: hi\r\nContent-Type: text/plain; charset=latin-1\r\n\r\n"
    + "déjà vu\r\n".encode("latin-1"),
    "qp body": b"Subject: hi\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nh=C3=A9\r\n",
    "unknown cte": b"Subject: hi\r\nContent-Transfer-Encoding: x-custom\r\n\r\nbody",
    "uuencode": b"Content-Transfer-Encoding: x-uuencode\r\n\r\n"
    b"begin 644 f\r\n#86)C\r\n`\r\nend\r\n",
    "bad content type": b"Content-Type: text\r\nSubject: hi\r\n\r\nx",
    "unparseable content type": b"Content-Type: ;;;=\x00\r\n\r\nx",
    "multipart without body": b"Content-Type: multipart/mixed; boundary=x\r\n\r\n",
    "message/rfc822": b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n",
    "delivery status": b"Content-Type: message/delivery-status\r\n\r\nA: b\r\n\r\nC: d\r\n",
    "content headers": b"Content-Type: image/png; name=a.png\r\nContent-ID: <x@y>\r\n"
    b"Content-Disposition: inline; filename*=utf-8''b%C3%A9.png\r\n\r\nx",
    "repeated headers": b"Content-Type: text/html\r\nContent-Type: text/plain\r\n"
    b"Subject: 1\r\nsubject: 2\r\n\r\n<p>x</p>",
    # one level of multipart, split here when its boundaries are well-formed
    "alternative": mixed(
        b"Content-Type: text/plain\r\n\r\nhi\r\n", b"Content-Type: text/html\r\n\r\n<p>hi</p>\r\n"
    ),
    "preamble and epilogue": mp(b"pre\r\namble\r\n--b\r\nX: 1\r\n\r\none\r\n--b--\r\nepi\r\n"),
    "blank preamble": mp(b"\r\n--b\r\nX: 1\r\n\r\none\r\n\r\n--b--"),
    "boundary trailing blanks": mp(b"--b \t\r\nX: 1\r\n\r\none\r\n--b-- \r\n"),
    "boundary look-alikes": mixed(b"X: 1\r\n\r\n--b1x\r\n--b1 x\r\n-b1\r\n--b1---\r\n"),
    "quoted boundary with specials": mixed(b"X: 1\r\n\r\na\r\n", boundary=b'"a.b+c?(d)"'),
    "boundary of regex specials": b'Content-Type: multipart/mixed; boundary="a.b+c?"\r\n\r\n'
    b"--a.b+c?\r\nX: 1\r\n\r\nx\r\n--aXb+c?\r\n--a.b+c?--\r\n",
    "empty boundary": b'Content-Type: multipart/mixed; boundary=""\r\n\r\n'
    b"--\r\nX: 1\r\n\r\nx\r\n----\r\n",
    "look-alike first": mp(b"--bx\r\n--b\r\nX: 1\r\n\r\nx\r\n--b--\r\n"),
    "close first": mp(b"--b--\r\n--b\r\nX: 1\r\n\r\nx\r\n--b--\r\n"),
    "close with text after": mp(b"--b\r\nX: 1\r\n\r\nx\r\n--b-- x\r\n--b--\t\r\nepi"),
    "no boundary": b"Content-Type: multipart/mixed\r\n\r\n--b\r\nX: 1\r\n\r\nx\r\n--b--\r\n",
    "no start boundary": mp(b"just text\r\n"),
    "no close boundary": mp(b"--b\r\nX: 1\r\n\r\nx\r\n"),
    "repeated boundary": mixed(b"X: 1\r\n\r\nx\r\n--b1\r\n"),
    "close right after boundary": mp(b"--b\r\n--b--\r\n"),
    "part without headers": mixed(b"\r\njust a body\r\n"),
    "part without blank line": mixed(b"X: 1\r\n"),
    "part with empty body": mixed(b"X: 1\r\n\r\n"),
    "part with 8-bit header": mixed(
        "Content-Disposition: attachment; filename=é.txt\r\n\r\nx\r\n".encode()
    ),
    "part with unix from": mixed(b"From x Tue\r\n\r\nx\r\n"),
    "nested multipart": mixed(
        b"Content-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\n"
        b"X: 1\r\n\r\nx\r\n--in--\r\n"
    ),
    "nested with preamble and epilogues": mixed(
        b"Content-Type: multipart/alternative; boundary=in\r\n\r\npre\r\n--in\r\n"
        b"X: 1\r\n\r\nx\r\n--in\r\nX: 2\r\n\r\ny\r\n--in--\r\ninner epi\r\n\r\n",
        b"X: 3\r\n\r\nz\r\n",
    ),
    "nested, one-line inner epilogue": mixed(
        b"Content-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\n"
        b"X: 1\r\n\r\nx\r\n--in--\r\n\r\n"
    ),
    "nested, inner not closed": mixed(
        b"Content-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\nX: 1\r\n\r\nx\r\n",
        b"X: 2\r\n\r\ny\r\n",
    ),
    "nested, outer boundary a prefix": mixed(
        b"Content-Type: multipart/alternative; boundary=b1-in\r\n\r\n--b1-in\r\n"
        b"X: 1\r\n\r\nx\r\n--b1-in--\r\n"
    ),
    "nested, same boundary": mixed(
        b"Content-Type: multipart/alternative; boundary=b1\r\n\r\n--b1\r\nX: 1\r\n\r\nx\r\n"
    ),
    "nested ten deep": b"".join(
        b"Content-Type: multipart/mixed; boundary=n%d\r\n\r\n--n%d\r\n" % (i, i) for i in range(10)
    )
    + b"X: 1\r\n\r\nx\r\n"
    + b"".join(b"--n%d--\r\n" % i for i in reversed(range(10))),
    "digest": b"Content-Type: multipart/digest; boundary=b\r\n\r\n"
    b"--b\r\n\r\nSubject: in\r\n\r\nx\r\n--b--\r\n",
    "encoded multipart": mp(
        b"--b\r\nX: 1\r\n\r\nx\r\n--b--\r\n", b"Content-Transfer-Encoding: base64\r\n"
    ),
    "7bit multipart": mp(
        b"--b\r\nX: 1\r\n\r\nx\r\n--b--\r\n", b"Content-Transfer-Encoding: 7BIT\r\n"
    ),
    "lf multipart": b"Content-Type: multipart/mixed; boundary=b\n\n"
    b"pre\n--b\nX: 1\n\nx\n\n--b--\nepi",
    "bare cr before boundary": mixed(b"X: 1\r\n\r\nx\r--b1\r\nY: 2\r\n\r\ny\r\n"),
    "bare lf before boundary": mixed(b"X: 1\r\n\r\nx\n--b1\r\nY: 2\r\n\r\ny\r\n"),
    "8-bit part bodies": mixed(
        "Content-Type: text/plain; charset=utf-8\r\n\r\nünï\r\n".encode(),
        b"Content-Type: text/plain; charset=latin-1\r\n\r\n\xe9t\xe9\r\n",
    ),
    "nul in part": mixed(b"X: \x00\r\n\r\na\x00b\r\n"),
    "close without eol": mixed(b"X: 1\r\n\r\nx\r\n")[:-2],
    "boundary line last without close": mp(b"--b\r\nX: 1\r\n\r\nx\r\n--b"),
    # big: base64 runs stood in for while the stdlib walks the message
    "base64 single part crlf": b"Subject: hi\r\nContent-Transfer-Encoding: base64\r\n\r\n" + RUN,
    "base64 single part lf": b"Subject: hi\nContent-Transfer-Encoding: base64\n\n"
    + b64_lines(60_000, eol=b"\n"),
    "base64 attachment": mixed(b"Content-Type: text/plain\r\n\r\nsee attached\r\n", ATTACHED + RUN),
    "base64 last line no eol": mixed(ATTACHED + RUN[:-2]),
    "base64 in preamble and epilogue": b"Content-Type: multipart/mixed; boundary=q\r\n\r\n"
    + RUN
    + b"--q\r\n\r\nx\r\n--q--\r\n"
    + RUN,
    "base64 where headers are": mixed(RUN + b"\r\nafter\r\n"),
    "base64 run, no eol at end": b"Subject: hi\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n"
    + b"--z\r\n"
    + ATTACHED
    + RUN.rstrip(b"\r\n"),
    "base64 broken in the middle": mixed(
        ATTACHED + RUN[:30_000] + b"not base64 here!\r\n" + RUN[30_000:]
    ),
    "base64 with a blank line": mixed(ATTACHED + RUN[:40_000] + b"\r\n" + RUN[40_000:]),
    "base64 bare cr": mixed(ATTACHED + RUN[:40_000].replace(b"\r\n", b"\r", 1) + RUN[40_000:]),
    "base64 bad padding": mixed(ATTACHED + RUN + b"QUJD\r\nQQ\r\n"),
    "base64 narrow lines": mixed(ATTACHED + b64_lines(50_000, width=4)),
    "base64 mixed widths": mixed(ATTACHED + b64_lines(30_000, width=60) + b64_lines(30_000)),
    "base64 lf inside crlf": mixed(ATTACHED + b64_lines(30_000, eol=b"\n") + RUN),
    "boundary of base64 letters": mixed(ATTACHED + RUN, boundary=b"QUJDRA"),
    "nested rfc822 with base64": mixed(
        b"Content-Type: message/rfc822\r\n\r\n" + mixed(ATTACHED + RUN, boundary=b"in")
    ),
    "base64 encoded rfc822": b"Content-Type: message/rfc822\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n" + RUN,
    "stand-in text in the message": mixed(ATTACHED + RUN, boundary=b"b")
    + b"\x00mailpipe-run:0\x00\r\n",
    "big without base64": mixed(b"Content-Type: text/plain\r\n\r\n" + b"a line of text\r\n" * 4000),
    "deep nesting": b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (depth, depth + 1)
        for depth in range(60)
    )
    + RUN,
}


def messages() -> Iterator[tuple[str, bytes]]:
    for directory in CORPORA:
        if directory.is_dir():
            for path in sorted(directory.iterdir()):
                if path.is_file() and path.suffix in (".eml", ".txt"):
                    yield path.name, path.read_bytes()
    yield from SYNTHETIC.items()


MESSAGES = dict(messages())


def tree(msg: Message) -> list[tuple[Any, ...]]:
    """Every node of a message tree, depth first, with what the parser set on it."""
    nodes: list[tuple[Any, ...]] = []
    stack = [(msg, "0")]
    while stack:
        part, where = stack.pop()
        payload = part._payload
        nodes.append(
            (
                where,
                type(part).__name__,
                list(part.raw_items()),
                part.get_unixfrom(),
                part.get_default_type(),
                part.preamble,
                part.epilogue,
                [(type(d).__name__, str(d)) for d in part.defects],
                payload if isinstance(payload, str) else None,
            )
        )
        if isinstance(payload, list):
            stack.extend((child, f"{where}.{i}") for i, child in enumerate(payload))
    return nodes


def event_of(raw: bytes) -> dict[str, Any]:
    captured = build_event(
        raw,
        envelope=Envelope(mail_from="from@example.test", rcpt_to=["to@example.test"]),
        auth=AuthInfo(),
        session=SessionInfo("s", "192.0.2.7:40000", "127.0.0.1:1025", "default", False),
        received_at=datetime(2026, 12, 1, 1, 0, tzinfo=UTC),
        options=EventOptions(include_raw=True),
        email_uuid="0b6f9d2e-8f43-4c4b-9a53-1f0e2d3c4b5a",
    )
    return orjson.loads(captured.json())


def digest(event: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(event, option=orjson.OPT_SORT_KEYS)).hexdigest()


@pytest.mark.parametrize("name", MESSAGES)
def test_fast_tree_is_the_stdlib_tree(name: str) -> None:
    raw = MESSAGES[name]
    assert tree(message_module._PARSER.parsebytes(raw)) == tree(
        message_module._STDLIB_PARSER.parsebytes(raw)
    )


@pytest.mark.parametrize("name", MESSAGES)
def test_event_is_the_stdlib_parsers_event(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = event_of(MESSAGES[name])
    monkeypatch.setattr(message_module, "_PARSER", message_module._STDLIB_PARSER)
    assert fast == event_of(MESSAGES[name])


def saved_digests() -> dict[str, Any]:
    return json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}


@pytest.mark.parametrize("name", MESSAGES)
def test_event_is_the_event_before_the_fast_path(name: str) -> None:
    saved = saved_digests()
    if saved.get("python") != list(sys.version_info[:2]):
        pytest.skip(f"digests were made with Python {saved.get('python')}: other stdlib parser")
    raw = MESSAGES[name]
    entry = saved["messages"].get(name)
    if entry is None or entry["raw_sha256"] != hashlib.sha256(raw).hexdigest():
        pytest.skip("no saved event for this message (a corpus file of another Python)")
    assert digest(event_of(raw)) == entry["event_sha256"]


def write_digests() -> None:
    entries = {
        name: {
            "raw_sha256": hashlib.sha256(raw).hexdigest(),
            "event_sha256": digest(event_of(raw)),
        }
        for name, raw in MESSAGES.items()
    }
    made = {"python": list(sys.version_info[:2]), "messages": entries}
    DIGESTS.write_text(json.dumps(made, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(entries)} digests written to {DIGESTS} by {message_module.__file__}")


if __name__ == "__main__":
    write_digests()
