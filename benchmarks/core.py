"""The SMTP core alone (sans-I/O): what `SMTPConnection` costs per email, no sockets.

    python benchmarks/core.py [--emails 20000] [--rounds 5] [--src DIR ...] [--alternate 2]
    python benchmarks/core.py --profile

Feeds one `SMTPConnection` what Postfix's smtp-source sends with `-d` (reused connections):
the greeting, EHLO, then per email MAIL, RCPT, DATA and the 1 KB body with its "." line,
each in its own `receive()` call (smtp-source awaits every reply), and answers each message
with 250 as the session does (`reply_to_message`). `new` does the same with a connection per
email (greeting, EHLO, the email, QUIT). Prints the best of `--rounds`, CPU microseconds per
email (CPU time: the machine is shared). `--src DIR` (repeatable) also runs the core found
in DIR (another checkout's `src`, through PYTHONPATH), in turn with this one, `--alternate`
times, for an A/B in one run; `--profile` prints cProfile's top functions instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What smtp-source -l 1024 sends as a body: a few headers, then lines of text.
HEADER = (b"From: <a@b.test>\r\nTo: <r@s.test>\r\nDate: Tue, 1 Dec 2026 01:00:00 +0000\r\n"
          b"Message-Id: <1.2@b.test>\r\nSubject: test\r\n\r\n")
BODY = HEADER + b"La La La La La La La La La La La La La La La La La La La\r\n" * 17 + b".\r\n"
COMMANDS = (b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<r@s.test>\r\n", b"DATA\r\n", BODY)


def _settings():  # the type is whichever tree's is imported
    from mailpipe.capture.protocol import ProtocolSettings

    return ProtocolSettings(hostname="mx.test", max_message_size=64 << 20, max_recipients=1000,
                            max_line_length=2048, spool_threshold=1 << 20, auth_mechanisms=())


def reused(emails: int) -> None:
    from mailpipe.capture.protocol import SMTPConnection
    from mailpipe.capture.types import Reply

    ok = Reply(250, "2.0.0 Ok: queued")
    now = datetime.now(UTC)
    conn = SMTPConnection(_settings(), clock=lambda: now)
    conn.start()
    conn.receive(b"EHLO client.test\r\n")
    receive, answer = conn.receive, conn.reply_to_message
    for _ in range(emails):
        for data in COMMANDS:
            receive(data)
        answer(ok, close_after=False, close_reply=None)


def new(emails: int) -> None:
    from mailpipe.capture.protocol import SMTPConnection
    from mailpipe.capture.types import Reply

    ok = Reply(250, "2.0.0 Ok: queued")
    now = datetime.now(UTC)
    settings = _settings()
    for _ in range(emails):
        conn = SMTPConnection(settings, clock=lambda: now)
        conn.start()
        conn.receive(b"EHLO client.test\r\n")
        for data in COMMANDS:
            conn.receive(data)
        conn.reply_to_message(ok, close_after=False, close_reply=None)
        conn.receive(b"QUIT\r\n")


LOADS = {"reused": reused, "new": new}


def measure(emails: int, rounds: int) -> dict[str, float]:
    """Best of `rounds`, microseconds per email, for each load."""
    out = {}
    for name, load in LOADS.items():
        load(100)  # warm up
        best = float("inf")
        for _ in range(rounds):
            started = time.process_time()
            load(emails)
            best = min(best, time.process_time() - started)
        out[name] = best / emails * 1e6
    return out


def profile(emails: int) -> None:
    import cProfile
    import pstats

    for name, load in LOADS.items():
        print(f"--- {name}")
        profiler = cProfile.Profile()
        profiler.runcall(load, emails)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def run_in(src: str, emails: int, rounds: int) -> str:
    """This script's one-tree run with `src` first on the path, in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=src)
    cmd = [sys.executable, __file__, "--one", "--emails", str(emails), "--rounds", str(rounds)]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emails", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--src", action="append", default=[],
                        help="also run the core in this src directory (repeatable)")
    parser.add_argument("--alternate", type=int, default=2, help="runs of each tree, in turn")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        profile(args.emails)
        return
    if args.one:
        result = measure(args.emails, args.rounds)
        print(" ".join(f"{name}={us:.1f}" for name, us in result.items()))
        return
    print(f"CPU us per email, best of {args.rounds} x {args.emails} emails, trees alternated")
    for _ in range(args.alternate):
        for src in [str(ROOT / "src"), *args.src]:
            print(f"{src}: {run_in(src, args.emails, args.rounds).strip()}")


if __name__ == "__main__":
    main()
