"""Faults under load, nothing lost: each fault runs through the front door while parallel SMTP
sessions send mail, every 250 is counted with its `queued as` uuid, and afterwards each one is
found (in the store through the API, or in the pipeline by draining it with the real driver).

- kill -9 of mailpipe mid-load, store only: restarted on the same data dir, every 250 is stored
  and no stored email is partial;
- the same with each jobs driver (sqlite, redis, amqp, nats): every 250 is in the pipeline;
- worker storm: real workers SIGKILLed at random (pids from /api/v1/workers) while mail flows:
  each email 250 (stored, with the worker's outcome, seen by a worker) or 451, the pool recovers;
- each broker's connection cut mid-load (a TCP proxy, never the machine's shared broker): 451
  while cut, 250 after, every 250 in the pipeline;
- a disk-full store (a small tmpfs when mounting is allowed, else RLIMIT_FSIZE on the mailpipe
  process): 451 once full, never 250 then loss, 250 again once there is room.

Each test loads for MAILPIPE_FAULT_SECONDS (3 in `make test`; `make faults` sets 30) over
MAILPIPE_FAULT_LANES sessions. With MAILPIPE_FAULT_REPORT=FILE each test appends one JSON line
(fault, sent, answers, found); `python tests/test_faults.py FILE` prints them as the table of
docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import test_jobs_e2e
from conftest import MailpipeServer
from test_jobs_e2e import (
    BROKER_DRIVERS,
    DRIVERS,
    BrokerProxy,
    Sent,
    Served,
    ServeWithPipeline,
    Session,
    accepted,
    back_to_250,
    drain,
    message,
    send_many,
    wait_for,
)
from test_workers import TestLog, start_pool, wait_until

# The jobs end-to-end fixtures this suite runs on (pytest finds fixtures by name in the module).
pipes = test_jobs_e2e.pipes
test_log = test_jobs_e2e.test_log
serve_with_pipeline = test_jobs_e2e.serve_with_pipeline
proxies = test_jobs_e2e.proxies
behind_proxy = test_jobs_e2e.behind_proxy

SECONDS = float(os.environ.get("MAILPIPE_FAULT_SECONDS", "3"))
LANES = int(os.environ.get("MAILPIPE_FAULT_LANES", "8"))
REPORT = os.environ.get("MAILPIPE_FAULT_REPORT")
# Room for the load, the restarts and the checks after it.
BOUND = pytest.mark.timeout(int(120 + 4 * SECONDS))

Factory = Callable[..., MailpipeServer]


# ---- the load: parallel SMTP sessions, every answer kept ----------------------------------


@dataclass
class Load:
    """`lanes` SMTP sessions sending emails of `size` bytes back to back until stopped; a
    session that fails is counted (code 0: no answer) and opened again."""

    port: int
    label: str
    size: int = 1000
    lanes: int = LANES
    sent: list[Sent] = field(default_factory=list)
    stopped: bool = False

    async def __aenter__(self) -> Load:
        self.tasks = [asyncio.create_task(self._lane(n)) for n in range(self.lanes)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stopped = True
        # An email waiting on a stuck server gets up to 20 s to be answered, then its client
        # gives up (counted as no answer).
        _, late = await asyncio.wait(self.tasks, timeout=20)
        for task in late:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def stop(self) -> None:
        self.stopped = True

    async def _lane(self, lane: int) -> None:
        count = 0
        while not self.stopped:
            subject = ""
            try:
                async with Session(self.port) as session:
                    while not self.stopped:
                        subject = f"{self.label} {lane}-{count}"
                        count += 1
                        self.sent.append(await session.send(subject, self.size))
                        subject = ""
            except asyncio.CancelledError:
                if subject:
                    self.sent.append(Sent(subject, 0, "cancelled: no answer in time"))
                raise
            except (OSError, ConnectionError, AssertionError, ValueError) as exc:
                if subject:
                    self.sent.append(Sent(subject, 0, f"{type(exc).__name__}: {exc}"))
                await asyncio.sleep(0.05)

    async def run_for(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def codes(self) -> Counter[int]:
        return Counter(s.code for s in self.sent)

    def accepted(self) -> list[str]:
        return accepted(self.sent)


def raw_size(subject: str, size: int) -> int:
    """The size the store must record for a whole email: what was sent, minus `.\\r\\n`."""
    return len(message(subject, size)) - 3


def answered(sent: list[Sent]) -> dict[str, int]:
    codes = Counter(s.code for s in sent)
    return {("no answer" if code == 0 else str(code)): n for code, n in sorted(codes.items())}


def assert_only(sent: list[Sent], allowed: set[int]) -> None:
    """Every answer's code is allowed, and each 451 is the "try again" of a failed sink."""
    bad = [s for s in sent if s.code not in allowed]
    bad += [s for s in sent if s.code == 451 and not s.reply.startswith("451 4.3.0")]
    assert not bad, f"{len(bad)} unexpected answers, e.g. {bad[0].subject}: {bad[0].reply}"


