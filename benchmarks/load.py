"""Load benchmark: many idle connections beside busy sessions, and slowloris against the limits.

    python benchmarks/load.py [--idle 10000] [--busy 100] [--messages 20] [--slow 300]
                              [--scenarios idle,slowloris] [--json FILE]

- **idle**: one mailpipe with `max_connections` raised; a holder process opens `--idle`
  connections (spread over the source addresses 127.0.0.2 and up, `max_connections_per_ip`
  apart), each greeted and EHLO'd, then silent. mailpipe's RSS is read before, with them all
  open, and at its peak while `--busy` sessions (from 127.0.0.1, through benchmarks/loadgen.py)
  send `--messages` emails each; the busy sessions' rate and latency show what the idle ones
  cost, and the holder counts how many idle connections mailpipe kept open throughout.
- **slowloris**: one mailpipe with its limits tightened (read_timeout 5s, data_timeout 20s,
  min_data_rate 1KB); `--slow` clients from other source addresses trickle one byte a second,
  half inside a command line, half inside DATA, while the busy sessions send. Reported: how
  many busy emails got 250, their p99, and how long mailpipe let the slow connections live.

Like the other benchmarks it reports, never judges: run it, read the table (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (  # a sibling script, not a package
    HOST,
    Server,
    group_spec,
    mailpipe_server,
    print_table,
    raise_fd_limit,
    read_status_kb,
    run_load,
)

HERE = Path(__file__).resolve().parent
# Source addresses for the idle and slow clients: all of 127/8 is loopback on Linux, and each
# address has its own ephemeral ports and its own max_connections_per_ip count.
FIRST_SOURCE = 257  # 127.0.1.1 on: loadgen.py's busy clients use 127.0.0.1-64
SLOW_LIMITS = {"read_timeout": "5s", "data_timeout": "20s", "min_data_rate": "1KB"}


def source_address(index: int, per_source: int) -> str:
    """The loopback address client `index` connects from, `per_source` clients an address."""
    n = FIRST_SOURCE + index // per_source
    return f"127.0.{n // 256}.{n % 256}"


# ---- the client processes (run as `load.py --hold ...` / `load.py --trickle ...`) -------------


Idle = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, index: int, per_source: int) -> Idle | None:
    try:
        reader, writer = await asyncio.open_connection(
            HOST, port, local_addr=(source_address(index, per_source), 0))
        await reader.readline()  # 220
        writer.write(b"EHLO idle.test\r\n")
        while (await reader.readline())[3:4] != b" ":
            pass
        return reader, writer
    except OSError:
        return None


async def still_open(reader: asyncio.StreamReader) -> bool:
    """Nothing came since the EHLO reply: mailpipe neither closed it nor said goodbye."""
    try:
        await asyncio.wait_for(reader.read(4096), 0.5)
    except TimeoutError:
        return True
    except OSError:
        return False
    return False  # EOF, or a 421 before the close


async def hold(port: int, count: int, per_source: int) -> None:
    """Open `count` idle connections, say how many, then wait for stdin to close and say how
    many mailpipe left open."""
    held: list[Idle] = []
    for start in range(0, count, 500):  # in waves: a SYN flood is not what is measured
        batch = await asyncio.gather(*(open_idle(port, i, per_source)
                                       for i in range(start, min(count, start + 500))))
        held += [pair for pair in batch if pair is not None]
    print(json.dumps({"opened": len(held)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    alive = await asyncio.gather(*(still_open(reader) for reader, _ in held))
    print(json.dumps({"still_open": sum(alive)}), flush=True)


async def trickle_one(port: int, index: int, per_source: int, in_data: bool) -> float:
    """One slow client: seconds until mailpipe closed the connection on it."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(
            HOST, port, local_addr=(source_address(index, per_source), 0))
        await reader.readline()
        if in_data:
            writer.write(b"EHLO slow.test\r\nMAIL FROM:<s@x.test>\r\n"
                         b"RCPT TO:<r@x.test>\r\nDATA\r\n")
        payload = b"Subject: slow\r\n\r\n" + b"x" * 100_000 if in_data else b"NOOP" * 100_000
        for byte in payload:
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(4096), 1.0) == b"":
                    break
    except (OSError, ConnectionError):
        pass
    return time.monotonic() - started


