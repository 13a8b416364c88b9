"""The worker pool end to end: a real `mailpipe serve`, real worker processes (the Python SDK
example, the dependency-free PHP example, and tests/workers/hooks_worker.py built on the frame
codec alone), real SMTP sockets.

The examples answer according to markers in the subject (`[close]`, `[error]`, `[sleep N]`,
`[crash]`, `[print]`) and append one JSON line per answered email to MAILPIPE_TEST_LOG (pid,
uuid, subject, answer); they also print one line per email to stderr, which mailpipe logs with
`worker=PID` before the worker answers (how the tests find the worker busy with an email).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, MailpipeServer, free_port, missing, require_tool

Factory = Callable[..., MailpipeServer]

PY_EXAMPLE = ROOT / "examples" / "worker.py"
PHP_EXAMPLE = ROOT / "examples" / "php" / "goridge_worker.php"
HOOKS_WORKER = ROOT / "tests" / "workers" / "hooks_worker.py"
KINDS = ["python", "php"]


def worker_command(kind: str) -> list[str]:
    if kind == "python":
        return [sys.executable, str(PY_EXAMPLE)]
    if kind == "php":
        return [require_tool("php"), str(PHP_EXAMPLE)]
    if kind == "hooks":
        return [sys.executable, str(HOOKS_WORKER)]
    raise ValueError(kind)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    """Poll until `predicate()` is truthy (returned); fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


# ---- SMTP ---------------------------------------------------------------------------------


@dataclass
class Reply:
    code: int
    text: str

    @property
    def uuid(self) -> str:
        match = re.search(r"queued as ([0-9a-f-]{36})", self.text)
        assert match, f"no uuid in {self.text!r}"
        return match.group(1)


class ServerClosed(Exception):
    """The server closed the connection."""


def message(subject: str, body: str = "Hello from the worker tests.\r\n") -> bytes:
    return (
        "From: App <app@example.com>\r\n"
        "To: <dev@example.test>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{uuidlib.uuid4()}@example.com>\r\n"
        "\r\n"
        f"{body}"
    ).encode()


