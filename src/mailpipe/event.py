"""The captured email as sinks receive it: the EMAIL_RECEIVED event plus its raw bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class CapturedEmail:
    """One captured email.

    `event` is the EMAIL_RECEIVED document (validates against
    shared/spec/email-event.schema.json); `raw` is the message as received, kept apart so the
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
