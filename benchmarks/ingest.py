"""Ingest benchmark: mailpipe next to a bare aiosmtpd sink (and Postfix's smtp-sink), one run.

    python benchmarks/ingest.py [--connections 100] [--messages 20] [--size 1024]
                                [--mode reuse|new|both] [--targets mailpipe,aiosmtpd,smtp-sink]
                                [--rounds 5] [--baseline REF] [--max-messages 5000]
                                [--no-steady-state] [--big] [--json FILE]

Every server runs as its own process, started fresh for each mode (mailpipe with a fresh data
directory); the load comes from benchmarks/loadgen.py in another process. The rounds of one mode
alternate between the targets, so machine noise hits them alike. Each mailpipe's store is first
filled to its `store.max_messages` so that retention runs as on a long-running server.
`--baseline REF` adds `mailpipe@SHA`, the code of that commit (same interpreter, venv and
config), and prints this checkout's numbers as a ratio of it: old against new in one run.
The machine is small and noisy, so what matters is the side-by-side comparison within one run,
not the absolute numbers. See benchmarks/README.md for what is measured and how.
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
import statistics
import subprocess
import sys
import tarfile
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
STEADY_MAX_MESSAGES = 5000  # the store's own default
RETENTION_OFF = 10_000_000  # a store limit no run reaches: retention deletes nothing
FILL_CONNECTIONS = 50
IMPORTED_FROM = "imported-from"  # the file a mailpipe writes its mailpipe.__file__ to
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


class WrongCodeError(Exception):
    """A mailpipe imported its code from another tree than the one it stands for: the numbers
    would compare the wrong code, so the whole run stops."""


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
        expect_src: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.smtp_port = smtp_port
        self.http_port = http_port
        self.env = env
        self.expect_src = expect_src
        self.imported_from_path = workdir / IMPORTED_FROM
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
                self._check_imported_from()
                return
            time.sleep(0.1)
        self.stop()
        raise StartError(f"not ready after {timeout:.0f}s: {self.log_tail()}")

    def _check_imported_from(self) -> None:
        """mailpipe only: the running process imported mailpipe from `expect_src`."""
        if self.expect_src is None:
            return
        try:
            imported = Path(self.imported_from_path.read_text()).resolve()
        except OSError as exc:
            imported = Path(f"(unknown: {exc})")
        if not imported.is_relative_to(self.expect_src.resolve()):
            self.stop()
            raise WrongCodeError(
                f"{self.name} imported mailpipe from {imported}, not from {self.expect_src}"
            )

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


def mailpipe_config(max_messages: int = RETENTION_OFF) -> dict[str, Any]:
    """The store's retention limit (by default none is reached, for the count check), room for
    --big's 1000 connections and 20 MB messages, a short shutdown."""
    return {
        "shutdown_timeout": "10s",
        "smtp": {"max_connections": 5000, "max_message_size": "64MB"},
        "store": {"max_messages": max_messages},
    }


# `python -m mailpipe`, after writing down where mailpipe was imported from (argv[1]), so that
# the benchmark can check that each mailpipe runs the tree it stands for, not the venv's.
IMPORT_PROBE = (
    "import runpy, sys, mailpipe; "
    "open(sys.argv.pop(1), 'w').write(mailpipe.__file__); "
    "runpy.run_module('mailpipe', run_name='__main__', alter_sys=True)"
)


def mailpipe_server(
    name: str, workdir: Path, config: dict[str, Any], src: Path = REPO / "src"
) -> Server:
    """`python -m mailpipe serve` with `config`, on free ports, its code imported from `src`
    (this checkout's by default) with this interpreter and venv."""
    smtp_port, http_port = free_port(), free_port()
    config_path = workdir / "mailpipe.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    probe = workdir / IMPORTED_FROM
    argv = [
        sys.executable, "-c", IMPORT_PROBE, str(probe), "serve",
        "-c", str(config_path),
        "--smtp", f"{HOST}:{smtp_port}",
        "--http", f"{HOST}:{http_port}",
        "--data-dir", str(workdir / "data"),
        "--log-level", "warning",
    ]  # fmt: skip
    return Server(name, argv, workdir, smtp_port, http_port, env, expect_src=src)


