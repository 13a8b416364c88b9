"""Out-of-process plugins: executables speaking HashiCorp go-plugin's gRPC protocol.

mailpipe is the host: `ExternalPlugin` starts the command, reads its handshake line, dials
it, and calls the services of proto/mailpipe/plugin/v1/plugin.proto (Hooks, Selector). A
plugin that dies is restarted in the background with exponential backoff; meanwhile its
calls fail fast with `PluginUnavailable`. See docs/plugins-external.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import grpc
import orjson

from mailpipe.plugins.base import Plugin, PluginError
from mailpipe.plugins.context import HookContext
from mailpipe.plugins.external import wire
from mailpipe.plugins.external.handshake import HandshakeError
from mailpipe.plugins.external.process import Instance, StartError
from mailpipe.plugins.external.proto import plugin_pb2 as pb
from mailpipe.plugins.results import HookResult, from_wire

__all__ = ["CONFIG_ENV", "ExternalPlugin", "HandshakeError", "PluginCallError",
           "PluginUnavailable", "StartError"]


CONFIG_ENV = "MAILPIPE_PLUGIN_CONFIG"
_DOWNSTREAM = set(pb.Downstream.DESCRIPTOR.fields_by_name)  # other keys are not sent


class PluginUnavailable(PluginError):
    """The plugin process is down (crashed, restarting, or closed): the call was not made."""


class PluginCallError(PluginError):
    """The plugin answered a call with a gRPC error, or an answer mailpipe cannot use."""


class ExternalPlugin(Plugin):
    kind = "external"

    def __init__(self, name: str, command: str, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, *, start_timeout: float = 60.0,
                 call_timeout: float | None = None,
                 restart_backoff: tuple[float, float] = (0.1, 30.0)) -> None:
        self.name = name
        self.source = command
        self.argv = [command, *args]
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.call_timeout = call_timeout
        self.backoff_min, self.backoff_max = restart_backoff
        self.restarts = 0
        self.logger = logging.getLogger(f"mailpipe.plugins.{name}")
        self._current: Instance | None = None
        self._hooks: frozenset[str] = frozenset()
        self._closed = False
        self._delay = self.backoff_min
        self._watchers: set[asyncio.Task[None]] = set()
        self._restarter: asyncio.Task[None] | None = None
        self._swap = asyncio.Lock()

    # ------------------------------------------------------------------ the Plugin interface

    def implemented(self) -> frozenset[str]:
        """The hooks the last started process named: kept while it is down, so that its
        calls fail (PluginUnavailable) rather than silently not happen."""
        return self._hooks

    @property
    def pid(self) -> int | None:
        inst = self._current
        return inst.pid if inst is not None and inst.alive else None

    def files(self) -> list[str]:
        """The executable, so that auto_reload restarts the plugin when it is rebuilt."""
        path = shutil.which(self.argv[0])
        return [os.path.realpath(path)] if path else []

    async def start(self, config: dict[str, Any] | None = None) -> None:
        """Start the process; raises StartError/HandshakeError (naming the plugin) if it
        does not come up. `config` reaches the plugin (and its restarts) as JSON in the
        environment variable MAILPIPE_PLUGIN_CONFIG: the protocol has no init call."""
        self._closed = False
        if config:
            self.env[CONFIG_ENV] = orjson.dumps(config, default=str).decode()
        self._adopt(await self._launch())

    async def call(self, hook: str, ctx: HookContext) -> HookResult | None:
        request = pb.HookCall(hook=hook, context_json=orjson.dumps(ctx.to_wire(), default=str))
        reply = await self._rpc(wire.HOOKS_CALL, request, hook)
        try:
            mods = orjson.loads(reply.modifications_json) if reply.modifications_json else None
            return from_wire(reply.action, reply.code, reply.enhanced_code, reply.message, mods)
        except (ValueError, TypeError) as exc:
            raise PluginCallError(f"plugin {self.name!r}: {hook} answered badly: {exc}") from None

    async def select(self, downstreams: list[dict[str, Any]], envelope: dict[str, Any],
                     message_uuid: str, event_json: bytes) -> str:
        """The Selector service: the name of one of `downstreams` (dicts with the fields of
        the proto's Downstream: name, host, port, weight, labels, healthy)."""
        request = pb.SelectRequest(
            downstreams=[pb.Downstream(**{k: v for k, v in d.items() if k in _DOWNSTREAM})
                         for d in downstreams],
            envelope=pb.Envelope(mail_from=envelope.get("mail_from") or "",
                                 rcpt_to=list(envelope.get("rcpt_to") or ())),
            message_uuid=message_uuid, event_json=event_json)
        reply = await self._rpc(wire.SELECTOR_SELECT, request, "Select")
        if reply.name not in {d.get("name") for d in downstreams} or not reply.name:
            raise PluginCallError(f"plugin {self.name!r} selected an unknown downstream "
                                  f"{reply.name!r}")
        return reply.name

    async def health(self) -> bool:
        inst = self._current
        return inst is not None and await inst.healthy()

    async def close(self) -> None:
        """Stop the restart loop and the process; remove its socket and temp dir."""
        self._closed = True
        if self._restarter is not None:
            self._restarter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarter
        async with self._swap:
            inst, self._current = self._current, None
        if inst is not None:
            await inst.close()
        if self._watchers:  # they end as their process exits; a crash's cleanup finishes
            _, pending = await asyncio.wait(list(self._watchers), timeout=5.0)
            for task in pending:
                task.cancel()

    async def reload(self) -> None:
        """A new process (e.g. a new binary at the same path) takes the calls once healthy;
        the old one then finishes its calls in flight and is shut down."""
        new = await self._launch()
        async with self._swap:
            old, self._current = self._current, None
            self._adopt(new)
        if old is not None:
            await old.close(drain=self.call_timeout or 30.0)
        self.logger.info("plugin %s reloaded (pid %s)", self.name, new.pid,
                         extra={"plugin": self.name})

    # ------------------------------------------------------------------ internals

    async def _launch(self) -> Instance:
        return await Instance.launch(self.name, self.argv, self.env, self.start_timeout,
                                     self.logger)

    def _adopt(self, inst: Instance) -> None:
        self._current = inst
        self._hooks = inst.hooks
        watcher = asyncio.create_task(self._watch(inst))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        self.logger.info("plugin %s started (pid %s, %s %s, hooks: %s)", self.name, inst.pid,
                         inst.handshake.network, inst.handshake.address,  # type: ignore[union-attr]
                         ", ".join(sorted(inst.hooks)) or "none", extra={"plugin": self.name})

    async def _rpc(self, method: wire.Method, request: Any, what: str) -> Any:
        inst = self._current
        if inst is None or not inst.alive:
            raise PluginUnavailable(f"plugin {self.name!r} is not running"
                                    + ("" if self._closed else " (restarting)"))
        try:
            return await inst.call(method, request, self.call_timeout)
        except grpc.aio.AioRpcError as exc:
            raise PluginCallError(f"plugin {self.name!r}: {what} failed: {exc.code().name}: "
                                  f"{exc.details()}") from None

    async def _watch(self, inst: Instance) -> None:
        code = await inst.proc.wait()
        if inst.closing:
            return
        lived = time.monotonic() - inst.started_at
        self.logger.warning("plugin %s (pid %s) exited unexpectedly with code %s after %.1fs",
                            self.name, inst.pid, code, lived, extra={"plugin": self.name})
        await inst.close(graceful=False)  # closes the channel, removes the leftover socket
        async with self._swap:
            if self._current is inst:
                self._current = None
        if lived >= self.backoff_max:
            self._delay = self.backoff_min  # it ran a good while: not a crash loop
        if not self._closed and (self._restarter is None or self._restarter.done()):
            self._restarter = asyncio.create_task(self._restart())

    async def _restart(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, self.backoff_max)
            try:
                inst = await self._launch()
            except PluginError as exc:
                self.logger.warning("plugin %s restart failed (next try in %.1fs): %s",
                                    self.name, self._delay, exc, extra={"plugin": self.name})
                continue
            async with self._swap:
                if self._closed or self._current is not None:
                    await inst.close()
                    return
                self.restarts += 1
                self._adopt(inst)
            return
