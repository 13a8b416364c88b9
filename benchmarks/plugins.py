"""Plugin benchmark: emails/s with no plugins, 5 in-process no-op plugins on every hook, and 1
out-of-process no-op plugin on on_rcpt_to, side by side in one run.

    python benchmarks/plugins.py [--connections 100] [--messages 20] [--size 1024]
                                 [--mode reuse|new|both] [--rounds 5] [--solo 300]
                                 [--targets none,inproc5,inproc5-async,external1]
                                 [--external go|python] [--baseline REF] [--json FILE]

Every target is `python -m mailpipe serve` configured as benchmarks/ingest.py configures it
(store at its retention limit, synchronous FULL, HTTP API on), differing only in `plugins:`:

- none:          no plugins (an empty plugin_path);
- inproc5:       5 in-process Python plugins, each a class with every hook of
                 mailpipe.plugins.hooks.HOOKS as a plain sync method returning None;
- inproc5-async: the same with `async def` methods (these go through the executor's
                 semaphore and timeout instead of running inline);
- external1:     1 out-of-process plugin on on_rcpt_to only, answering CONTINUE: the Go program
                 benchmarks/noop_plugin/main.go (built with examples/plugins/go/build.sh), or a
                 Python SDK plugin (mailpipe.plugins.sdk) if Go is missing or `--external python`.

The load, the rounds (alternating between the targets) and the tables are ingest.py's, imported
from it. Per target it also reads the executor's counters from /metrics (calls and time per
plugin and hook) over the measured rounds. `--solo N` adds a run of one connection sending N
emails one at a time: the latency a plugin adds to an email with no queueing behind others.
`--baseline REF` runs each target a second time on that commit's code (`TARGET@SHA`, just before
the target in every round), and compares it with `none@SHA`: before and after in one run.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's HOOKS

from ingest import (  # a sibling script, not a package
    REPO,
    MakeServer,
    Row,
    Server,
    announce,
    bench_mode,
    bench_parser,
    compare_rows,
    export_src,
    fmt,
    mailpipe_config,
    mailpipe_server,
    parse_bench_args,
    print_load_table,
    print_table,
    raise_fd_limit,
    resolve_baseline,
    write_report,
)

from mailpipe.plugins.hooks import HOOKS
from workers import cpu_delta, workers_cpu  # CPU of a server's child processes

HERE = Path(__file__).resolve().parent
TARGETS = ("none", "inproc5", "inproc5-async", "external1")
INPROC_PLUGINS = 5
THROUGHPUT_GOAL = 0.90  # inproc5 / none emails/s
ADDED_LATENCY_GOAL_MS = 0.3  # per out-of-process hook call
EXTERNAL_HOOK = "on_rcpt_to"
RCPTS_PER_EMAIL = 1  # loadgen.py sends one RCPT TO per email

NOOP_GO_SRC = HERE / "noop_plugin"
BUILD_SH = REPO / "examples" / "plugins" / "go" / "build.sh"
PLUGIN_PROTO = REPO / "proto" / "mailpipe" / "plugin" / "v1" / "plugin.proto"
GO_PLUGIN_LIB = Path("/usr/share/gocode/src/github.com/hashicorp/go-plugin")
NOOP_BUILD = REPO / "build" / "noop-plugin"

# The fallback external plugin on the Python SDK: the same hook, the same answer.
PYTHON_NOOP = f"""\
from mailpipe.plugins.sdk import serve


class Noop:
    def {EXTERNAL_HOOK}(self, ctx):
        return None


