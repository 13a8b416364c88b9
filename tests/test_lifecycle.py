"""One lifecycle for `mailpipe serve` and `mailpipe jobs consume` (lifecycle.py), through the
front door: real processes, real signals, real SMTP clients, workers and consumers.

A first SIGTERM drains gracefully; a second skips the waiting but still flushes and closes,
and the process exits 0; only a cleanup that hangs (or a third signal) ends it at once. The
timeouts are set far beyond the tests' own guards, so a process that waited for them instead
of hurrying fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, MailpipeServer
from test_admin import send, wait_for
from test_jobs_cli import CONSUMER, SQLITE, acked, consume, stats
from test_workers import Reply, ServerClosed, gone, in_thread, send_one

Factory = Callable[..., MailpipeServer]

PY_WORKER = [sys.executable, str(ROOT / "examples" / "worker.py")]
LONG = "300s"  # shutdown_timeout and destroy_timeout: no test waits this long
GUARD = 60  # seconds a hurried process may take before the test calls it hung


def stored_uuids(server: MailpipeServer) -> set[str]:
    """The uuids in the store file, read after mailpipe exited; the file must be intact."""
    with sqlite3.connect(server.workdir / "data" / "mailpipe.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return {row[0] for row in db.execute("SELECT uuid FROM messages")}


def jsonl_uuids(path: Path) -> set[str]:
    return {json.loads(line)["uuid"] for line in path.read_text().splitlines()}


def wait_for_log(server_log: Callable[[], str], needle: str, timeout: float = 20) -> None:
    assert wait_for(lambda: needle in server_log(), timeout), server_log()[-3000:]


def serve_with_workers(factory: Factory, tmp_path: Path) -> tuple[MailpipeServer, Path]:
    jsonl = tmp_path / "events.jsonl"
    server = factory({
        "shutdown_timeout": LONG,
        "server": {"command": PY_WORKER},
        "smtp": {"pool": {"num_workers": 2, "destroy_timeout": LONG}},
        "sinks": {"jsonl": {"path": str(jsonl)}},
    })
    return server, jsonl


def accepted(server: MailpipeServer, count: int) -> set[str]:
    replies = [send_one(server.smtp_port, f"accepted {i}") for i in range(count)]
    assert all(reply.code == 250 for reply in replies), replies
    return {reply.uuid for reply in replies}


def hold_one(server: MailpipeServer) -> Any:
    """The future reply to an email a worker sits on, once the worker has it."""
    token = f"held-{uuidlib.uuid4().hex[:8]}"
    pending = in_thread(send_one, server.smtp_port, f"{token} [sleep 300]")
    wait_for_log(server.log, token)  # the worker printed it: it has the email
    return pending


def reply_or_closed(pending: Any) -> Reply | None:
    try:
        return pending.result(timeout=GUARD)
    except ServerClosed:
        return None


# ---- serve ---------------------------------------------------------------------------------


def test_serve_sigterm_lets_the_held_email_finish_and_exits_0(
    mailpipe_factory: Factory, tmp_path: Path,
) -> None:
    server = mailpipe_factory({"server": {"command": PY_WORKER},
                               "smtp": {"pool": {"num_workers": 2}}})
    uuids = accepted(server, 3)
    token = f"finish-{uuidlib.uuid4().hex[:8]}"
    pending = in_thread(send_one, server.smtp_port, f"{token} [sleep 1]")
    wait_for_log(server.log, token)
    server.process.send_signal(signal.SIGTERM)
    reply = pending.result(timeout=GUARD)
    assert reply.code == 250, reply
    assert server.process.wait(timeout=GUARD) == 0, server.log()[-3000:]
    assert stored_uuids(server) == uuids | {reply.uuid}


def test_serve_second_sigterm_skips_the_wait_but_flushes_and_closes(
    mailpipe_factory: Factory, tmp_path: Path,
) -> None:
    server, jsonl = serve_with_workers(mailpipe_factory, tmp_path)
    uuids = accepted(server, 3)
    workers = [w["pid"] for w in server.get_json("/api/v1/workers")["workers"]]
    pending = hold_one(server)

    server.process.send_signal(signal.SIGTERM)
    wait_for_log(server.log, "finishing messages in flight")
    assert server.process.poll() is None  # graceful: it waits for the held email
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=GUARD) == 0, server.log()[-3000:]

    reply = reply_or_closed(pending)
    assert reply is None or reply.code != 250, reply  # the client will send it again
    log = server.log()
    assert "not waiting for messages in flight" in log and "stopped" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert stored_uuids(server) == uuids  # every email that got 250, and the file intact
    assert jsonl_uuids(jsonl) == uuids  # the optional sink was flushed too
    assert all(gone(pid) for pid in workers), "workers left behind"


# ---- jobs consume --------------------------------------------------------------------------


def consume_config(factory: Factory, tmp_path: Path) -> tuple[MailpipeServer, Path]:
    log = tmp_path / "consumer.jsonl"
    jobs = {**SQLITE["jobs"], "pool": {"command": CONSUMER, "num_workers": 1,
                                       "destroy_timeout": LONG}}
    server = factory({**SQLITE, "jobs": jobs, "shutdown_timeout": LONG,
                      "server": {"env": {"MAILPIPE_TEST_LOG": str(log)}}})
    return server, log


def consume_log(server: MailpipeServer) -> Callable[[], str]:
    return lambda: (server.workdir / "consume.log").read_text(errors="replace")


@contextlib.contextmanager
def consuming(server: MailpipeServer) -> Iterator[subprocess.Popen[bytes]]:
    """`mailpipe jobs consume emails` on the server's config; killed if a test leaves it."""
    process = consume(server.workdir / "mailpipe.yaml", "emails")
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_consume_sigterm_finishes_the_job_in_hand_and_exits_0(
    mailpipe_factory: Factory, tmp_path: Path,
) -> None:
    server, log = consume_config(mailpipe_factory, tmp_path)
    send(server, "in hand [sleep 1]")
    with consuming(server) as process:
        wait_for_log(consume_log(server), "in hand")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=GUARD) == 0, consume_log(server)()[-3000:]
    assert acked(log) == ["in hand [sleep 1]"]
    assert stats(server)["ready"] == 0 and stats(server)["reserved"] == 0