def report(fault: str, sent: list[Sent], found: str, how: str = "") -> None:
    row = {
        "fault": fault,
        "sent": len(sent),
        "answered": answered(sent),
        "found": found,
        "how": how,
        # tests/test_faults.py::test_...[driver]: what reruns this one fault.
        "rerun": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
        "seconds": SECONDS,
        "lanes": LANES,
    }
    print(json.dumps(row))
    if REPORT:
        with open(REPORT, "a") as fh:
            fh.write(json.dumps(row) + "\n")


# ---- the store seen through the API ---------------------------------------------------------


def stored(server: MailpipeServer) -> dict[str, dict[str, Any]]:
    """Every stored email's summary, by uuid."""
    found: dict[str, dict[str, Any]] = {}
    while True:
        page = server.get_json(f"/api/v1/messages?limit=1000&offset={len(found)}")
        found.update((m["uuid"], m) for m in page["messages"])
        if not page["messages"] or len(found) >= page["total"]:
            return found


def assert_whole(found: dict[str, dict[str, Any]], size: int) -> None:
    """No stored email is partial: each has the size of what its client sent."""
    partial = [m for m in found.values() if m["size"] != raw_size(m["subject"], size)]
    assert not partial, f"{len(partial)} partial emails stored, e.g. {partial[0]}"


def assert_intact(data_dir: Path) -> None:
    """The store's file passes SQLite's own check (read once its mailpipe has stopped)."""
    with contextlib.closing(sqlite3.connect(data_dir / "mailpipe.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def assert_all_stored(ids: list[str], found: dict[str, Any], what: str) -> None:
    lost = set(ids) - set(found)
    assert not lost, f"{len(lost)} of {len(ids)} emails answered 250 are not {what}"


async def all_in_pipeline(served: Served, ids: list[str]) -> Counter[str]:
    """Drain the pipeline with the driver itself: every 250's uuid must be there. How many
    times each job came (unanswered emails may be there too: at least once)."""
    got = await drain(await served.pipe.open(), len(ids), timeout=30 + SECONDS)
    seen = Counter(d.job.id for d in got)
    assert_all_stored(ids, seen, f"in the {served.pipe.driver} pipeline")
    return seen


async def all_250(port: int, label: str, count: int = 20) -> list[Sent]:
    """After the fault: `count` emails over 5 sessions, each must get 250."""
    sent = await send_many(port, [f"{label} {i}" for i in range(count)], 5)
    assert [s.code for s in sent] == [250] * count, [s.reply for s in sent if s.code != 250]
    return sent


# ---- 1. kill -9 of mailpipe under load, the store only --------------------------------------


@BOUND
async def test_kill_9_under_load_store_only(mailpipe_factory: Factory) -> None:
    size = 2000
    first = mailpipe_factory({"store": {"max_messages": 1_000_000}})
    async with Load(first.smtp_port, "kill", size) as load:
        await load.run_for(SECONDS)
        first.process.send_signal(signal.SIGKILL)  # mid-load: emails are in flight
        load.stop()
    assert first.process.wait(10) == -signal.SIGKILL
    assert_only(load.sent, {250, 0})
    ids = load.accepted()
    assert ids, load.codes()

    again = mailpipe_factory(
        {"data_dir": str(first.workdir / "data"), "store": {"max_messages": 1_000_000}}
    )
    found = stored(again)
    assert_all_stored(ids, found, "in the store after the restart")
    assert_whole(found, size)
    again.stop()
    assert_intact(first.workdir / "data")
    unanswered = len(found) - len(ids)  # committed, but the kill came before the 250 left
    report(
        "kill -9 of mailpipe under load (store)",
        load.sent,
        f"{len(ids)}/{len(ids)} 250s in the store after restart, {unanswered} unanswered "
        f"stored too, 0 partial",
    )


# ---- 2. kill -9 of mailpipe under load, each jobs driver ------------------------------------


@BOUND
@pytest.mark.parametrize("driver", DRIVERS)
async def test_kill_9_under_load_each_jobs_driver(
    driver: str, serve_with_pipeline: ServeWithPipeline
) -> None:
    served = serve_with_pipeline(driver)
    first = served.server
    async with Load(first.smtp_port, f"kill {driver}") as load:
        await load.run_for(SECONDS)
        first.process.send_signal(signal.SIGKILL)
        load.stop()
    assert first.process.wait(10) == -signal.SIGKILL
    assert_only(load.sent, {250, 0})

    # Restarted on the same pipeline, it takes mail again.
    second = served.another()
    after = await all_250(second.smtp_port, "after restart")
    ids = load.accepted() + accepted(after)
    seen = await all_in_pipeline(served, ids)
    report(
        f"kill -9 of mailpipe under load (jobs: {driver})",
        load.sent + after,
        f"{len(ids)}/{len(ids)} 250s in the pipeline (drained with the {driver} driver); "
        f"{len(seen) - len(ids)} unanswered there too",
    )


# ---- 3. worker storm ------------------------------------------------------------------------


async def kill_workers_at_random(server: MailpipeServer, until: asyncio.Event) -> list[int]:
    """SIGKILL a random worker (its pid from /api/v1/workers) every 0.2-0.5 s."""
    killed: list[int] = []
    while not until.is_set():
        doc = await asyncio.to_thread(server.get_json, "/api/v1/workers")
        pids = [w["pid"] for w in doc["workers"] if w.get("pid")]
        if pids:
            victim = random.choice(pids)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), random.uniform(0.2, 0.5))
    return killed