def make_server(
    name: str, workdir: Path, mailpipe_src: dict[str, Path], max_messages: int
) -> Server:
    """The target `name`: a mailpipe of `mailpipe_src` (its name -> the tree it runs) with
    that store limit, or a sink."""
    if name in mailpipe_src:
        return mailpipe_server(name, workdir, mailpipe_config(max_messages), mailpipe_src[name])
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


# ---- the baseline commit ----------------------------------------------------------------------


@dataclass
class Baseline:
    """`--baseline REF`: the commit whose mailpipe runs beside this checkout's."""

    ref: str
    sha: str
    short: str

    @property
    def target(self) -> str:
        return f"mailpipe@{self.short}"


def git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ValueError(done.stderr.strip() or f"git {args[0]} failed")
    return done.stdout.strip()


def resolve_baseline(ref: str) -> Baseline:
    sha = git("rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}")
    return Baseline(ref, sha, git("rev-parse", "--short", sha))


def export_src(baseline: Baseline, root: Path) -> Path:
    """The commit's src/ (`git archive`, which leaves the repository as it is) extracted into
    a folder under `root`, removed with it; returns that src/."""
    dest = root / baseline.target
    dest.mkdir()
    archive = dest / "src.tar"
    git("archive", "--format=tar", f"--output={archive}", baseline.sha, "src")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    if not (dest / "src" / "mailpipe" / "__init__.py").is_file():
        raise ValueError(f"{baseline.ref} ({baseline.short}) has no src/mailpipe")
    return dest / "src"


def checkout_state() -> str:
    """What the `mailpipe` target runs: HEAD, and whether src/ differs from it."""
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "src")
    except (OSError, ValueError):
        return "this checkout"
    return f"this checkout, HEAD {head}" + (" with uncommitted changes in src/" if dirty else "")


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
    max_messages: int | None = None  # set when the store was filled to its retention limit
    prefilled: int = 0
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


# What --baseline compares: (label, Row attribute, key of a round's numbers or None).
COMPARED = (
    ("emails/s", "emails_per_s", "emails_per_s"),
    ("CPU-s/1000", "cpu_s_per_1000", "cpu_s_per_1000"),
    ("p50 ms", "p50_ms", "p50_ms"),
    ("p99 ms", "p99_ms", "p99_ms"),
    ("idle RSS MB", "idle_rss_mb", None),
    ("peak RSS MB", "peak_rss_mb", None),
)


def ratio(new: float, old: float) -> float:
    return new / old if old else float("nan")


def compare_rows(rows: list[Row], new: str, old: str) -> dict[str, dict[str, float]]:
    """new/old per metric. The rounds are paired as they ran (round i of each, next to each
    other): the median of their ratios, and the lowest and highest. On a busy machine the rate
    swings between rounds far more than between two targets in one round, so the paired ratio
    is steadier than a ratio of the two tables' median rounds. RSS has no rounds: its ratio."""
    by_name = {row.target: row for row in rows}
    new_row, old_row = by_name[new], by_name[old]
    nan = float("nan")
    result: dict[str, dict[str, float]] = {}
    for label, attr, key in COMPARED:
        pairs = [
            ratio(n[key], o[key])
            for n, o in zip(new_row.rounds, old_row.rounds, strict=False)
            if key is not None
        ]
        result[label] = {
            "ratio": (
                statistics.median(pairs)
                if pairs
                else ratio(getattr(new_row, attr), getattr(old_row, attr))
            ),
            "round_min": min(pairs, default=nan),
            "round_max": max(pairs, default=nan),
        }
    return result


