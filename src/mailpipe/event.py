"""The captured email as sinks receive it: the EMAIL_RECEIVED event plus its raw bytes."""

from __future__ import annotations

import random
from typing import Any

import orjson


class CapturedEmail:
    """One captured email.

    `event` is the EMAIL_RECEIVED document (validates against
    mailpipe/schema/email-event.schema.json); `raw` is the message as received, kept apart so the
    store can serve it even when `include_raw` leaves it out of the event. `outcomes` lets
    sinks note what became of the email (the store keeps it beside the event).

    An email built in a helper process arrives as the event's JSON (and `index`, the store's
    columns computed with it): the dict is decoded only when someone reads `event`, so sinks
    that only need `json()` never pay for it. Whoever changes the event afterwards assigns
    `event` or sets `_json` to None, which drops the JSON and the index columns made from it.
    """

    __slots__ = ("_event", "_json", "_uuid", "index", "outcomes", "raw")

    def __init__(self, event: dict[str, Any] | None = None, raw: bytes = b"",
                 outcomes: dict[str, Any] | None = None, _json: bytes | None = None, *,
                 uuid: str | None = None, index: tuple[Any, ...] | None = None) -> None:
        if event is None and _json is None:
            raise ValueError("a CapturedEmail needs its event or the event's JSON")
        self._event = event
        self._json = _json
        self._uuid = uuid
        self.raw = raw
        self.outcomes = {} if outcomes is None else outcomes
        self.index = index

    @property
    def event(self) -> dict[str, Any]:
        if self._event is None:
            self._event = orjson.loads(self._json)  # type: ignore[arg-type]
        return self._event

    @event.setter
    def event(self, value: dict[str, Any]) -> None:
        self._event = value
        self._json = None
        self.index = None

    @property
    def uuid(self) -> str:
        return self._uuid if self._uuid is not None else self.event["uuid"]

    def json(self) -> bytes:
        """The event serialised once, shared by every sink."""
        if self._json is None:
            self.index = None  # made from the JSON that is gone: the event changed since
            self._json = orjson.dumps(self._event)
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
