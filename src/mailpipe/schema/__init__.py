"""The JSON Schema (2020-12) of the EMAIL_RECEIVED event, shipped inside the package.

The file is the contract every sink can rely on; `GET /api/v1/schema` serves it byte for byte.
It is written by hand: the event is built as plain dicts in `mailpipe.capture.message`, so
there are no types to generate it from, and tests check every event built against it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import orjson

SCHEMA_FILE = "email-event.schema.json"


@cache
def event_schema_bytes() -> bytes:
    """The schema file as shipped."""
    return resources.files(__name__).joinpath(SCHEMA_FILE).read_bytes()


def event_schema() -> dict[str, Any]:
    """The schema as a JSON document (a fresh copy each call)."""
    return orjson.loads(event_schema_bytes())
