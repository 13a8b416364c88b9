"""caniemail's support data as shipped in data/caniemail.json (scripts/caniemail_table.py
writes it): loaded once, on the first check."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson


@dataclass(frozen=True)
class Table:
    source: dict[str, Any]
    families: dict[str, str]  # family slug -> name shown
    platforms: dict[str, str]
    features: dict[str, dict[str, Any]]  # by slug


@cache
def caniemail() -> Table:
    data = orjson.loads(
        resources.files("mailpipe.checks").joinpath("data/caniemail.json").read_bytes()
    )
    return Table(
        source=data["source"],
        families=data["families"],
        platforms=data["platforms"],
        features={feature["slug"]: feature for feature in data["features"]},
    )