def print_comparison(
    comparisons: dict[str, dict[str, dict[str, float]]], baseline: Baseline
) -> None:
    print(
        f"\n== mailpipe / {baseline.target}: this checkout as a ratio of {baseline.ref} "
        f"({baseline.short}), new / old\n"
        "emails/s above 1.00x: new is faster; every other metric below 1.00x: new costs less.\n"
        "Each round of new is divided by the round of old run next to it: the median of these "
        "ratios, in brackets the lowest and highest."
    )
    table = []
    for label, _, _ in COMPARED:
        cells = [label]
        for numbers in comparisons.values():
            ratios = numbers[label]
            cell = f"{fmt(ratios['ratio'], 2)}x" if ratios["ratio"] == ratios["ratio"] else "-"
            if ratios["round_min"] == ratios["round_min"]:  # not NaN: per-round numbers
                cell += f" [{fmt(ratios['round_min'], 2)}-{fmt(ratios['round_max'], 2)}]"
            cells.append(cell)
        table.append(cells)
    print_table(["metric", *comparisons], table)


def print_notes(rows: list[Row]) -> None:
    for row in rows:
        notes: list[str] = []
        if row.note:
            notes.append(row.note)
        if row.stored is not None and row.max_messages:
            notes.append(retention_note(row, row.max_messages))
        elif row.stored is not None:
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


