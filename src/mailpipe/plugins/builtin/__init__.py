"""Plugins that ship with mailpipe, by the name `plugins.plugins` lists them under.

Each runs only when listed; its settings come from `plugins.plugin_config.NAME` and are
checked at start (a bad key fails startup, naming it). See docs/plugins-builtin.md.
"""

from __future__ import annotations

from typing import Any

from mailpipe.plugins.builtin._common import parse
from mailpipe.plugins.builtin.chaos import Chaos, ChaosConfig
from mailpipe.plugins.builtin.greylist import Greylist, GreylistConfig
from mailpipe.plugins.builtin.header_stamp import HeaderStamp, HeaderStampConfig
from mailpipe.plugins.builtin.policy import Policy, PolicyConfig
from mailpipe.plugins.builtin.rate_limit import RateLimit, RateLimitConfig

BUILTINS: dict[str, Any] = {
    "chaos": Chaos,
    "greylist": Greylist,
    "header_stamp": HeaderStamp,
    "policy": Policy,
    "rate_limit": RateLimit,
}

# Each built-in's settings model: what `check_settings` validates against.
SETTINGS: dict[str, Any] = {
    "chaos": ChaosConfig,
    "greylist": GreylistConfig,
    "header_stamp": HeaderStampConfig,
    "policy": PolicyConfig,
    "rate_limit": RateLimitConfig,
}


def check_settings(name: str, settings: dict[str, Any] | None) -> None:
    """Validate a built-in's `plugins.plugin_config.NAME` without starting it (for config
    loading or `check-config`); raises PluginError naming each bad key in full."""
    if name in SETTINGS:
        parse(name, SETTINGS[name], settings)
