"""The admin API and the management commands (`mailpipe workers|connections|reset|stop`):
a real `mailpipe serve` process, the real CLI as a subprocess, real SMTP clients and workers.
The last section drives the web layer alone over a small in-memory `AdminOps`."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp.test_utils import TestClient, TestServer

from conftest import ROOT, MailpipeServer, free_port, wait_until_ready
from mailpipe.admin import NoWorkerPool
from mailpipe.metrics import Metrics
from mailpipe.web.app import HttpAuth, create_app

Factory = Callable[..., MailpipeServer]

WORKER = ROOT / "examples" / "worker.py"
POOL_CONFIG = {
    "server": {"command": [sys.executable, str(WORKER)]},
    "smtp": {"pool": {"num_workers": 2}},
}
NO_POOL = "no worker pool configured (set server.command)"
CLOSED_BY_ADMIN = b"4.3.2 Connection closed by administrator"
OPENAPI = json.loads((ROOT / "src" / "mailpipe" / "web" / "openapi.json").read_text())


# ---- helpers ----------------------------------------------------------------------------


def cli(*args: str, cwd: Path | None = None,
        columns: int = 200) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    env["COLUMNS"] = str(columns)  # rich wraps cells to the terminal's width
    return subprocess.run(
        [sys.executable, "-m", "mailpipe", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd or ROOT, env=env,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}{result.stdout}"
    return result.stdout


def failed(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a command that must exit 1."""
    assert result.returncode == 1, f"exit {result.returncode}: {result.stderr}{result.stdout}"
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailpipe: "), result.stderr
    return lines[0]


def cli_json(server: MailpipeServer, *args: str) -> Any:
    return json.loads(ok(cli(*args, "--api", server.api, "--json")))


def check_schema(instance: Any, name: str) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": OPENAPI["components"]}
    jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def smtp_client(server: MailpipeServer, name: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10)
    client.ehlo(name)
    return client


def local_addr(client: smtplib.SMTP) -> str:
    host, port = client.sock.getsockname()[:2]
    return f"{host}:{port}"


def connections(server: MailpipeServer) -> list[dict[str, Any]]:
    data = cli_json(server, "connections", "list")
    check_schema(data, "ConnectionList")
    return data["connections"]


