"""The plugin manager: loads the configured plugins, calls their hooks, reloads them.

One caller loop for every hook (pluggy's model; pluggy itself checks the hook methods at
load, see `plugins.python`): the hook's plugins run in the configured order, each call
through the executor. A result decides what happens next, as in Haraka:

- CONTINUE (or None): the next plugin runs;
- MODIFY: the change is noted (applied to the message before the sinks see it), the next
  plugin runs;
- ACCEPT: the later plugins of this hook are skipped, the command gets its usual reply;
- REJECT, TEMPFAIL, DISCONNECT: the later plugins are skipped and the client gets the
  refusal (what it refuses depends on the hook: `hooks.HOOKS[name].effect`).

Hooks at SMTP stages answer through the capture server's verdict seam (`Verdicts`), so a
stage no plugin cares about costs a session nothing. Notification hooks (`effect`
"notify") run in the background; their results are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mailpipe.capture.types import (
    PROCEED,
    Changes,
    Disconnect,
    Respond,
    Stage,
    Verdict,
)
from mailpipe.plugins.base import Plugin, PluginError
from mailpipe.plugins.context import HookContext, SessionView, StageSession
from mailpipe.plugins.executor import Entry, Executor, Failed, Run
from mailpipe.plugins.hooks import HOOKS, STAGE_HOOKS
from mailpipe.plugins.python import (
    discover_files,
    find_file,
    instantiate,
    load_entry_point,
    load_file,
)
from mailpipe.plugins.results import Action, HookResult

if TYPE_CHECKING:
    from mailpipe.capture.verdicts import VerdictContext, Verdicts
    from mailpipe.config import PluginsConfig
    from mailpipe.event import CapturedEmail

log = logging.getLogger("mailpipe.plugins")

PLUGIN_FAILED = Respond(451, "4.3.0", "Temporary failure in a plugin, please retry")
NEXT = object()  # a hook's result that leaves the word to the next plugin
CHECK_RESULTS = {"on_spf_check": "spf_result", "on_dkim_verify": "dkim_result"}
# What the capture server reports (see `observe`), and the hooks that hear of it.
OBSERVED = {
    "disconnect": ("on_disconnect", "on_metrics_collect"),
    "delivery_attempt": ("on_delivery_attempt",),
    "delivery_success": ("on_delivery_success",),
    "delivery_failure": ("on_delivery_failure",),
    "email_accepted": ("on_metrics_collect",),
    "email_refused": ("on_metrics_collect",),
}


class PluginManager:
    def __init__(self, config: PluginsConfig, verdicts: Verdicts) -> None:
        self.config = config
        self.verdicts = verdicts
        self.plugin_path = Path(config.plugin_path)
        ex = config.executor
        tempfail = {h for h, policy in ex.on_failure_hooks.items() if policy == "tempfail"}
        if ex.on_failure == "tempfail":
            tempfail |= {h for h in HOOKS if h not in ex.on_failure_hooks}
        self.executor = Executor(
            timeout=ex.timeout, max_concurrent=ex.max_concurrent,
            panic_recovery=ex.enable_panic_recovery, failure_threshold=ex.failure_threshold,
            tempfail_hooks=frozenset(tempfail), on_failure=self._on_failure,
        )
        self.entries: list[Entry] = []
        self.callers: dict[str, tuple[Entry, ...]] = {}
        self._steps: dict[Stage, tuple[Step, ...]] = {}
        self._notified: dict[str, tuple[Run, int, tuple[Entry, ...]]] = {}
        self._registered: set[Stage] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._mtimes: dict[str, float] = {}
        self.reloads = 0

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Load and start every configured plugin; a plugin that cannot start is an error."""
        if not self.config.enabled:
            return
        for order, name in enumerate(self._names()):
            plugin = self._load(name)
            await self._start_plugin(plugin)
            self.entries.append(Entry(plugin, order))
        self._mtimes = self._file_mtimes()
        self._wire()
        if self.entries:
            log.info("plugins started: %s", ", ".join(
                f"{e.name} ({e.plugin.kind})" for e in self.entries))
            self._spawn(self._health_loop())
            if self.config.auto_reload:
                self._spawn(self._reload_loop())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for stage in self._registered:
            self.verdicts.unregister(stage, self.decide)
        self._registered.clear()
        self.verdicts.observer, self.verdicts.observed = None, frozenset()
        for entry in self.entries:
            await self._close_plugin(entry.plugin)
        self.entries.clear()
        self.callers = {}

    def _names(self) -> list[str]:
        listed = list(dict.fromkeys(self.config.plugins))
        if not listed:
            listed = discover_files(self.plugin_path)
        return listed + [name for name in self.config.external if name not in listed]

    def _load(self, name: str) -> Plugin:
        """A plugin by name: an external one, a file in plugin_path, an entry point, a
        built-in, in that order."""
        external = self.config.external.get(name)
        if external is not None:
            from mailpipe.plugins.external import ExternalPlugin

            return ExternalPlugin(name, external.command, external.args, external.env,
                                  start_timeout=external.start_timeout)
        path = find_file(self.plugin_path, name)
        if path is not None:
            return load_file(name, path)
        # The built-ins are imported when a plugin is looked up, not with mailpipe (idle memory).
        from mailpipe.plugins.builtin import BUILTINS

        found = load_entry_point(name)
        if found is not None:
            return found
        if name in BUILTINS:
            return instantiate(name, BUILTINS[name], "builtin", f"mailpipe built-in {name}")
        known = sorted(set(BUILTINS) | set(discover_files(self.plugin_path)))
        raise PluginError(f"plugins.plugins: no plugin named {name!r} (not in "
                          f"{self.plugin_path}, not an entry point in mailpipe.plugins, "
                          f"not external; built in: {', '.join(sorted(BUILTINS)) or 'none'}"
                          f"{'; found: ' + ', '.join(known) if known else ''})")

    async def _start_plugin(self, plugin: Plugin) -> None:
        config = self.config.plugin_config.get(plugin.name, {})
        try:
            await plugin.start(config)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin.name}: init failed: {exc}") from exc

    async def _close_plugin(self, plugin: Plugin) -> None:
        try:
            await asyncio.wait_for(plugin.close(), self.config.executor.timeout)
        except Exception as exc:
            log.warning("plugin %s did not close cleanly: %r", plugin.name, exc)

    def _wire(self) -> None:
        """Point each hook at the plugins implementing it, and hold the stages they need.
        Sessions already open keep the stages they started with."""
        callers: dict[str, list[Entry]] = {}
        for entry in self.entries:
            for hook in entry.plugin.implemented():
                callers.setdefault(hook, []).append(entry)
        self.callers = {hook: tuple(entries) for hook, entries in callers.items()}
        # Everything a call needs, looked up now rather than on every command.
        self._steps = {
            stage: tuple(self._step(hook) for hook in hooks if hook in self.callers)
            for stage, hooks in STAGE_HOOKS.items()
        }
        self._notified = {hook: self._notice(hook) for hook in self.callers}
        for stage in self._registered:
            self.verdicts.unregister(stage, self.decide)
        self._registered = {stage for stage, steps in self._steps.items() if steps}
        for stage in self._registered:
            inline = all(step.run is not None for step in self._steps[stage])
            self.verdicts.register(stage, self.decide, bounded=False,
                                   now=self.decide_now if inline else None)
        observed = frozenset(what for what, hooks in OBSERVED.items()
                             if any(hook in self.callers for hook in hooks))
        self.verdicts.observed = observed
        self.verdicts.observer = self.observe if observed else None

    def _notice(self, hook: str) -> tuple[Run, int, tuple[Entry, ...]]:
        """A notification hook's inline plugins as one function, how many, and the others."""
        entries = self.callers[hook]
        inline = tuple(c for e in entries if (c := e.inline_call(hook)) is not None)
        return (self.executor.compile(inline), len(inline),
                tuple(e for e in entries if e.calls[hook][0] is None))

    def _step(self, hook: str) -> Step:
        entries = self.callers[hook]
        inline = tuple(e.inline_call(hook) for e in entries)
        run = self.executor.compile(inline) if None not in inline else None  # type: ignore[arg-type]
        return Step(hook, ARGS[hook], entries, run)

    # ---- hooks at SMTP stages -----------------------------------------------------------

    async def decide(self, vctx: VerdictContext) -> Verdict:
        """The verdict of every plugin hook at this SMTP stage."""
        call = self.executor.call
        for step, ctx in self._contexts(vctx):
            for entry in step.entries:
                if entry.open:
                    continue
                outcome = self._outcome(step.hook, ctx, await call(entry, step.hook, ctx),
                                        vctx.changes)
                if outcome is NEXT:
                    continue
                if outcome is PROCEED:
                    break
                return outcome  # type: ignore[return-value]
        return PROCEED

    def decide_now(self, vctx: VerdictContext) -> Verdict:
        """`decide` for a stage whose plugins all answer inline: no task, nothing awaited.
        (The same loop as `decide`, with `_contexts` written out: it runs at every held
        stage; Python cannot share it between sync and async.)"""
        view = StageSession(vctx)
        email, stage, stage_args = vctx.email, STAGE_NAMES[vctx.stage], vctx.args
        for step in self._steps[vctx.stage]:
            for args in step.args(stage_args, view, email):
                ctx = HookContext(step.hook, stage, args, view, None, email)
                run = step.run
                index, result = run(ctx, 0)  # type: ignore[misc]
                while result is not None:  # the usual answer is None: no plugin had a word
                    outcome = self._outcome(step.hook, ctx, result, vctx.changes)
                    if outcome is PROCEED:
                        break
                    if outcome is not NEXT:
                        return outcome  # type: ignore[return-value]
                    index, result = run(ctx, index + 1)  # type: ignore[misc]
        return PROCEED

    def _contexts(self, vctx: VerdictContext) -> Iterator[tuple[Step, HookContext]]:
        """Each hook of the stage with its context (once per recipient for on_pre_delivery)."""
        view = StageSession(vctx)
        email = vctx.email
        stage = STAGE_NAMES[vctx.stage]
        for step in self._steps[vctx.stage]:
            for args in step.args(vctx.args, view, email):
                yield step, HookContext(step.hook, stage, args, view, None, email)

    def _outcome(self, hook: str, ctx: HookContext, result: HookResult | Failed | None,
                 changes: Changes | None) -> Verdict | object:
        """NEXT (the next plugin's turn), PROCEED (the hook is done: ACCEPT) or a refusal."""
        if result is None:
            return NEXT
        if type(result) is Failed:
            return PLUGIN_FAILED if result.tempfail else NEXT
        action = result.action
        if hook in CHECK_RESULTS and result.message:
            ctx.store[CHECK_RESULTS[hook]] = result.message
        if action is Action.CONTINUE:
            return NEXT
        if action is Action.MODIFY:
            if changes is not None:
                note_changes(changes, hook, ctx.args, result)
            return NEXT
        if action is Action.ACCEPT:
            return PROCEED
        code, enhanced, text = result.reply()
        if action is Action.DISCONNECT:
            return Disconnect(text, enhanced)
        return Respond(code, enhanced, text)

    # ---- notifications ------------------------------------------------------------------

    def notify(self, hook: str, args: dict[str, Any],
               view: SessionView | StageSession | None = None,
               event: dict[str, Any] | None = None, *,
               email: CapturedEmail | None = None) -> None:
        """Fire a notification hook (its results are ignored): plugins answering inline are
        called now, the others in the background. `email`: the event is read from it when a
        plugin asks for ctx.event."""
        calls = self._notified.get(hook)
        if calls is None:
            return
        run, inline, later = calls
        ctx = HookContext(hook, "", args, view or SessionView(), event, email)
        index = run(ctx, 0)[0]
        while index < inline:  # every plugin, whatever each answers
            index = run(ctx, index + 1)[0]
        if later:
            self._spawn(self._notify_later(later, hook, ctx))

    async def _notify_later(self, entries: tuple[Entry, ...], hook: str,
                            ctx: HookContext) -> None:
        for entry in entries:
            if not entry.open:
                await self.executor.call(entry, hook, ctx)

    def observe(self, what: str, vctx: VerdictContext) -> None:
        """The capture server reports: disconnect, delivery_attempt, delivery_success,
        delivery_failure (args: error), email_accepted, email_refused."""
        view, email = StageSession(vctx), vctx.email
        if what == "disconnect":
            self.notify("on_disconnect", {"remote_addr": view.remote_addr}, view)
            self.notify("on_metrics_collect", {"event": "connection_closed",
                                               "data": dict(vctx.args)}, view)
            return
        if what.startswith("delivery_"):
            hook = f"on_{what}"
            for rcpt in view.rcpt_to:
                args = {"recipient": rcpt}
                if what == "delivery_attempt":
                    args["attempt"] = vctx.args.get("attempt", 1)
                elif what == "delivery_failure":
                    args["error"] = vctx.args.get("error", "")
                self.notify(hook, args, view, email=email)
            return
        self.notify("on_metrics_collect", {"event": what, "data": dict(vctx.args)}, view,
                    email=email)

    def _on_failure(self, entry: Entry, hook: str, error: BaseException) -> None:
        if hook not in ("on_error", "on_recovery"):  # a failing error hook must not loop
            self.notify("on_error", {"error": error, "stage": hook})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- health and reload --------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval)
            await self.check_health()

    async def check_health(self) -> None:
        for entry in list(self.entries):
            try:
                healthy = await asyncio.wait_for(entry.plugin.health(),
                                                 self.config.executor.timeout)
            except Exception as exc:
                healthy = False
                entry.last_error = f"health: {exc!r}"
            if entry.open and healthy:
                entry.open = False
                entry.consecutive_failures = 0
                entry.restored += 1
                log.warning("plugin %s is healthy again: switched back on", entry.name)
                self.notify("on_recovery", {"recovered": entry.name, "stage": "health_check"})
            elif not entry.open and not healthy:
                entry.open = True
                entry.opened_at = time.monotonic()
                log.warning("plugin %s is not healthy: switched off until it is", entry.name)

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval)
            current = self._file_mtimes()
            changed = {name for name, files in self._files_by_plugin().items()
                       if any(current.get(f) != self._mtimes.get(f) for f in files)}
            self._mtimes = current
            if changed:
                log.info("plugin files changed: reloading %s", ", ".join(sorted(changed)))
                await self.reload(sorted(changed))

    def _files_by_plugin(self) -> dict[str, list[str]]:
        return {e.name: e.plugin.files() for e in self.entries}

    def _file_mtimes(self) -> dict[str, float]:
        mtimes = {}
        for files in self._files_by_plugin().values():
            for file in files:
                try:
                    mtimes[file] = os.stat(file).st_mtime_ns
                except OSError:
                    mtimes[file] = -1
        return mtimes

    async def reload(self, names: list[str] | None = None) -> dict[str, str]:
        """Load the named plugins (all when None) afresh and swap them in; sessions go on,
        their next hook call reaches the new code. A plugin that fails to load keeps its
        old version. Returns each name's outcome."""
        outcome: dict[str, str] = {}
        for entry in list(self.entries):
            if names is not None and entry.name not in names:
                continue
            outcome[entry.name] = await self._reload_entry(entry)
        unknown = set(names or ()) - {e.name for e in self.entries}
        outcome.update({name: "error: not a loaded plugin" for name in sorted(unknown)})
        self._mtimes = self._file_mtimes()
        self._wire()
        self.reloads += 1
        return outcome

    async def _reload_entry(self, entry: Entry) -> str:
        old = entry.plugin
        swap = getattr(old, "reload", None)
        try:
            if swap is not None:  # an external plugin swaps its own process
                await swap()
                entry.use(old)  # the new process may implement other hooks
                return "reloaded"
            new = self._load(entry.name)
            await self._start_plugin(new)
        except Exception as exc:
            log.error("plugin %s: reload failed, keeping the running version: %s",
                      entry.name, exc)
            return f"error: {exc}"
        entry.use(new)
        entry.open = False
        entry.consecutive_failures = 0
        await self._close_plugin(old)
        log.info("plugin %s reloaded", entry.name)
        return "reloaded"

    # ---- status ---------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        return [{
            "name": e.name,
            "kind": e.plugin.kind,
            "source": e.plugin.source,
            "order": e.order,
            "enabled": not e.open,
            "hooks": sorted(e.plugin.implemented()),
            "restored": e.restored,
            "last_error": e.last_error,
            "pid": getattr(e.plugin, "pid", None),
            "restarts": getattr(e.plugin, "restarts", None),
            "stats": {hook: s.as_dict() for hook, s in sorted(e.stats.items())},
        } for e in self.entries]


