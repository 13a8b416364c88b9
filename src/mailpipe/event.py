"""The captured email as sinks receive it: the EMAIL_RECEIVED event plus its raw bytes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class CapturedEmail:
    """One captured email.

    `event` is the EMAIL_RECEIVED document (validates against
    mailpipe/schema/email-event.schema.json); `raw` is the message as received, kept apart so the
    store can serve it even when `include_raw` leaves it out of the event. `outcomes` lets
    sinks note what became of the email (the store keeps it beside the event).
    """

    event: dict[str, Any]
    raw: bytes
    outcomes: dict[str, Any] = field(default_factory=dict)
    _json: bytes | None = None

    @property
    def uuid(self) -> str:
        return self.event["uuid"]

    def json(self) -> bytes:
        """The event serialised once, shared by every sink."""
        if self._json is None:
            self._json = orjson.dumps(self.event)
        return self._json


def new_uuid() -> str:
    """A random (version 4) UUID string.

    uuid.uuid4() reads os.urandom and builds a UUID object for every email; these ids need
    uniqueness, not secrecy, so the fast non-cryptographic generator does (seeded from
    os.urandom at import and reseeded after fork by the random module itself).
    """
    value = (_random_bits(128) & _UUID4_CLEAR) | _UUID4_SET
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_random_bits = random.getrandbits
# Version 4 in bits 76-79, variant 10 in bits 62-63 (RFC 4122 section 4.4).
_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID4_SET = (0x4 << 76) | (0x2 << 62)
