"""How long `build_event` takes per message, this checkout against another mailpipe.

    python benchmarks/parse.py [--src DIR] [--seconds S] [--json FILE]

Cases: a 1 KB text/plain message like smtp-source's, a multipart/alternative (text and
HTML), multipart/mixed with a 100 KB and with a 2 MB base64 attachment, and the corpus
(tests/data/corpus plus CPython's email test messages) as one total. Each case runs in
turn in fresh interpreters, this checkout's `src` and `--src` (default /work/main/src,
main's code), twice each (other, this, this, other), for about S seconds a run; the fastest
batch is shown.
Like the other benchmarks it reports, never judges (benchmarks/README.md has results).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPORA = [
    ROOT / "tests" / "data" / "corpus",
    Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data",
]


def smtp_source_like() -> bytes:
    head = (
        "From: <a@b.test>\r\nTo: <r@s.test>\r\nDate: Tue, 01 Dec 2026 01:00:00 +0000\r\n"
        "Message-Id: <20261201010000.1234.5678@client.test>\r\nSubject: test\r\n\r\n"
    )
    return head.encode() + b"La La La La La La La La La La La La La La La La La\r\n" * 20


def multipart(*parts: bytes) -> bytes:
    head = (
        b"From: Sender <sender@example.test>\r\nTo: rcpt@example.test\r\n"
        b"Subject: a report\r\nMessage-ID: <abc.123@example.test>\r\n"
        b"Date: Tue, 01 Dec 2026 01:00:00 +0000\r\nMIME-Version: 1.0\r\n"
    )
    return head + b"".join(parts)


def alternative() -> bytes:
    text = b"Hello,\r\n\r\nthe report is attached.\r\n" * 10
    html = b"<p>Hello,</p><p>the report is <b>attached</b>.</p>\r\n" * 10
    return multipart(
        b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n',
        b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text,
        b"\r\n--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html,
        b"\r\n--alt--\r\n",
    )


def with_attachment(size: int) -> bytes:
    data = base64.encodebytes(os.urandom(size)).replace(b"\n", b"\r\n")
    return multipart(
        b'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n',
        b"--mix\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee attached.\r\n",
        b"--mix\r\nContent-Type: application/pdf; name=report.pdf\r\n"
        b"Content-Disposition: attachment; filename=report.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + data,
        b"--mix--\r\n",
    )


def corpus() -> list[bytes]:
    files = [p for d in CORPORA if d.is_dir() for p in sorted(d.iterdir())]
    return [p.read_bytes() for p in files if p.suffix in (".eml", ".txt")]


CASES = {
    "1 KB text/plain": lambda: [smtp_source_like()],
    "multipart/alternative": lambda: [alternative()],
    "100 KB attachment": lambda: [with_attachment(100_000)],
    "2 MB attachment": lambda: [with_attachment(2_000_000)],
    "corpus (total)": corpus,
}

# Runs in the measured interpreter: prints microseconds per batch of the case's messages.
CHILD = """
import json, sys, time
from datetime import UTC, datetime
sys.path.insert(0, {bench!r})
from parse import CASES
from mailpipe.capture.message import EventOptions, SessionInfo, build_event
from mailpipe.capture.types import AuthInfo, Envelope
messages = CASES[{case!r}]()
kw = dict(envelope=Envelope("a@b.test", ["r@s.test"]), auth=AuthInfo(),
          session=SessionInfo("u", "192.0.2.1:5", "127.0.0.1:25", "smtp", False),
          received_at=datetime.now(UTC), options=EventOptions())
def batch():
    for raw in messages:
        build_event(raw, **kw)
def timed():
    start = time.perf_counter()
    batch()
    return time.perf_counter() - start
timed()
end = time.perf_counter() + {seconds}
best = min(timed() for _ in range(3))
while time.perf_counter() < end:
    best = min(best, timed())
print(json.dumps({{"us": best * 1e6, "messages": len(messages),
                   "module": __import__("mailpipe").__file__}}))
"""


def measure(src: str, case: str, seconds: float) -> dict[str, float]:
    code = CHILD.format(bench=str(ROOT / "benchmarks"), case=case, seconds=seconds)
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default="/work/main/src", help="the other mailpipe's src")
    parser.add_argument("--seconds", type=float, default=1.5, help="per run: 4 runs a case")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    ours = str(ROOT / "src")
    rows = []
    print(f"{'case':24} {'messages':>8} {'other us':>10} {'this us':>10} {'ratio':>7}")
    for case in CASES:
        # In turn, twice, the fastest of each: a busy spell of the shared machine then
        # slows one run of each side rather than one side.
        other, this = measure(args.src, case, args.seconds), measure(ours, case, args.seconds)
        this = min(this, measure(ours, case, args.seconds), key=lambda r: r["us"])
        other = min(other, measure(args.src, case, args.seconds), key=lambda r: r["us"])
        ratio = this["us"] / other["us"]
        rows.append({"case": case, "other_us": other["us"], "this_us": this["us"]})
        print(
            f"{case:24} {this['messages']:>8} {other['us']:>10,.1f} {this['us']:>10,.1f}"
            f" {ratio:>6.2f}x"
        )
    print(f"other: {other['module']}\nthis:  {this['module']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