# ---- helpers ------------------------------------------------------------------------------


# ---- each hook's arguments at its stage ------------------------------------------------------
# One small function per hook, from the stage's own arguments, the session and the email:
# a list of argument sets (empty: the hook does not apply, as on_helo at EHLO; one per
# recipient for on_pre_delivery).

Args = list[dict[str, Any]]
ArgsOf = Callable[[dict[str, Any], StageSession, Any], Args]
STAGE_NAMES = {stage: stage.name.lower() for stage in Stage}


class Step(NamedTuple):
    """One hook at a stage: its arguments, its plugins in order, and the function calling
    them all inline (None when one of them is awaited: `decide` calls them one by one)."""

    hook: str
    args: ArgsOf
    entries: tuple[Entry, ...]
    run: Run | None


def _greeting(verbs: tuple[str, ...]) -> Any:
    def args(a: dict[str, Any], view: StageSession, email: Any) -> Args:
        return [{"hostname": a.get("hostname")}] if a.get("verb") in verbs else []
    return args


def _envelope_args(key: str) -> Any:
    def args(a: dict[str, Any], view: StageSession, email: Any) -> Args:
        return [{key: a.get(key), "params": a.get("params", [])}]
    return args


def _remote(a: dict[str, Any], view: StageSession, email: Any) -> Args:
    return [{"remote_addr": view.remote_addr}]


