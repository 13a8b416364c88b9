"""What the plugin manager holds: one `Plugin` per configured plugin, in-process or not.

In-process Python plugins are wrapped by `plugins.python.PythonPlugin`; out-of-process
plugins (go-plugin over gRPC) by `plugins.external.ExternalPlugin`. The manager calls only
this interface, so both get the same executor, metrics, breaker and reload.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from mailpipe.plugins.context import HookContext
from mailpipe.plugins.results import HookResult

# A hook method called inline: the function and the names of the arguments it takes, in
# order (hook arguments and "ctx"); it is called with their values positionally.
Inline = tuple[Callable[..., "HookResult | None"], tuple[str, ...]]


class PluginError(Exception):
    """A plugin cannot be loaded or started; the message says which and why."""


class Plugin(ABC):
    name: str
    kind: str  # "builtin", "python" or "external"
    source: str  # where it came from: a module, a file, an entry point, a command

    @abstractmethod
    def implemented(self) -> frozenset[str]:
        """The hooks (HOOKS names) this plugin wants to be called for."""

    async def start(self, config: dict[str, Any]) -> None:
        """init(config): called once before the first hook call."""

    @abstractmethod
    async def call(self, hook: str, ctx: HookContext) -> HookResult | None:
        """One hook call; may raise or hang: the executor isolates it."""

    def inline(self, hook: str) -> Inline | None:
        """A plain function answering this hook synchronously (no task, no timer) and its
        argument names, or None when calls must go through `call`."""
        return None

    async def health(self) -> bool:
        """True while the plugin can take calls; the health check asks it."""
        return True

    async def close(self) -> None:
        """Release what start() took; no calls follow."""

    def files(self) -> list[str]:
        """Files whose change means this plugin should be reloaded (auto_reload)."""
        return []
