"""The load generator that benchmarks/ingest.py runs in its own process.

Lean on purpose (the machine has two cores, one of them is the server's): uvloop, raw
`asyncio.open_connection`, messages built once before the clock starts.

    python benchmarks/loadgen.py '<spec as JSON>'   ->   one JSON document on stdout

The spec names the server and one or more groups of sessions run at the same time:

    {"host": "127.0.0.1", "port": 2525, "timeout": 120,
     "groups": [{"name": "load", "connections": 100, "messages": 20, "size": 1024,
                 "mode": "reuse", "barrier": false, "until": null, "kind": "text"}]}

mode "reuse": a connection per session; after EHLO it sends `messages` emails, each as
MAIL+RCPT+DATA in one write (PIPELINING), the three replies, the body and its terminator, the
final reply; then QUIT. mode "new": each email on a new connection: greeting, EHLO, the same
pipelined envelope, body, final reply, QUIT. An email's latency runs from writing MAIL to
reading the final reply. "barrier": every session of the group connects and says EHLO before
any sends (so all its connections are open at once). "until": the group's sessions keep sending
until the named group has finished (`messages` is then ignored). "kind": "text" (text/plain)
or "attachment" (multipart with a base64 attachment, for the big messages).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - the benchmark says which loop it used
    uvloop = None  # type: ignore[assignment]

EHLO = b"EHLO loadgen.bench.test\r\n"
QUIT = b"QUIT\r\n"
TERMINATOR = b".\r\n"
LINE_LIMIT = 1 << 20


# Loopback source addresses the connections are spread over (see Runner._source).
SOURCES = 64

class SMTPFailure(Exception):
    """An unexpected reply: the session stops (its unsent emails count as failed)."""

    def __init__(self, stage: str, code: int) -> None:
        super().__init__(f"{stage} {code}")
        self.key = f"{stage}:{code}"


@dataclass
class Group:
    name: str
    connections: int
    messages: int
    size: int
    mode: str = "reuse"
    barrier: bool = False
    until: str | None = None
    kind: str = "text"


@dataclass
class GroupStats:
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    first_send: float | None = None
    last_done: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    sessions_left: int = 0

    def fail(self, key: str, count: int = 1) -> None:
        self.failed += count
        self.failures[key] = self.failures.get(key, 0) + count


@dataclass
class Connections:
    open: int = 0
    peak: int = 0

    def opened(self) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)

    def closed(self) -> None:
        self.open -= 1


def build_message(size: int, kind: str, seed: int = 1) -> bytes:
    """Headers and body (no Message-ID, the sender adds one per email), CRLF lines, ~size bytes
    on the wire with the Message-ID line. No line starts with '.', so no dot-stuffing is needed.
    """
    rng = random.Random(seed)
    headers = (
        b"From: Load Generator <sender@bench.test>\r\n"
        b"To: Sink <rcpt@bench.test>\r\n"
        b"Subject: benchmark message\r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\n"
    )
    budget = max(0, size - len(headers) - 60)  # ~60: the Message-ID line
    if kind == "attachment":
        boundary = "bench-boundary-7d3f"
        head = (
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "See the attached file.\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            'Content-Disposition: attachment; filename="data.bin"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        tail = f"--{boundary}--\r\n".encode()
        encoded_budget = max(0, budget - len(head) - len(tail))
        raw = rng.randbytes(encoded_budget * 57 // 78)  # 57 bytes -> 76 chars + CRLF
        body = base64.encodebytes(raw).replace(b"\n", b"\r\n")
        return headers + head + body + tail
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(512)
    ]
    lines: list[bytes] = []
    total = 0
    while total < budget:
        line = " ".join(rng.choice(words) for _ in range(11))[:70].encode() + b"\r\n"
        lines.append(line)
        total += len(line)
    body = b"".join(lines)
    if len(body) > budget > 2:
        body = body[: budget - 2].rstrip(b" ") + b"\r\n"
    ctype = b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    return headers + ctype + body


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One SMTP reply (all its lines); returns the code and the text."""
    text = b""
    while True:
        line = await reader.readuntil(b"\n")
        text += line
        if len(line) < 4 or line[3:4] != b"-":
            try:
                return int(line[:3]), text
            except ValueError:
                raise SMTPFailure("garbled", 0) from None


