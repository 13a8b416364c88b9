"""`mailpipe jobs consume|list|stats|pause|resume|purge` and the /api/v1/jobs admin routes,
through the front door: a real `mailpipe serve`, the real CLI as subprocesses, smtplib clients
and real consumer processes (examples/consumer.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, MailpipeServer, free_port, require_service
from test_admin import check_schema, cli, failed, ok, send, wait_for

Factory = Callable[..., MailpipeServer]

CONSUMER = [sys.executable, str(ROOT / "examples" / "consumer.py")]
SQLITE = {
    "smtp": {"jobs": {"pipeline": "emails"}},
    "jobs": {"pipelines": {"emails": {"driver": "sqlite"}}},
}
# A paused consumer may still be inside one receive call, which waits up to 1 s for jobs.
RECEIVE_WINDOW = 1.5
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


# ---- helpers ----------------------------------------------------------------------------


def consuming_config(log: Path, consume: bool = True) -> dict[str, Any]:
    """The sqlite pipeline with one examples/consumer.py, consumed in `serve` or not."""
    jobs: dict[str, Any] = {
        **SQLITE["jobs"],
        "pool": {"command": CONSUMER, "num_workers": 1},
    }
    if consume:
        jobs["consume"] = ["emails"]
    return {**SQLITE, "jobs": jobs, "server": {"env": {"MAILPIPE_TEST_LOG": str(log)}}}


def jobs_cli(server: MailpipeServer, *args: str) -> Any:
    return json.loads(ok(cli("jobs", *args, "--api", server.api, "--json")))


def pipelines(server: MailpipeServer) -> dict[str, dict[str, Any]]:
    data = jobs_cli(server, "list")
    check_schema(data, "PipelineList")
    return {entry["pipeline"]: entry for entry in data["pipelines"]}


def stats(server: MailpipeServer, name: str = "emails") -> dict[str, Any]:
    data = jobs_cli(server, "stats", name)
    check_schema(data, "PipelineStats")
    return data


def drained(server: MailpipeServer) -> bool:
    found = stats(server)
    return found["ready"] == 0 and found["reserved"] == 0


def acked(log: Path) -> list[str]:
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [line["subject"] for line in lines if line["answer"] == "ack"]


def send_many(server: MailpipeServer, prefix: str, count: int) -> list[str]:
    subjects = [f"{prefix} {i}" for i in range(count)]
    for subject in subjects:
        send(server, subject)
    return subjects


def api_error(server: MailpipeServer, method: str, path: str, status: int) -> str:
    got, body, headers = server.request(method, path)
    assert got == status, (method, path, got, body)
    assert headers["Content-Type"].startswith("application/json")
    return str(json.loads(body)["error"])


# ---- list, stats, purge -----------------------------------------------------------------


def test_list_stats_and_purge(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory(SQLITE)
    send_many(server, "queued", 3)

    (entry,) = pipelines(server).values()
    assert entry["pipeline"] == "emails" and entry["driver"] == "sqlite"
    assert (entry["ready"], entry["delayed"], entry["reserved"], entry["dead"]) == (3, 0, 0, 0)
    assert entry["consumed"] is False and entry["paused"] is False
    assert stats(server) == entry

    for args in (["list"], ["stats"], ["stats", "emails"]):
        table = ok(cli("jobs", *args, "--api", server.api))
        for column in ("Pipeline", "Driver", "Queue", "Ready", "Delayed", "Reserved", "Dead",
                       "Consumed", "Paused"):
            assert column in table, args
        assert "emails" in table and "sqlite" in table

    assert ok(cli("jobs", "purge", "emails", "--api", server.api)).strip() == (
        "purged 3 jobs from pipeline emails"
    )
    assert stats(server)["ready"] == 0
    assert jobs_cli(server, "purge", "emails") == {"purged": 0}
    # Pushing goes on after a purge.
    send(server, "after purge")
    assert stats(server)["ready"] == 1


def test_unknown_pipeline(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory(SQLITE)
    message = "no pipeline 'nope' is declared in jobs.pipelines"
    for method, path in (("GET", "/api/v1/jobs/pipelines/nope"),
                         ("POST", "/api/v1/jobs/pipelines/nope/pause"),
                         ("POST", "/api/v1/jobs/pipelines/nope/resume"),
                         ("DELETE", "/api/v1/jobs/pipelines/nope/jobs")):
        assert api_error(server, method, path, 404) == message
    for command in ("stats", "pause", "resume", "purge"):
        line = failed(cli("jobs", command, "nope", "--api", server.api))
        assert line == f"mailpipe: {message} (HTTP 404)", command
    # Without --api: the address comes from the mailpipe.yaml in the working directory.
    assert "emails" in ok(cli("jobs", "list", cwd=server.workdir))


def test_pause_a_pipeline_this_process_does_not_consume(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory(SQLITE)
    message = "pipeline 'emails' is not consumed by this process (not in its jobs.consume)"
    for action in ("pause", "resume"):
        assert api_error(server, "POST", f"/api/v1/jobs/pipelines/emails/{action}", 409) == message
        line = failed(cli("jobs", action, "emails", "--api", server.api))
        assert line == f"mailpipe: {message} (HTTP 409)"


def test_broker_down(mailpipe_factory: Factory) -> None:
    down = {"driver": "redis", "config": {"addr": f"redis://127.0.0.1:{free_port()}/0"}}
    config = {**SQLITE, "jobs": {"pipelines": {**SQLITE["jobs"]["pipelines"], "down": down}}}
    server = mailpipe_factory(config)

    found = pipelines(server)
    assert found["emails"]["ready"] == 0
    assert set(found["down"]) == {"pipeline", "error"} and found["down"]["error"]
    table = ok(cli("jobs", "list", "--api", server.api))
    assert "Error" in table and "down" in table

    for method, path in (("GET", "/api/v1/jobs/pipelines/down"),
                         ("DELETE", "/api/v1/jobs/pipelines/down/jobs")):
        assert api_error(server, method, path, 503).startswith("broker unavailable: ")
    line = failed(cli("jobs", "stats", "down", "--api", server.api))
    assert "broker unavailable" in line and line.endswith("(HTTP 503)")


# ---- pause and resume a pipeline consumed in-process ------------------------------------


def test_pause_and_resume(mailpipe_factory: Factory, tmp_path: Path) -> None:
    log = tmp_path / "consumer.jsonl"
    server = mailpipe_factory(consuming_config(log))
    send(server, "before pause")
    assert wait_for(lambda: acked(log) == ["before pause"], timeout=20), acked(log)

    assert ok(cli("jobs", "pause", "emails", "--api", server.api)).strip() == (
        "paused pipeline emails"
    )
    assert stats(server)["consumed"] is True and stats(server)["paused"] is True
    time.sleep(RECEIVE_WINDOW)
    held = send_many(server, "while paused", 3)
    deadline = time.monotonic() + RECEIVE_WINDOW
    while time.monotonic() < deadline:  # they stay in the queue, untouched
        assert stats(server)["ready"] == 3
        time.sleep(0.1)
    assert acked(log) == ["before pause"]

    assert jobs_cli(server, "resume", "emails") == {"pipeline": "emails", "paused": False}
    assert stats(server)["paused"] is False
    assert wait_for(lambda: drained(server), timeout=20), stats(server)
    assert wait_for(lambda: sorted(acked(log)) == sorted(["before pause", *held]), timeout=10)
    assert "Traceback" not in server.log()


# ---- `mailpipe jobs consume` as a process of its own ------------------------------------


def consume(config: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    with open(config.parent / "consume.log", "wb") as stderr:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "mailpipe", "jobs", "consume", *args, "-c", str(config)],
            cwd=config.parent, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,
        )


@pytest.fixture
def consumers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_consume_process(mailpipe_factory: Factory, tmp_path: Path,
                         consumers: list[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    log = tmp_path / "consumer.jsonl"
    server = mailpipe_factory(consuming_config(log, consume=False))
    subjects = send_many(server, "for the consumer", 3)
    assert stats(server)["ready"] == 3 and stats(server)["consumed"] is False

    # The same config file: `serve` pushes, `jobs consume` drains the same jobs.db.
    process = consume(server.workdir / "mailpipe.yaml", "emails")
    consumers.append(process)
    assert wait_for(lambda: drained(server), timeout=30), stats(server)
    assert wait_for(lambda: sorted(acked(log)) == subjects, timeout=10), acked(log)
    send(server, "one more")
    assert wait_for(lambda: len(acked(log)) == 4, timeout=20), acked(log)

    process.send_signal(sig)
    assert process.wait(timeout=30) == 0
    output = (server.workdir / "consume.log").read_text()
    assert "Traceback" not in output and "starting" in output


def test_consume_defaults_to_jobs_consume_then_every_pipeline(
    mailpipe_factory: Factory, tmp_path: Path, consumers: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "consumer.jsonl"
    server = mailpipe_factory(consuming_config(log, consume=False))
    send(server, "no arguments")
    process = consume(server.workdir / "mailpipe.yaml")  # no jobs.consume: every pipeline
    consumers.append(process)
    assert wait_for(lambda: acked(log) == ["no arguments"], timeout=30), acked(log)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def write_config(tmp_path: Path, jobs: dict[str, Any]) -> Path:
    path = tmp_path / "consumer.yaml"
    path.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "jobs": jobs}))
    return path


def consume_error(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("jobs", "consume", *args, "-c", str(config), cwd=config.parent)


@pytest.mark.parametrize(
    ("jobs", "args", "message"),
    [
        ({"pipelines": {"emails": {}}, "pool": {"command": CONSUMER}}, ["other"],
         "jobs consume: pipeline 'other' is not declared in jobs.pipelines"),
        ({"pool": {"command": CONSUMER}}, [],
         "jobs consume: no pipeline is declared in jobs.pipelines"),
        ({"pipelines": {"emails": {}}}, [],
         "jobs consume: no consumer command: set jobs.pool.command (or server.command)"),
        ({"pipelines": {"emails": {}}, "consume": ["other"]}, [],
         "jobs.consume: 'other' is not declared in jobs.pipelines"),
        ({"pipelines": {"rr": {"driver": "roadrunner"}}, "pool": {"command": CONSUMER}},
         ["rr"], "jobs consume: 'rr' is a roadrunner pipeline"),
        ({"pipelines": {"rr": {"driver": "roadrunner"}}, "pool": {"command": CONSUMER}}, [],
         "jobs consume: no pipeline to consume (roadrunner pipelines are RoadRunner's)"),
    ],
    ids=["undeclared-argument", "no-pipelines", "no-command", "undeclared-in-config",
         "roadrunner-argument", "roadrunner-only"],
)
def test_consume_config_errors_exit_2(tmp_path: Path, jobs: dict[str, Any], args: list[str],
                                      message: str) -> None:
    result = consume_error(write_config(tmp_path, jobs), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [["/nonexistent/consumer"], [sys.executable, "-c", "import sys; sys.exit(3)"]],
    ids=["missing", "exits-at-once"],
)
def test_consume_with_a_command_that_cannot_start(tmp_path: Path, command: list[str]) -> None:
    config = write_config(tmp_path, {"pipelines": {"emails": {}},
                                     "pool": {"command": command, "num_workers": 1}})
    result = consume_error(config, "emails")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mailpipe: cannot start the jobs worker pool: "), result.stderr
    assert "Traceback" not in result.stderr


# ---- a redis pipeline -------------------------------------------------------------------


@pytest.fixture
def redis_stream() -> Iterator[str]:
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    from redis import Redis

    stream = f"mailpipe-test:jobs-cli:{uuid.uuid4().hex}"
    yield stream
    with Redis(host=REDIS_HOST, port=REDIS_PORT) as client:
        keys = list(client.scan_iter(f"{stream}*"))
        if keys:
            client.delete(*keys)


def test_redis_list_stats_and_purge(mailpipe_factory: Factory, redis_stream: str) -> None:
    pipeline = {"driver": "redis", "config": {"addr": f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
                                              "stream": redis_stream}}
    server = mailpipe_factory({"smtp": {"jobs": {"pipeline": "emails"}},
                               "jobs": {"pipelines": {"emails": pipeline}}})
    send_many(server, "via redis", 2)

    entry = pipelines(server)["emails"]
    assert entry["driver"] == "redis" and entry["queue"] == redis_stream
    assert (entry["ready"], entry["reserved"], entry["dead"]) == (2, 0, 0)
    assert stats(server)["ready"] == 2
    assert redis_stream in ok(cli("jobs", "stats", "emails", "--api", server.api))
    assert jobs_cli(server, "purge", "emails") == {"purged": 2}
    assert stats(server)["ready"] == 0
