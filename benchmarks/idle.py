"""Idle memory: mailpipe's RSS with its defaults, and what each import stack costs.

    python benchmarks/idle.py [--runs 3] [--config FILE] [--src DIR ...] [--imports]

- **serve**: `python -m mailpipe serve` with the defaults (a fresh data directory, free
  ports, no config file unless `--config`), `VmRSS` from /proc after the API answers
  (+2 s), after one email, and after 5 s idle. `--src DIR` (repeatable) also runs the
  mailpipe found in DIR (another checkout's `src`, through PYTHONPATH), in turn with this one.
- **imports** (`--imports`): in one fresh interpreter, the stacks `serve` uses imported one
  after the other, each row the VmRSS it added (so a row is what that stack adds on top of the
  ones above it, not what it would cost alone).

Like the other benchmarks it reports, never judges (benchmarks/README.md has results).
"""

from __future__ import annotations

import argparse
import os
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACKS = [
    ("interpreter", ""),
    ("asyncio (with ssl)", "import asyncio"),
    ("uvloop", "import uvloop"),
    ("click", "import click"),
    ("pydantic_core", "import pydantic_core"),
    ("pydantic BaseModel", "from pydantic import BaseModel"),
    ("pydantic_settings", "import pydantic_settings"),
    ("mailpipe.config (its models)", "import mailpipe.config"),
    ("prometheus_client", "import prometheus_client"),
    ("email, sqlite3", "import email.parser, email.policy, sqlite3"),
    ("mailpipe.app (capture, store, plugins)", "import mailpipe.app"),
    ("aiohttp.web", "import aiohttp.web"),
    ("mailpipe.web.app, mailpipe.cli", "import mailpipe.web.app, mailpipe.cli"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def serve_once(src: str | None, config: str | None) -> tuple[int, int, int]:
    smtp, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    if src:
        env["PYTHONPATH"] = src
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mailpipe", "serve", "--data-dir", f"{tmp}/data",
               "--smtp", f"127.0.0.1:{smtp}", "--http", f"127.0.0.1:{http}",
               "--log-level", "warning", *(["-c", config] if config else [])]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                raise RuntimeError("mailpipe did not start")
            time.sleep(2)
            started = rss_kb(proc.pid)
            with smtplib.SMTP("127.0.0.1", smtp, timeout=10) as client:
                client.sendmail("a@example.test", ["b@example.test"],
                                "Subject: idle\r\nFrom: a@example.test\r\n\r\nhello\r\n")
            time.sleep(1)
            after_email = rss_kb(proc.pid)
            time.sleep(5)
            return started, after_email, rss_kb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)


def import_costs() -> None:
    code = "\n".join([
        "import sys",
        "def rss():",
        "    for line in open('/proc/self/status'):",
        "        if line.startswith('VmRSS:'): return int(line.split()[1])",
        "prev = 0",
        *(f"{stmt}\nnow = rss(); print(f'{name:40s} {{now - prev:7d}} {{now:7d}}'); prev = now"
          for name, stmt in STACKS),
    ])
    print(f"{'imported in this order':40s} {'+kB':>7s} {'VmRSS':>7s}")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", help="a config file for serve (default: none)")
    parser.add_argument("--src", action="append", default=[],
                        help="also measure the mailpipe in DIR (for example a main checkout's src)")
    parser.add_argument("--imports", action="store_true", help="also the per-stack import table")
    args = parser.parse_args()
    targets: list[str | None] = [None, *args.src]
    print(f"{'mailpipe':40s} {'start MB':>9s} {'1 email':>9s} {'idle MB':>9s}")
    for run in range(args.runs):
        for src in targets if run % 2 == 0 else reversed(targets):
            started, email, idle = serve_once(src, args.config)
            print(f"{src or 'this checkout':40s} {started / 1024:9.1f} {email / 1024:9.1f} "
                  f"{idle / 1024:9.1f}")
    if args.imports:
        print()
        import_costs()


if __name__ == "__main__":
    main()