serve(hooks=Noop())
"""

# /metrics lines of the executor's counters: name{hook="...",plugin="..."} value
METRIC_LINE = re.compile(
    r"^mailpipe_plugin_(executions_total|call_seconds_total|call_p99_seconds)"
    r'\{hook="([^"]+)",plugin="([^"]+)"\} (\S+)$'
)


# ---- the plugins ------------------------------------------------------------------------------


def noop_plugin_source(asynchronous: bool) -> str:
    """A class with every hook as a method that takes all the hook's arguments (and ctx) and
    returns None."""
    prefix = "async def" if asynchronous else "def"
    methods = [
        f"    {prefix} {hook.name}(self, {', '.join(('ctx', *hook.args))}):\n        return None\n"
        for hook in HOOKS.values()
    ]
    return "class Plugin:\n" + "\n".join(methods)


def write_inproc_plugins(plugin_path: Path, asynchronous: bool) -> list[str]:
    names = [f"noop{i}" for i in range(1, INPROC_PLUGINS + 1)]
    source = noop_plugin_source(asynchronous)
    for name in names:
        (plugin_path / f"{name}.py").write_text(source)
    return names


def go_missing() -> str | None:
    """Why the Go plugin cannot be built here, or None."""
    for tool in ("go", "protoc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not GO_PLUGIN_LIB.is_dir():
        return "go-plugin is not installed (golang-github-hashicorp-go-plugin-dev)"
    return None


def build_go_noop() -> Path:
    """benchmarks/noop_plugin built by the example's build.sh, once per source hash."""
    digest = hashlib.sha256()
    for path in (NOOP_GO_SRC / "main.go", BUILD_SH, PLUGIN_PROTO):
        digest.update(path.read_bytes())
    binary = NOOP_BUILD / digest.hexdigest()[:16] / "mailpipe-noop-plugin"
    if not binary.exists():
        env = {**os.environ, "PLUGIN_SRC": str(NOOP_GO_SRC)}
        subprocess.run(
            [str(BUILD_SH), str(binary), str(NOOP_BUILD / "work")],
            env=env,
            check=True,
            timeout=600,
            capture_output=True,
        )
    return binary


def external_plugin(choice: str, root: Path) -> tuple[dict[str, Any], str]:
    """The `plugins.external.noop` config and a line saying what it runs."""
    if choice == "go":
        reason = go_missing()
        if reason is None:
            try:
                binary = build_go_noop()
                return {"command": str(binary)}, f"Go, {NOOP_GO_SRC.relative_to(REPO)} ({binary})"
            except (OSError, subprocess.SubprocessError) as exc:
                stderr = getattr(exc, "stderr", b"") or b""
                reason = f"the build failed: {exc} {stderr.decode(errors='replace')[-400:]}"
        fallback = f"Python SDK (FALLBACK: Go plugin not used: {reason})"
    else:
        fallback = "Python SDK (--external python)"
    script = root / "noop_sdk_plugin.py"
    script.write_text(PYTHON_NOOP)
    return {"command": sys.executable, "args": [str(script)]}, fallback


def make_target(external: dict[str, Any], baseline_src: Path | None = None) -> MakeServer:
    """The `make` for ingest.bench_mode: mailpipe with the target's `plugins:` section
    (`TARGET@SHA`: on the --baseline commit's code, `baseline_src`)."""

    def make(name: str, workdir: Path, max_messages: int) -> Server:
        target, _, commit = name.partition("@")
        config = mailpipe_config(max_messages)
        plugin_path = workdir / "plugins"
        plugin_path.mkdir()
        plugins: dict[str, Any] = {"plugin_path": str(plugin_path), "plugins": []}
        if target.startswith("inproc5"):
            asynchronous = target.endswith("-async")
            plugins["plugins"] = write_inproc_plugins(plugin_path, asynchronous)
        elif target == "external1":
            plugins["external"] = {"noop": external}
        config["plugins"] = plugins
        src = baseline_src if commit and baseline_src is not None else REPO / "src"
        return mailpipe_server(name, workdir, config, src)

    return make


# ---- what the executor counted ----------------------------------------------------------------


