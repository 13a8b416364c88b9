"""Worker benchmark: emails/s and latency through N no-op workers vs the store alone, one run.

    python benchmarks/workers.py [--workers 4] [--connections 100] [--messages 20]
                                 [--size 1024] [--rounds 5] [--targets store,python,php]
                                 [--solo 500] [--json FILE]

Three mailpipe configurations, each a fresh `python -m mailpipe serve` process:

- store:  the capture core alone (SMTP, parsing, SQLite commit before the 250), no workers;
- python: the same plus a pool of N no-op workers on the Python SDK (`mailpipe.worker`);
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
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (  # a sibling script, not a package
    HOST,
    REPO,
    Server,
    StartError,
    cpu_model,
    cpu_seconds,
    filesystem_of,
    fmt,
    free_port,
    group_spec,
    print_table,
    raise_fd_limit,
    run_load,
)

TARGETS = ("store", "python", "php")
ADDED_LATENCY_GOAL_MS = 0.3

# A no-op worker on the Python SDK: answer CONTINUE to every email.
PYTHON_NOOP = """\
from mailpipe.worker import Worker

worker = Worker.create()
for email in worker:
    worker.respond_continue()
"""

# A no-op worker in plain PHP (no composer): RoadRunner's protocol over STDIN/STDOUT, as
# examples/php/goridge_worker.php speaks it, minus everything but the answer.
PHP_NOOP = r"""<?php
declare(strict_types=1);

function frame(int $flags, string $payload, array $options = []): string
{
    $head = pack('CCV', 0x10 | (3 + count($options)), $flags, strlen($payload));
    return $head . pack('VCC', crc32($head), 0, 0) . ($options ? pack('V*', ...$options) : '')
        . $payload;
}

function read_exactly(int $size): ?string
{
    $data = '';
    while (strlen($data) < $size) {
        $chunk = fread(STDIN, $size - strlen($data));
        if ($chunk === false || $chunk === '') {
            if (feof(STDIN)) {
                return null;
            }
            continue;
        }
        $data .= $chunk;
    }
    return $data;
}