@BOUND
async def test_worker_storm(mailpipe_factory: Factory, tmp_path: Path) -> None:
    workers = 4
    keep_all = {"MAILPIPE_STORE__MAX_MESSAGES": "1000000"}  # retention must not look like loss
    pool = start_pool(
        mailpipe_factory, tmp_path, "hooks", pool={"num_workers": workers}, env=keep_all
    )
    server = pool.server
    stop = asyncio.Event()
    async with Load(pool.port, "storm [sleep 0.01]") as load:
        killer = asyncio.create_task(kill_workers_at_random(server, stop))
        await load.run_for(SECONDS)
        stop.set()
        killed = await killer
    assert killed, "no worker was killed"
    assert_only(load.sent, {250, 451})
    assert load.codes()[451] > 0, "no email met a dying worker"

    # The pool recovers: back to full size, and every email gets 250 again.
    last: list[Any] = []

    def whole() -> bool:
        last[:] = server.get_json("/api/v1/workers")["workers"]
        return len(last) == workers and all(w["status"] == "ready" for w in last)

    try:
        wait_until(whole, 30, f"{workers} ready workers again")
    except AssertionError as exc:
        warnings = [line for line in server.log().splitlines() if " INFO " not in line]
        raise AssertionError(f"{exc}: {last}\n" + "\n".join(warnings[-40:])) from None
    after = await all_250(pool.port, "after storm")

    ids = load.accepted() + accepted(after)
    found = stored(server)
    assert_all_stored(ids, found, "in the store")
    seen_by_worker = set(TestLog(pool.log.path).by_uuid())
    assert_all_stored(ids, seen_by_worker, "in the workers' log")
    for uuid in ids:
        assert server.event(uuid)["mailpipe"]["outcomes"]["worker"]["response"] == "CONTINUE"
    report(
        f"worker storm ({workers} workers, {len(killed)} SIGKILLed at random)",
        load.sent + after,
        f"{len(ids)}/{len(ids)} 250s stored with the worker's CONTINUE outcome; pool back to "
        f"{workers} ready workers",
    )


# ---- 4. each broker's connection cut mid-load -------------------------------------------------


@BOUND
@pytest.mark.parametrize("driver", BROKER_DRIVERS)
async def test_broker_cut_under_load(
    driver: str, behind_proxy: Callable[..., tuple[Served, BrokerProxy]]
) -> None:
    push_timeout = 1.0
    served, proxy = behind_proxy(driver, push_timeout=f"{push_timeout}s")
    cut_for = max(3.0, SECONDS / 3)
    async with Load(served.port, f"cut {driver}") as load:
        await load.run_for(SECONDS / 3)
        cut_at = time.monotonic()
        proxy.cut()
        await load.run_for(cut_for)
        restored_at = time.monotonic()
        proxy.restore()
        await load.run_for(SECONDS / 3)
    assert_only(load.sent, {250, 451})
    assert load.codes()[451] > 0, "the cut was not felt"
    # Past the push timeout, nothing can be confirmed until the proxy is back.
    during = [s for s in load.sent if cut_at + push_timeout + 1 < s.done_at < restored_at]
    assert 250 not in {s.code for s in during}, "250 while the broker was cut off"
    back = await back_to_250(served.port, f"cut {driver}")

    ids = load.accepted() + accepted(back)
    await all_in_pipeline(served, ids)
    report(
        f"{driver} connection cut for {cut_for:.0f} s under load",
        load.sent + back,
        f"{len(ids)}/{len(ids)} 250s in the pipeline; 451 while cut, 250 again after",
    )


