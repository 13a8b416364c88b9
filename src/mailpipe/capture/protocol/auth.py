"""SASL capture for AUTH: PLAIN, LOGIN, CRAM-MD5 and XOAUTH2 (RFC 4954, 4616, 2195).

mailpipe verifies nothing: an exchange only collects what the client sent. Each exchange is
a small sans-I/O machine: `begin()` and `step()` return the next 334 challenge to send, or
None once the credentials are in `username`/`password`; undecodable input raises BadResponse.
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


class Exchange:
    """One AUTH exchange for `mechanism`: PLAIN, LOGIN, CRAM-MD5 or XOAUTH2 (which ones are
    offered is the listener's `auth_mechanisms`)."""

    __slots__ = ("_step", "mechanism", "password", "username")

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.username: str | None = None
        self.password: str | None = None
        self._step = 0

    def begin(self, initial: str, *, hostname: str, now: float) -> bytes | None:
        if self.mechanism == "CRAM-MD5":
            # No initial response in CRAM-MD5 (RFC 2195); a client that sends one is ignored.
            nonce = f"<{secrets.randbelow(10**12)}.{int(now)}@{hostname}>"
            return replies.challenge(base64.b64encode(nonce.encode("utf-8", "replace")))
        if initial:
            return self.step(initial)
        return replies.CHALLENGE_USERNAME if self.mechanism == "LOGIN" else replies.CHALLENGE_EMPTY

    def step(self, line: str) -> bytes | None:
        text = decode(line)
        mechanism = self.mechanism
        if mechanism == "PLAIN":
            self._plain(text)
        elif mechanism == "LOGIN":
            if self._step == 0:
                self._step = 1
                self.username = text
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