class Runner:
    def __init__(self, host: str, port: int, groups: list[Group]) -> None:
        self.host = host
        self.port = port
        self.groups = {group.name: group for group in groups}
        self.stats = {group.name: GroupStats() for group in groups}
        self.conns = Connections()
        self.bodies = {g.name: build_message(g.size, g.kind) + TERMINATOR for g in groups}
        self.envelopes = {
            g.name: (
                f"MAIL FROM:<sender@bench.test> SIZE={len(self.bodies[g.name]) + 60}\r\n"
                "RCPT TO:<rcpt@bench.test>\r\nDATA\r\n"
            ).encode()
            for g in groups
        }
        self.barriers: dict[str, tuple[asyncio.Event, list[int]]] = {
            g.name: (asyncio.Event(), [g.connections]) for g in groups if g.barrier
        }
        self.barrier_released: dict[str, float] = {}
        self.connect_slots = asyncio.Semaphore(200)  # barrier phase: don't flood the backlog
        self.counter = 0
        self.sources_used = 0

    # -- helpers -------------------------------------------------------------------------

    def _source(self) -> tuple[str, int] | None:
        """Loopback clients come from SOURCES addresses in turn (all of 127/8 is loopback on
        Linux): as many clients from one address as this generator opens would meet mailpipe's
        max_connections_per_ip, which guards against one real source, not against a benchmark."""
        if not self.host.startswith("127."):
            return None
        self.sources_used += 1
        return (f"127.0.0.{1 + self.sources_used % SOURCES}", 0)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, limit=LINE_LIMIT, local_addr=self._source())
        self.conns.opened()
        try:
            code, _ = await read_reply(reader)
            if code != 220:
                raise SMTPFailure("greeting", code)
            writer.write(EHLO)
            code, _ = await read_reply(reader)
            if code != 250:
                raise SMTPFailure("ehlo", code)
        except BaseException:
            self._close(writer)
            raise
        return reader, writer

    def _close(self, writer: asyncio.StreamWriter) -> None:
        if not writer.is_closing():
            writer.close()
            self.conns.closed()

    async def _quit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            writer.write(QUIT)
            await read_reply(reader)
        self._close(writer)

    def _keep_going(self, group: Group, sent: int) -> bool:
        if group.until is not None:
            return not self.stats[group.until].done.is_set()
        return sent < group.messages

    async def _send_one(
        self, group: Group, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        stats = self.stats[group.name]
        body = self.bodies[group.name]
        self.counter += 1
        message_id = f"Message-ID: <{self.counter}.{time.time_ns()}@loadgen.bench.test>\r\n"
        started = time.perf_counter()
        if stats.first_send is None:
            stats.first_send = started
        writer.write(self.envelopes[group.name])
        for stage, expected in (("mail", 250), ("rcpt", 250), ("data", 354)):
            code, _ = await read_reply(reader)
            if code != expected:
                raise SMTPFailure(stage, code)  # the session closes the connection
        if len(body) > 65536:
            writer.write(message_id.encode())
            writer.write(body)
            await writer.drain()
        else:
            writer.write(message_id.encode() + body)
        code, _ = await read_reply(reader)
        if code != 250:
            raise SMTPFailure("end-of-data", code)
        done = time.perf_counter()
        stats.latencies.append(done - started)
        stats.ok += 1
        stats.last_done = done

    def _arrive(self, group: Group) -> asyncio.Event | None:
        """Count this session in at the group's barrier (also when it failed to connect)."""
        barrier = self.barriers.get(group.name)
        if barrier is None:
            return None
        event, left = barrier
        left[0] -= 1
        if left[0] <= 0 and not event.is_set():
            self.barrier_released[group.name] = time.perf_counter()
            event.set()
        return event

    # -- sessions --------------------------------------------------------------------------

    async def reuse_session(self, group: Group) -> None:
        stats = self.stats[group.name]
        sent = 0
        arrived = False
        writer: asyncio.StreamWriter | None = None
        try:
            if group.barrier:
                async with self.connect_slots:
                    reader, writer = await self._connect()
                arrived = True
                event = self._arrive(group)
                if event is not None:
                    await event.wait()
            else:
                reader, writer = await self._connect()
            while self._keep_going(group, sent):
                sent += 1
                await self._send_one(group, reader, writer)
            await self._quit(reader, writer)
        except SMTPFailure as exc:
            stats.fail(exc.key, self._unsent(group, sent))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            stats.fail(f"error:{type(exc).__name__}", self._unsent(group, sent))
        finally:
            if group.barrier and not arrived:
                self._arrive(group)
            if writer is not None:
                self._close(writer)

    @staticmethod
    def _unsent(group: Group, sent: int) -> int:
        """Emails a failed session did not deliver: the one in progress and those not sent."""
        if group.until is not None:
            return 1
        return group.messages - max(sent - 1, 0)

    async def new_session(self, group: Group) -> None:
        stats = self.stats[group.name]
        sent = 0
        while self._keep_going(group, sent):
            sent += 1
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await self._connect()
                await self._send_one(group, reader, writer)
                await self._quit(reader, writer)
            except SMTPFailure as exc:
                stats.fail(exc.key)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                stats.fail(f"error:{type(exc).__name__}")
            finally:
                if writer is not None:
                    self._close(writer)

    async def run_group(self, group: Group) -> None:
        stats = self.stats[group.name]
        session = self.reuse_session if group.mode == "reuse" else self.new_session
        try:
            await asyncio.gather(*(session(group) for _ in range(group.connections)))
        finally:
            stats.done.set()

    async def run(self, timeout: float) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = usage.ru_utime + usage.ru_stime
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(self.run_group(g)) for g in self.groups.values()]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        timed_out = bool(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        t1 = time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu1 = usage.ru_utime + usage.ru_stime
        groups: dict[str, Any] = {}
        for name, stats in self.stats.items():
            group = self.groups[name]
            start = self.barrier_released.get(name, stats.first_send or t0)
            end = stats.last_done or t1
            wall = max(end - start, 1e-9)
            planned = None if group.until else group.connections * group.messages
            unfinished = 0 if planned is None else planned - stats.ok - stats.failed
            if unfinished > 0:
                stats.fail("timeout", unfinished)
            groups[name] = {
                "ok": stats.ok,
                "failed": stats.failed,
                "failures": stats.failures,
                "planned": planned,
                "wall_s": wall,
                "emails_per_s": stats.ok / wall,
                "latency_ms": summarize(stats.latencies),
                "message_bytes": len(self.bodies[name]) - len(TERMINATOR),
            }
        return {
            "groups": groups,
            "wall_s": t1 - t0,
            "client_cpu_s": cpu1 - cpu0,
            "peak_connections": self.conns.peak,
            "timed_out": timed_out,
            "loop": "uvloop" if uvloop is not None else "asyncio",
        }


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def summarize(latencies: list[float]) -> dict[str, float | int]:
    ordered = sorted(latencies)
    ms = 1000.0
    return {
        "count": len(ordered),
        "p50": percentile(ordered, 50) * ms,
        "p90": percentile(ordered, 90) * ms,
        "p99": percentile(ordered, 99) * ms,
        "max": (ordered[-1] * ms) if ordered else float("nan"),
        "mean": (sum(ordered) / len(ordered) * ms) if ordered else float("nan"),
    }


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main_async(spec: dict[str, Any]) -> dict[str, Any]:
    groups = [Group(**group) for group in spec["groups"]]
    runner = Runner(spec.get("host", "127.0.0.1"), int(spec["port"]), groups)
    return await runner.run(float(spec.get("timeout", 120)))


def main() -> None:
    spec = json.loads(sys.argv[1])
    raise_fd_limit()
    loop_factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(main_async(spec))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
