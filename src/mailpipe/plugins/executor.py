"""The executor: every plugin call isolated, bounded, timed and counted.

- An exception is caught (the session goes on; `on_error` hears of it), unless
  `enable_panic_recovery` is off: then the failing call answers 451 instead.
- A call past `timeout` is abandoned; the hook's failure policy applies (continue, or
  tempfail where configured).
- At most `max_concurrent` calls are in flight; the rest wait their turn.
- `failure_threshold` failures in a row open a plugin's circuit breaker: its hooks are
  skipped until its health check says it is back.

Sync hook methods that are not marked `threaded` run inline on the event loop, with no task,
timer or semaphore: they cannot hang the loop for long without blocking it anyway, and a no-op
plugin then costs next to nothing. Counting is plain integers; `/metrics` reads them at scrape
time (see `plugins.metrics`), so a call costs no Prometheus label lookups. Inline calls are
all counted but timed one in `TIMED_EVERY` (each timed call stands for that many in the total
time, as statsd samples): reading the clock twice would cost more than a no-op hook itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any

from mailpipe.plugins.inline import compile_calls
from mailpipe.plugins.results import HookResult

if TYPE_CHECKING:
    from mailpipe.plugins.base import Inline, Plugin
    from mailpipe.plugins.context import HookContext

log = logging.getLogger("mailpipe.plugins")

RECENT = 1024  # call durations kept per plugin and hook, for the p99
TIMED_EVERY = 64  # inline calls: one in this many is timed (a power of two)
_UNTIMED = TIMED_EVERY - 1


class Failed:
    """A call that raised, timed out or answered nonsense; `tempfail` when it must not pass."""

    __slots__ = ("error", "tempfail")

    def __init__(self, error: BaseException, tempfail: bool) -> None:
        self.error = error
        self.tempfail = tempfail


@dataclass(slots=True)
class CallStats:
    executions: int = 0
    pending: int = 0  # awaited calls in flight (neither a success nor a failure yet)
    cancelled: int = 0  # awaited calls cut short by mailpipe (shutdown, session gone)
    failures: int = 0
    timeouts: int = 0
    recoveries: int = 0  # exceptions caught (panic recovery)
    seconds: float = 0.0  # total time (inline calls: estimated from the timed ones)
    timed: int = 0  # calls whose duration is in `seconds` at their own weight
    timed_seconds: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))

    @property
    def successes(self) -> int:
        # Derived, not counted: one store less on every inline call.
        return self.executions - self.failures - self.pending - self.cancelled

    def as_dict(self) -> dict[str, Any]:
        durations = sorted(self.recent)
        p99 = durations[min(len(durations) - 1, int(len(durations) * 0.99))] if durations else 0
        return {
            "executions": self.executions, "successes": self.successes,
            "failures": self.failures, "timeouts": self.timeouts,
            "recoveries": self.recoveries,
            "mean_ms": round(1000 * self.timed_seconds / self.timed, 4) if self.timed else 0,
            "p99_ms": round(1000 * p99, 4),
        }


@dataclass(slots=True)
class Entry:
    """One loaded plugin as the executor sees it: its breaker and its counters."""

    plugin: Plugin
    order: int
    stats: dict[str, CallStats] = field(default_factory=dict)
    consecutive_failures: int = 0
    open: bool = False  # circuit breaker open: its hooks are skipped
    opened_at: float = 0.0
    restored: int = 0  # times the health check closed the breaker again
    last_error: str | None = None
    # Per hook: the plugin's inline function and its argument names (None: awaited) and
    # the hook's counters.
    calls: dict[str, tuple[Inline | None, CallStats]] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)  # Executor.call's, made on first use
    ok_at_failure: int = -1  # successes() at the last failure: more since, the row restarts

    def __post_init__(self) -> None:
        self.use(self.plugin)

    def use(self, plugin: Plugin) -> None:
        """Take this plugin (a reloaded one keeps the counters of the hooks it still has)."""
        self.plugin = plugin
        self.calls = {hook: (plugin.inline(hook), self.stat(hook))
                      for hook in plugin.implemented()}
        self.runs = {}

    def successes(self) -> int:
        return sum(stats.successes for stats in self.stats.values())

    @property
    def name(self) -> str:
        return self.plugin.name

    def inline_call(self, hook: str) -> InlineCall | None:
        """The hook as the executor calls it inline, or None when it must be awaited."""
        inline, stats = self.calls[hook]
        if inline is None:
            return None
        fn, argnames = inline
        return InlineCall(self, hook, fn, argnames, stats)

    def stat(self, hook: str) -> CallStats:
        stats = self.stats.get(hook)
        if stats is None:
            stats = self.stats[hook] = CallStats()
        return stats


@dataclass(slots=True, frozen=True)
class InlineCall:
    """One plugin's inline hook, looked up once (`Entry.inline_call`) for the call path."""

    entry: Entry
    hook: str
    fn: Callable[..., Any]  # called with the values of `argnames`, in order
    argnames: tuple[str, ...]
    stats: CallStats


