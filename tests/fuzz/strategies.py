"""Shared strategies of the fuzz suite: valid SMTP sessions (as the wire bytes and the
messages they must deliver), mutations of any valid byte stream, random chunkings, and the
settings every fuzz test runs under.

A valid session is built as commands in CRLF framing, the messages dot-stuffed and ended by
`<CRLF>.<CRLF>` (or sent as BDAT chunks), so that the bodies it must deliver are known byte for
byte whatever the core does with the bare LF it tolerates elsewhere.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

PROFILE = os.environ.get("MAILPIPE_FUZZ_PROFILE", "fuzz")


def fuzz_settings(scale: float = 1.0) -> settings:
    """The profile's settings, with `scale` times its examples (for costlier tests)."""
    profile = settings.get_profile(PROFILE)
    return settings(profile, max_examples=max(10, int(profile.max_examples * scale)))


# ---- valid sessions ---------------------------------------------------------------------

EDGE_LINES = [
    b"", b".", b"..", b"...", b". ", b".\r.", b".x", b"x.", b"a\rb", b"\x00\x7f\xff",
    b"\xc3\xa9t\xc3\xa9", b"From: x", b"QUIT", b"RSET", b"DATA", b"MAIL FROM:<e@vil>",
    b"x" * 1100, b"." * 200,
]
# Body lines (without their CRLF): the dot-stuffing edge cases, 8-bit text, long lines, a CR
# alone inside a line, and anything else without a line feed.
body_line = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"").rstrip(b"\r")),
    st.sampled_from(EDGE_LINES),
)


def stuff(lines: list[bytes]) -> bytes:
    """DATA framing (RFC 5321 4.5.2): a leading dot doubled, each line ended by CRLF."""
    return b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines)