async def trickle(port: int, count: int, per_source: int) -> None:
    lives = await asyncio.gather(*(trickle_one(port, i, per_source, in_data=i % 2 == 1)
                                   for i in range(count)))
    print(json.dumps({"command": sorted(lives[0::2]), "data": sorted(lives[1::2])}), flush=True)


# ---- the scenarios ------------------------------------------------------------------------------


def start(name: str, root: Path, smtp: dict[str, Any]) -> Server:
    workdir = root / name
    workdir.mkdir()
    config = {"shutdown_timeout": "5s", "smtp": smtp, "store": {"max_messages": 5000}}
    server = mailpipe_server(name, workdir, config)
    server.start()
    time.sleep(0.5)
    return server


def spawn_client(mode: str, port: int, count: int, per_source: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, mode, str(port), str(count), str(per_source)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def busy_load(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    groups = [group_spec("load", args.busy, args.messages, 1024, "reuse")]
    return run_load(server, groups, timeout=120).group()


def scenario_idle(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    per_source = 100
    server = start("idle", root, {"max_connections": args.idle + args.busy + 100,
                                  "max_connections_per_ip": per_source,
                                  "read_timeout": "10m"})
    try:
        rss_before = read_status_kb(server.pid, "VmRSS")
        holder = spawn_client("--hold", server.smtp_port, args.idle, per_source)
        assert holder.stdout is not None and holder.stdin is not None
        opened = json.loads(holder.stdout.readline())["opened"]
        time.sleep(1)
        rss_idle = read_status_kb(server.pid, "VmRSS")
        load = busy_load(server, args)
        rss_peak = read_status_kb(server.pid, "VmHWM")
        holder.stdin.close()
        still_open = json.loads(holder.stdout.readline())["still_open"]
        holder.wait(30)
    finally:
        server.stop()
    return {"scenario": f"{args.idle} idle + {args.busy} busy", "opened": opened,
            "still_open": still_open, "rss_before_mb": rss_before / 1024,
            "rss_idle_mb": rss_idle / 1024, "rss_peak_mb": rss_peak / 1024, **_busy(load)}


def scenario_slowloris(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    per_source = 50
    server = start("slowloris", root, dict(SLOW_LIMITS, max_connections_per_ip=per_source))
    try:
        slow = spawn_client("--trickle", server.smtp_port, args.slow, per_source)
        time.sleep(2)  # the slow ones hold their slots first
        load = busy_load(server, args)
        assert slow.stdout is not None
        lives = json.loads(slow.stdout.readline())
        slow.wait(30)
    finally:
        server.stop()
    limits = ", ".join(f"{k} {v}" for k, v in SLOW_LIMITS.items())
    return {"scenario": f"{args.slow} slowloris ({limits}) + {args.busy} busy",
            "slow_in_command_line": len(lives["command"]),
            "slow_in_command_line_cut_after_s": max(lives["command"], default=0.0),
            "slow_in_data": len(lives["data"]),
            "slow_in_data_cut_after_s": max(lives["data"], default=0.0),
            **_busy(load)}


def _busy(load: dict[str, Any]) -> dict[str, Any]:
    latency = load["latency_ms"]
    return {"busy_ok": load["ok"], "busy_failed": load["failed"],
            "busy_failures": load.get("failures", {}),
            "busy_emails_per_s": load["ok"] / load["wall_s"] if load["wall_s"] else 0.0,
            "busy_p50_ms": latency["p50"], "busy_p99_ms": latency["p99"]}


def report(results: list[dict[str, Any]]) -> None:
    for result in results:
        print(f"\n== {result['scenario']}")
        print_table(["measure", "value"], [[key, _cell(value)] for key, value in result.items()
                                          if key != "scenario"])


def _cell(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] in ("--hold", "--trickle"):
        port, count, per_source = (int(v) for v in sys.argv[2:])
        runner = hold if sys.argv[1] == "--hold" else trickle
        asyncio.run(runner(port, count, per_source))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections held")
    parser.add_argument("--busy", type=int, default=100, help="busy sessions")
    parser.add_argument("--messages", type=int, default=20, help="emails per busy session")
    parser.add_argument("--slow", type=int, default=300, help="slowloris clients")
    parser.add_argument("--scenarios", default="idle,slowloris")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    raise_fd_limit()
    scenarios = {"idle": scenario_idle, "slowloris": scenario_slowloris}
    with tempfile.TemporaryDirectory(prefix="mailpipe-load-") as tmp:
        results = [scenarios[name](Path(tmp), args) for name in args.scenarios.split(",")]
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
