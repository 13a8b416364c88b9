"""Plugins that ship with mailpipe, by the name `plugins.plugins` lists them under."""

from __future__ import annotations

from typing import Any

BUILTINS: dict[str, Any] = {}