class Client:
    """A blocking SMTP client on a plain socket: every reply code is seen, nothing is hidden."""

    def __init__(self, port: int, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")
        assert self.reply().code == 220
        assert self.command("EHLO tests.example").code == 250

    def reply(self) -> Reply:
        lines: list[bytes] = []
        while True:
            line = self.rfile.readline()
            if not line:
                raise ServerClosed(b"".join(lines).decode(errors="replace"))
            lines.append(line)
            if line[3:4] != b"-":
                return Reply(int(line[:3]), b"".join(lines).decode(errors="replace"))

    def command(self, line: str) -> Reply:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def send(self, subject: str, body: str = "Hello from the worker tests.\r\n") -> Reply:
        """One email; the reply to its end of data."""
        for line, expected in (
            ("MAIL FROM:<app@example.com>", 250),
            ("RCPT TO:<dev@example.test>", 250),
            ("DATA", 354),
        ):
            reply = self.command(line)
            assert reply.code == expected, f"{line}: {reply}"
        self.sock.sendall(message(subject, body) + b".\r\n")
        return self.reply()

    def at_eof(self) -> bool:
        return self.rfile.read(1) == b""

    def close(self) -> None:
        with contextlib.suppress(OSError, ServerClosed):
            self.command("QUIT")
        self.sock.close()


def send_one(port: int, subject: str) -> Reply:
    client = Client(port)
    try:
        return client.send(subject)
    finally:
        client.close()


# ---- the pool under test ------------------------------------------------------------------


class TestLog:
    """MAILPIPE_TEST_LOG: one JSON object per email a worker handled."""

    __test__ = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def wait(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            lines = self.lines()
            return lines if len(lines) >= count else None

        return wait_until(enough, timeout, f"{count} lines in {self.path.name}")

    def by_uuid(self) -> dict[str, dict[str, Any]]:
        return {line["uuid"]: line for line in self.lines()}


def live_children(pid: int, marker: str = "") -> set[int]:
    """Child processes of `pid` that are not zombies, whose command line contains `marker`
    (the worker script: mailpipe may have other helper processes)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    alive = set()
    for child in found:
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] == "Z":
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                alive.add(child)
    return alive


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@dataclass
class Pool:
    server: MailpipeServer
    log: TestLog
    script: str  # the worker script, to tell workers from other child processes

    @property
    def port(self) -> int:
        return self.server.smtp_port

    def client(self) -> Client:
        return Client(self.port)

    def pids(self) -> set[int]:
        return live_children(self.server.process.pid, self.script)

    def wait_pids(
        self, predicate: Callable[[set[int]], bool], what: str, timeout: float = 10.0
    ) -> set[int]:
        def check() -> list[set[int]] | None:
            pids = self.pids()
            return [pids] if predicate(pids) else None

        return wait_until(check, timeout, what)[0]

    def busy_pid(self, token: str, timeout: float = 10.0) -> int:
        """The worker holding the email whose subject contains `token`: from the line the
        worker printed on stderr, which mailpipe logs with `worker=PID`."""

        def find() -> int | None:
            for line in self.server.log().splitlines():
                if token in line and (match := re.search(r"\bworker=(\d+)", line)):
                    return int(match.group(1))
            return None

        return int(wait_until(find, timeout, f"a worker to pick up {token!r}"))

    def metrics(self) -> str:
        status, body, _ = self.server.request("GET", "/metrics")
        assert status == 200
        return body.decode()

    def admin_api(self) -> bool:
        status, _, _ = self.server.request("GET", "/api/v1/workers")
        return status == 200


def start_pool(
    factory: Factory,
    tmp_path: Path,
    kind: str = "python",
    *,
    pool: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    smtp: dict[str, Any] | None = None,
    worker_env: dict[str, str] | None = None,
    **kwargs: Any,
) -> Pool:
    """mailpipe with a pool of `kind` workers; `worker_env` goes to server.env, `kwargs` to
    the factory (e.g. `env=` for mailpipe's own environment)."""
    log_path = tmp_path / f"worker-log-{uuidlib.uuid4().hex[:8]}.jsonl"
    server_cfg = {
        "command": worker_command(kind),
        "env": {"MAILPIPE_TEST_LOG": str(log_path), **(worker_env or {})},
        **(server or {}),
    }
    smtp_cfg = {"include_raw": True, "pool": {"num_workers": 2, **(pool or {})}, **(smtp or {})}
    mp = factory({"server": server_cfg, "smtp": smtp_cfg}, **kwargs)
    return Pool(mp, TestLog(log_path), server_cfg["command"][-1])


def in_thread(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    executor = ThreadPoolExecutor(max_workers=1)
    future = executor.submit(fn, *args)
    executor.shutdown(wait=False)
    return future


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in Prometheus text, None when absent."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{\})?")
    match = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def outcome(pool: Pool, uuid: str) -> dict[str, Any]:
    return pool.server.event(uuid)["mailpipe"]["outcomes"]["worker"]


# ---- the documented workers run as written ------------------------------------------------


def documented_command(command: str, *dirs: Path) -> list[str]:
    """A command from the docs, its relative paths taken in `dirs` (where a user runs it: their
    project, this repository); the venv's Python must be there, as a user's would be."""
    argv = []
    for token in shlex.split(command):
        found = next((d / token for d in dirs if (d / token).exists()), None)
        if token.startswith(".venv/") and found is None:
            missing(f"{token} does not exist: make creates the venv the docs refer to")
        argv.append(str(found) if found is not None else token)
    return argv


def readme_python_worker() -> tuple[str, str]:
    """README's Python worker snippet and the server.command it says to run it with."""
    text = (ROOT / "README.md").read_text()
    part = text[text.index("**Python workers**"):]
    snippet = re.search(r"```python\n(.*?)```", part, re.DOTALL)
    command = re.search(r'`server\.command: "([^"]+)"`', part)
    assert snippet and command, "README's Python worker section lost its snippet or command"
    return snippet.group(1), command.group(1)


@pytest.mark.parametrize("how", ["venv-python", "venv-on-path"])
def test_readme_python_worker_runs_as_pasted(
    mailpipe_factory: Factory, tmp_path: Path, how: str
) -> None:
    snippet, command = readme_python_worker()
    (tmp_path / "worker.py").write_text(snippet)
    argv = documented_command(command, tmp_path, ROOT)
    env: dict[str, str] = {}
    if how == "venv-on-path":  # README's other way: .venv/bin first on the worker's PATH
        python, script = argv
        assert python.endswith("/.venv/bin/python")
        argv = ["python3", script]
        env = {"PATH": f"{Path(python).parent}:$PATH"}
    server = mailpipe_factory(
        {"server": {"command": argv, "env": env}, "smtp": {"pool": {"num_workers": 1}}}
    )
    reply = send_one(server.smtp_port, f"pasted from the README ({how})")
    assert reply.code == 250, (reply, server.log()[-2000:])
    assert server.event(reply.uuid)["mailpipe"]["outcomes"]["worker"]["response"] == "CONTINUE"
    # The snippet prints each subject on stderr, which mailpipe logs as the worker's.
    assert re.search(rf"pasted from the README \({how}\).* worker=\d+", server.log())
    assert "Traceback" not in server.log()


def test_examples_worker_runs_as_its_docstring_says(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    doc = ast.get_docstring(ast.parse(PY_EXAMPLE.read_text())) or ""
    command = re.search(r'server\.command: "([^"]+)"', doc)
    assert command, "examples/worker.py no longer says how to run it"
    argv = documented_command(command.group(1), ROOT)
    assert argv[-1] == str(PY_EXAMPLE)
    server = mailpipe_factory({"server": {"command": argv}, "smtp": {"pool": {"num_workers": 1}}})
    client = Client(server.smtp_port)
    assert client.send("as the docstring says").code == 250
    assert client.send("and goodbye [close]").code == 250  # CLOSE: 250, then 221
    assert client.reply().code == 221
    assert "'as the docstring says' from app@example.com" in server.log()


# ---- CONTINUE / CLOSE / error frames --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_continue_keeps_the_session_close_ends_it_with_221(
    mailpipe_factory: Factory, tmp_path: Path, kind: str
) -> None:
    pool = start_pool(mailpipe_factory, tmp_path, kind)
    pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    client = pool.client()
    replies = [client.send(f"keep going {i}") for i in range(3)]
    assert [r.code for r in replies] == [250, 250, 250], replies
    closing = client.send("that is all [close]")
    assert closing.code == 250, closing
    assert client.reply().code == 221  # sent unprompted right after the 250
    assert client.at_eof(), "the server should close the connection after 221"
    with pytest.raises(OSError):  # and the next command on that socket fails
        for _ in range(3):
            client.sock.sendall(b"NOOP\r\n")
            time.sleep(0.05)

    uuids = [r.uuid for r in [*replies, closing]]
    events = [pool.server.event(u) for u in uuids]
    assert len({e["session"]["uuid"] for e in events}) == 1, "all four came over one session"
    outcomes = [e["mailpipe"]["outcomes"]["worker"] for e in events]
    assert [o["response"] for o in outcomes] == ["CONTINUE", "CONTINUE", "CONTINUE", "CLOSE"]

    # Each worker received the event JSON of its email: the uuid and subject it logged are the
    # stored ones, and the pid in the stored outcome is the worker that logged it.
    lines = pool.log.wait(4)
    assert [line["uuid"] for line in lines] == uuids
    assert [line["subject"] for line in lines] == [e["message"]["subject"] for e in events]
    assert [line["pid"] for line in lines] == [o["pid"] for o in outcomes]
    assert {o["pid"] for o in outcomes} <= pool.pids()

    assert pool.client().send("a new session after CLOSE").code == 250


@pytest.mark.parametrize(
    ("include_raw", "lines"), [(True, 1), (False, 1), (True, 5000)], ids=["raw", "no_raw", "5MB"]
)
def test_worker_receives_event_context_and_raw_body(
    mailpipe_factory: Factory, tmp_path: Path, include_raw: bool, lines: int
) -> None:
    pool = start_pool(
        mailpipe_factory,
        tmp_path,
        "hooks",
        pool={"num_workers": 1},
        smtp={"include_raw": include_raw},
    )
    body = "Line one.\r\nLine two: ü.\r\n" if lines == 1 else ("y" * 998 + "\r\n") * lines
    reply = pool.client().send("raw body check", body=body)
    assert reply.code == 250
    [line] = pool.log.wait(1)
    assert line["uuid"] == reply.uuid
    assert line["subject"] == "raw body check"
    if include_raw:
        status, raw, _ = pool.server.request("GET", f"/api/v1/messages/{reply.uuid}/raw")
        assert status == 200
        assert line["body_len"] == len(raw)
        assert line["body_sha256"] == hashlib.sha256(raw).hexdigest()
    else:
        assert line["body_len"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_error_frame_still_250_and_print_keeps_frames_intact(
    mailpipe_factory: Factory, tmp_path: Path, kind: str
) -> None:
    pool = start_pool(mailpipe_factory, tmp_path, kind)
    before = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    client = pool.client()
    failed = client.send("refuse me [error]")
    noisy = client.send("chatty [print]")
    after = client.send("plain")
    assert [failed.code, noisy.code, after.code] == [250, 250, 250]

    bad = outcome(pool, failed.uuid)
    assert "response" not in bad
    assert "refuse me [error]" in bad["error"]
    assert outcome(pool, noisy.uuid)["response"] == "CONTINUE"
    assert outcome(pool, after.uuid)["response"] == "CONTINUE"
    warning = rf"WARNING .*worker {bad['pid']} answered an error: .*refuse me \[error\]"
    assert re.search(warning, pool.server.log()), pool.server.log()[-2000:]
    assert "garbage that must not reach the frame channel" in pool.server.log()  # on stderr
    assert metric(pool.metrics(), "mailpipe_worker_errors_total") == 1
    # Neither the error frame nor the garbage cost a worker.
    assert pool.pids() == before
    assert "replacing worker" not in pool.server.log()


def test_other_answers_count_as_continue_with_a_warning(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    pool = start_pool(mailpipe_factory, tmp_path, "hooks", pool={"num_workers": 1})
    client = pool.client()
    odd = client.send("[answer MAYBE]")
    assert odd.code == 250
    assert outcome(pool, odd.uuid)["response"] == "CONTINUE"
    assert re.search(r"WARNING .*MAYBE.*treated as CONTINUE", pool.server.log())
    flood = client.send("[stderr-flood]")  # 3 MB on stderr without a newline
    assert flood.code == 250
    assert outcome(pool, flood.uuid)["response"] == "CONTINUE"
    assert client.send("still open").code == 250


def test_worker_initiated_stop_hands_the_email_to_another_worker(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    mark = tmp_path / "stopped"
    pool = start_pool(
        mailpipe_factory, tmp_path, "hooks", worker_env={"HOOKS_STOP_MARK": str(mark)}
    )
    before = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    client = pool.client()
    reply = client.send("retire me [stop]")
    assert reply.code == 250, reply
    assert mark.exists()
    # The first worker logged the email and stopped; another one answered it.
    lines = pool.log.wait(2)
    assert [line["uuid"] for line in lines] == [reply.uuid, reply.uuid]
    quitter, answerer = lines[0]["pid"], lines[1]["pid"]
    assert quitter != answerer and {quitter, answerer} <= before
    assert outcome(pool, reply.uuid) == {"pid": answerer, "response": "CONTINUE"}
    pool.wait_pids(lambda p: len(p) == 2 and quitter not in p, "the quitter replaced")
    assert client.send("after a stop").code == 250


@pytest.mark.parametrize("retries", [None, 1], ids=["default", "one"])
def test_an_email_every_worker_stops_on_is_poison_451_and_the_pool_serves_on(
    mailpipe_factory: Factory, tmp_path: Path, retries: int | None
) -> None:
    settings = {} if retries is None else {"max_retries_per_email": retries}
    pool = start_pool(mailpipe_factory, tmp_path, "hooks", pool=settings)
    before = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    client = pool.client()
    assert client.send("good before").code == 250
    poison = client.send("poison [stop-always]")
    assert poison.code == 451 and "4.3.0" in poison.text, poison
    # The same session goes on, and so does the pool: a good email right after gets its 250.
    after = client.send("good after")
    assert after.code == 250, after
    assert outcome(pool, after.uuid)["response"] == "CONTINUE"

    attempts = retries or 3  # pool.max_retries_per_email, default 3
    tried = [line for line in pool.log.lines() if "poison" in line["subject"]]
    assert len(tried) == attempts, tried  # bounded: each attempt a different worker, no more
    assert len({line["pid"] for line in tried}) == attempts
    assert {line["pid"] for line in tried} & before
    [uuid] = {line["uuid"] for line in tried}
    assert re.search(rf"ERROR .*poison.*{uuid}", pool.server.log()), pool.server.log()[-3000:]
    text = pool.metrics()
    assert metric(text, "mailpipe_worker_poison_emails_total") == 1
    assert metric(text, "mailpipe_worker_restarts_total") == attempts
    pool.wait_pids(lambda p: len(p) == 2 and not p & {line["pid"] for line in tried},
                   "the pool back to 2 workers without the ones that stopped")
    assert pool.client().send("a new session").code == 250
    assert client.send("the old session too").code == 250


def test_text_on_the_frame_channel_gives_451_and_a_clear_log(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    pool = start_pool(mailpipe_factory, tmp_path, "hooks", pool={"num_workers": 1})
    [broken] = pool.wait_pids(lambda p: len(p) == 1, "1 worker")
    reply = pool.client().send("[stdout-garbage]")
    assert reply.code == 451, reply
    log = pool.server.log()
    assert "did the worker print to stdout" in log
    assert "printed text where a frame belongs" in log  # the bytes are shown
    pool.wait_pids(lambda p: len(p) == 1 and broken not in p, "a fresh worker")
    assert pool.client().send("fine again").code == 250


# ---- workers that die, hang, or are all busy ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_worker_killed_mid_email_gives_451_and_is_replaced(
    mailpipe_factory: Factory, tmp_path: Path, kind: str
) -> None:
    pool = start_pool(mailpipe_factory, tmp_path, kind)
    before = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    assert pool.client().send("warm up").code == 250

    token = f"victim-{uuidlib.uuid4().hex[:8]}"
    pending = in_thread(send_one, pool.port, f"{token} [sleep 5]")
    victim = pool.busy_pid(token)
    assert victim in before
    if pool.admin_api():
        workers = {w["pid"]: w for w in pool.server.get_json("/api/v1/workers")["workers"]}
        assert workers[victim]["status"] == "working"
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    reply = pending.result(timeout=10)
    assert reply.code == 451 and "4.3.0" in reply.text, reply
    assert time.monotonic() - killed_at < 3

    after = pool.wait_pids(lambda p: len(p) == 2 and victim not in p, "a fresh worker")
    assert len(after - before) == 1
    assert pool.client().send("after the kill").code == 250
    assert not any(token in line["subject"] for line in pool.log.lines())  # never answered
    assert re.search(rf"WARNING .*replacing worker {victim}\b", pool.server.log())

    text = pool.metrics()
    assert (metric(text, "mailpipe_worker_restarts_total") or 0) >= 1
    assert (metric(text, "mailpipe_worker_exec_seconds_count") or 0) >= 2
    executed = sum(metric(text, "mailpipe_worker_execs", f'pid="{pid}"') or 0 for pid in after)
    assert executed >= 1, text
    assert metric(text, "mailpipe_worker_execs", f'pid="{victim}"') is None  # gone with it
    wait_until(lambda: metric(pool.metrics(), "mailpipe_workers") == 2, 5, "pool size 2")


def test_crash_marker_gives_451_and_is_replaced(mailpipe_factory: Factory, tmp_path: Path) -> None:
    pool = start_pool(mailpipe_factory, tmp_path, pool={"num_workers": 1})
    [first] = pool.wait_pids(lambda p: len(p) == 1, "1 worker")
    client = pool.client()
    reply = client.send("boom [crash]")
    assert reply.code == 451, reply
    pool.wait_pids(lambda p: len(p) == 1 and first not in p, "a fresh worker")
    assert client.send("the same session goes on").code == 250


@pytest.mark.parametrize("where", ["pool", "supervisor"])
def test_exec_ttl_kills_a_hanging_worker(
    mailpipe_factory: Factory, tmp_path: Path, where: str
) -> None:
    ttl = {"exec_ttl": "1s"}
    settings = {"supervisor": ttl} if where == "supervisor" else ttl
    pool = start_pool(mailpipe_factory, tmp_path, pool=settings)
    before = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    token = f"hang-{uuidlib.uuid4().hex[:8]}"
    started = time.monotonic()
    reply = pool.client().send(f"{token} [sleep 5]")
    elapsed = time.monotonic() - started
    assert reply.code == 451 and "4.3.0" in reply.text, reply
    assert 0.9 <= elapsed < 3, elapsed
    victim = pool.busy_pid(token)
    assert victim in before
    wait_until(lambda: gone(victim), 5, f"worker {victim} to be killed")
    pool.wait_pids(lambda p: len(p) == 2 and victim not in p, "a fresh worker")
    assert "exec_ttl" in pool.server.log()
    assert pool.client().send("quick one").code == 250


def test_allocate_timeout_when_every_worker_is_busy(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    pool = start_pool(mailpipe_factory, tmp_path, pool={"num_workers": 1, "allocate_timeout": "1s"})
    token = f"busy-{uuidlib.uuid4().hex[:8]}"
    slow = in_thread(send_one, pool.port, f"{token} [sleep 3]")
    pool.busy_pid(token)
    started = time.monotonic()
    second = pool.client().send("no worker for me")
    elapsed = time.monotonic() - started
    assert second.code == 451, second
    assert 0.9 <= elapsed < 2.5, elapsed
    assert slow.result(timeout=10).code == 250
    # No queue: the refused email never reaches a worker, even once one is free again.
    assert pool.client().send("later").code == 250
    subjects = [line["subject"] for line in pool.log.wait(2)]
    assert "no worker for me" not in subjects
    assert "allocate_timeout" in pool.server.log()


@pytest.mark.parametrize("kind", KINDS)
def test_max_jobs_recycles_workers(mailpipe_factory: Factory, tmp_path: Path, kind: str) -> None:
    pool = start_pool(mailpipe_factory, tmp_path, kind, pool={"num_workers": 1, "max_jobs": 2})
    client = pool.client()
    replies = [client.send(f"job {i}") for i in range(5)]
    assert [r.code for r in replies] == [250] * 5
    pids = [line["pid"] for line in pool.log.wait(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4], pids
    assert len(set(pids)) == 3
    pool.wait_pids(lambda p: len(p) == 1 and pids[4] in p, "the third worker alone")
    assert all(gone(pid) for pid in pids[:4])


# ---- reset and stop lose nothing ------------------------------------------------------------


def test_reset_under_load_loses_nothing(mailpipe_factory: Factory, tmp_path: Path) -> None:
    pool = start_pool(mailpipe_factory, tmp_path)
    initial = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    if not pool.admin_api():
        pytest.fail("the admin API (GET/POST /api/v1/workers) is not served")
    token = f"inflight-{uuidlib.uuid4().hex[:8]}"

    def session(n: int) -> list[Reply]:
        client = Client(pool.port)
        replies = []
        try:
            for i in range(10):
                # Client 0's third email is on an old worker when the reset comes; the other
                # emails are spread out so that they run before, during and after it.
                slow = n == 0 and i == 2
                replies.append(client.send(f"{token} [sleep 1]" if slow else f"load c{n} m{i}"))
                time.sleep(0.05)
        finally:
            client.close()
        return replies

    with ThreadPoolExecutor(max_workers=4) as executor:
        futures = [executor.submit(session, n) for n in range(4)]
        old = pool.busy_pid(token)
        status, body, _ = pool.server.request("POST", "/api/v1/workers/reset")
        assert status == 200, body
        assert json.loads(body) == {"reset": 2}
        replies = [r for f in futures for r in f.result(timeout=30)]

    assert [r.code for r in replies] == [250] * 40, [r for r in replies if r.code != 250]
    lines = pool.log.wait(40)
    counts = Counter(line["uuid"] for line in lines)
    assert len(lines) == 40
    assert all(counts[r.uuid] == 1 for r in replies), "each email reached exactly one worker"
    by_uuid = pool.log.by_uuid()
    slow = next(r for r in by_uuid.values() if token in r["subject"])
    assert slow["pid"] == old and old in initial  # finished on its old worker
    final = pool.wait_pids(lambda p: len(p) == 2 and not p & initial, "2 fresh workers")
    assert {line["pid"] for line in lines} & final, "the fresh workers took emails too"
    assert all(gone(pid) for pid in initial)


def test_reset_with_a_worker_failing_to_start_keeps_the_pool_whole(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    counter = tmp_path / "launches"
    pool = start_pool(
        mailpipe_factory,
        tmp_path,
        "hooks",
        pool={"allocate_timeout": "500ms"},
        worker_env={"HOOKS_START_COUNTER": str(counter), "HOOKS_CRASH_STARTS": "4"},
    )
    pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    if not pool.admin_api():
        pytest.skip("the admin API is not served")
    pool.server.request("POST", "/api/v1/workers/reset")  # launch 3 starts, launch 4 crashes
    # Whatever the reset answered, the pool must end up with two usable workers.
    for round_ in range(3):
        pending = [in_thread(send_one, pool.port, f"r{round_} c{i} [sleep 1]") for i in range(2)]
        codes = [f.result(timeout=10).code for f in pending]
        assert codes == [250, 250], f"round {round_}: {codes}"
    workers = pool.server.get_json("/api/v1/workers")["workers"]
    assert len(workers) == 2 and all(w["num_execs"] > 0 for w in workers), workers


def test_stop_with_an_email_in_flight(mailpipe_factory: Factory, tmp_path: Path) -> None:
    pool = start_pool(mailpipe_factory, tmp_path)
    workers = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    token = f"flight-{uuidlib.uuid4().hex[:8]}"
    pending = in_thread(send_one, pool.port, f"{token} [sleep 2]")
    busy = pool.busy_pid(token)
    pool.server.process.send_signal(signal.SIGTERM)
    reply = pending.result(timeout=20)
    assert reply.code == 250, reply
    assert pool.server.process.wait(timeout=20) == 0, pool.server.log()[-2000:]
    [line] = [line for line in pool.log.lines() if token in line["subject"]]
    assert line["uuid"] == reply.uuid and line["pid"] == busy
    assert all(gone(pid) for pid in workers), "mailpipe exited and left workers behind"


def stop_stubborn_pool(factory: Factory, tmp_path: Path) -> tuple[float, int, set[int]]:
    """mailpipe with workers that ignore the stop frame and SIGTERM, destroy_timeout 1s,
    stopped with SIGTERM: (seconds to exit, exit status, worker pids)."""
    pool = start_pool(
        factory,
        tmp_path,
        "hooks",
        pool={"destroy_timeout": "1s"},
        worker_env={"HOOKS_STUBBORN": "1"},
    )
    workers = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    started = time.monotonic()
    pool.server.process.send_signal(signal.SIGTERM)
    status = pool.server.process.wait(timeout=20)
    return time.monotonic() - started, status, workers


def test_stop_kills_workers_that_ignore_the_stop_frame_and_sigterm(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    elapsed, status, workers = stop_stubborn_pool(mailpipe_factory, tmp_path)
    assert status == 0
    assert all(gone(pid) for pid in workers)
    assert elapsed < 5, elapsed


def test_stop_of_stubborn_workers_stays_within_destroy_timeout(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    elapsed, status, workers = stop_stubborn_pool(mailpipe_factory, tmp_path)
    assert status == 0 and all(gone(pid) for pid in workers)
    assert elapsed < 1.8, f"destroy_timeout is 1s, the stop took {elapsed:.2f}s"


# ---- start-up failures and restarts ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "php-script"])
def test_a_command_that_cannot_start_fails_serve(
    mailpipe_factory: Factory, tmp_path: Path, kind: str
) -> None:
    if kind == "binary":
        command, needle = ["/nonexistent/worker"], "/nonexistent/worker"
    else:
        needle = "/nonexistent/worker.php"
        command = [require_tool("php"), needle]
    server = mailpipe_factory({"server": {"command": command}}, wait=False)
    status = server.process.wait(timeout=20)
    log = server.log()
    assert status != 0
    assert needle in log, log
    assert "Traceback" not in log, log


def test_worker_crashing_at_start_at_runtime_is_restarted_with_backoff(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    counter = tmp_path / "launches"
    pool = start_pool(
        mailpipe_factory,
        tmp_path,
        "hooks",
        pool={"num_workers": 1},
        worker_env={"HOOKS_START_COUNTER": str(counter), "HOOKS_CRASH_STARTS": "2,3,4"},
    )
    pool.wait_pids(lambda p: len(p) == 1, "1 worker")
    assert pool.client().send("dies [crash]").code == 451

    def launches() -> list[int]:
        return [int(pid) for pid in counter.read_text().split()]

    wait_until(lambda: len(launches()) >= 5, 10, "launches 2-4 to crash and a 5th to start")
    fifth = launches()[4]
    pool.wait_pids(lambda p: p == {fifth}, "the 5th launch alone in the pool")
    assert len(launches()) == 5
    delays = [float(d) for d in re.findall(r"retrying in ([0-9.]+)s", pool.server.log())]
    assert len(delays) == 3, pool.server.log()
    assert delays == sorted(delays) and delays[0] < delays[-1], delays
    assert pool.client().send("back to normal").code == 250


def test_worker_crashing_at_start_while_serve_starts_is_retried(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    counter = tmp_path / "launches"
    pool = start_pool(
        mailpipe_factory,
        tmp_path,
        "hooks",
        worker_env={"HOOKS_START_COUNTER": str(counter), "HOOKS_CRASH_STARTS": "2"},
    )
    pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    assert "retrying in" in pool.server.log()
    assert pool.client().send("hello").code == 250


# ---- supervisor -----------------------------------------------------------------------------


def test_supervisor_max_worker_memory_replaces_workers(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    pool = start_pool(
        mailpipe_factory,
        tmp_path,
        pool={"supervisor": {"watch_tick": "200ms", "max_worker_memory": 1}},
    )
    initial = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    client = pool.client()
    replies = []
    seen: set[int] = set()
    deadline = time.monotonic() + 10
    while len(seen - initial) < 4 and time.monotonic() < deadline:
        replies.append(client.send(f"under memory pressure {len(replies)}"))
        seen |= pool.pids()
        time.sleep(0.05)
    assert len(seen - initial) >= 4, "workers should keep being replaced"
    assert replies and all(r.code == 250 for r in replies), replies
    assert "max_worker_memory" in pool.server.log()
    assert len(pool.log.lines()) == len(replies)


def test_supervisor_idle_ttl_replaces_idle_workers(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    pool = start_pool(
        mailpipe_factory, tmp_path, pool={"supervisor": {"watch_tick": "200ms", "idle_ttl": "1s"}}
    )
    initial = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    pool.wait_pids(lambda p: len(p) == 2 and not p & initial, "2 fresh workers", timeout=6)
    assert "idle for more than" in pool.server.log()
    assert pool.client().send("after idle replacement").code == 250


# ---- relays and environment -----------------------------------------------------------------


@pytest.mark.parametrize("relay", ["tcp", "unix"])
def test_socket_relay(mailpipe_factory: Factory, tmp_path: Path, relay: str) -> None:
    if relay == "tcp":
        address, kind = f"tcp://127.0.0.1:{free_port()}", "python"  # the SDK example
    else:
        address, kind = f"unix://{tmp_path}/relay.sock", "hooks"
    pool = start_pool(mailpipe_factory, tmp_path, kind, server={"relay": address})
    workers = pool.wait_pids(lambda p: len(p) == 2, "2 workers")
    client = pool.client()
    replies = [client.send(f"over {relay} {i}") for i in range(3)]
    closing = client.send(f"over {relay} [close]")
    assert [r.code for r in [*replies, closing]] == [250] * 4
    assert client.reply().code == 221
    lines = pool.log.wait(4)
    assert {line["pid"] for line in lines} <= workers
    assert outcome(pool, closing.uuid)["response"] == "CLOSE"


def test_worker_environment(mailpipe_factory: Factory, tmp_path: Path) -> None:
    env_log = tmp_path / "env.jsonl"
    pool = start_pool(
        mailpipe_factory,
        tmp_path,
        "hooks",
        worker_env={
            "hooks_env_log": str(env_log),
            "test_greeting": "hello",
            "Test_Expanded": "${TEST_BASE}/sub",
        },
        env={"TEST_BASE": "/base"},  # mailpipe's own environment, expanded into server.env
    )
    workers = pool.wait_pids(lambda p: len(p) == 2, "2 workers")

    def entries() -> list[dict[str, Any]] | None:
        lines = env_log.read_text().splitlines() if env_log.exists() else []
        return [json.loads(line) for line in lines] if len(lines) >= 2 else None

    found = wait_until(entries, 5, "both workers to log their environment")
    assert {e["pid"] for e in found} == workers
    for entry in found:
        env = entry["env"]
        assert env["RR_MODE"] == "smtp"
        assert env["RR_RELAY"] == "pipes"
        assert f"127.0.0.1:{pool.server.http_port}" in env["RR_RPC"]
        assert env["TEST_GREETING"] == "hello"  # server.env keys are upper-cased
        assert env["TEST_EXPANDED"] == "/base/sub"  # and $VARs expanded
        assert env["TEST_BASE"] == "/base"  # mailpipe's environment is inherited