# What `Executor.compile` makes: the calls from `start` in order, until one answers.
Run = Callable[["HookContext", int], "tuple[int, HookResult | Failed | None]"]


class Executor:
    def __init__(self, *, timeout: float, max_concurrent: int, panic_recovery: bool,
                 failure_threshold: int, tempfail_hooks: frozenset[str],
                 on_failure: Callable[[Entry, str, BaseException], None]) -> None:
        self.timeout = timeout
        self.panic_recovery = panic_recovery
        self.failure_threshold = failure_threshold
        self.tempfail_hooks = tempfail_hooks
        self._on_failure = on_failure
        self._slots = asyncio.Semaphore(max_concurrent)

    def compile(self, calls: tuple[InlineCall, ...]) -> Run:
        """One function calling these plugins' inline hooks (of one hook) in order from
        `start`, with no task, timer or slot, until one answers something but None: its
        index and answer, or (len, None). Generated (plugins.inline) because it runs for
        every plugin on every command."""
        return compile_calls(self, calls)

    def _timed(self, call: InlineCall, values: tuple[Any, ...]) -> HookResult | Failed | None:
        """An inline call with the clock read around it: one in TIMED_EVERY."""
        stats = call.stats
        started = perf_counter()
        try:
            result = call.fn(*values)
        except Exception as exc:
            return self._raised(call.entry, call.hook, stats, started, exc)
        if result is not None and type(result) is not HookResult:
            return self._nonsense(call, result, started)
        _timing(stats, perf_counter() - started, TIMED_EVERY)
        return result

    def _nonsense(self, call: InlineCall, result: object, started: float | None) -> Failed:
        error = TypeError(f"{call.hook} returned {result!r}, not a HookResult or None")
        return self._raised(call.entry, call.hook, call.stats, started, error)

    async def call(self, entry: Entry, hook: str, ctx: HookContext) -> HookResult | Failed | None:
        """Call one hook of one plugin; never raises (but CancelledError, which is ours)."""
        run = entry.runs.get(hook)
        if run is None and (inline := entry.inline_call(hook)) is not None:
            run = entry.runs[hook] = self.compile((inline,))
        if run is not None:
            return run(ctx, 0)[1]
        stats = entry.calls[hook][1]
        stats.executions += 1
        stats.pending += 1
        started = time.perf_counter()
        try:
            try:
                async with self._slots, asyncio.timeout(self.timeout):
                    result = await entry.plugin.call(hook, ctx)
            finally:
                stats.pending -= 1
            if result is not None and type(result) is not HookResult:
                raise TypeError(f"{hook} returned {result!r}, not a HookResult or None")
        except TimeoutError as exc:
            stats.timeouts += 1
            error = TimeoutError(f"{entry.name}.{hook} timed out after {self.timeout:g}s")
            return self._failed(entry, hook, stats, started, error, exc)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                stats.cancelled += 1
                raise  # the session (or mailpipe) is being cancelled: not the plugin's doing
            # The plugin's own machinery cancelled the call (a gRPC channel closed under
            # it when its process died): a failure like any other.
            error = RuntimeError(f"{entry.name}.{hook} was cancelled ({exc!r})")
            return self._failed(entry, hook, stats, started, error, error)
        except Exception as exc:
            return self._raised(entry, hook, stats, started, exc)
        _timing(stats, time.perf_counter() - started)
        return result

    def _raised(self, entry: Entry, hook: str, stats: CallStats, started: float | None,
                exc: Exception) -> Failed:
        if self.panic_recovery:
            stats.recoveries += 1
        return self._failed(entry, hook, stats, started, exc, exc)

    def _failed(self, entry: Entry, hook: str, stats: CallStats, started: float | None,
                error: BaseException, cause: BaseException) -> Failed:
        stats.failures += 1
        if started is not None:
            _timing(stats, time.perf_counter() - started)
        entry.last_error = f"{hook}: {error}"
        # Failures in a row: a success is not written down per call (it would cost every
        # call), so a row restarts when the plugin succeeded since its last failure.
        ok = entry.successes()
        if ok != entry.ok_at_failure:
            entry.consecutive_failures = 0
            entry.ok_at_failure = ok
        entry.consecutive_failures += 1
        log.error("plugin %s failed in %s: %s", entry.name, hook, error,
                  exc_info=cause if not isinstance(cause, TimeoutError) else None)
        if not entry.open and entry.consecutive_failures >= self.failure_threshold:
            entry.open = True
            entry.opened_at = time.monotonic()
            log.warning("plugin %s switched off after %d failures in a row; its health check "
                        "switches it back on", entry.name, entry.consecutive_failures)
        self._on_failure(entry, hook, error)
        tempfail = hook in self.tempfail_hooks or not self.panic_recovery
        return Failed(error, tempfail)


def _timing(stats: CallStats, elapsed: float, weight: int = 1) -> None:
    """One call's duration; `weight`: how many calls it stands for in the total time."""
    stats.seconds += elapsed * weight
    stats.timed += 1
    stats.timed_seconds += elapsed
    stats.recent.append(elapsed)
