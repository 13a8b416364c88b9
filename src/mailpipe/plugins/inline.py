"""The inline path: one generated function per hook calling its plugins in order.

Every SMTP command of every session runs it once per plugin, so it is generated as
straight-line code (as pluggy's specifications are in `hooks._spec`): each plugin's
function, breaker and counters are the function's own constants, the hook's arguments
are read from the context once for all plugins, and each method gets them positionally.
A loop over the plugins did the same with a dozen attribute reads per plugin: most of what
5 no-op plugins cost (benchmarks/README.md, `plugins.py`).

The bookkeeping of one call, as `Executor.call` does it for awaited calls: counted, one in
TIMED_EVERY timed (`Executor._timed`), exceptions and nonsense answers turned into
`Failed` (`Executor._raised`), skipped while its plugin's breaker is open. A success is
counted by `executions` alone (`CallStats.successes` is derived).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailpipe.plugins.results import HookResult

if TYPE_CHECKING:
    from mailpipe.plugins.executor import Executor, InlineCall, Run

TEMPLATE = """\
    if start <= {i} and not entry{i}.open:
        done = stats{i}.executions
        stats{i}.executions = done + 1
        if done & untimed:
            try:
                result = fn{i}({values})
            except Exception as exc:
                return {i}, executor._raised(entry{i}, hook, stats{i}, None, exc)
            if result is not None:
                if type(result) is not HookResult:
                    return {i}, executor._nonsense(call{i}, result, None)
                return {i}, result
        else:
            result = executor._timed(call{i}, {packed})
            if result is not None:
                return {i}, result
"""


def compile_calls(executor: Executor, calls: tuple[InlineCall, ...]) -> Run:
    """`run(ctx, start)` for these calls, all of one hook (see Executor.compile)."""
    from mailpipe.plugins.executor import _UNTIMED

    names = sorted({name for call in calls for name in call.argnames if name != "ctx"})
    # Hook argument names: pluggy checked them against the specifications (identifiers).
    lines = ["def run(ctx, start=0):", "    args = ctx.args"]
    lines += [f"    arg_{name} = args.get({name!r})" for name in names]
    namespace: dict[str, Any] = {
        "executor": executor, "untimed": _UNTIMED, "HookResult": HookResult,
        "hook": calls[0].hook if calls else "",
    }
    for i, call in enumerate(calls):
        values = ", ".join("ctx" if name == "ctx" else f"arg_{name}" for name in call.argnames)
        packed = f"({values},)" if values else "()"
        lines.append(TEMPLATE.format(i=i, values=values, packed=packed))
        namespace.update({f"entry{i}": call.entry, f"stats{i}": call.stats,
                          f"fn{i}": call.fn, f"call{i}": call})
    lines.append(f"    return {len(calls)}, None")
    exec("\n".join(lines), namespace)
    return namespace["run"]  # type: ignore[no-any-return]