$continue = frame(0, 'CONTINUE', [8]);
while (($header = read_exactly(12)) !== null) {
    $h = unpack('Cb0/Cflags/Vlength', $header);
    $rest = 4 * (($h['b0'] & 0x0F) - 3) + $h['length'];
    $data = $rest > 0 ? read_exactly($rest) : '';
    if ($data === null) {
        exit(0);
    }
    if ($h['flags'] & 0x01) {
        $command = json_decode(substr($data, -$h['length']), true);
        if (!empty($command['stop'])) {
            exit(0);
        }
        fwrite(STDOUT, frame(0x01, json_encode(['pid' => getmypid()])));
        continue;
    }
    fwrite(STDOUT, $continue);
}
"""


@dataclass
class Row:
    target: str
    scenario: str
    workers: int = 0
    emails: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    emails_per_s: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    server_cpu_per_1000: float = float("nan")
    workers_cpu_per_1000: float = float("nan")
    worker_execs: int | None = None
    stored: int | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)
    note: str = ""


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


def get_text(server: Server, path: str) -> str:
    url = f"http://{HOST}:{server.http_port}{path}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def worker_execs(server: Server) -> int:
    for line in get_text(server, "/metrics").splitlines():
        if line.startswith("mailpipe_worker_exec_seconds_count"):
            return int(float(line.split()[-1]))
    return 0


def make_mailpipe(target: str, workers: int, workdir: Path) -> Server:
    """mailpipe configured as ingest.py configures it, plus the worker pool for `target`."""
    smtp_port, http_port = free_port(), free_port()
    config: dict[str, Any] = {
        "shutdown_timeout": "10s",
        "smtp": {"max_connections": 5000, "max_message_size": "64MB"},
        "store": {"max_messages": 10_000_000},
    }
    if target == "python":
        script = workdir / "noop_worker.py"
        script.write_text(PYTHON_NOOP)
        command = [sys.executable, str(script)]
    elif target == "php":
        php = shutil.which("php")
        if php is None:
            raise StartError("php is not installed (Debian package php-cli)")
        script = workdir / "noop_worker.php"
        script.write_text(PHP_NOOP)
        command = [php, str(script)]
    else:
        command = None
    if command is not None:
        config["server"] = {"command": command}
        config["smtp"]["pool"] = {"num_workers": workers, "allocate_timeout": "120s"}
    config_path = workdir / "mailpipe.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    argv = [
        sys.executable, "-m", "mailpipe", "serve",
        "-c", str(config_path),
        "--smtp", f"{HOST}:{smtp_port}",
        "--http", f"{HOST}:{http_port}",
        "--data-dir", str(workdir / "data"),
        "--log-level", "warning",
    ]  # fmt: skip
    return Server(target, argv, workdir, smtp_port, http_port, env)


def measure(
    server: Server, row: Row, groups: list[dict[str, Any]], rounds: int, timeout: float
) -> None:
    """Run the load `rounds` times; fill the row with the median round and CPU per email."""
    cpu_before = workers_cpu(server.pid)
    execs_before = worker_execs(server)
    stored_before = server.stored_total() or 0
    results = [run_load(server, groups, timeout) for _ in range(rounds)]
    loads = [result.group() for result in results]
    row.emails = sum(g["ok"] for g in loads)
    row.failed = sum(g["failed"] for g in loads)
    for g in loads:
        for key, count in g["failures"].items():
            row.failures[key] = row.failures.get(key, 0) + count
    row.rounds = [
        {"emails_per_s": g["emails_per_s"], "p50_ms": g["latency_ms"]["p50"],
         "p99_ms": g["latency_ms"]["p99"]}
        for g in loads
    ]  # fmt: skip
    median = sorted(loads, key=lambda g: g["emails_per_s"])[len(loads) // 2]
    row.emails_per_s = median["emails_per_s"]
    row.p50_ms = median["latency_ms"]["p50"]
    row.p99_ms = median["latency_ms"]["p99"]
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
    workdir = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=root))
    try:
        server = make_mailpipe(target, workers, workdir)
        server.start()
    except StartError as exc:
        load.note = solo.note = f"did not start: {exc}"[:600]
        return load, solo
    try:
        time.sleep(0.5)  # let it settle
        warmup = [group_spec("load", 10, 10, args.size, "reuse")]
        run_load(server, warmup, args.timeout)  # imports, caches, JIT-free but still
        spec = [group_spec("load", args.connections, args.messages, args.size, "reuse")]
        measure(server, load, spec, args.rounds, args.timeout)
        if args.solo:
            solo_spec = [group_spec("load", 1, args.solo, args.size, "reuse")]
            measure(server, solo, solo_spec, args.rounds, args.timeout)
    except Exception as exc:  # report it in the table and go on with the next target
        load.note = f"run failed: {type(exc).__name__}: {exc}"[:600]
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
        "emails",
        "failed",
        "emails/s",
        "p50 ms",
        "p99 ms",
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
            fmt(row.emails),
            fmt(row.failed),
            fmt(row.emails_per_s, 0),
            fmt(row.p50_ms, 2),
            fmt(row.p99_ms, 2),
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
            notes.append("failures " + ", ".join(f"{k} x{v}" for k, v in row.failures.items()))
        if notes:
            print(f"  {row.target}: " + "; ".join(notes))


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
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4, help="workers per pool")
    parser.add_argument("--connections", type=int, default=100, help="concurrent connections")
    parser.add_argument("--messages", type=int, default=20, help="emails per connection")
    parser.add_argument("--size", type=int, default=1024, help="bytes per email")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario; median shown")
    parser.add_argument(
        "--solo", type=int, default=500, help="emails sent one by one on one connection (0: skip)"
    )
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated, from {','.join(TARGETS)}"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per load run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.target_list) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if min(args.workers, args.connections, args.messages, args.rounds, args.size) < 1:
        parser.error("--workers, --connections, --messages, --rounds and --size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="mailpipe-bench-workers-"))
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    print(
        f"machine: nproc={os.cpu_count()} python={platform.python_version()} "
        f"cpu={cpu_model()} ({platform.platform()}; data dirs on {filesystem_of(root)})"
    )
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
    elapsed = time.monotonic() - started_at
    print(f"\n(total {elapsed:.0f}s)")
    if args.json:
        report = {
            "command": command,
            "args": vars(args),
            "elapsed_s": elapsed,
            "load": [asdict(r) for r in load_rows],
            "solo": [asdict(r) for r in solo_rows],
        }
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