# ---- 5. disk-full store ---------------------------------------------------------------------


@dataclass
class SmallDisk:
    """Where the store runs out of room, and how room is given back."""

    how: str
    path: Path
    give_room: Callable[[], None]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[SmallDisk]:
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield SmallDisk(
            f"tmpfs of {size}, remounted at 64m",
            path,
            lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(path)], check=True),
        )
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def can_mount(scratch: Path) -> bool:
    """Whether a tmpfs can be mounted here (root, with the privilege a container may lack)."""
    if os.environ.get("MAILPIPE_FAULT_DISK") == "fsize" or os.geteuid() != 0:
        return False
    if not (shutil.which("mount") and shutil.which("umount")):
        return False
    probe = scratch / "mount-probe"
    probe.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True
    )
    if done.returncode == 0:
        subprocess.run(["umount", str(probe)], check=False)
    return done.returncode == 0


def limit_file_size(pid: int, limit: int) -> Callable[[], None]:
    """RLIMIT_FSIZE on the running mailpipe (its log file lives elsewhere and stays small):
    writes past `limit` bytes in any file fail with EFBIG (Python ignores SIGXFSZ). Returns
    how to lift it."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    return lambda: resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


@BOUND
async def test_disk_full_store(mailpipe_factory: Factory, tmp_path: Path) -> None:
    size = 8000
    mounted = can_mount(tmp_path)
    with contextlib.ExitStack() as stack:
        if mounted:
            disk = stack.enter_context(tmpfs(tmp_path / "small", "2m"))
            server = mailpipe_factory(
                {"data_dir": str(disk.path), "store": {"max_messages": 1_000_000}}
            )
        else:
            server = mailpipe_factory({"store": {"max_messages": 1_000_000}})
            lift = limit_file_size(server.process.pid, 2 << 20)
            disk = SmallDisk(
                "RLIMIT_FSIZE of 2 MB on mailpipe, then lifted", server.workdir / "data", lift
            )
        async with Load(server.smtp_port, "full", size) as load:

            def refused() -> bool:
                return load.codes()[451] >= LANES

            await wait_for(refused, 30 + SECONDS, "451s once the disk is full", interval=0.1)
            full_at = len(load.sent)
            await load.run_for(SECONDS / 2)  # it stays full: 451s, never 250
            disk.give_room()
            room_at = len(load.sent)

            def accepting_again() -> bool:
                return any(s.code == 250 for s in load.sent[room_at + LANES :])

            await wait_for(accepting_again, 30, "250 once there is room", interval=0.1)
            await load.run_for(SECONDS / 2)
        assert_only(load.sent, {250, 451})
        ids = load.accepted()
        full_phase = load.sent[full_at + LANES : room_at]
        # 451 while full; a commit that fits in space SQLite already holds (the WAL is reused
        # after a checkpoint) may still succeed and get 250, and must then be stored.
        while_full = answered(full_phase)
        assert while_full.get("451"), while_full
        found = stored(server)
        assert_all_stored(ids, found, "in the store")
        assert_whole(found, size)
        # And after a restart, from the file itself.
        server.stop()
        again = mailpipe_factory({"data_dir": str(disk.path), "store": {"max_messages": 1_000_000}})
        assert_all_stored(ids, stored(again), "in the store after a restart")
        again.stop()
        assert_intact(disk.path)
    report(
        "disk-full store",
        load.sent,
        f"{len(ids)}/{len(ids)} 250s in the store (also after a restart), 0 partial; while "
        f"full: {while_full}; 250 again once there was room",
        disk.how,
    )


# ---- the summary table ------------------------------------------------------------------------


def table(lines: list[dict[str, Any]]) -> str:
    out = [
        "| fault | sent | answered | found afterwards | rerun |",
        "|---|---|---|---|---|",
    ]
    for row in lines:
        answers = ", ".join(f"{n} x {code}" for code, n in row["answered"].items())
        how = f" ({row['how']})" if row.get("how") else ""
        rerun = f"`{row['rerun']}`" if row.get("rerun") else ""
        out.append(
            f"| {row['fault']}{how} | {row['sent']} | {answers} | {row['found']} | {rerun} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    source = Path(sys.argv[1])
    lines = source.read_text().splitlines() if source.exists() else []
    print(table([json.loads(x) for x in lines if x.strip()]))
