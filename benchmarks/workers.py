"""Worker benchmark: emails/s and latency through N no-op workers vs the store alone, one run.

    python benchmarks/workers.py [--workers 4] [--connections 100] [--messages 20]
                                 [--size 1024] [--rounds 5] [--targets store,python,php]
                                 [--solo 500] [--json FILE]

Three mailpipe configurations, each a fresh `python -m mailpipe serve` process:

- store:  the capture core alone (SMTP, parsing, SQLite commit before the 250), no workers;
- python: the same plus a pool of N no-op workers on the Python SDK (`mailpipe.sdk`);
- php:    the same plus a pool of N no-op workers in plain php-cli speaking Goridge directly.

Every email then makes one round trip to a worker (event JSON in the context, empty body) before
the store records it and the client gets its 250. The load comes from benchmarks/loadgen.py
in another process (reuse mode: one connection per session, PIPELINING), run as
benchmarks/ingest.py runs it; its helpers are imported, not copied. Two scenarios:

- load: C connections x M emails of S bytes;
- solo: one connection sending `--solo` emails one after another: the round trip a worker adds
  to one email with no contention (the load's p50 includes queueing behind other sessions).

Each scenario runs `--rounds` times on the same server; the table shows the median round (by
emails/s) and the CPU of all rounds.

The table shows, per target: emails answered 250, failures, emails/s, p50/p99 latency, the ratio
of emails/s to the store alone, the p50 added to the store alone's, and CPU seconds per 1,000
emails of mailpipe and of its worker processes. Each email is checked to have reached a worker
(`mailpipe_worker_exec_seconds_count`) and the store (its message count).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (  # a sibling script, not a package
    REPO,
    LoadRow,
    Server,
    StartError,
    announce,
    bench_parser,
    cpu_seconds,
    failure_note,
    failures_note,
    fmt,
    group_spec,
    mailpipe_config,
    mailpipe_server,
    parse_bench_args,
    print_row_notes,
    print_table,
    raise_fd_limit,
    run_load,
    start_server,
    summarize_rounds,
    write_report,
)

TARGETS = ("store", "python", "php")
ADDED_LATENCY_GOAL_MS = 0.3

# A no-op worker on the Python SDK: answer CONTINUE to every email.
PYTHON_NOOP = """\
from mailpipe.sdk import Worker

worker = Worker.create()
for email in worker:
    worker.respond_continue()
"""

# A no-op worker in plain PHP (no composer): RoadRunner's protocol over STDIN/STDOUT with the
# frame code of examples/php/goridge_worker.php, minus everything but the answer.
PHP_NOOP = """<?php
declare(strict_types=1);

require getenv('GORIDGE_PHP');

while (next_request() !== null) {
    respond('CONTINUE');
}
"""
GORIDGE_PHP = REPO / "examples" / "php" / "goridge.php"


@dataclass
class Row(LoadRow):
    workers: int = 0
    server_cpu_per_1000: float = float("nan")
    workers_cpu_per_1000: float = float("nan")
    worker_execs: int | None = None


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def workers_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each worker process (mailpipe's children) right now."""
    usage: dict[int, float] = {}
    for child in children(pid):
        try:
            usage[child] = cpu_seconds(child)
        except (OSError, ValueError):
            continue
    return usage


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def worker_execs(server: Server) -> int:
    for line in server.http_get("/metrics").decode().splitlines():
        if line.startswith("mailpipe_worker_exec_seconds_count"):
            return int(float(line.split()[-1]))
    return 0


def make_mailpipe(target: str, workers: int, workdir: Path) -> Server:
    """mailpipe configured as ingest.py configures it, plus the worker pool for `target`."""
    config = mailpipe_config()
    server: dict[str, Any] | None = None
    if target == "python":
        script = workdir / "noop_worker.py"
        script.write_text(PYTHON_NOOP)
        server = {"command": [sys.executable, str(script)]}
    elif target == "php":
        php = shutil.which("php")
        if php is None:
            raise StartError("php is not installed (Debian package php-cli)")
        script = workdir / "noop_worker.php"
        script.write_text(PHP_NOOP)
        server = {"command": [php, str(script)], "env": {"GORIDGE_PHP": str(GORIDGE_PHP)}}
    if server is not None:
        config["server"] = server
        config["smtp"]["pool"] = {"num_workers": workers, "allocate_timeout": "120s"}
    return mailpipe_server(target, workdir, config)


def measure(
    server: Server, row: Row, groups: list[dict[str, Any]], rounds: int, timeout: float
) -> None:
    """Run the load `rounds` times; fill the row with the median round and CPU per email."""
    cpu_before = workers_cpu(server.pid)
    execs_before = worker_execs(server)
    stored_before = server.stored_total() or 0
    results = [run_load(server, groups, timeout) for _ in range(rounds)]
    summarize_rounds(row, results)
    if row.emails:
        row.server_cpu_per_1000 = sum(r.server_cpu_s for r in results) / row.emails * 1000
        if row.workers:
            workers_cpu_s = cpu_delta(cpu_before, workers_cpu(server.pid))
            row.workers_cpu_per_1000 = workers_cpu_s / row.emails * 1000
    row.stored = (server.stored_total() or 0) - stored_before
    if row.workers:
        row.worker_execs = worker_execs(server) - execs_before