def _reputation(a: dict[str, Any], view: StageSession, email: Any) -> Args:
    sender = str(a.get("sender") or "")
    domain = sender.rpartition("@")[2] if "@" in sender else view.helo
    return [{"remote_addr": view.remote_addr, "domain": domain}]


def _raw(email: Any) -> bytes:
    return email.raw if email is not None else b""


ARGS: dict[str, Any] = {
    "on_connect": _remote,
    "on_rate_limit_check": _remote,
    "on_starttls": lambda a, view, email: [{}],
    "on_data": lambda a, view, email: [{}],
    "on_helo": _greeting(("HELO",)),
    "on_ehlo": _greeting(("EHLO", "LHLO")),
    "on_auth": lambda a, view, email: [{"mechanism": a.get("mechanism"),
                                        "username": a.get("username")}],
    "on_mail_from": _envelope_args("sender"),
    "on_rcpt_to": _envelope_args("recipient"),
    "on_reputation_check": _reputation,
    "on_spf_check": lambda a, view, email: [{"sender": a.get("sender"),
                                             "remote_ip": view.remote_ip}],
    "on_greylist_check": lambda a, view, email: [{
        "sender": view.mail_from, "recipient": a.get("recipient"),
        "remote_addr": view.remote_addr}],
    "on_headers": lambda a, view, email: [{"headers": parse_headers(a.get("headers") or b"")}],
    "on_body": lambda a, view, email: [{"body": body_of(_raw(email))}],
    "on_antivirus_scan": lambda a, view, email: [{"content": _raw(email)}],
    "on_antispam_scan": lambda a, view, email: [{"content": _raw(email)}],
    "on_content_filter": lambda a, view, email: [{"content": _raw(email)}],
    "on_dkim_verify": lambda a, view, email: [{"content": _raw(email)}],
    "on_dmarc_check": lambda a, view, email: [{
        "sender": view.mail_from, "spf_result": view.store.get("spf_result", "none"),
        "dkim_result": view.store.get("dkim_result", "none")}],
    "on_message_complete": lambda a, view, email: [{"raw": _raw(email)}],
    "on_pre_delivery": lambda a, view, email: [{"recipient": rcpt} for rcpt in view.rcpt_to],
}


