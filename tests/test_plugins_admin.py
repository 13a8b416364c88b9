"""The plugins admin API and `mailpipe plugins list|status|reload`, and the queue and delivery
hooks, through the front door: a real `mailpipe serve` with a plugin file in its plugin_path,
the real CLI as subprocesses, smtplib clients, real jobs pipelines and consumer processes."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import MailpipeServer, require_service
from test_admin import check_schema, cli, cli_json, failed, ok, send, wait_for
from test_jobs_cli import CONSUMER, REDIS_HOST, REDIS_PORT, consume
from test_workers import HOOKS_WORKER

Factory = Callable[..., MailpipeServer]

NAME = "recorder"
# A plugin that stamps each email with its version and records the notifications it gets,
# one JSON line each (with the pid of the process that fired it), in plugin_config's `log`.
PLUGIN = '''
import json
import os

from mailpipe.plugins.results import Modify

VERSION = {version}


class Plugin:
    def init(self, config):
        self.log = config.get("log")

    def record(self, hook, **args):
        if self.log:
            with open(self.log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({{"hook": hook, "pid": os.getpid(), **args}}) + "\\n")

    def on_mail_from(self, sender):
        return None

    def on_message_complete(self, ctx):
        return Modify(add_headers=[("X-Version", str(VERSION))])

    def on_enqueue(self, ctx, queue_id):
        self.record("on_enqueue", queue_id=queue_id, event=(ctx.event or {{}}).get("uuid"))

    def on_dequeue(self, queue_id):
        self.record("on_dequeue", queue_id=queue_id)

    def on_queue_retry(self, queue_id, attempt):
        self.record("on_queue_retry", queue_id=queue_id, attempt=attempt)

    def on_delivery_attempt(self, ctx, recipient, attempt):
        self.record("on_delivery_attempt", recipient=recipient, attempt=attempt,
                    event=(ctx.event or {{}}).get("uuid"))
'''
HOOKS = ["on_delivery_attempt", "on_dequeue", "on_enqueue", "on_mail_from",
         "on_message_complete", "on_queue_retry"]
SQLITE_JOBS = {"pipelines": {"emails": {"driver": "sqlite", "config": {"max_attempts": 2}}}}


# ---- helpers ----------------------------------------------------------------------------


def write_plugin(directory: Path, version: int, padding: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{NAME}.py").write_text(PLUGIN.format(version=version) + padding)


def plugin_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """A mailpipe with the recorder plugin (version 1) and whatever else `extra` adds."""
    directory = tmp_path / "plugins"
    write_plugin(directory, 1)
    plugins = {"plugin_path": str(directory),
               "plugin_config": {NAME: {"log": str(tmp_path / "hooks.jsonl")}}}
    return {"smtp": {"include_raw": True}, "plugins": plugins, **extra}


def recorded(tmp_path: Path, hook: str | None = None) -> list[dict[str, Any]]:
    log = tmp_path / "hooks.jsonl"
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [line for line in lines if hook is None or line["hook"] == hook]


def uuids_by_subject(server: MailpipeServer, count: int) -> dict[str, str]:
    return {m["subject"]: m["uuid"] for m in server.wait_for_messages(count)}


def raw(server: MailpipeServer, uuid: str) -> bytes:
    status, body, _ = server.request("GET", f"/api/v1/messages/{uuid}/raw")
    assert status == 200
    return body


def version_of(server: MailpipeServer, uuid: str) -> list[bytes]:
    head = raw(server, uuid).split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
            if line.lower().startswith(b"x-version:")]


def post(server: MailpipeServer, path: str, body: bytes | None,
         headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(server.api + path, data=body, method="POST",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def row(table: str, key: str) -> list[str]:
    """The cells of the table row holding `key` (rich draws columns with │)."""
    line = next(line for line in table.splitlines() if key in line)
    return [cell.strip() for cell in line.strip().strip("│").split("│")]


def reloads(server: MailpipeServer) -> int:
    return int(server.get_json("/api/v1/plugins")["reloads"])


# ---- list and status --------------------------------------------------------------------


def test_list_and_status_show_the_plugin_and_its_counts(mailpipe_factory: Factory,
                                                        tmp_path: Path) -> None:
    server = mailpipe_factory(plugin_config(tmp_path))
    for i in range(3):
        send(server, f"counted {i}")

    data = server.get_json("/api/v1/plugins")
    check_schema(data, "PluginList")
    assert data["reloads"] == 0
    (entry,) = data["plugins"]
    assert (entry["name"], entry["kind"], entry["enabled"]) == (NAME, "python", True)
    assert entry["hooks"] == HOOKS and entry["source"].endswith(f"{NAME}.py")
    for hook in ("on_mail_from", "on_message_complete"):
        stats = entry["stats"][hook]
        assert (stats["executions"], stats["successes"], stats["failures"]) == (3, 3, 0), hook
        assert stats["timeouts"] == 0 and stats["p99_ms"] >= 0
    one = server.get_json(f"/api/v1/plugins/{NAME}")
    check_schema(one, "Plugin")
    assert one["stats"]["on_mail_from"] == entry["stats"]["on_mail_from"]

    assert cli_json(server, "plugins", "list") == server.get_json("/api/v1/plugins")
    # Wide enough for every hook and the source's temporary path on one line each.
    table = ok(cli("plugins", "list", "--api", server.api, columns=1000))
    for cell in ("Name", "Kind", "Enabled", "Hooks", "Source", NAME, "python", "yes",
                 "on_message_complete", f"{NAME}.py"):
        assert cell in table, cell
    for args in (["status"], ["status", NAME]):
        table = ok(cli("plugins", *args, "--api", server.api))
        for cell in ("Plugin", "Hook", "Execs", "OK", "Failed", "Timeouts", "Recovered",
                     "Mean ms", "P99 ms"):
            assert cell in table, (args, cell)
        assert row(table, "on_mail_from")[:7] == [NAME, "on_mail_from", "3", "3", "0", "0",
                                                  "0"], table
    # Without --api: the server is found through its state file in the data dir.
    assert NAME in ok(cli("plugins", "list", cwd=server.workdir))


def test_unknown_plugin(mailpipe_factory: Factory, tmp_path: Path) -> None:
    server = mailpipe_factory(plugin_config(tmp_path))
    status, body, _ = server.request("GET", "/api/v1/plugins/nope")
    assert status == 404 and json.loads(body) == {"error": "no plugin 'nope' is loaded"}
    line = failed(cli("plugins", "status", "nope", "--api", server.api))
    assert line == "mailpipe: no plugin 'nope' is loaded (HTTP 404)"
    result = cli("plugins", "reload", "nope", "--api", server.api)
    assert result.returncode == 1 and result.stdout.strip() == (
        "nope: error: not a loaded plugin"), result


def test_no_plugins(mailpipe_factory: Factory, tmp_path: Path) -> None:
    server = mailpipe_factory({"plugins": {"plugin_path": str(tmp_path / "empty")}})
    assert server.get_json("/api/v1/plugins") == {"plugins": [], "reloads": 0}
    assert ok(cli("plugins", "list", "--api", server.api)).strip() == "no plugins"
    assert ok(cli("plugins", "reload", "--api", server.api)).strip() == "no plugins loaded"


# ---- reload -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["named", "all"])
def test_reload_changes_behaviour_without_dropping_an_open_session(
    mailpipe_factory: Factory, tmp_path: Path, how: str
) -> None:
    server = mailpipe_factory(plugin_config(tmp_path))
    send(server, "before")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as client:
        client.ehlo("open.test")  # the session is open across the reload
        # The padding makes the new file's size differ (see the report on bytecode caches).
        write_plugin(tmp_path / "plugins", 2, padding="# version 2\n")
        names = [NAME] if how == "named" else []
        assert ok(cli("plugins", "reload", *names, "--api", server.api)).strip() == (
            f"{NAME}: reloaded")
        client.sendmail("app@example.com", ["dev@example.test"],
                        "Subject: after\r\n\r\nHello.\r\n")
    found = uuids_by_subject(server, 2)
    assert version_of(server, found["before"]) == [b"1"]
    assert version_of(server, found["after"]) == [b"2"]
    assert reloads(server) == 1
    # Counters go on across the reload.
    stats = server.get_json(f"/api/v1/plugins/{NAME}")["stats"]["on_message_complete"]
    assert stats["executions"] == 2 and stats["successes"] == 2


def test_a_reload_that_fails_keeps_the_running_version(mailpipe_factory: Factory,
                                                       tmp_path: Path) -> None:
    server = mailpipe_factory(plugin_config(tmp_path))
    (tmp_path / "plugins" / f"{NAME}.py").write_text("this is not python\n")
    data = post(server, "/api/v1/plugins/reload", b'{"plugins": ["recorder"]}',
                {"Content-Type": "application/json"})
    assert data[0] == 200
    check_schema(data[1], "PluginReload")
    assert data[1]["plugins"][NAME].startswith("error: plugin recorder: ")
    result = cli("plugins", "reload", NAME, "--api", server.api, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["plugins"][NAME].startswith("error: ")
    send(server, "still version 1")
    (uuid,) = uuids_by_subject(server, 1).values()
    assert version_of(server, uuid) == [b"1"]


def test_reload_refused_to_other_origins_and_bad_bodies(mailpipe_factory: Factory,
                                                        tmp_path: Path) -> None:
    server = mailpipe_factory(plugin_config(tmp_path))
    path = "/api/v1/plugins/reload"
    json_type = {"Content-Type": "application/json"}
    status, body = post(server, path, b"{}", {**json_type, "Origin": "http://evil.example"})
    assert status == 403 and "cross-origin request refused" in body["error"]
    status, body = post(server, path, None, {"Referer": "http://evil.example/page"})
    assert status == 403 and "cross-origin request refused" in body["error"]
    # A form post (no preflight in a browser) is refused for its type, whatever its origin.
    status, _ = post(server, path, b"plugins=recorder", {
        "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    for bad in (b"[]", b'{"plugins": "recorder"}', b'{"other": 1}', b"{"):
        status, body = post(server, path, bad, json_type)
        assert status == 400, bad
        check_schema(body, "Error")
    assert reloads(server) == 0
    # The API's own origin is served.
    status, body = post(server, path, b'{"plugins": null}', {
        **json_type, "Origin": f"http://127.0.0.1:{server.http_port}"})
    assert (status, body) == (200, {"plugins": {NAME: "reloaded"}})
    assert reloads(server) == 1


# ---- queue hooks ------------------------------------------------------------------------


def consuming(tmp_path: Path, pipeline: dict[str, Any], consume_here: bool) -> dict[str, Any]:
    """The recorder plugin; emails on pipeline `emails`, drained by examples/consumer.py (in
    `serve`, or by a `mailpipe jobs consume` of the same config)."""
    jobs: dict[str, Any] = {"pipelines": {"emails": pipeline},
                            "pool": {"command": CONSUMER, "num_workers": 1}}
    if consume_here:
        jobs["consume"] = ["emails"]
    return plugin_config(tmp_path, smtp={"include_raw": True, "jobs": {"pipeline": "emails"}},
                         jobs=jobs,
                         server={"env": {"MAILPIPE_TEST_LOG": str(tmp_path / "jobs.jsonl")}})


def check_queue_hooks(tmp_path: Path, found: dict[str, str], enqueuer: int,
                      consumer: int | None = None) -> None:
    """`ok` consumed once; `[fail] retried` twice (max_attempts 2), requeued once between."""
    good, bad = found["ok"], found["[fail] retried"]
    enqueued = recorded(tmp_path, "on_enqueue")
    assert sorted((e["queue_id"], e["event"]) for e in enqueued) == sorted(
        [(good, good), (bad, bad)])
    assert {e["pid"] for e in enqueued} == {enqueuer}
    assert wait_for(lambda: len(recorded(tmp_path, "on_dequeue")) == 3, timeout=30), recorded(
        tmp_path)
    dequeued = recorded(tmp_path, "on_dequeue")
    assert sorted(e["queue_id"] for e in dequeued) == sorted([good, bad, bad])
    assert wait_for(lambda: recorded(tmp_path, "on_queue_retry"), timeout=10)
    (retry,) = recorded(tmp_path, "on_queue_retry")
    assert (retry["queue_id"], retry["attempt"]) == (bad, 2)
    assert {e["pid"] for e in [*dequeued, retry]} == {consumer or enqueuer}


def consumer_answers(tmp_path: Path) -> list[tuple[str, str]]:
    log = tmp_path / "jobs.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [(line["subject"], line["answer"]) for line in lines]


EXPECTED_ANSWERS = sorted([("ok", "ack"), ("[fail] retried", "nack-requeue"),
                           ("[fail] retried", "nack-requeue")])


def send_one_ok_one_retried(server: MailpipeServer) -> dict[str, str]:
    """Two emails for the consumer: one it acks, one it asks to retry; their uuids."""
    send(server, "ok")
    send(server, "[fail] retried")
    return uuids_by_subject(server, 2)


def wait_for_answers(tmp_path: Path) -> None:
    assert wait_for(lambda: sorted(consumer_answers(tmp_path)) == EXPECTED_ANSWERS,
                    timeout=30), consumer_answers(tmp_path)


def test_queue_hooks_in_serve(mailpipe_factory: Factory, tmp_path: Path) -> None:
    pipeline = {"driver": "sqlite", "config": {"max_attempts": 2}}
    server = mailpipe_factory(consuming(tmp_path, pipeline, consume_here=True))
    found = send_one_ok_one_retried(server)
    wait_for_answers(tmp_path)
    check_queue_hooks(tmp_path, found, enqueuer=server.process.pid)
    stats = server.get_json(f"/api/v1/plugins/{NAME}")["stats"]
    assert stats["on_enqueue"]["executions"] == 2 and stats["on_dequeue"]["executions"] == 3


def test_queue_hooks_in_jobs_consume(mailpipe_factory: Factory, tmp_path: Path) -> None:
    pipeline = {"driver": "sqlite", "config": {"max_attempts": 2}}
    server = mailpipe_factory(consuming(tmp_path, pipeline, consume_here=False))
    found = send_one_ok_one_retried(server)
    assert recorded(tmp_path, "on_dequeue") == []  # nothing consumes in `serve`
    process = consume(server.workdir / "mailpipe.yaml", "emails")
    try:
        wait_for_answers(tmp_path)
        check_queue_hooks(tmp_path, found, enqueuer=server.process.pid, consumer=process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "Traceback" not in (server.workdir / "consume.log").read_text()


def test_queue_hooks_with_redis(mailpipe_factory: Factory, tmp_path: Path) -> None:
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    import uuid

    from redis import Redis

    stream = f"mailpipe-test:plugins:{uuid.uuid4().hex}"
    pipeline = {"driver": "redis", "config": {"addr": f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
                                              "stream": stream, "max_attempts": 2}}
    try:
        server = mailpipe_factory(consuming(tmp_path, pipeline, consume_here=True))
        found = send_one_ok_one_retried(server)
        wait_for_answers(tmp_path)
        check_queue_hooks(tmp_path, found, enqueuer=server.process.pid)
    finally:
        with Redis(host=REDIS_HOST, port=REDIS_PORT) as client:
            keys = list(client.scan_iter(f"{stream}*"))
            if keys:
                client.delete(*keys)


# ---- delivery attempts on the worker pool -----------------------------------------------


def test_delivery_attempts_count_worker_retries(mailpipe_factory: Factory,
                                                tmp_path: Path) -> None:
    mark = tmp_path / "stopped"
    config = plugin_config(
        tmp_path,
        server={"command": [sys.executable, str(HOOKS_WORKER)],
                "env": {"HOOKS_STOP_MARK": str(mark)}},
        smtp={"include_raw": True, "pool": {"num_workers": 2}},
    )
    server = mailpipe_factory(config)
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as client:
        client.sendmail("app@example.com", ["a@example.test", "b@example.test"],
                        "Subject: retried [stop]\r\n\r\nHello.\r\n")
        code, _ = client.mail("app@example.com")
        assert code == 250
        client.rcpt("c@example.test")
        code, text = client.data(b"Subject: poison [stop-always]\r\n\r\nHello.\r\n")
        assert code == 451, text
    assert mark.exists()  # the first worker stopped on it; the second answered

    def attempts() -> list[tuple[str, int]]:
        return sorted((e["recipient"], e["attempt"])
                      for e in recorded(tmp_path, "on_delivery_attempt"))

    expected = [("a@example.test", 1), ("a@example.test", 2), ("b@example.test", 1),
                ("b@example.test", 2), ("c@example.test", 1), ("c@example.test", 2),
                ("c@example.test", 3)]  # the poison email: pool.max_retries_per_email = 3
    assert wait_for(lambda: attempts() == expected, timeout=10), attempts()
    (retried,) = server.messages(q="retried")
    assert {e["event"] for e in recorded(tmp_path, "on_delivery_attempt")
            if e["recipient"] != "c@example.test"} == {retried["uuid"]}


def test_jobs_consume_with_a_plugin_that_cannot_load(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / f"{NAME}.py").write_text("this is not python\n")
    config = tmp_path / "consumer.yaml"
    config.write_text(json.dumps({
        "data_dir": str(tmp_path / "data"), "plugins": {"plugin_path": str(plugins)},
        "jobs": {"pipelines": {"emails": {}}, "pool": {"command": CONSUMER}}}))
    result = cli("jobs", "consume", "emails", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mailpipe: cannot start: plugin {NAME}: "), result.stderr
    assert "failed to import" in last and "Traceback" not in result.stderr
