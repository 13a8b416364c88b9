"""Ingest benchmark: mailpipe next to a bare aiosmtpd sink (and Postfix's smtp-sink), one run.

    python benchmarks/ingest.py [--connections 100] [--messages 20] [--size 1024]
                                [--mode reuse|new|both] [--targets mailpipe,aiosmtpd,smtp-sink]
                                [--rounds 5] [--big] [--json FILE]

Every server runs as its own process, started fresh for each mode (mailpipe with a fresh data
directory); the load comes from benchmarks/loadgen.py in another process. The machine is small
and noisy, so what matters is the side-by-side comparison within one run, not the absolute
numbers. See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOADGEN = HERE / "loadgen.py"
AIOSMTPD_SINK = HERE / "aiosmtpd_sink.py"
SMTP_SINK = Path("/usr/sbin/smtp-sink")
TARGETS = ("mailpipe", "aiosmtpd", "smtp-sink")
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024

# --big
BIG_CONNECTIONS = 1000
BIG_CONNECTIONS_RSS_GOAL_MB = 100
BIG_MESSAGE_SIZE = 20 * 1000 * 1000
BIG_MESSAGE_SESSIONS = 10
SMALL_SESSIONS = 20
SMALL_BASELINE_MESSAGES = 50


class StartError(Exception):
    """A server did not come up; the message says why (its exit status and last log lines)."""


# ---- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def read_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Server:
    """One server under test, as a subprocess with its stderr kept in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        smtp_port: int,
        http_port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.smtp_port = smtp_port
        self.http_port = http_port
        self.env = env
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"exited with status {self.proc.returncode}: {self.log_tail()}")
            if self._smtp_ready() and self._http_ready():
                return
            time.sleep(0.1)
        self.stop()
        raise StartError(f"not ready after {timeout:.0f}s: {self.log_tail()}")

    def _smtp_ready(self) -> bool:
        try:
            with socket.create_connection((HOST, self.smtp_port), timeout=2) as sock:
                greeting = sock.recv(512)
                with contextlib.suppress(OSError):
                    sock.sendall(b"QUIT\r\n")
                    sock.recv(512)
                return greeting.startswith(b"220")
        except OSError:
            return False

    def _http_ready(self) -> bool:
        if self.http_port is None:
            return True
        try:
            url = f"http://{HOST}:{self.http_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def http_get(self, path: str) -> bytes:
        """mailpipe only: GET a path of its HTTP API."""
        url = f"http://{HOST}:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return bytes(response.read())

    def stored_total(self) -> int | None:
        """mailpipe only: the store's message count from the API."""
        if self.http_port is None:
            return None
        return int(json.loads(self.http_get("/api/v1/messages?limit=1"))["total"])

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def log_tail(self, lines: int = 8) -> str:
        return " | ".join(line.strip() for line in self.log_lines()[-lines:]) or "(no output)"


def mailpipe_config() -> dict[str, Any]:
    """A store big enough that retention deletes nothing (the count check), room for --big's
    1000 connections and 20 MB messages, a short shutdown."""
    return {
        "shutdown_timeout": "10s",
        "smtp": {"max_connections": 5000, "max_message_size": "64MB"},
        "store": {"max_messages": 10_000_000},
    }


def mailpipe_server(name: str, workdir: Path, config: dict[str, Any]) -> Server:
    """`python -m mailpipe serve` from this checkout with `config`, on free ports."""
    smtp_port, http_port = free_port(), free_port()
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
    return Server(name, argv, workdir, smtp_port, http_port, env)


def make_server(name: str, workdir: Path) -> Server:
    if name == "mailpipe":
        return mailpipe_server(name, workdir, mailpipe_config())
    smtp_port = free_port()
    if name == "aiosmtpd":
        argv = [sys.executable, str(AIOSMTPD_SINK), HOST, str(smtp_port)]
        return Server(name, argv, workdir, smtp_port)
    if name == "smtp-sink":
        # -u: required as root (it drops to that user after binding); -m: concurrent sessions.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        argv = [str(SMTP_SINK), *user, "-m", "5000", f"{HOST}:{smtp_port}", "1024"]
        return Server(name, argv, workdir, smtp_port)
    raise ValueError(name)