def note_changes(changes: Changes, hook: str, args: dict[str, Any], result: HookResult) -> None:
    changes.add_headers.extend(result.add_headers)
    changes.set_headers.extend(result.set_headers)
    changes.tags.extend(t for t in result.tags if t not in changes.tags)
    if result.rcpt_to is not None:
        if hook == "on_rcpt_to":  # that recipient only
            changes.recipients[str(args.get("recipient"))] = list(result.rcpt_to)
        else:
            changes.rcpt_to = list(result.rcpt_to)


def parse_headers(block: bytes) -> list[tuple[str, str]]:
    """The header block as (name, value) pairs in order, values unfolded and as sent (no
    RFC 2047 decoding: the event has the decoded ones). A plain split rather than the email
    package's parser, which would cost more than every plugin call of the message."""
    text = block.decode("utf-8", "replace")
    fields: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line:
            break
        if line[0] in " \t":
            if fields:  # a folded continuation of the field before
                name, value = fields[-1]
                fields[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if colon:
            fields.append((name.rstrip(), value.strip()))
    return fields


def body_of(raw: bytes) -> bytes:
    """What follows the blank line that ends the header block (CRLF or bare LF)."""
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n", 0, crlf if crlf >= 0 else len(raw))  # only before a CRLF one
    if lf >= 0:
        return raw[lf + 2:]
    return raw[crlf + 4:] if crlf >= 0 else b""
