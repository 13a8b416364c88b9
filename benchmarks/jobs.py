"""Jobs benchmark: emails/s through each pipeline driver, batching on and off, beside the store
alone, in one run.

    python benchmarks/jobs.py [--drivers sqlite,redis,amqp,nats] [--connections 100]
                              [--messages 20] [--size 1024] [--rounds 5] [--batch-size 100]
                              [--flush-interval 5ms] [--json FILE]

Every configuration is a fresh `python -m mailpipe serve` process (configured as
benchmarks/ingest.py configures it: store on with `synchronous: FULL`, retention that deletes
nothing) on a fresh pipeline (a unique stream, queue or SQLite file, removed afterwards):

- store:  the capture core alone (SMTP, parsing, SQLite commit before the 250), no jobs; it
  runs first and last, and the mean of the two is the reference (the machine drifts);
- DRIVER batching on:  plus `smtp.jobs` pushing each email as a job, `batch_size` 100 and
  `flush_interval` 5ms (the defaults): concurrent sessions share one broker round trip;
- DRIVER batching off: the same with `batch_size` 1: one push per email.

The 250 waits for both the store's commit and the broker's confirmation of the batch holding
the email (fsync, XADD reply, publisher confirm, PubAck). The load comes from
benchmarks/loadgen.py in another process (reuse mode: one connection per session,
PIPELINING), run through benchmarks/ingest.py's helpers, which are imported, not copied.

Each configuration runs a small warm-up, then `--rounds` rounds of C connections x M emails;
the table shows the median round (by emails/s). Every email answered 250 is checked to be in
the pipeline (`mailpipe_jobs_confirmed_total` and the driver's own count of waiting jobs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (  # a sibling script, not a package
    HOST,
    Server,
    StartError,
    cpu_model,
    filesystem_of,
    fmt,
    group_spec,
    mailpipe_config,
    mailpipe_server,
    print_table,
    raise_fd_limit,
    run_load,
)

DRIVERS = ("sqlite", "redis", "amqp", "nats")
BROKERS = {"redis": ("127.0.0.1", 6379), "amqp": ("127.0.0.1", 5672), "nats": ("127.0.0.1", 4222)}
ADDRS = {
    "redis": "redis://127.0.0.1:6379/0",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
}
GOAL_RATIO = 0.80  # batching keeps sqlite and redis within 80% of the store alone
GOAL_DRIVERS = ("sqlite", "redis")
WARMUP = (10, 10)  # connections x emails before the measured rounds (in the pipeline too)


@dataclass
class Row:
    target: str  # "store" or a driver
    batching: str  # "-", "on", "off"
    batch_size: int = 0
    emails: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    emails_per_s: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    cpu_per_1000: float = float("nan")
    mean_batch: float = float("nan")
    confirmed: int | None = None
    in_pipeline: int | None = None
    stored: int | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)
    note: str = ""

    @property
    def label(self) -> str:
        return self.target if self.batching == "-" else f"{self.target} ({self.batching})"


# ---- pipelines on the real brokers ------------------------------------------------------------


def reachable(driver: str) -> bool:
    if driver not in BROKERS:
        return True
    try:
        socket.create_connection(BROKERS[driver], timeout=1).close()
        return True
    except OSError:
        return False


def pipeline_config(driver: str, name: str, workdir: Path) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if driver == "sqlite":
        options["path"] = str(workdir / "jobs.db")
    else:
        options["addr"] = ADDRS[driver]
    if driver == "amqp":
        options["exchange"] = f"{name}-ex"
    return {"driver": driver, "config": options}


def make_driver(driver: str, name: str, workdir: Path) -> Any:
    from mailpipe.config import PipelineConfig
    from mailpipe.jobs.drivers import make_driver as make

    config = PipelineConfig.model_validate(pipeline_config(driver, name, workdir))
    return make(name, config, data_dir=workdir)


async def waiting_jobs(driver: str, name: str, workdir: Path) -> int:
    """Jobs waiting in the pipeline (nothing consumes them during the benchmark)."""
    instance = make_driver(driver, name, workdir)
    await instance.connect()
    try:
        stats = await instance.stats()
        return int(stats.ready + stats.reserved + stats.delayed)
    finally:
        await instance.close()


async def remove_pipeline(driver: str, name: str, workdir: Path) -> None:
    """Delete what mailpipe declared for the pipeline (SQLite: the temp dir goes anyway)."""
    instance = make_driver(driver, name, workdir)
    if driver == "redis":
        from redis.asyncio import Redis

        client = Redis.from_url(ADDRS["redis"], socket_timeout=5)
        try:
            await client.delete(
                instance.stream, f"{instance.stream}:delayed", f"{instance.stream}:dead"
            )
        finally:
            await client.aclose()
    elif driver == "amqp":
        import aio_pika

        connection = await aio_pika.connect(ADDRS["amqp"], timeout=5)
        async with connection:
            exchange = f"{name}-ex"
            for kind, item in (
                ("queue", instance.queue),
                ("queue", f"{instance.queue}.dead"),
                ("exchange", exchange),
                ("exchange", f"{exchange}.dlx"),
            ):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    if kind == "queue":
                        await channel.queue_delete(item)
                    else:
                        await channel.exchange_delete(item)
    elif driver == "nats":
        import nats

        nc = await nats.connect(ADDRS["nats"], connect_timeout=2, allow_reconnect=False)
        try:
            js = nc.jetstream()
            for stream in (instance.stream, instance.dead_stream):
                with contextlib.suppress(Exception):
                    await js.delete_stream(stream)
        finally:
            await nc.close()


# ---- mailpipe -----------------------------------------------------------------------------------


def make_mailpipe(label: str, workdir: Path, jobs: dict[str, Any] | None) -> Server:
    config = mailpipe_config()
    if jobs is not None:
        config["smtp"]["jobs"] = jobs["smtp"]
        config["jobs"] = {"pipelines": jobs["pipelines"]}
    return mailpipe_server(label, workdir, config)


def metrics_text(server: Server) -> str:
    url = f"http://{HOST}:{server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def bench(row: Row, args: argparse.Namespace, root: Path) -> Row:
    workdir = Path(tempfile.mkdtemp(prefix=f"{row.target}-{row.batching}-", dir=root))
    name = f"bench-{uuid.uuid4().hex[:10]}"
    jobs = None
    if row.target != "store":
        if not reachable(row.target):
            row.note = f"skipped: {row.target} broker not reachable on {BROKERS[row.target]}"
            return row
        jobs = {
            "smtp": {"pipeline": name, "batch_size": row.batch_size,
                     "flush_interval": args.flush_interval},
            "pipelines": {name: pipeline_config(row.target, name, workdir)},
        }  # fmt: skip
    server = make_mailpipe(row.label, workdir, jobs)
    try:
        server.start()
    except StartError as exc:
        row.note = f"did not start: {exc}"[:600]
        return row
    try:
        time.sleep(0.5)  # let it settle, as ingest.py does
        warmup = [group_spec("load", *WARMUP, args.size, "reuse")]
        run_load(server, warmup, args.timeout)
        before = metrics_text(server)
        stored_before = server.stored_total() or 0
        spec = [group_spec("load", args.connections, args.messages, args.size, "reuse")]
        results = [run_load(server, spec, args.timeout) for _ in range(args.rounds)]
        after = metrics_text(server)
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
            row.cpu_per_1000 = sum(r.server_cpu_s for r in results) / row.emails * 1000
        row.stored = (server.stored_total() or 0) - stored_before
        if jobs is not None:
            count, total = "mailpipe_jobs_batch_size_count", "mailpipe_jobs_batch_size_sum"
            batches = metric(after, count) - metric(before, count)
            if batches:
                row.mean_batch = (metric(after, total) - metric(before, total)) / batches
            row.confirmed = int(metric(after, "mailpipe_jobs_confirmed_total"))
    except Exception as exc:  # report it in the table and go on with the next configuration
        row.note = f"run failed: {type(exc).__name__}: {exc}"[:600]
    finally:
        code = server.stop()
        if code not in (0, None):
            row.note += f" exit status {code} after SIGTERM"
    if jobs is not None:
        try:
            row.in_pipeline = asyncio.run(waiting_jobs(row.target, name, workdir))
        except Exception as exc:
            row.note += f" could not count the pipeline: {type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                asyncio.run(remove_pipeline(row.target, name, workdir))
    return row


# ---- report -------------------------------------------------------------------------------------


def reference(rows: list[Row]) -> float | None:
    stores = [r.emails_per_s for r in rows if r.target == "store" and r.emails]
    return sum(stores) / len(stores) if stores else None


def print_rows(rows: list[Row], args: argparse.Namespace) -> None:
    base = reference(rows)
    print(
        f"\n== {args.connections} connections x {args.messages} emails x {args.size} bytes "
        f"(reuse), batching on = batch_size {args.batch_size} + flush_interval "
        f"{args.flush_interval}, off = batch_size 1"
    )
    headers = ["driver", "batching", "emails", "failed", "emails/s", "p50 ms", "p99 ms",
               "vs store", "mean batch", "CPU-s/1000", "in pipeline"]  # fmt: skip
    table = []
    for row in rows:
        ratio = row.emails_per_s / base if base and row.emails else float("nan")
        table.append([
            row.target,
            row.batching,
            fmt(row.emails),
            fmt(row.failed),
            fmt(row.emails_per_s, 0),
            fmt(row.p50_ms, 2),
            fmt(row.p99_ms, 2),
            "-" if ratio != ratio else f"{ratio:.2f}x",
            fmt(row.mean_batch, 1),
            fmt(row.cpu_per_1000, 3),
            fmt(row.in_pipeline),
        ])  # fmt: skip
    print_table(headers, table)
    if base:
        print(f"store-only reference: {base:,.0f} emails/s (mean of the first and last store runs)")
    for row in rows:
        notes = [row.note.strip()] if row.note.strip() else []
        warmup = WARMUP[0] * WARMUP[1]
        if row.in_pipeline is not None and row.emails and row.in_pipeline != row.emails + warmup:
            notes.append(
                f"in pipeline {row.in_pipeline} != {row.emails} answered 250 + {warmup} warm-up"
            )
        if row.stored is not None and row.emails and row.stored != row.emails:
            notes.append(f"stored {row.stored} != {row.emails} answered 250")
        if row.failures:
            notes.append("failures " + ", ".join(f"{k} x{v}" for k, v in row.failures.items()))
        if notes:
            print(f"  {row.label}: " + "; ".join(notes))


def verdicts(rows: list[Row]) -> list[str]:
    base = reference(rows)
    lines = []
    if not base:
        return lines
    for row in rows:
        if row.target in GOAL_DRIVERS and row.batching == "on" and row.emails:
            ratio = row.emails_per_s / base
            verdict = "OK" if ratio >= GOAL_RATIO else "UNDER"
            lines.append(
                f"{row.target} with batching: {ratio:.0%} of the store-only rate "
                f"(goal >= {GOAL_RATIO:.0%}): {verdict}"
            )
    by_key = {(r.target, r.batching): r for r in rows if r.emails}
    for driver in DRIVERS:
        on, off = by_key.get((driver, "on")), by_key.get((driver, "off"))
        if on and off:
            lines.append(
                f"{driver}: batching on/off = {on.emails_per_s / off.emails_per_s:.2f}x "
                f"emails/s, p50 {on.p50_ms:.1f} vs {off.p50_ms:.1f} ms"
            )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--drivers", default=",".join(DRIVERS), help=f"comma-separated, from {','.join(DRIVERS)}"
    )
    parser.add_argument("--connections", type=int, default=100, help="concurrent connections")
    parser.add_argument("--messages", type=int, default=20, help="emails per connection")
    parser.add_argument("--size", type=int, default=1024, help="bytes per email")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per configuration; median")
    parser.add_argument("--batch-size", type=int, default=100, help="batching on: batch_size")
    parser.add_argument("--flush-interval", default="5ms", help="batching on: flush_interval")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per load run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.driver_list = [d.strip() for d in args.drivers.split(",") if d.strip()]
    unknown = set(args.driver_list) - set(DRIVERS)
    if unknown:
        parser.error(f"unknown drivers: {', '.join(sorted(unknown))}")
    if min(args.connections, args.messages, args.rounds, args.size, args.batch_size) < 1:
        parser.error(
            "--connections, --messages, --rounds, --size and --batch-size must be positive"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="mailpipe-bench-jobs-"))
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    print(
        f"machine: nproc={os.cpu_count()} python={platform.python_version()} "
        f"cpu={cpu_model()} ({platform.platform()}; data dirs on {filesystem_of(root)})"
    )
    print(f"brokers: {', '.join(f'{d} {ADDRS[d]}' for d in args.driver_list if d in ADDRS)}")
    print(
        f"load: {args.connections} connections x {args.messages} emails x {args.size} bytes, "
        f"reuse mode; {args.rounds} round(s) per configuration, median shown"
    )
    plan = [Row("store", "-")]
    for driver in args.driver_list:
        plan += [Row(driver, "on", args.batch_size), Row(driver, "off", 1)]
    plan.append(Row("store", "-"))
    started_at = time.monotonic()
    rows: list[Row] = []
    try:
        for row in plan:
            rows.append(bench(row, args, root))
            print(
                f"  {row.label}: {fmt(row.emails_per_s, 0)} emails/s {row.note.strip()}".rstrip(),
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_rows(rows, args)
    lines = verdicts(rows)
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
            "reference_emails_per_s": reference(rows),
            "rows": [asdict(r) for r in rows],
        }
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