def bench_target(target: str, args: argparse.Namespace, root: Path) -> tuple[Row, Row]:
    workers = 0 if target == "store" else args.workers
    load = Row(target, "load", workers)
    solo = Row(target, "solo", workers)
    server, note = start_server(target, root, lambda d: make_mailpipe(target, workers, d))
    if server is None:
        load.note = solo.note = note
        return load, solo
    try:
        warmup = [group_spec("load", 10, 10, args.size, "reuse")]
        run_load(server, warmup, args.timeout)  # imports, caches, JIT-free but still
        spec = [group_spec("load", args.connections, args.messages, args.size, "reuse")]
        measure(server, load, spec, args.rounds, args.timeout)
        if args.solo:
            solo_spec = [group_spec("load", 1, args.solo, args.size, "reuse")]
            measure(server, solo, solo_spec, args.rounds, args.timeout)
    except Exception as exc:
        load.note = failure_note(exc)
    finally:
        code = server.stop()
        if code not in (0, None):
            load.note += f" exit status {code} after SIGTERM"
    return load, solo


def print_rows(title: str, rows: list[Row]) -> None:
    print(f"\n== {title}")
    base = next((r for r in rows if r.target == "store" and r.emails), None)
    headers = [
        "target",
        "workers",
        *LoadRow.HEADERS,
        "vs store",
        "added p50 ms",
        "mailpipe CPU-s/1000",
        "workers CPU-s/1000",
    ]
    table = []
    for row in rows:
        ratio = added = float("nan")
        if base is not None and row.emails:
            ratio = row.emails_per_s / base.emails_per_s
            added = row.p50_ms - base.p50_ms
        table.append([
            row.target,
            fmt(row.workers),
            *row.cells(),
            "-" if ratio != ratio else f"{ratio:.2f}x",
            "-" if added != added else f"{added:+.3f}",
            fmt(row.server_cpu_per_1000, 3),
            fmt(row.workers_cpu_per_1000, 3),
        ])  # fmt: skip
    print_table(headers, table)
    for row in rows:
        notes = [row.note] if row.note else []
        if row.emails and row.stored is not None and row.stored != row.emails:
            notes.append(f"stored {row.stored} != {row.emails} answered 250")
        if row.worker_execs is not None and row.worker_execs != row.emails + row.failed:
            notes.append(f"worker execs {row.worker_execs} != {row.emails + row.failed} emails")
        if row.failures:
            notes.append(failures_note(row.failures))
        print_row_notes(row.target, notes)


def verdicts(load: list[Row], solo: list[Row]) -> list[str]:
    lines = []
    base_solo = next((r for r in solo if r.target == "store" and r.emails), None)
    base_load = next((r for r in load if r.target == "store" and r.emails), None)
    for row in solo:
        if base_solo is not None and row.target != "store" and row.emails:
            added = row.p50_ms - base_solo.p50_ms
            verdict = "OK" if added < ADDED_LATENCY_GOAL_MS else "OVER"
            lines.append(
                f"{row.target}: round trip adds {added:.3f} ms per email alone "
                f"(goal < {ADDED_LATENCY_GOAL_MS} ms): {verdict}"
            )
    for row in load:
        if base_load is not None and row.target != "store" and row.emails:
            ratio = row.emails_per_s / base_load.emails_per_s
            lines.append(
                f"{row.target}: {row.workers} workers carry {ratio:.0%} of the store-only "
                f"rate under load"
            )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, TARGETS)
    parser.add_argument("--workers", type=int, default=4, help="workers per pool")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario; median shown")
    parser.add_argument(
        "--solo", type=int, default=500, help="emails sent one by one on one connection (0: skip)"
    )
    positive = ["workers", "connections", "messages", "rounds", "size"]
    return parse_bench_args(parser, argv, TARGETS, positive)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="mailpipe-bench-workers-"))
    command, machine = announce(root)
    php = shutil.which("php")
    if php and "php" in args.target_list:
        version = os.popen(f"{shlex.quote(php)} -r 'echo PHP_VERSION;'").read().strip()
        print(f"php: {php} {version}")
    print(
        f"load: {args.connections} connections x {args.messages} emails x {args.size} bytes, "
        f"reuse mode; solo: 1 connection x {args.solo}; {args.rounds} round(s) each, median shown"
    )
    started_at = time.monotonic()
    load_rows: list[Row] = []
    solo_rows: list[Row] = []
    try:
        for target in args.target_list:
            load, solo = bench_target(target, args, root)
            load_rows.append(load)
            solo_rows.append(solo)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_rows(f"load: {args.connections} connections x {args.messages} emails (reuse)", load_rows)
    if args.solo:
        print_rows(f"solo: 1 connection x {args.solo} emails, one at a time", solo_rows)
    lines = verdicts(load_rows, solo_rows if args.solo else [])
    if lines:
        print()
        print("\n".join(lines))
    report = {
        "command": command,
        "machine": machine,
        "args": vars(args),
        "load": [asdict(r) for r in load_rows],
        "solo": [asdict(r) for r in solo_rows],
    }
    write_report(report, started_at, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