def send(server: MailpipeServer, subject: str) -> None:
    """One email on a fresh connection; smtplib raises unless it gets 250."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as client:
        client.sendmail("app@example.com", ["dev@example.test"],
                        f"Subject: {subject}\r\n\r\nHello.\r\n")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- connections (no worker pool needed) ------------------------------------------------


def test_connections_list_and_close(mailpipe: MailpipeServer) -> None:
    first, second = smtp_client(mailpipe, "first.test"), smtp_client(mailpipe, "second.test")
    listeners = set(mailpipe.get_json("/healthz")["smtp"])
    assert second.mail("app@example.com")[0] == 250

    found = wait_for(lambda: len(conns := connections(mailpipe)) == 2 and conns)
    by_addr = {conn["remote_addr"]: conn for conn in found}
    assert set(by_addr) == {local_addr(first), local_addr(second)}
    assert by_addr[local_addr(first)]["state"] == "idle"
    assert by_addr[local_addr(second)]["state"] == "transaction"
    for conn in found:
        assert conn["server"] in listeners and conn["emails"] == 0 and conn["tls"] is False
        assert datetime.fromisoformat(conn["since"]) <= datetime.now(UTC)

    table = ok(cli("connections", "list", "--api", mailpipe.api))
    for column in ("UUID", "Remote", "Server", "State", "Emails", "Since"):
        assert column in table
    for conn in found:
        assert conn["uuid"] in table and conn["remote_addr"] in table

    closed = by_addr[local_addr(first)]["uuid"]
    assert closed in ok(cli("connections", "close", closed, "--api", mailpipe.api))
    assert first.getreply() == (421, CLOSED_BY_ADMIN)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        first.getreply()

    assert second.rset()[0] == 250
    second.sendmail("app@example.com", ["dev@example.test"], "Subject: still here\r\n\r\nHi\r\n")
    assert second.noop()[0] == 250
    (left,) = wait_for(lambda: len(conns := connections(mailpipe)) == 1 and conns)
    assert left["remote_addr"] == local_addr(second) and left["emails"] == 1
    second.quit()


def test_close_connection_mid_transaction_waits_for_the_email(mailpipe: MailpipeServer) -> None:
    client = smtp_client(mailpipe, "busy.test")
    assert client.mail("app@example.com")[0] == 250
    (conn,) = wait_for(lambda: connections(mailpipe))
    ok(cli("connections", "close", conn["uuid"], "--api", mailpipe.api))
    # The transaction under way still completes and is captured; then the session ends.
    assert client.rcpt("dev@example.test")[0] == 250
    assert client.data(b"Subject: last one\r\n\r\nbye\r\n")[0] == 250
    assert client.getreply() == (421, CLOSED_BY_ADMIN)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.getreply()
    assert mailpipe.wait_for_messages(1)[0]["subject"] == "last one"


def test_close_a_session_waiting_on_a_hanging_worker(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({**POOL_CONFIG, "smtp": {"pool": {"num_workers": 1}}})
    [hung] = ready_pids(server, 1)
    client = smtp_client(server, "waiting.test")
    assert client.mail("app@example.com")[0] == 250
    assert client.rcpt("dev@example.test")[0] == 250
    assert client.docmd("DATA")[0] == 354
    client.send(b"Subject: hang [sleep 60]\r\n\r\nThe worker sleeps on this one.\r\n.\r\n")
    (conn,) = wait_for(lambda: [c for c in connections(server) if c["state"] == "delivering"])

    assert conn["uuid"] in ok(cli("connections", "close", conn["uuid"], "--api", server.api))
    assert client.getreply() == (421, CLOSED_BY_ADMIN)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.getreply()
    assert wait_for(lambda: connections(server) == [])
    # The worker still held the email: it is replaced, so that its late answer cannot be read
    # as the next email's, and the pool serves on.
    assert wait_for(lambda: not alive(hung)), "the worker of the cancelled email still runs"
    [fresh] = ready_pids(server, 1)
    assert fresh != hung
    send(server, "after the close")
    assert [m["subject"] for m in server.wait_for_messages(1)] == ["after the close"]
    assert wait_for(lambda: workers(server)[0]["num_execs"] == 1)
    assert "Traceback" not in server.log()


def test_close_a_session_waiting_for_a_free_worker(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({**POOL_CONFIG, "smtp": {"pool": {"num_workers": 1}}})
    [worker] = ready_pids(server, 1)
    with ThreadPoolExecutor(max_workers=1) as executor:
        holder = executor.submit(send, server, "holds the only worker [sleep 8]")
        wait_for(lambda: workers(server)[0]["status"] == "working")
        client = smtp_client(server, "queued.test")
        assert client.mail("app@example.com")[0] == 250
        assert client.rcpt("dev@example.test")[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: never delivered\r\n\r\nNo worker is free for me.\r\n.\r\n")
        mine = local_addr(client)
        (conn,) = wait_for(lambda: [c for c in connections(server)
                                    if c["remote_addr"] == mine and c["state"] == "delivering"])
        ok(cli("connections", "close", conn["uuid"], "--api", server.api))
        assert client.getreply() == (421, CLOSED_BY_ADMIN)
        holder.result(timeout=30)  # the email on the worker is not disturbed: 250
    # The closed session never had a worker, so none was recycled for it.
    assert [(w["pid"], w["num_execs"]) for w in workers(server)] == [(worker, 1)]
    send(server, "next")
    assert sorted(m["subject"] for m in server.wait_for_messages(2)) == [
        "holds the only worker [sleep 8]", "next"]


def test_close_unknown_connection(mailpipe: MailpipeServer) -> None:
    line = failed(cli("connections", "close", "no-such-session", "--api", mailpipe.api))
    assert "connection not found" in line
    status, body, _ = mailpipe.request("DELETE", "/api/v1/connections/no-such-session")
    assert status == 404 and json.loads(body) == {"error": "connection not found"}


def test_empty_lists_and_default_api_from_the_config(mailpipe: MailpipeServer) -> None:
    # No --api: the address comes from the mailpipe.yaml in the working directory.
    assert ok(cli("connections", "list", cwd=mailpipe.workdir)).strip() == "no connections"
    config = mailpipe.workdir / "mailpipe.yaml"
    data = json.loads(ok(cli("connections", "list", "--json", "-c", str(config))))
    assert data == {"connections": []}


def test_unreachable_api(tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{free_port()}"
    for args in (["connections", "list"], ["workers", "list"], ["stop"]):
        line = failed(cli(*args, "--api", api, cwd=tmp_path))
        assert line.startswith(f"mailpipe: cannot reach the admin API at {api}: ")


def test_http_disabled_in_the_config(tmp_path: Path) -> None:
    (tmp_path / "mailpipe.yaml").write_text("http: {enabled: false}\n")
    assert "--api" in failed(cli("workers", "list", cwd=tmp_path))


def test_0000_addr_is_reached_on_loopback(mailpipe_factory: Factory, tmp_path: Path) -> None:
    port = free_port()
    server = mailpipe_factory({"http": {"addr": f"0.0.0.0:{port}"}}, wait=False)
    server.http_port = port
    wait_until_ready(server)
    config = tmp_path / "client.yaml"
    config.write_text(f"http: {{addr: '0.0.0.0:{port}'}}\n")
    assert json.loads(ok(cli("connections", "list", "--json", "-c", str(config)))) == {
        "connections": []
    }


@pytest.mark.parametrize(
    "auth",
    [
        {"type": "basic", "username": "dev", "password": "s3cret"},
        {"type": "bearer", "token": "t0ken"},
    ],
    ids=["basic", "bearer"],
)
def test_auth_from_the_config_or_token(
    mailpipe_factory: Factory, tmp_path: Path, auth: dict[str, str]
) -> None:
    server = mailpipe_factory({"http": {"auth": auth}})
    status, _, _ = server.request("GET", "/api/v1/connections")
    assert status == 401
    # The config in the working directory gives both the address and the credentials.
    assert ok(cli("connections", "list", cwd=server.workdir)).strip() == "no connections"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    line = failed(cli("connections", "list", "--api", server.api, cwd=elsewhere))
    assert "authentication required" in line and "401" in line
    if auth["type"] == "bearer":
        out = cli("connections", "list", "--api", server.api, "--token", "t0ken", cwd=elsewhere)
        assert ok(out).strip() == "no connections"


# ---- finding the server: the state file in its data dir ----------------------------------


@pytest.mark.parametrize("how", ["--http", "MAILPIPE_HTTP__ADDR"])
def test_commands_find_a_server_started_on_another_address(
    mailpipe_factory: Factory, tmp_path: Path, how: str
) -> None:
    port = free_port()  # not the http.addr of the mailpipe.yaml that the commands read
    addr = f"127.0.0.1:{port}"
    if how == "--http":
        server = mailpipe_factory(args=["--http", addr], wait=False)
    else:
        server = mailpipe_factory(env={"MAILPIPE_HTTP__ADDR": addr}, wait=False)
    server.http_port = port
    wait_until_ready(server)
    state_file = server.workdir / "data" / "mailpipe.json"
    state = json.loads(state_file.read_text())
    assert state["pid"] == server.process.pid and state["http_addr"] == addr, state

    # From the server's directory (its mailpipe.yaml names the data dir) and from elsewhere
    # with --data-dir: no address given, and the commands reach the server all the same.
    assert ok(cli("connections", "list", cwd=server.workdir)).strip() == "no connections"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data_dir = str(server.workdir / "data")
    listed = json.loads(ok(cli("connections", "list", "--json", "--data-dir", data_dir,
                               cwd=elsewhere)))
    assert listed == {"connections": []}
    assert "stopping" in ok(cli("stop", cwd=server.workdir))
    assert server.process.wait(timeout=30) == 0, server.log()[-2000:]
    assert not state_file.exists(), "a clean exit removes the state file"


def test_a_state_file_left_by_a_dead_server_is_ignored(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    stale = {"pid": int(finished.stdout), "http_addr": f"127.0.0.1:{free_port()}"}
    (data / "mailpipe.json").write_text(json.dumps(stale))
    configured = f"127.0.0.1:{free_port()}"
    (tmp_path / "mailpipe.yaml").write_text(
        json.dumps({"data_dir": str(data), "http": {"addr": configured}}))
    line = failed(cli("stop", cwd=tmp_path))
    assert f"cannot reach the admin API at http://{configured}: " in line


# ---- workers without a pool ---------------------------------------------------------------


def test_workers_without_a_pool(mailpipe: MailpipeServer) -> None:
    for method, path in (("GET", "/api/v1/workers"), ("POST", "/api/v1/workers"),
                         ("DELETE", "/api/v1/workers"), ("POST", "/api/v1/workers/reset")):
        status, body, headers = mailpipe.request(method, path)
        assert (status, json.loads(body)) == (404, {"error": NO_POOL}), (method, path)
        assert headers["Content-Type"].startswith("application/json")
    for args in (["workers", "list"], ["workers", "add"], ["workers", "remove"],
                 ["workers", "reset"], ["reset"]):
        assert NO_POOL in failed(cli(*args, "--api", mailpipe.api)), args


# ---- stop -------------------------------------------------------------------------------


def test_stop(mailpipe: MailpipeServer) -> None:
    send(mailpipe, "before stop")
    idle = smtp_client(mailpipe, "idle.test")
    wait_for(lambda: connections(mailpipe))
    assert "stopping" in ok(cli("stop", "--api", mailpipe.api))
    assert mailpipe.process.wait(timeout=30) == 0
    code, text = idle.getreply()
    assert code == 421, text
    assert "Traceback" not in mailpipe.log()


def test_stop_json(mailpipe: MailpipeServer) -> None:
    assert cli_json(mailpipe, "stop") == {"stopping": True}
    assert mailpipe.process.wait(timeout=30) == 0


# ---- workers with a pool ------------------------------------------------------------------


def workers(server: MailpipeServer) -> list[dict[str, Any]]:
    data = cli_json(server, "workers", "list")
    check_schema(data, "WorkerList")
    return data["workers"]


def ready_pids(server: MailpipeServer, count: int) -> set[int]:
    """The pids once exactly `count` workers are all ready."""
    def check() -> set[int] | None:
        found = workers(server)
        if len(found) == count and all(w["status"] == "ready" for w in found):
            return {w["pid"] for w in found}
        return None

    pids = wait_for(check, timeout=20)
    assert pids, f"expected {count} ready workers, got {workers(server)}"
    return pids


@pytest.fixture
def pooled(mailpipe_factory: Factory) -> MailpipeServer:
    return mailpipe_factory(POOL_CONFIG)


def test_workers_list(pooled: MailpipeServer) -> None:
    pids = ready_pids(pooled, 2)
    assert all(alive(pid) for pid in pids) and os.getpid() not in pids
    for worker in workers(pooled):
        assert worker["num_execs"] == 0 and worker["last_error"] is None
        assert datetime.fromisoformat(worker["created_at"]) <= datetime.now(UTC)

    send(pooled, "one")
    assert wait_for(lambda: sum(w["num_execs"] for w in workers(pooled)) == 1)

    table = ok(cli("workers", "list", "--api", pooled.api))
    for column in ("PID", "Status", "Execs", "Memory", "Created", "Last error"):
        assert column in table
    for pid in pids:
        assert str(pid) in table
    assert "ready" in table and " MB" in table


MARKUP = "[/] [bold]x[/bold] [red]"  # rich markup, and a closing tag rich would choke on


def test_tables_print_square_brackets_as_they_are(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    smtp_port = free_port()
    server = mailpipe_factory({
        **POOL_CONFIG,
        "smtp": {"pool": {"num_workers": 1},
                 "servers": [{"name": f"dev {MARKUP}", "addr": f"127.0.0.1:{smtp_port}"}]},
        "jobs": {"pipelines": {f"mail{MARKUP}": {"driver": "sqlite"}}},
    })
    ready_pids(server, 1)
    # examples/worker.py answers `[error]` with an error frame naming the subject: the
    # worker's last_error then holds the markup.
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
        client.sendmail("app@example.com", ["dev@example.test"],
                        f"Subject: oops {MARKUP} [error]\r\n\r\nHello.\r\n")
        assert wait_for(lambda: MARKUP in str(workers(server)[0]["last_error"]))
        table = ok(cli("workers", "list", "--api", server.api))
        assert f"refused: oops {MARKUP} [error]" in table
        table = ok(cli("connections", "list", "--api", server.api))
        assert f"dev {MARKUP}" in table
    table = ok(cli("jobs", "list", "--api", server.api))
    assert f"mail{MARKUP}" in table


def test_workers_add_and_remove(pooled: MailpipeServer) -> None:
    before = ready_pids(pooled, 2)

    added = cli_json(pooled, "workers", "add")
    check_schema(added, "Worker")
    assert added["pid"] not in before and alive(added["pid"])
    assert ready_pids(pooled, 3) == before | {added["pid"]}

    removed = cli_json(pooled, "workers", "remove")
    check_schema(removed, "Worker")
    remaining = ready_pids(pooled, 2)
    assert removed["pid"] not in remaining and remaining < before | {added["pid"]}
    assert wait_for(lambda: not alive(removed["pid"])), "the removed worker still runs"

    assert "added worker PID" in ok(cli("workers", "add", "--api", pooled.api))
    assert "removed worker PID" in ok(cli("workers", "remove", "--api", pooled.api))
    send(pooled, "after add and remove")


def test_remove_the_last_worker(pooled: MailpipeServer) -> None:
    ready_pids(pooled, 2)
    cli_json(pooled, "workers", "remove")
    cli_json(pooled, "workers", "remove")
    assert wait_for(lambda: workers(pooled) == [])
    assert "no worker left" in failed(cli("workers", "remove", "--api", pooled.api))
    assert ok(cli("workers", "list", "--api", pooled.api)).strip() == "no workers"
    cli_json(pooled, "workers", "add")
    send(pooled, "with a worker again")


def test_reset_replaces_every_worker_without_failing_email(pooled: MailpipeServer) -> None:
    before = ready_pids(pooled, 2)
    errors: list[BaseException] = []
    sent = 0
    done = threading.Event()

    def keep_sending() -> None:
        nonlocal sent
        while not done.is_set():
            try:
                send(pooled, f"during reset {sent}")
            except BaseException as exc:
                errors.append(exc)
                return
            sent += 1

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        wait_for(lambda: sent >= 3)
        assert cli_json(pooled, "workers", "reset") == {"reset": 2}
        assert ok(cli("reset", "--api", pooled.api)).strip() == "reset 2 workers"
        start = sent
        wait_for(lambda: sent >= start + 3)
    finally:
        done.set()
        sender.join(timeout=60)
    assert not errors, f"an email failed during reset: {errors[0]!r}"

    after = ready_pids(pooled, 2)
    assert not after & before and all(alive(pid) for pid in after)
    assert wait_for(lambda: not any(alive(pid) for pid in before)), "old workers still run"
    send(pooled, "after reset")
    assert pooled.wait_for_messages(sent + 1)
    assert len(pooled.messages(limit=1000)) == sent + 1


# ---- the web layer alone, over a small in-memory AdminOps ---------------------------------


class MemoryAdmin:
    """A real, if tiny, AdminOps: workers are dicts, sessions a set of uuids."""

    def __init__(self, pool: bool = True) -> None:
        self.pool: list[dict[str, Any]] | None = [] if pool else None
        self.sessions = {"s-1", "s-2"}
        self.stops = 0
        self.fail_add: Exception | None = None
        self._next_pid = 1000

    def _workers(self) -> list[dict[str, Any]]:
        if self.pool is None:
            raise NoWorkerPool
        return self.pool

    def workers(self) -> list[dict[str, Any]]:
        return list(self._workers())

    async def add_worker(self) -> dict[str, Any]:
        pool = self._workers()
        if self.fail_add is not None:
            raise self.fail_add
        self._next_pid += 1
        worker = {"pid": self._next_pid, "status": "ready", "num_execs": 0,
                  "created_at": datetime.now(UTC).isoformat(), "rss_bytes": 5 << 20,
                  "last_error": None}
        pool.append(worker)
        return worker

    async def remove_worker(self) -> dict[str, Any] | None:
        pool = self._workers()
        return pool.pop() if pool else None

    async def reset_workers(self) -> int:
        pool = self._workers()
        count = len(pool)
        pool.clear()
        for _ in range(count):
            await self.add_worker()
        return count

    def connections(self) -> list[dict[str, Any]]:
        return [{"uuid": uuid, "remote_addr": "127.0.0.1:1", "server": "default",
                 "since": datetime.now(UTC).isoformat(), "state": "idle", "emails": 0,
                 "tls": False} for uuid in sorted(self.sessions)]

    def close_connection(self, uuid: str) -> bool:
        if uuid not in self.sessions:
            return False
        self.sessions.discard(uuid)
        return True

    def stop(self) -> None:
        self.stops += 1


@pytest.fixture
def admin() -> MemoryAdmin:
    return MemoryAdmin()


@pytest.fixture
async def client(admin: MemoryAdmin) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(None, Metrics(), admin=admin))) as c:
        yield c


async def json_of(resp: Any, status: int) -> Any:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


async def test_worker_routes(client: TestClient, admin: MemoryAdmin) -> None:
    assert await json_of(await client.get("/api/v1/workers"), 200) == {"workers": []}
    added = await json_of(await client.post("/api/v1/workers"), 201)
    check_schema(added, "Worker")
    check_schema(await json_of(await client.get("/api/v1/workers"), 200), "WorkerList")
    assert await json_of(await client.post("/api/v1/workers/reset"), 200) == {"reset": 1}
    removed = await json_of(await client.delete("/api/v1/workers"), 200)
    assert removed["pid"] != added["pid"]
    body = await json_of(await client.delete("/api/v1/workers"), 409)
    assert body == {"error": "no worker left to remove"}


async def test_add_worker_failure_is_a_json_500(client: TestClient, admin: MemoryAdmin) -> None:
    admin.fail_add = OSError("exec format error")
    body = await json_of(await client.post("/api/v1/workers"), 500)
    assert body == {"error": "cannot start a worker: exec format error"}


async def test_connection_routes(client: TestClient, admin: MemoryAdmin) -> None:
    body = await json_of(await client.get("/api/v1/connections"), 200)
    check_schema(body, "ConnectionList")
    assert [c["uuid"] for c in body["connections"]] == ["s-1", "s-2"]
    assert (await client.delete("/api/v1/connections/s-1")).status == 204
    await json_of(await client.delete("/api/v1/connections/s-1"), 404)
    assert admin.sessions == {"s-2"}


async def test_stop_answers_first_and_stops_once(client: TestClient, admin: MemoryAdmin) -> None:
    for _ in range(2):  # the second must not count as a second signal
        assert await json_of(await client.post("/api/v1/stop"), 202) == {"stopping": True}
    deadline = time.monotonic() + 5
    while admin.stops == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert admin.stops == 1


async def test_no_pool_and_no_admin() -> None:
    async with TestClient(TestServer(create_app(None, Metrics(), admin=MemoryAdmin(False)))) as c:
        assert await json_of(await c.get("/api/v1/workers"), 404) == {"error": NO_POOL}
        assert (await c.get("/api/v1/connections")).status == 200
    async with TestClient(TestServer(create_app(None, Metrics()))) as c:
        for method, path in (("GET", "/api/v1/workers"), ("GET", "/api/v1/connections"),
                             ("POST", "/api/v1/stop")):
            body = await json_of(await c.request(method, path), 404)
            assert "not available" in body["error"]


async def test_admin_routes_need_auth(admin: MemoryAdmin) -> None:
    app = create_app(None, Metrics(), auth=HttpAuth("bearer", token="t"), admin=admin)
    async with TestClient(TestServer(app)) as c:
        for method, path in (("GET", "/api/v1/workers"), ("POST", "/api/v1/workers"),
                             ("DELETE", "/api/v1/connections/s-1"), ("POST", "/api/v1/stop")):
            assert (await c.request(method, path)).status == 401, path
        resp = await c.get("/api/v1/workers", headers={"Authorization": "Bearer t"})
        assert resp.status == 200
    assert admin.stops == 0 and admin.sessions == {"s-1", "s-2"} and admin.pool == []
