"""mailpipe next to the SMTP servers people use instead, one load for all, in one run.

    python benchmarks/peers.py [--quick] [--emails 20000] [--peers mailpipe,smtp-sink,...]
                               [--loads new,reuse,2mb,idle] [--docs docs/benchmarks.md]

Each peer (the PEERS table: how to install it, how to start it, what it keeps) is started fresh
on loopback on free ports for each load, and driven by Postfix's `smtp-source` (Debian package
`postfix`; `make bench` installs it). A peer that cannot be installed or started is skipped with
the reason, never faked. Per load and peer: emails/s, CPU seconds per 1,000 emails of the peer's
process tree, idle and peak RSS, each also as a ratio against mailpipe; smtp-source measures no
latency, so p50/p99 come from one extra run of benchmarks/loadgen.py (pipelined, reused
connections), as benchmarks/ingest.py measures it. The tables are also written to
`docs/benchmarks.md` with the command that made them. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (  # a sibling script, not a package
    AIOSMTPD_SINK,
    CLOCK_TICKS,
    HOST,
    SMTP_SINK,
    STEADY_MAX_MESSAGES,
    Server,
    StartError,
    fmt,
    free_port,
    group_spec,
    mailpipe_config,
    mailpipe_server,
    print_table,
    raise_fd_limit,
    run_load,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = REPO / "build" / "peers"  # npm and pip installs of the peers, reused between runs
SMTP_SOURCE = Path("/usr/sbin/smtp-source")
LOAD_PY = HERE / "load.py"
IDLE_CONNECTIONS = 1000
FILL_SPEC = [group_spec("load", 50, STEADY_MAX_MESSAGES // 50, 1024, "reuse")]


# ---- the peers ----------------------------------------------------------------------------------


def have(path: Path, what: str) -> str | None:
    return None if path.exists() else f"{path} not found ({what})"


def npm_install(package: str, entry: str) -> Callable[[], str | None]:
    """Install `package` into build/peers/<package>/ unless its `entry` script is there."""

    def install() -> str | None:
        folder = CACHE / package.lower()
        if (folder / entry).exists():
            return None
        if shutil.which("npm") is None:
            return "npm not found (Debian package npm)"
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(folder), package],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0 or not (folder / entry).exists():
            return f"npm install {package} failed: {done.stderr.strip()[-300:]}"
        return None

    return install


def pip_venv_install(package: str) -> Callable[[], str | None]:
    """Install `package` into its own venv, build/peers/<package>/venv (its pins stay apart)."""

    def install() -> str | None:
        venv = CACHE / package / "venv"
        if (venv / "bin" / package).exists():
            return None
        done = subprocess.run(
            f"{shlex.quote(sys.executable)} -m venv {venv} && {venv}/bin/pip install -q {package}",
            shell=True, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            return f"pip install {package} failed: {done.stderr.strip()[-300:]}"
        return None

    return install


def start_mailpipe(workdir: Path) -> Server:
    # Its defaults, with the store at its default retention limit (filled before the load),
    # room for the 1,000 idle connections and the per-IP cap raised: smtp-source connects from
    # 127.0.0.1 only, and no other peer caps connections per address.
    config = mailpipe_config(STEADY_MAX_MESSAGES)
    config["smtp"]["max_connections_per_ip"] = 5000
    return mailpipe_server("mailpipe", workdir, config)


def start_smtp_sink(workdir: Path) -> Server:
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root otherwise
    argv = [str(SMTP_SINK), *user, "-m", "5000", f"{HOST}:{port}", "1024"]
    return Server("smtp-sink", argv, workdir, port)


def start_aiosmtpd(workdir: Path) -> Server:
    port = free_port()
    return Server("aiosmtpd", [sys.executable, str(AIOSMTPD_SINK), HOST, str(port)], workdir, port)


def start_maildump(workdir: Path) -> Server:
    port = free_port()
    argv = [
        str(CACHE / "maildump" / "venv" / "bin" / "maildump"), "-f",
        "--smtp-ip", HOST, "--smtp-port", str(port),
        "--http-ip", HOST, "--http-port", str(free_port()),
        "--db", str(workdir / "maildump.db"),
    ]  # fmt: skip
    return Server("maildump", argv, workdir, port)


def start_maildev(workdir: Path) -> Server:
    port = free_port()
    argv = [
        "node", str(CACHE / "maildev" / "node_modules" / "maildev" / "dist" / "bin" / "maildev.js"),
        "--ip", HOST, "--smtp", str(port), "--web-ip", HOST, "--web", str(free_port()),
        "--mail-directory", str(workdir / "mail"), "--max-emails", str(STEADY_MAX_MESSAGES),
    ]  # fmt: skip
    return Server("maildev", argv, workdir, port)


HARAKA_PLUGIN = """\
// Accept every recipient; the queue hook answers OK and keeps nothing (a sink).
exports.hook_rcpt = (next) => next(OK)
exports.hook_queue = (next) => next(OK)
"""


def start_haraka(workdir: Path) -> Server:
    port = free_port()
    config = workdir / "haraka" / "config"
    (workdir / "haraka" / "plugins").mkdir(parents=True)
    (workdir / "haraka" / "plugins" / "bench_accept.js").write_text(HARAKA_PLUGIN)
    haraka = CACHE / "haraka" / "node_modules" / "Haraka"
    shutil.copytree(haraka / "config", config)  # its defaults (connection.ini is needed)
    (config / "plugins").write_text("bench_accept\n")
    (config / "smtp.ini").write_text(f"listen={HOST}:{port}\n")  # nodes unset: 1 worker
    (config / "log.ini").write_text("[main]\nlevel=warn\n")
    argv = ["node", str(haraka / "bin" / "haraka"), "-c", str(workdir / "haraka")]
    return Server("haraka", argv, workdir, port)


@dataclass
class Peer:
    name: str
    keeps: str  # what it does with an email
    install: Callable[[], str | None]  # None when ready to run, else why not
    start: Callable[[Path], Server]  # ready = it greets with 220 (mailpipe: and /healthz is 200)
    fill: bool = False  # stores emails: filled with 5,000 before each load (steady state)
    share: float = 1.0  # of each load's emails it gets (a peer too slow for the whole load)


PEERS = [
    Peer("mailpipe", "parses, stores in SQLite (fsync), retention 5,000",
         lambda: None, start_mailpipe, fill=True),
    Peer("smtp-sink", "C (Postfix), discards: the ceiling",
         lambda: have(SMTP_SINK, "Debian package postfix"), start_smtp_sink),
    Peer("aiosmtpd", "aiosmtpd on uvloop, discards (benchmarks/aiosmtpd_sink.py)",
         lambda: None, start_aiosmtpd),
    Peer("maildump", "aiosmtpd, parses, stores in SQLite (PyPI maildump); about 7 emails/s "
         "on new connections here, so it gets 1/50 of each load and an empty store",
         pip_venv_install("maildump"), start_maildump, share=0.02),
    Peer("maildev", "Node, parses, stores files, keeps 5,000 (npm maildev)",
         npm_install("maildev", "node_modules/maildev/dist/bin/maildev.js"), start_maildev,
         fill=True),
    Peer("haraka", "Node MTA, a plugin accepts every RCPT and discards at queue (npm Haraka)",
         npm_install("Haraka", "node_modules/Haraka/bin/haraka"), start_haraka),
]  # fmt: skip


# ---- the loads ----------------------------------------------------------------------------------


@dataclass
class Load:
    name: str
    title: str
    sessions: int
    emails: int
    size: int
    reuse: bool
    idle: int = 0  # idle connections held open (EHLO'd, silent) during the load


def loads(args: argparse.Namespace) -> list[Load]:
    n = args.emails
    table = [
        Load("new", f"a new connection per email: 1 KB x {n:,}, 100 sessions", 100, n, 1024, False),
        Load("reuse", f"reused connections: 1 KB x {n:,}, 100 sessions", 100, n, 1024, True),
        Load("2mb", f"2 MB x {args.big_emails}, 10 sessions, reused connections",
             10, args.big_emails, 2 * 1024 * 1024, True),
        Load("idle", f"{IDLE_CONNECTIONS:,} idle connections + reused connections: "
             f"1 KB x {n // 2:,}, 100 sessions", 100, n // 2, 1024, True, idle=IDLE_CONNECTIONS),
    ]  # fmt: skip
    return [load for load in table if load.name in args.load_list]


# ---- measuring ----------------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of the tree: utime + stime + the reaped children's (cutime + cstime)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])
    return total / CLOCK_TICKS


def tree_kb(pid: int, key: str) -> int:
    """The sum of a /proc/PID/status field (VmRSS, VmHWM) over the tree."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as status:
                total += next(int(ln.split()[1]) for ln in status if ln.startswith(key + ":"))
        except (OSError, StopIteration):
            continue
    return total