def test_consume_second_sigterm_skips_the_wait_and_the_job_stays_queued(
    mailpipe_factory: Factory, tmp_path: Path,
) -> None:
    server, log = consume_config(mailpipe_factory, tmp_path)
    for subject in ("first", "second", "held [sleep 300]"):
        send(server, subject)
    output = consume_log(server)
    with consuming(server) as process:
        assert wait_for(lambda: acked(log) == ["first", "second"], 30), acked(log)
        wait_for_log(output, "held [sleep 300]")
        process.send_signal(signal.SIGTERM)
        wait_for_log(output, "shutting down")
        assert process.poll() is None  # graceful: it waits for the job in hand
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=GUARD) == 0, output()[-3000:]
    assert "Traceback" not in output()
    assert acked(log) == ["first", "second"]
    left = stats(server)
    assert left["ready"] + left["reserved"] + left["delayed"] == 1, left  # not lost


# ---- the cleanup bound -------------------------------------------------------------------

# A process built on Lifecycle whose drain never ends unless hurried and whose close() hangs
# when told to: what the bound is for.
LIFECYCLE_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from mailpipe.lifecycle import Lifecycle

    HANG_IN_CLOSE = sys.argv[1] == "hang"

    async def start():
        print("started", flush=True)

    async def drain(hurry):
        print(f"drain hurry={hurry}", flush=True)
        if not hurry:
            await asyncio.Event().wait()

    async def close():
        if HANG_IN_CLOSE:
            await asyncio.Event().wait()
        print("closed", flush=True)

    asyncio.run(Lifecycle(cleanup_bound=float(sys.argv[2])).run(start, drain, close))
""")


def lifecycle_process(close: str, bound: float) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", LIFECYCLE_SCRIPT, close, str(bound)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "started\n"
    return process


def signal_until(process: subprocess.Popen[str], line: str) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.stdout is not None and process.stdout.readline() == line


def finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    """The rest of its stdout and its stderr once it exited (not communicate(), which would
    miss what readline() already buffered)."""
    process.wait(timeout=GUARD)
    assert process.stdout is not None and process.stderr is not None
    return process.stdout.read(), process.stderr.read()


@pytest.mark.parametrize(("close", "bound", "status", "out", "err"), [
    ("return", 300, 0, "closed\n", ""),
    ("hang", 0.5, 1, "", "cleanup did not finish within 0.5s: exiting"),
])
def test_second_signal_cleans_up_and_exits_at_once_only_when_cleanup_hangs(
    close: str, bound: float, status: int, out: str, err: str,
) -> None:
    process = lifecycle_process(close, bound)
    signal_until(process, "drain hurry=False\n")
    signal_until(process, "drain hurry=True\n")
    stdout, stderr = finish(process)
    assert process.returncode == status, stderr
    assert stdout == out and err in stderr


def test_third_signal_exits_without_cleaning_up() -> None:
    process = lifecycle_process("hang", 300)
    signal_until(process, "drain hurry=False\n")
    signal_until(process, "drain hurry=True\n")  # close() hangs next
    process.send_signal(signal.SIGTERM)
    _, stderr = finish(process)
    assert process.returncode == 1 and "a third time" in stderr