@st.composite
def data_message(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(the DATA command through its `<CRLF>.<CRLF>`, the body the core must deliver)."""
    lines = draw(st.lists(body_line, max_size=10))
    body = b"".join(line + b"\r\n" for line in lines)
    return b"DATA\r\n" + stuff(lines) + b".\r\n", body


@st.composite
def bdat_message(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(BDAT chunks, the last one marked LAST, possibly as `BDAT 0 LAST`; their bytes)."""
    chunks = draw(st.lists(st.binary(max_size=80), min_size=1, max_size=4))
    wire = b"".join(
        b"BDAT %d%s\r\n%s" % (len(c), b" LAST" if i == len(chunks) - 1 else b"", c)
        for i, c in enumerate(chunks)
    )
    return wire, b"".join(chunks)


RECIPIENTS = [b"<a@example.test>", b"<\"q u\"@example.test>", b"<u@[127.0.0.1]>",
              b"<x@example.test> NOTIFY=NEVER"]
SENDERS = [b"<>", b"<a@example.test>", b"<\xc3\xa9@example.test> SMTPUTF8",
           b"<x@example.test> SIZE=100 BODY=8BITMIME"]
ASIDES = [b"NOOP", b"RSET", b"VRFY u", b"HELP", b"EXPN l", b"EHLO again.test", b"bogus verb"]


@dataclass(frozen=True)
class ValidSession:
    wire: bytes  # everything the client sends, QUIT included
    bodies: tuple[bytes, ...]  # each message as the core must deliver it

    def __repr__(self) -> str:  # hypothesis prints the failing input: keep it readable
        return f"ValidSession(wire={self.wire!r}, bodies={self.bodies!r})"


@st.composite
def valid_sessions(draw: st.DrawFn, max_messages: int = 3) -> ValidSession:
    """A whole session a correct client could pipeline: greeting, transactions (with harmless
    commands between them), QUIT."""
    parts = [draw(st.sampled_from([b"EHLO client.test\r\n", b"HELO client.test\r\n"]))]
    bodies: list[bytes] = []
    for _ in range(draw(st.integers(0, max_messages))):
        parts += [a + b"\r\n" for a in draw(st.lists(st.sampled_from(ASIDES), max_size=2))]
        parts.append(b"MAIL FROM:" + draw(st.sampled_from(SENDERS)) + b"\r\n")
        for rcpt in draw(st.lists(st.sampled_from(RECIPIENTS), min_size=1, max_size=3)):
            parts.append(b"RCPT TO:" + rcpt + b"\r\n")
        wire, body = draw(st.one_of(data_message(), bdat_message()))
        parts.append(wire)
        bodies.append(body)
    parts.append(b"QUIT\r\n")
    return ValidSession(b"".join(parts), tuple(bodies))


# ---- mutations --------------------------------------------------------------------------

# Bytes that mean something to an SMTP parser: line ends, terminators, verbs, NUL, long runs.
TOKENS = [
    b"\r\n", b"\n", b"\r", b".", b"\r\n.\r\n", b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"..", b"\x00",
    b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 0 LAST\r\n", b"BDAT 99999999999\r\n", b"RSET\r\n",
    b"QUIT\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"*\r\n", b"STARTTLS\r\n",
    b"MAIL FROM:<a@b> SIZE=1\r\n", b"RCPT TO:<c@d>\r\n", b"x" * 5000, b"\xff" * 64,
]


MUTATIONS = ("flip", "insert", "token", "delete", "truncate", "crlf_to_lf", "lf_to_crlf",
             "repeat")


def mutate(data: bytes, kind: str, at: int, n: int, blob: bytes) -> bytes:
    """One mutation of `data` at offset `at` (clamped): `n` picks the bit to flip, the length
    to delete or repeat, or (odd) a CRLF/LF swap everywhere; `blob` is what gets inserted."""
    at = min(at, len(data))
    if kind == "flip" and data:
        at = min(at, len(data) - 1)
        return data[:at] + bytes([data[at] ^ (1 << n % 8)]) + data[at + 1:]
    if kind in ("insert", "token"):
        return data[:at] + blob + data[at:]
    if kind == "delete":
        return data[:at] + data[at + 1 + n % 32:]
    if kind == "truncate":
        return data[:at]
    if kind == "crlf_to_lf":
        return _swap(data, b"\r\n", b"\n", n % 2 == 1, at)
    if kind == "lf_to_crlf":
        return _swap(data, b"\n", b"\r\n", n % 2 == 1, at)
    if kind == "repeat":
        end = at + 1 + n % 64
        return data[:end] + data[at:end] + data[end:]
    return data


@st.composite
def one_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(st.sampled_from(MUTATIONS))
    blob = draw(st.sampled_from(TOKENS) if kind == "token" else st.binary(min_size=1, max_size=16))
    return mutate(data, kind, draw(st.integers(0, len(data))), draw(st.integers(0, 63)), blob)


def _swap(data: bytes, old: bytes, new: bytes, everywhere: bool, at: int) -> bytes:
    """`old` -> `new` everywhere, or at its first occurrence from `at` on."""
    if everywhere:
        return data.replace(old, new)
    found = data.find(old, at)
    return data if found < 0 else data[:found] + new + data[found + len(old):]


def random_mutation(rng: random.Random, data: bytes) -> bytes:
    """The same mutations, for loops that run for a time rather than over examples."""
    kind = rng.choice(MUTATIONS)
    blob = rng.choice(TOKENS) if kind == "token" else rng.randbytes(rng.randint(1, 16))
    return mutate(data, kind, rng.randint(0, len(data)), rng.randint(0, 63), blob)


@st.composite
def mutated(draw: st.DrawFn, data: bytes, max_mutations: int = 6) -> bytes:
    for _ in range(draw(st.integers(1, max_mutations))):
        data = draw(one_mutation(data))
    return data


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` split at random points: pipelining as the network delivers it."""
    cuts = draw(st.lists(st.integers(0, max(len(data), 1)), max_size=12))
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


# ---- bounded work -------------------------------------------------------------------------


class WorkBudgetExceeded(AssertionError):
    """The code under test ran more lines than its input can justify: it loops."""


@contextlib.contextmanager
def work_budget(under: str, limit: int) -> Iterator[None]:
    """Count the Python lines run in the files whose path starts with `under` (a module's
    file or a package's directory); fail past `limit`.

    A bound on work rather than on time, so a hang fails at once and deterministically (and
    hypothesis shrinks the input) instead of stalling the suite."""
    steps = 0

    def local(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > limit:
                raise WorkBudgetExceeded(f"more than {limit} lines run in {under}: it loops")
        return local

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_filename.startswith(under) else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        yield
    finally:
        sys.settrace(previous)