def raise_fd_limit() -> None:
    """Children inherit it: 1000 connections need more than a default 1024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---- load -------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One load-generator run against one server, with the server's CPU during it."""

    client: dict[str, Any]
    server_cpu_s: float

    def group(self, name: str = "load") -> dict[str, Any]:
        return dict(self.client["groups"][name])


def run_load(server: Server, groups: list[dict[str, Any]], timeout: float) -> LoadResult:
    spec = {"host": HOST, "port": server.smtp_port, "timeout": timeout, "groups": groups}
    cpu_before = cpu_seconds(server.pid)
    done = subprocess.run(
        [sys.executable, str(LOADGEN), json.dumps(spec)],
        capture_output=True,
        timeout=timeout + 60,
        check=False,
    )
    cpu_after = cpu_seconds(server.pid)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return LoadResult(json.loads(done.stdout), cpu_after - cpu_before)


def group_spec(
    name: str, connections: int, messages: int, size: int, mode: str, **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "connections": connections,
        "messages": messages,
        "size": size,
        "mode": mode,
        **extra,
    }


# ---- results ----------------------------------------------------------------------------------


@dataclass
class LoadRow:
    """What a row of every benchmark's table has; `summarize_rounds` fills most of it."""

    target: str
    scenario: str
    _: KW_ONLY
    emails: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    emails_per_s: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    stored: int | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)
    note: str = ""

    # The columns every table has, after the target's.
    HEADERS = ("emails", "failed", "emails/s", "p50 ms", "p99 ms")

    def cells(self) -> list[str]:
        return [
            fmt(self.emails),
            fmt(self.failed),
            fmt(self.emails_per_s, 0),
            fmt(self.p50_ms, 2),
            fmt(self.p99_ms, 2),
        ]


@dataclass
class Row(LoadRow):
    max_ms: float = float("nan")
    cpu_s: float = float("nan")
    cpu_s_per_1000: float = float("nan")
    idle_rss_mb: float = float("nan")
    peak_rss_mb: float = float("nan")
    client_cpu_pct: float = float("nan")
    peak_connections: int = 0
    exit_code: int | None = None
    log_lines: int = 0
    log_sample: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def print_load_table(title: str, rows: list[Row], with_connections: bool = False) -> None:
    print(f"\n== {title}")
    headers = [
        "target",
        *LoadRow.HEADERS,
        "CPU-s/1000",
        "idle RSS MB",
        "peak RSS MB",
        "client CPU%",
    ]
    if with_connections:
        headers.append("open conns")
    table: list[list[str]] = []
    for row in rows:
        if row.note and not row.emails:
            table.append(
                [row.target, "-", "-", "-", "-", "-", "-", "-", "-", "-"]
                + (["-"] if with_connections else [])
            )
            continue
        cells = [
            row.target,
            *row.cells(),
            fmt(row.cpu_s_per_1000, 3),
            fmt(row.idle_rss_mb),
            fmt(row.peak_rss_mb),
            fmt(row.client_cpu_pct, 0),
        ]
        if with_connections:
            cells.append(fmt(row.peak_connections))
        table.append(cells)
    print_table(headers, table)
    print_ratio(rows)
    print_notes(rows)


def print_ratio(rows: list[Row]) -> None:
    by_name = {row.target: row for row in rows if row.emails}
    mailpipe, baseline = by_name.get("mailpipe"), by_name.get("aiosmtpd")
    if mailpipe and baseline:
        ratio = mailpipe.emails_per_s / baseline.emails_per_s
        print(f"mailpipe/aiosmtpd emails/s: {ratio:.2f}x")


def print_notes(rows: list[Row]) -> None:
    for row in rows:
        notes: list[str] = []
        if row.note:
            notes.append(row.note)
        if row.stored is not None:
            sent = row.emails + row.failed
            verdict = "OK" if row.stored == row.emails else "MISMATCH (lost or extra emails)"
            notes.append(f"stored {row.stored}, sent {sent}, got 250 {row.emails}: {verdict}")
        if row.failures:
            notes.append(failures_note(row.failures))
        if row.exit_code not in (None, 0, -signal.SIGTERM):
            notes.append(f"exit status {row.exit_code} after SIGTERM")
        if row.log_lines:
            notes.append(f"{row.log_lines} log lines, e.g. {row.log_sample}")
        print_row_notes(row.target, notes)


