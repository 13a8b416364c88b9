"""SASL capture for AUTH: PLAIN, LOGIN, CRAM-MD5 and XOAUTH2 (RFC 4954, 4616, 2195).

mailpipe verifies nothing: an exchange only collects what the client sent. `start()` reads
the AUTH command's argument; the exchange it opens is a small sans-I/O machine: `begin()`
and `answer()` return the next reply to send (a 334 challenge while `waiting`, or why the
exchange ended: cancelled, bad base64), or None once the credentials are in
`username`/`password`. The connection only routes lines and holds the AUTH verdict.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from . import replies


class BadResponse(Exception):
    """The client's response is not base64."""


def decode(text: str) -> str:
    text = text.strip()
    if text == "=":  # RFC 4954: an empty initial response
        return ""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadResponse from exc
    return raw.decode("utf-8", "replace")


def start(arg: str, offered: tuple[str, ...]) -> Exchange | bytes:
    """The exchange `AUTH arg` opens, or the reply refusing it (syntax, not offered)."""
    mechanism, _, initial = arg.partition(" ")
    if not mechanism:
        return replies.SYNTAX_AUTH
    mechanism = mechanism.upper()
    if mechanism not in offered:
        return replies.AUTH_UNKNOWN
    return Exchange(mechanism, initial.strip())


class Exchange:
    """One AUTH exchange for `mechanism`: PLAIN, LOGIN, CRAM-MD5 or XOAUTH2 (which ones are
    offered is the listener's `auth_mechanisms`)."""

    __slots__ = ("_initial", "_step", "mechanism", "password", "username", "waiting")

    def __init__(self, mechanism: str, initial: str = "") -> None:
        self.mechanism = mechanism
        self.username: str | None = None
        self.password: str | None = None
        self.waiting = False  # a 334 challenge was sent: the next line answers it
        self._initial = initial
        self._step = 0

    def begin(self, *, hostname: str, now: float) -> bytes | None:
        if self.mechanism == "CRAM-MD5":
            # No initial response in CRAM-MD5 (RFC 2195); a client that sends one is ignored.
            nonce = f"<{secrets.randbelow(10**12)}.{int(now)}@{hostname}>"
            return self._challenge(base64.b64encode(nonce.encode("utf-8", "replace")))
        if self._initial:
            return self._respond(self._initial)
        self.waiting = True
        return replies.CHALLENGE_USERNAME if self.mechanism == "LOGIN" else replies.CHALLENGE_EMPTY

    def answer(self, line: str) -> bytes | None:
        """The client's line answering a challenge."""
        if line.strip() == "*":  # RFC 4954 4: the client gives up
            self.waiting = False
            return replies.AUTH_CANCELLED
        return self._respond(line)

    def _respond(self, line: str) -> bytes | None:
        self.waiting = False
        try:
            return self._step_with(decode(line))
        except BadResponse:
            return replies.AUTH_BAD_BASE64

    def _challenge(self, data: bytes) -> bytes:
        self.waiting = True
        return replies.challenge(data)

    def _step_with(self, text: str) -> bytes | None:
        mechanism = self.mechanism
        if mechanism == "PLAIN":
            self._plain(text)
        elif mechanism == "LOGIN":
            if self._step == 0:
                self._step = 1
                self.username = text
                self.waiting = True
                return replies.CHALLENGE_PASSWORD
            self.password = text
        elif mechanism == "CRAM-MD5":
            user, sep, digest = text.rpartition(" ")
            self.username, self.password = (user, digest) if sep else (text, "")
        else:
            self._xoauth2(text)
        return None

    def _plain(self, text: str) -> None:
        parts = text.split("\0")
        if len(parts) >= 3:  # authzid \0 authcid \0 passwd
            self.username, self.password = parts[1], "\0".join(parts[2:])
        elif len(parts) == 2:
            self.username, self.password = parts
        else:
            self.username = text

    def _xoauth2(self, text: str) -> None:
        for field in text.split("\x01"):
            if field[:5] == "user=":
                self.username = field[5:]
            elif field[:5] == "auth=":
                token = field[5:]
                self.password = token[7:] if token[:7].lower() == "bearer " else token