def plugin_metrics(server: Server) -> dict[str, dict[str, float]]:
    """(plugin/hook) -> executions, seconds, p99 from /metrics."""
    found: dict[str, dict[str, float]] = {}
    for line in server.http_get("/metrics").decode().splitlines():
        match = METRIC_LINE.match(line)
        if match:
            name, hook, plugin, value = match.groups()
            found.setdefault(f"{plugin}/{hook}", {})[name] = float(value)
    return found


def observe(server: Server, row: Row, phase: str) -> None:
    """ingest.bench_mode's observer: counters and child CPU before and after the rounds."""
    snapshot = {"metrics": plugin_metrics(server), "children_cpu": workers_cpu(server.pid)}
    if phase == "measured":
        row.extra["_before"] = snapshot
        return
    before = row.extra.pop("_before")
    row.extra["hooks"] = hook_deltas(before["metrics"], snapshot["metrics"])
    row.extra["plugin_cpu_s"] = cpu_delta(before["children_cpu"], snapshot["children_cpu"])


def hook_deltas(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Per hook over all plugins: calls and seconds during the rounds, the worst p99 (of each
    plugin's last 1024 calls)."""
    hooks: dict[str, dict[str, float]] = {}
    for key, numbers in after.items():
        old = before.get(key, {})
        hook = key.split("/", 1)[1]
        total = hooks.setdefault(hook, {"calls": 0.0, "seconds": 0.0, "p99_s": 0.0})
        total["calls"] += numbers.get("executions_total", 0) - old.get("executions_total", 0)
        total["seconds"] += numbers.get("call_seconds_total", 0) - old.get("call_seconds_total", 0)
        total["p99_s"] = max(total["p99_s"], numbers.get("call_p99_seconds", 0))
    return {hook: numbers for hook, numbers in sorted(hooks.items()) if numbers["calls"]}


def hook_totals(row: Row) -> tuple[float, float]:
    """Plugin calls per email and the mean time of one call (µs) during the rounds."""
    hooks = row.extra.get("hooks") or {}
    calls = sum(h["calls"] for h in hooks.values())
    seconds = sum(h["seconds"] for h in hooks.values())
    if not calls or not row.emails:
        return float("nan"), float("nan")
    return calls / row.emails, seconds / calls * 1e6


# ---- output -----------------------------------------------------------------------------------


def print_plugin_table(rows: list[Row], comparison: dict[str, dict[str, dict[str, float]]]) -> None:
    """Each target against `none`: paired per-round ratios (median [lowest-highest])."""
    headers = [
        "target",
        "emails/s vs none",
        "CPU-s/1000 vs none",
        "p50 added ms",
        "plugin calls/email",
        "mean µs/call",
        "plugin process CPU-s/1000",
    ]
    bases = {r.target: r for r in rows if r.target == base_of(r.target) and r.emails}
    table = []
    for row in rows:
        if row.target == base_of(row.target) or not row.emails:
            continue
        base = bases.get(base_of(row.target))
        ratios = comparison.get(row.target, {})
        added = paired_p50_added(row, base)[0] if base is not None else float("nan")
        calls, mean_us = hook_totals(row)
        plugin_cpu = row.extra.get("plugin_cpu_s")
        table.append([
            row.target,
            ratio_cell(ratios.get("emails/s")),
            ratio_cell(ratios.get("CPU-s/1000")),
            "-" if added != added else f"{added:+.3f}",
            fmt(calls, 1),
            fmt(mean_us, 2),
            fmt(plugin_cpu / row.emails * 1000, 3) if plugin_cpu and row.emails else "-",
        ])  # fmt: skip
    if table:
        print(
            "\nagainst none: each round divided by none's round next to it, the median "
            "[lowest-highest];\np50 added: the median of the same pairs' differences; calls "
            "and time per call: the executor's counters over all rounds"
        )
        print_table(headers, table)


def ratio_cell(numbers: dict[str, float] | None) -> str:
    if not numbers or numbers["ratio"] != numbers["ratio"]:
        return "-"
    cell = f"{numbers['ratio']:.2f}x"
    if numbers["round_min"] == numbers["round_min"]:
        cell += f" [{numbers['round_min']:.2f}-{numbers['round_max']:.2f}]"
    return cell


def print_hook_table(rows: list[Row]) -> None:
    """Per hook and plugin target: calls per email, mean and p99 µs per call (executor's)."""
    targets = [r for r in rows if r.extra.get("hooks") and r.emails]
    if not targets:
        return
    hooks = sorted({hook for r in targets for hook in r.extra["hooks"]}, key=list(HOOKS).index)
    headers = ["hook"]
    for r in targets:
        headers += [f"{r.target} calls/email", "mean µs", "p99 µs"]
    table = []
    for hook in hooks:
        cells = [hook]
        for r in targets:
            h = r.extra["hooks"].get(hook)
            if h is None:
                cells += ["-", "-", "-"]
                continue
            cells += [
                fmt(h["calls"] / r.emails, 2),
                fmt(h["seconds"] / h["calls"] * 1e6, 2),
                fmt(h["p99_s"] * 1e6, 1),
            ]
        table.append(cells)
    print("\nper hook, over all plugins of the target (the executor's timing of each call):")
    print_table(headers, table)


def paired_p50_added(row: Row, base: Row) -> tuple[float, float, float]:
    """p50 of `row` minus p50 of `base`, round by round as they ran next to each other: the
    median, lowest and highest difference (ms)."""
    diffs = sorted(r["p50_ms"] - b["p50_ms"] for r, b in zip(row.rounds, base.rounds, strict=False))
    if not diffs:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(diffs), diffs[0], diffs[-1]


def base_of(target: str) -> str:
    """What a target is compared with: `none` on the same code."""
    _, at, commit = target.partition("@")
    return f"none{at}{commit}"


def verdicts(mode: str, rows: list[Row], comparison: dict[str, Any]) -> list[str]:
    lines = []
    by_name = {r.target: r for r in rows if r.emails}
    base = by_name.get("none")
    for target in [t for t in comparison if t.startswith("inproc5")]:
        numbers = comparison.get(target, {})
        rate, cpu = numbers.get("emails/s"), numbers.get("CPU-s/1000")
        if rate is None or rate["ratio"] != rate["ratio"]:
            continue
        verdict = "OK" if rate["ratio"] >= THROUGHPUT_GOAL else "UNDER"
        aim = f" (aim >= {THROUGHPUT_GOAL:.2f}x): {verdict}" if "-async" not in target else ""
        lines.append(
            f"{mode}: {target} / {base_of(target)} emails/s {ratio_cell(rate)}, CPU per email "
            f"{ratio_cell(cpu)}{aim}"
        )
    external = by_name.get("external1")
    if base is not None and external is not None:
        added, low, high = (d / RCPTS_PER_EMAIL for d in paired_p50_added(external, base))
        verdict = "OK" if added < ADDED_LATENCY_GOAL_MS else "OVER"
        lines.append(
            f"{mode}: external1 adds {added:+.3f} ms [{low:+.3f} to {high:+.3f}] per "
            f"{EXTERNAL_HOOK} call = (p50 external1 - p50 none) / {RCPTS_PER_EMAIL} call per "
            f"email, the median over the paired rounds [lowest to highest] (aim < "
            f"{ADDED_LATENCY_GOAL_MS} ms): {verdict}"
        )
        hook = (external.extra.get("hooks") or {}).get(EXTERNAL_HOOK)
        if hook:
            lines.append(
                f"{mode}: external1's {EXTERNAL_HOOK} as the executor timed it (from the call "
                f"to its result, a wait for a max_concurrent slot included): "
                f"{hook['seconds'] / hook['calls'] * 1000:.3f} ms mean, "
                f"{hook['p99_s'] * 1000:.3f} ms p99 of the last 1024"
            )
    return lines


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, TARGETS)
    parser.add_argument("--mode", choices=("reuse", "new", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=5, help="load runs per target")
    parser.add_argument(
        "--solo",
        type=int,
        default=300,
        help="also one connection sending this many emails one at a time (0: skip)",
    )
    parser.add_argument(
        "--external",
        choices=("go", "python"),
        default="go",
        help="external1's plugin: the Go no-op (falls back to python if Go is missing) or the "
        "Python SDK's",
    )
    parser.add_argument(
        "--max-messages",
        type=int,
        default=5000,
        help="store.max_messages; each store is filled to it before the rounds",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run every target on this commit's code (TARGET@SHA, compared with none@SHA)",
    )
    positive = ["connections", "messages", "rounds", "size", "max_messages"]
    args = parse_bench_args(parser, argv, TARGETS, positive)
    args.steady_state = True
    if args.baseline is not None:
        try:
            args.baseline = resolve_baseline(args.baseline)
        except (OSError, ValueError) as exc:
            parser.error(f"--baseline {args.baseline}: {exc}")
        short = args.baseline.short
        args.target_list = [t for target in args.target_list for t in (f"{target}@{short}", target)]
    return args


def scenarios(args: argparse.Namespace) -> list[tuple[str, str, argparse.Namespace]]:
    """(loadgen mode, title, the args bench_mode reads) for each table."""
    modes = ["reuse", "new"] if args.mode == "both" else [args.mode]
    titles = {
        "reuse": "reuse: one connection per session, PIPELINING",
        "new": "new: a new connection per email",
    }
    found = [(mode, titles[mode], args) for mode in modes]
    if args.solo:
        solo = copy.copy(args)
        solo.connections, solo.messages = 1, args.solo
        found.append(("reuse", f"solo: 1 connection x {args.solo} emails, one at a time", solo))
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    root = Path(tempfile.mkdtemp(prefix="mailpipe-bench-plugins-"))
    try:
        return run(args, root)
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped, temporary files removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> int:
    command, machine = announce(root)
    external: dict[str, Any] = {}
    external_note = ""
    if "external1" in args.target_list:
        external, external_note = external_plugin(args.external, root)
    print(
        f"load: {args.connections} connections x {args.messages} emails x {args.size} bytes, "
        f"{RCPTS_PER_EMAIL} recipient each; {args.rounds} round(s) per target taken in turn, "
        f"median round shown; stores filled to max_messages {args.max_messages} first"
    )
    print(
        f"plugins: inproc5 = {INPROC_PLUGINS} no-op classes x {len(HOOKS)} hooks "
        f"(sync, inline); inproc5-async = the same, async def; external1 = {EXTERNAL_HOOK} "
        f"only, {external_note or '-'}"
    )
    report: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "args": vars(args),
        "external": external_note,
        "results": [],
        "verdicts": [],
    }
    started_at = time.monotonic()
    lines: list[str] = []
    baseline_src = None
    if args.baseline is not None:
        baseline_src = export_src(args.baseline, root)
        print(f"baseline: TARGET@{args.baseline.short} = {args.baseline.ref} "
              f"({args.baseline.sha}), each just before TARGET in every round")
    make = make_target(external, baseline_src)
    for mode, title, mode_args in scenarios(args):
        rows = bench_mode(mode, mode_args, root, make=make, observe=observe)
        label = title.split(":")[0]
        for row in rows:
            row.scenario = label
        comparison = {
            r.target: compare_rows(rows, r.target, base_of(r.target))
            for r in rows
            if r.target != base_of(r.target) and base_of(r.target) in args.target_list
        }
        print_load_table(title, rows)
        print_plugin_table(rows, comparison)
        print_hook_table(rows)
        lines += verdicts(label, rows, comparison)
        for row in rows:
            row.extra.pop("_before", None)  # a target that failed mid-run
        report["results"].extend(asdict(row) for row in rows)
        report.setdefault("comparison", {})[label] = comparison
    if lines:
        print("\n" + "\n".join(lines))
    report["verdicts"] = lines
    write_report(report, started_at, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