def summarize_rounds(row: LoadRow, results: list[LoadResult]) -> list[dict[str, Any]]:
    """Fill a row from the rounds of one load: totals over all rounds, emails/s and latency
    of the median round (by emails/s). Returns the rounds' "load" groups."""
    groups = [result.group() for result in results]
    row.emails = sum(g["ok"] for g in groups)
    row.failed = sum(g["failed"] for g in groups)
    for g in groups:
        for key, count in g["failures"].items():
            row.failures[key] = row.failures.get(key, 0) + count
    row.rounds = [
        {
            "emails_per_s": g["emails_per_s"],
            "p50_ms": g["latency_ms"]["p50"],
            "p99_ms": g["latency_ms"]["p99"],
            "wall_s": g["wall_s"],
        }
        for g in groups
    ]
    median = sorted(groups, key=lambda g: g["emails_per_s"])[len(groups) // 2]
    row.emails_per_s = median["emails_per_s"]
    row.p50_ms = median["latency_ms"]["p50"]
    row.p99_ms = median["latency_ms"]["p99"]
    return groups


def failures_note(failures: dict[str, int]) -> str:
    return "failures " + ", ".join(f"{k} x{v}" for k, v in failures.items())


def print_row_notes(target: str, notes: list[str]) -> None:
    if notes:
        print(f"  {target}: " + "; ".join(notes))


# ---- scenarios --------------------------------------------------------------------------------


def fill_process_stats(row: Row, server: Server, idle_kb: int, cpu_s: float) -> None:
    row.idle_rss_mb = idle_kb / 1024
    row.peak_rss_mb = read_status_kb(server.pid, "VmHWM") / 1024
    row.cpu_s = cpu_s
    if row.emails:
        row.cpu_s_per_1000 = cpu_s / row.emails * 1000


def finish_server(row: Row, server: Server) -> None:
    """Stop the server and keep what its log says (mailpipe runs at --log-level warning)."""
    row.exit_code = server.stop()
    lines = [line for line in server.log_lines() if line.strip()]
    row.log_lines = len(lines)
    row.log_sample = [text for text, _ in Counter(line[-160:] for line in lines).most_common(3)]


def start_server(
    name: str, root: Path, make: Callable[[Path], Server]
) -> tuple[Server | None, str]:
    """The server `make` builds in a fresh work dir under `root`, started and settled; or None
    and a note saying why it did not start."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        server = make(workdir)
        server.start()
    except StartError as exc:
        return None, f"did not start: {exc}"[:600]
    time.sleep(0.5)  # let it settle before the idle reading
    return server, ""


def failure_note(exc: Exception) -> str:
    """For a row whose run raised: reported in the table, and the next target goes on."""
    return f"run failed: {type(exc).__name__}: {exc}"[:600]


def started(name: str, scenario: str, root: Path) -> tuple[Server | None, Row]:
    row = Row(target=name, scenario=scenario)
    if name == "smtp-sink" and not SMTP_SINK.exists():
        row.note = f"skipped: {SMTP_SINK} not installed (Debian package postfix)"
        return None, row
    server, row.note = start_server(name, root, lambda workdir: make_server(name, workdir))
    return server, row


def bench_load(name: str, mode: str, args: argparse.Namespace, root: Path) -> Row:
    """The main table: `rounds` runs of C connections x M messages against one fresh server."""
    server, row = started(name, mode, root)
    if server is None:
        return row
    try:
        idle_kb = read_status_kb(server.pid, "VmRSS")
        spec = [group_spec("load", args.connections, args.messages, args.size, mode)]
        results = [run_load(server, spec, args.timeout) for _ in range(args.rounds)]
        groups = summarize_rounds(row, results)
        row.max_ms = max(g["latency_ms"]["max"] for g in groups)
        wall = sum(r.client["wall_s"] for r in results)
        row.client_cpu_pct = 100 * sum(r.client["client_cpu_s"] for r in results) / wall
        row.peak_connections = max(r.client["peak_connections"] for r in results)
        fill_process_stats(row, server, idle_kb, sum(r.server_cpu_s for r in results))
        row.stored = server.stored_total()
    except Exception as exc:
        row.note = failure_note(exc)
    finally:
        finish_server(row, server)
    return row


def bench_connections(name: str, args: argparse.Namespace, root: Path) -> Row:
    """--big: 1000 connections open at once (all connect and EHLO before any sends)."""
    server, row = started(name, f"{BIG_CONNECTIONS} connections", root)
    if server is None:
        return row
    try:
        idle_kb = read_status_kb(server.pid, "VmRSS")
        spec = [
            group_spec("load", BIG_CONNECTIONS, args.big_messages, args.size, "reuse", barrier=True)
        ]
        result = run_load(server, spec, max(args.timeout, 300))
        g = result.group()
        row.emails, row.failed, row.failures = g["ok"], g["failed"], g["failures"]
        row.emails_per_s = g["emails_per_s"]
        row.p50_ms, row.p99_ms = g["latency_ms"]["p50"], g["latency_ms"]["p99"]
        row.max_ms = g["latency_ms"]["max"]
        row.client_cpu_pct = 100 * result.client["client_cpu_s"] / result.client["wall_s"]
        row.peak_connections = result.client["peak_connections"]
        fill_process_stats(row, server, idle_kb, result.server_cpu_s)
        row.stored = server.stored_total()
        if name == "mailpipe":
            verdict = "OK" if row.peak_rss_mb < BIG_CONNECTIONS_RSS_GOAL_MB else "OVER"
            row.note = (
                f"peak RSS {row.peak_rss_mb:.1f} MB with {row.peak_connections} open "
                f"connections (goal < {BIG_CONNECTIONS_RSS_GOAL_MB} MB): {verdict}"
            )
    except Exception as exc:
        row.note = failure_note(exc)
    finally:
        finish_server(row, server)
    return row


def bench_big_messages(name: str, args: argparse.Namespace, root: Path) -> Row:
    """--big: do 10 concurrent 20 MB messages stall 20 small-message sessions?

    Alone: 20 sessions x 50 small emails. Then, on the same server: 10 sessions each sending one
    20 MB message (a base64 attachment) while the 20 small sessions keep sending until the last
    big one is answered. Compare the small emails' latency.
    """
    server, row = started(name, "big messages", root)
    if server is None:
        return row
    try:
        idle_kb = read_status_kb(server.pid, "VmRSS")
        alone = run_load(
            server,
            [group_spec("small", SMALL_SESSIONS, SMALL_BASELINE_MESSAGES, args.size, "reuse")],
            args.timeout,
        )
        mixed = run_load(
            server,
            [
                group_spec(
                    "big", BIG_MESSAGE_SESSIONS, 1, BIG_MESSAGE_SIZE, "reuse", kind="attachment"
                ),
                group_spec("small", SMALL_SESSIONS, 0, args.size, "reuse", until="big"),
            ],
            max(args.timeout, 300),
        )
        small_alone, small_mixed, big = (
            alone.group("small"),
            mixed.group("small"),
            mixed.group("big"),
        )
        groups = (small_alone, small_mixed, big)
        row.emails = sum(g["ok"] for g in groups)
        row.failed = sum(g["failed"] for g in groups)
        for g, label in zip(groups, ("small alone", "small during big", "big"), strict=True):
            for key, count in g["failures"].items():
                row.failures[f"{label} {key}"] = count
        fill_process_stats(row, server, idle_kb, alone.server_cpu_s + mixed.server_cpu_s)
        row.stored = server.stored_total()
        row.extra = {
            "small_alone": small_alone["latency_ms"]
            | {"emails_per_s": small_alone["emails_per_s"]},
            "small_during_big": small_mixed["latency_ms"]
            | {"emails_per_s": small_mixed["emails_per_s"]},
            "big": big["latency_ms"]
            | {
                "ok": big["ok"],
                "failed": big["failed"],
                "message_bytes": big["message_bytes"],
                "wall_s": big["wall_s"],
            },
        }
    except Exception as exc:
        row.note = failure_note(exc)
    finally:
        finish_server(row, server)
    return row


def print_big_messages_table(rows: list[Row]) -> None:
    print(
        f"\n== {BIG_MESSAGE_SESSIONS} concurrent {BIG_MESSAGE_SIZE // 1_000_000} MB messages "
        f"while {SMALL_SESSIONS} small-message sessions run (reuse)"
    )
    headers = [
        "target",
        "small p50 ms alone",
        "during",
        "small p99 ms alone",
        "during",
        "small max ms during",
        "small n during",
        "small emails/s alone",
        "during",
        "big ok",
        "big p50 s",
        "big max s",
        "peak RSS MB",
    ]
    table: list[list[str]] = []
    for row in rows:
        if not row.extra:
            table.append([row.target] + ["-"] * (len(headers) - 1))
            continue
        alone, during, big = (row.extra[k] for k in ("small_alone", "small_during_big", "big"))
        table.append(
            [
                row.target,
                fmt(alone["p50"], 2),
                fmt(during["p50"], 2),
                fmt(alone["p99"], 2),
                fmt(during["p99"], 2),
                fmt(during["max"], 1),
                fmt(during["count"]),
                fmt(alone["emails_per_s"], 0),
                fmt(during["emails_per_s"], 0),
                f"{big['ok']}/{big['ok'] + big['failed']}",
                fmt(big["p50"] / 1000, 2),
                fmt(big["max"] / 1000, 2),
                fmt(row.peak_rss_mb),
            ]
        )
    print_table(headers, table)
    print_notes(rows)


# ---- main -------------------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    best, fstype = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def bench_parser(doc: str, targets: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options every benchmark script shares; each adds its own."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=100, help="concurrent connections")
    parser.add_argument("--messages", type=int, default=20, help="emails per connection")
    parser.add_argument("--size", type=int, default=1024, help="bytes per email")
    parser.add_argument(
        "--targets", default=",".join(targets), help=f"comma-separated, from {','.join(targets)}"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per load run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser


def parse_bench_args(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    targets: tuple[str, ...],
    positive: list[str],
) -> argparse.Namespace:
    """Parse, check the targets (into `args.target_list`) and the options that must be >= 1."""
    args = parser.parse_args(argv)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.target_list) - set(targets)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if min(getattr(args, name) for name in positive) < 1:
        names = [f"--{name}" for name in positive]
        parser.error(f"{', '.join(names[:-1])} and {names[-1]} must be positive")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, TARGETS)
    parser.add_argument("--mode", choices=("reuse", "new", "both"), default="both")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="load runs per server; the table shows the median round",
    )
    parser.add_argument(
        "--big",
        action="store_true",
        help=f"also {BIG_CONNECTIONS} connections, and 20 MB messages vs small ones",
    )
    parser.add_argument(
        "--big-messages",
        type=int,
        default=5,
        help=f"emails per connection in the {BIG_CONNECTIONS}-connection scenario",
    )
    return parse_bench_args(parser, argv, TARGETS, ["connections", "messages", "rounds", "size"])


def announce(root: Path) -> tuple[str, dict[str, Any]]:
    """Print the command line and the machine (its temp file system: `root`'s); return both
    for the JSON report."""
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    machine = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "temp_fs": filesystem_of(root),
    }
    print(f"command: {command}")
    print(
        f"machine: nproc={machine['nproc']} python={machine['python']} cpu={machine['cpu']} "
        f"({machine['platform']}; data dirs on {machine['temp_fs']})"
    )
    return command, machine


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="mailpipe-bench-"))
    command, machine = announce(root)
    print(
        f"load: {args.connections} connections x {args.messages} emails x {args.size} bytes, "
        f"{args.rounds} round(s) per server, median round shown; PIPELINING client on uvloop"
    )
    modes = ["reuse", "new"] if args.mode == "both" else [args.mode]
    report: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "args": vars(args),
        "results": [],
    }
    started_at = time.monotonic()
    try:
        for mode in modes:
            rows = [bench_load(name, mode, args, root) for name in args.target_list]
            title = (
                "reuse: one connection per session, PIPELINING"
                if mode == "reuse"
                else "new: a new connection per email"
            )
            print_load_table(title, rows)
            report["results"].extend(asdict(row) for row in rows)
        if args.big:
            rows = [bench_connections(name, args, root) for name in args.target_list]
            print_load_table(
                f"{BIG_CONNECTIONS} concurrent connections x {args.big_messages} "
                f"emails (reuse, all open before sending)",
                rows,
                with_connections=True,
            )
            report["results"].extend(asdict(row) for row in rows)
            rows = [bench_big_messages(name, args, root) for name in args.target_list]
            print_big_messages_table(rows)
            report["results"].extend(asdict(row) for row in rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_report(report, started_at, args.json)
    return 0


def write_report(report: dict[str, Any], started_at: float, path: str | None) -> None:
    """Print the total time and add it to the report; with --json, write the report there."""
    report["elapsed_s"] = time.monotonic() - started_at
    print(f"\n(total {report['elapsed_s']:.0f}s)")
    if path:
        Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"results written to {path}")


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


if __name__ == "__main__":
    sys.exit(main())
