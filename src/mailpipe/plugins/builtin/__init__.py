"""Plugins that ship with mailpipe, by the name `plugins.plugins` lists them under.

Each runs only when listed; its settings come from `plugins.plugin_config.NAME` and are
checked at start (a bad key fails startup, naming it). See docs/plugins-builtin.md.
"""

from __future__ import annotations

from typing import Any

from mailpipe.plugins.builtin.chaos import Chaos
from mailpipe.plugins.builtin.greylist import Greylist
from mailpipe.plugins.builtin.header_stamp import HeaderStamp
from mailpipe.plugins.builtin.policy import Policy
from mailpipe.plugins.builtin.rate_limit import RateLimit

BUILTINS: dict[str, Any] = {
    "chaos": Chaos,
    "greylist": Greylist,
    "header_stamp": HeaderStamp,
    "policy": Policy,
    "rate_limit": RateLimit,
}