def retention_note(row: LoadRow, max_messages: int) -> str:
    """With the store at its limit, retention deletes as fast as emails come: the stored count
    can only show that the store stayed full (an exact loss check needs --no-steady-state)."""
    # The store may run over by 5% (at most 256 rows) between two prunes (store/sqlite.py).
    margin = min(max_messages // 20, 256)
    if row.stored is None or row.stored < max_messages:
        verdict = "BELOW THE LIMIT"
    elif row.stored > max_messages + margin:
        verdict = f"ABOVE THE LIMIT + {margin}"
    else:
        verdict = "OK"
    return (
        f"store filled with {row.prefilled} before the rounds, stored {row.stored} after them "
        f"(max_messages {max_messages}, got 250 {row.emails + row.prefilled}): {verdict}"
    )


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
    row.cpu_s_per_1000 = per_1000(cpu_s, row.emails)


def per_1000(cpu_s: float, emails: int) -> float:
    return cpu_s / emails * 1000 if emails else float("nan")


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


# Builds the server of a target: (target name, its fresh work dir, store.max_messages).
MakeServer = Callable[[str, Path, int], Server]
# Called with each target's server and row after its store was filled ("measured": the rounds
# start) and after its last round ("done": it is still running): what another benchmark reads.
Observe = Callable[[Server, Row, str], None]


def started(
    name: str,
    scenario: str,
    root: Path,
    args: argparse.Namespace,
    max_messages: int,
    make: MakeServer | None = None,
) -> tuple[Server | None, Row]:
    row = Row(target=name, scenario=scenario)
    if name == "smtp-sink" and not SMTP_SINK.exists():
        row.note = f"skipped: {SMTP_SINK} not installed (Debian package postfix)"
        return None, row
    if make is None:

        def make(name: str, workdir: Path, limit: int) -> Server:
            return make_server(name, workdir, args.mailpipe_src, limit)

    server, row.note = start_server(name, root, lambda workdir: make(name, workdir, max_messages))
    return server, row


@dataclass
class Running:
    """One target of the main table: its server, started, and the rounds it has run."""

    server: Server
    row: Row
    idle_kb: int
    results: list[LoadResult] = field(default_factory=list)


def bench_mode(
    mode: str,
    args: argparse.Namespace,
    root: Path,
    make: MakeServer | None = None,
    observe: Observe | None = None,
) -> list[Row]:
    """The main table: every target started fresh (with --steady-state each mailpipe's store
    filled to its limit first), then `rounds` runs of C connections x M messages. Each round
    runs the targets one after the other, so a slow spell of the machine hits all alike, and
    every other round in reverse order (A B, B A, A B, ...), so no target always goes first.
    `make` builds each target's server (default: `make_server`); `observe` sees each server
    before its first round and after its last."""
    max_messages = args.max_messages if args.steady_state else RETENTION_OFF
    rows: list[Row] = []
    runs: list[Running] = []
    try:
        for name in args.target_list:
            server, row = started(name, mode, root, args, max_messages, make)
            rows.append(row)
            if server is not None:
                runs.append(Running(server, row, read_status_kb(server.pid, "VmRSS")))
        active = runs
        if args.steady_state:
            active = [run for run in active if fill_store(run, max_messages, args)]
        spec = [group_spec("load", args.connections, args.messages, args.size, mode)]
        observe_all(observe, active, "measured")
        for round_number in range(args.rounds):
            in_turn = active if round_number % 2 == 0 else active[::-1]
            failed = [run for run in in_turn if not run_round(run, spec, args.timeout)]
            active = [run for run in active if run not in failed]
        observe_all(observe, active, "done")
        for run in active:
            summarize_load(run)
    finally:
        for run in runs:
            finish_server(run.row, run.server)
    return rows


def observe_all(observe: Observe | None, runs: list[Running], phase: str) -> None:
    for run in runs if observe is not None else ():
        try:
            observe(run.server, run.row, phase)
        except Exception as exc:  # what it reads is extra: the rounds still count
            run.row.note = failure_note(exc)


def fill_store(run: Running, max_messages: int, args: argparse.Namespace) -> bool:
    """Fill a mailpipe's store up to its retention limit, so that the measured rounds run as
    on a server that has been up for a day; False (and a note) if that failed. A sink stores
    nothing: there is nothing to fill."""
    if run.server.http_port is None:
        return True
    per_connection = -(-max_messages // FILL_CONNECTIONS)
    spec = [group_spec("load", FILL_CONNECTIONS, per_connection, args.size, "reuse")]
    try:
        fill = run_load(run.server, spec, max(args.timeout, 300)).group()
        stored = run.server.stored_total()
        if fill["failed"] or stored is None or stored < max_messages:
            raise RuntimeError(
                f"filling the store: {fill['ok']} got 250, {fill['failed']} failed "
                f"{fill['failures'] or ''}, stored {stored} of max_messages {max_messages}"
            )
    except Exception as exc:
        run.row.note = failure_note(exc)
        run.server.stop()
        return False
    run.row.max_messages, run.row.prefilled = max_messages, fill["ok"]
    return True


def run_round(run: Running, spec: list[dict[str, Any]], timeout: float) -> bool:
    """One measured round against one target; False (and a note) if it failed, and the target
    then sits out the other rounds."""
    # Write back what the previous round left dirty, so that it does not slow this one's fsyncs.
    os.sync()
    try:
        run.results.append(run_load(run.server, spec, timeout))
    except Exception as exc:
        run.row.note = failure_note(exc)
        run.server.stop()
        return False
    return True


def summarize_load(run: Running) -> None:
    row, server, results = run.row, run.server, run.results
    try:
        groups = summarize_rounds(row, results)
        for numbers, result, group in zip(row.rounds, results, groups, strict=True):
            numbers["cpu_s_per_1000"] = per_1000(result.server_cpu_s, group["ok"])
        row.max_ms = max(g["latency_ms"]["max"] for g in groups)
        wall = sum(r.client["wall_s"] for r in results)
        row.client_cpu_pct = 100 * sum(r.client["client_cpu_s"] for r in results) / wall
        row.peak_connections = max(r.client["peak_connections"] for r in results)
        fill_process_stats(row, server, run.idle_kb, sum(r.server_cpu_s for r in results))
        row.stored = server.stored_total()
    except Exception as exc:
        row.note = failure_note(exc)


def bench_connections(name: str, args: argparse.Namespace, root: Path) -> Row:
    """--big: 1000 connections open at once (all connect and EHLO before any sends)."""
    server, row = started(name, f"{BIG_CONNECTIONS} connections", root, args, RETENTION_OFF)
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
        if name in args.mailpipe_src:
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
    server, row = started(name, "big messages", root, args, RETENTION_OFF)
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
        names = [f"--{name.replace('_', '-')}" for name in positive]
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
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run mailpipe at this git commit (target mailpipe@SHA) and print this "
        "checkout's numbers as a ratio of its",
    )
    parser.add_argument(
        "--steady-state",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fill each mailpipe's store to --max-messages before the measured rounds, so "
        "retention runs as on a long-running server (off: a store that never fills, and an "
        "exact count of what was stored)",
    )
    parser.add_argument(
        "--max-messages",
        type=int,
        default=STEADY_MAX_MESSAGES,
        help="store.max_messages with --steady-state (the store's default)",
    )
    args = parse_bench_args(
        parser, argv, TARGETS, ["connections", "messages", "rounds", "size", "max_messages"]
    )
    if args.baseline is not None:
        add_baseline_target(parser, args)
    return args


def add_baseline_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--baseline: its target runs just before `mailpipe` in every round (old, new, ...)."""
    if "mailpipe" not in args.target_list:
        parser.error("--baseline compares against the mailpipe target: add it to --targets")
    try:
        args.baseline = resolve_baseline(args.baseline)
    except (OSError, ValueError) as exc:
        parser.error(f"--baseline {args.baseline}: {exc}")
    args.target_list.insert(args.target_list.index("mailpipe"), args.baseline.target)


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


def announce_setup(args: argparse.Namespace) -> None:
    """Print the load, which code each mailpipe runs and how full its store is."""
    print(
        f"load: {args.connections} connections x {args.messages} emails x {args.size} bytes, "
        f"{args.rounds} round(s) per server taken in turn, median round shown; "
        f"PIPELINING client on uvloop"
    )
    if "mailpipe" in args.target_list:
        print(f"mailpipe: {checkout_state()} ({args.mailpipe_src['mailpipe']})")
    if args.baseline is not None:
        print(
            f"{args.baseline.target}: {args.baseline.ref} = {args.baseline.sha}, its src/ "
            f"exported with git archive; same python, venv and config (each mailpipe checks "
            f"at start that it imported its own tree, or the run stops)"
        )
    if args.steady_state:
        print(
            f"store: max_messages {args.max_messages}, each mailpipe's store filled to it "
            f"before the measured rounds, so retention deletes as emails come in"
        )
    else:
        print(f"store: max_messages {RETENTION_OFF}, retention never runs (--no-steady-state)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    # A SIGTERM unwinds like Ctrl-C does: servers stopped, temp trees removed.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    root = Path(tempfile.mkdtemp(prefix="mailpipe-bench-"))
    try:
        return run(args, root)
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped, temporary files removed", file=sys.stderr)
        return 130
    except WrongCodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> int:
    command, machine = announce(root)
    args.mailpipe_src = {"mailpipe": REPO / "src"}
    if args.baseline is not None:
        args.mailpipe_src[args.baseline.target] = export_src(args.baseline, root)
    announce_setup(args)
    modes = ["reuse", "new"] if args.mode == "both" else [args.mode]
    report: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "args": vars(args),
        "results": [],
    }
    started_at = time.monotonic()
    comparisons: dict[str, dict[str, dict[str, float]]] = {}
    for mode in modes:
        rows = bench_mode(mode, args, root)
        title = (
            "reuse: one connection per session, PIPELINING"
            if mode == "reuse"
            else "new: a new connection per email"
        )
        print_load_table(title, rows)
        report["results"].extend(asdict(row) for row in rows)
        if args.baseline is not None:
            comparisons[mode] = compare_rows(rows, "mailpipe", args.baseline.target)
    if args.baseline is not None:
        print_comparison(comparisons, args.baseline)
        report["comparison"] = {"new": "mailpipe", "old": args.baseline.target} | comparisons
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
