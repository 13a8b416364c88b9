"""CPU per email by thread under Postfix's smtp-source: the event loop's thread apart.

    python benchmarks/threads.py [--mode reuse|new] [--emails 15000] [--rounds 6]
                                 [--src DIR ...] [--lock /tmp/bench.lock]

Starts `python -m mailpipe serve` from this checkout and from each `--src DIR` (another
checkout's `src`, through PYTHONPATH), each with the defaults plus `max_connections_per_ip`
5000 (smtp-source connects from one address) and `store.max_messages` 5000, fills each store
past that limit so retention runs, then per round drives each server in turn (the order
alternating) with `smtp-source -s 100 -m EMAILS -l 1024 -N` (`-d`, reused connections, with
`--mode reuse`). Per run: emails/s (smtp-source's wall time) and, from /proc, the CPU time of
the main thread (the event loop) and of all other threads (the store's writer, the readers)
per email; then each server's medians. With `--lock FILE` every load holds an flock on FILE
(shared machines: one load at a time). Like the other benchmarks it reports, never judges.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
shutdown_timeout: 10s
smtp: {max_connections: 5000, max_message_size: 64MB, max_connections_per_ip: 5000}
store: {max_messages: 5000}
"""
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(src: str, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    smtp, http = free_port(), free_port()
    data = Path(tempfile.mkdtemp(dir=work))
    (data / "config.yaml").write_text(CONFIG)
    cmd = [sys.executable, "-m", "mailpipe", "serve", "-c", str(data / "config.yaml"),
           "--smtp", f"127.0.0.1:{smtp}", "--http", f"127.0.0.1:{http}",
           "--data-dir", str(data), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=src),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", smtp), 1) as s:
            if s.recv(100).startswith(b"220"):
                return proc, smtp
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"mailpipe from {src} did not start")


def cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the main thread and of all the others."""
    main = rest = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        if int(tid) == pid:
            main += seconds
        else:
            rest += seconds
    return main, rest


def smtp_source(port: int, emails: int, reuse: bool, sessions: int = 100) -> float:
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(emails), "-l", "1024", "-N",
           "-f", "a@b.test", "-t", "r@s.test", *(["-d"] if reuse else []), f"127.0.0.1:{port}"]
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


@contextlib.contextmanager
def locked(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("reuse", "new"), default="reuse")
    parser.add_argument("--emails", type=int, default=15000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--src", action="append", default=[])
    parser.add_argument("--lock", help="flock this file around each load")
    args = parser.parse_args()
    reuse = args.mode == "reuse"
    with tempfile.TemporaryDirectory() as tmp:
        servers = [(src, *start(src, Path(tmp))) for src in [str(ROOT / "src"), *args.src]]
        try:
            for _, _, port in servers:
                with locked(args.lock):
                    smtp_source(port, 5500, True, sessions=50)
            results: dict[str, list[tuple[float, float, float]]] = {s: [] for s, *_ in servers}
            for n in range(args.rounds):
                with locked(args.lock):
                    for src, proc, port in servers if n % 2 == 0 else servers[::-1]:
                        before = cpu(proc.pid)
                        wall = smtp_source(port, args.emails, reuse)
                        after = cpu(proc.pid)
                        main_us, rest_us = ((b - a) / args.emails * 1e6
                                            for a, b in zip(before, after, strict=True))
                        results[src].append((args.emails / wall, main_us, rest_us))
                        print(f"round {n} {src}: {args.emails / wall:6.0f} emails/s, main thread"
                              f" {main_us:4.0f} us/email, other threads {rest_us:4.0f}", flush=True)
        finally:
            for _, proc, _ in servers:
                proc.terminate()
                proc.wait()
    print(f"medians ({args.mode}, {args.rounds} rounds of {args.emails}):")
    for src, rows in results.items():
        rate, main_us, rest_us = (median([row[i] for row in rows]) for i in range(3))
        print(f"  {src}: {rate:6.0f} emails/s, main thread {main_us:4.0f} us/email,"
              f" other threads {rest_us:4.0f}")


if __name__ == "__main__":
    main()