@dataclass
class Result:
    peer: str
    emails: int = 0
    emails_per_s: float = float("nan")
    cpu_per_1000: float = float("nan")
    idle_rss_mb: float = float("nan")
    peak_rss_mb: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    notes: list[str] = field(default_factory=list)


def smtp_source(server: Server, load: Load, timeout: float) -> tuple[float, str]:
    """Run smtp-source; its wall time and, if it failed, why."""
    argv = [
        str(SMTP_SOURCE), "-s", str(load.sessions), "-m", str(load.emails), "-l", str(load.size),
        "-N", "-f", "bench@source.test", "-t", "rcpt@sink.test",
    ]  # fmt: skip
    argv += ["-d"] if load.reuse else []
    started = time.monotonic()
    try:
        done = subprocess.run(
            [*argv, f"{HOST}:{server.smtp_port}"], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return time.monotonic() - started, f"smtp-source did not finish in {timeout:.0f}s"
    wall = time.monotonic() - started
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode != 0 or errors:
        return wall, f"smtp-source exit {done.returncode}: {' | '.join(errors[-3:])[:300]}"
    return wall, ""


def hold_idle(server: Server, count: int) -> tuple[subprocess.Popen[str], int]:
    """load.py's holder: `count` connections from 127.0.1.x, greeted, EHLO'd, then silent."""
    holder = subprocess.Popen(
        [sys.executable, str(LOAD_PY), "--hold", str(server.smtp_port), str(count), "100"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    return holder, int(json.loads(holder.stdout.readline())["opened"])


def measure(peer: Peer, load: Load, root: Path, args: argparse.Namespace) -> Result:
    result = Result(peer.name)
    if load.idle and peer.share < 1:
        result.notes.append(f"skipped: it opens too few connections a second for {load.idle:,}")
        return result
    if peer.share != 1.0:
        load = replace(load, emails=max(1, int(load.emails * peer.share)))
        result.notes.append(f"{load.emails} emails only")
    workdir = Path(tempfile.mkdtemp(prefix=f"{peer.name}-{load.name}-", dir=root))
    try:
        server = peer.start(workdir)
        server.start(timeout=60)
    except (StartError, OSError) as exc:
        result.notes.append(f"did not start: {exc}"[:400])
        return result
    holder = None
    try:
        if peer.fill:
            fill = run_load(server, FILL_SPEC, 300).group()
            if fill["failed"]:
                result.notes.append(f"filling: {fill['failed']} failed {fill['failures']}")
        time.sleep(0.5)
        result.idle_rss_mb = tree_kb(server.pid, "VmRSS") / 1024
        if load.idle:
            holder, opened = hold_idle(server, load.idle)
            result.notes.append(f"{opened} idle connections opened")
        os.sync()  # what filling left dirty is not this load's cost
        cpu = tree_cpu(server.pid)
        wall, error = smtp_source(server, load, args.timeout)
        cpu = tree_cpu(server.pid) - cpu
        if error:
            result.notes.append(error)
        else:
            result.emails = load.emails
            result.emails_per_s = load.emails / wall
            result.cpu_per_1000 = cpu / load.emails * 1000
        if holder is not None:
            assert holder.stdin is not None and holder.stdout is not None
            holder.stdin.close()
            still = json.loads(holder.stdout.readline() or '{"still_open": "?"}')["still_open"]
            result.notes.append(f"{still} still open after the load")
        if load.name == "reuse" and peer.share < 1:
            result.notes.append("no latency run (too slow for it)")
        elif load.name == "reuse":  # latency: smtp-source has none to give
            spec = [group_spec("load", 100, args.latency_messages, 1024, "reuse")]
            timed = run_load(server, spec, 120).group()
            result.p50_ms, result.p99_ms = timed["latency_ms"]["p50"], timed["latency_ms"]["p99"]
            if timed["failed"]:
                result.notes.append(f"latency run: {timed['failed']} failed {timed['failures']}")
        result.peak_rss_mb = tree_kb(server.pid, "VmHWM") / 1024
    except Exception as exc:  # one peer's failure is its row's note; the others go on
        result.notes.append(f"run failed: {type(exc).__name__}: {exc}"[:400])
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        server.stop()
        with contextlib.suppress(OSError):  # what it forked (Haraka's worker), in its session
            os.killpg(server.pid, signal.SIGKILL)
    return result


# ---- the report ---------------------------------------------------------------------------------


def cell(value: float, base: float, digits: int) -> str:
    if value != value:  # NaN
        return "-"
    ratio = f" ({value / base:.2f}x)" if base == base and base else ""
    return fmt(value, digits) + ratio


def print_load(load: Load, results: list[Result]) -> None:
    print(f"\n== {load.title}")
    base = next((r for r in results if r.peer == "mailpipe"), Result("mailpipe"))
    latency = load.name == "reuse"
    headers = ["peer", "emails/s", "CPU-s/1000", "idle RSS MB", "peak RSS MB"]
    headers += ["p50 ms", "p99 ms"] if latency else []
    rows = []
    for r in results:
        row = [
            r.peer,
            cell(r.emails_per_s, base.emails_per_s, 0),
            cell(r.cpu_per_1000, base.cpu_per_1000, 3),
            cell(r.idle_rss_mb, base.idle_rss_mb, 1),
            cell(r.peak_rss_mb, base.peak_rss_mb, 1),
        ]
        if latency:
            row += [cell(r.p50_ms, base.p50_ms, 2), cell(r.p99_ms, base.p99_ms, 2)]
        rows.append(row)
    print_table(headers, rows)
    for r in results:
        if r.notes:
            print(f"  {r.peer}: " + "; ".join(r.notes))


class Tee(io.StringIO):
    """stdout, also kept for docs/benchmarks.md."""

    def write(self, text: str) -> int:
        sys.__stdout__.write(text)
        sys.__stdout__.flush()
        return super().write(text)


def interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4,000 emails a 1 KB load, 100 of 2 MB (default 20,000 and 200)",
    )
    parser.add_argument("--emails", type=int, help="emails per 1 KB load")
    parser.add_argument("--big-emails", type=int, help="emails of 2 MB")
    parser.add_argument("--peers", default=",".join(p.name for p in PEERS))
    parser.add_argument("--loads", default="new,reuse,2mb,idle")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per load run")
    parser.add_argument(
        "--docs",
        default=str(REPO / "docs" / "benchmarks.md"),
        help="where to write the report ('' for nowhere)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    args.emails = args.emails or (4000 if args.quick else 20_000)
    args.big_emails = args.big_emails or (100 if args.quick else 200)
    args.latency_messages = 10 if args.quick else 20
    args.peer_list = [p for p in PEERS if p.name in args.peers.split(",")]
    args.load_list = args.loads.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/peers.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not SMTP_SOURCE.exists():
        print(f"{SMTP_SOURCE} not found: install Debian's postfix (`make bench` does)")
        return 1
    raise_fd_limit()
    # SIGTERM (a timeout, CI) unwinds like Ctrl-C, so every started peer is stopped.
    signal.signal(signal.SIGTERM, interrupted)
    out = Tee()
    sys.stdout = out
    started = time.monotonic()
    try:
        print(f"command: {command.strip()}")
        print(f"machine: nproc={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start")
        print(
            "load: Postfix's smtp-source (one reply awaited per command, no pipelining); "
            "one run per peer and load, each peer started fresh; storing peers filled "
            f"with {STEADY_MAX_MESSAGES:,} emails first. Cells: value (ratio to mailpipe)."
        )
        print(
            "p50/p99: benchmarks/loadgen.py after the reused-connection load, "
            f"100 sessions x {args.latency_messages}, pipelined (smtp-source has no latency)."
        )
        print(
            "CPU and RSS: the peer's process tree; peak RSS is the sum of each process's "
            "VmHWM.\n\npeers:"
        )
        peers = []
        for peer in args.peer_list:
            why = peer.install()
            print(f"  {peer.name:<10} {peer.keeps}" + (f": SKIPPED, {why}" if why else ""))
            if not why:
                peers.append(peer)
        with tempfile.TemporaryDirectory(prefix="mailpipe-peers-") as tmp:
            for load in loads(args):
                print_load(load, [measure(peer, load, Path(tmp), args) for peer in peers])
        print(f"\n(total {time.monotonic() - started:.0f}s)")
    finally:
        sys.stdout = sys.__stdout__
    if args.docs:
        Path(args.docs).write_text(
            "# Benchmarks: mailpipe and its peers\n\n"
            "Made by `make bench` (`benchmarks/peers.py`; what it measures: "
            "[benchmarks/README.md](../benchmarks/README.md)). One run on the project's 2-core "
            "machine, shared with other work: compare the rows of one table, not runs.\n\n"
            f"```\n{out.getvalue().strip()}\n```\n"
        )
        print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
