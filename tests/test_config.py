"""Configuration: sources and their order, RoadRunner files, errors that name the key."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shlex
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, MailpipeServer, free_port, require_tool
from mailpipe.config import ConfigError, load_config, parse_duration, parse_size


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config, path = load_config(cwd=tmp_path)
    assert path is None
    assert config.smtp.addr == "127.0.0.1:1025"
    assert config.http.addr == "127.0.0.1:8025"
    assert config.store_path == Path("./.mailpipe/mailpipe.db")
    assert config.smtp.max_message_size == 10 * 1024 * 1024
    assert config.smtp.max_recipients == 100
    assert config.store.max_messages == 5000


def test_rr_yaml_is_found_and_unknown_sections_ignored(tmp_path: Path) -> None:
    write(
        tmp_path / ".rr.yaml",
        """
version: "3"
rpc: {listen: "tcp://127.0.0.1:6001"}
server: {command: "php worker.php", relay: pipes}
smtp:
  addr: "127.0.0.1:2525"
  hostname: "buggregator.local"
  read_timeout: "60s"
  write_timeout: "10s"
  max_message_size: 10485760
  attachment_storage: {mode: "tempfile", temp_dir: "/tmp/smtp-attachments", cleanup_after: "1h"}
  pool: {num_workers: 4, max_jobs: 0, allocate_timeout: 60s, destroy_timeout: 60s}
""",
    )
    config, path = load_config(cwd=tmp_path)
    assert path == tmp_path / ".rr.yaml"
    assert config.rpc.listen == "tcp://127.0.0.1:6001"  # RoadRunner's rpc turns ours on
    assert config.rr_rpc == "tcp://127.0.0.1:6001"  # and workers get it as RR_RPC
    assert config.smtp.hostname == "buggregator.local"
    assert config.smtp.read_timeout == 60.0
    assert config.smtp.attachment_storage.cleanup_after == 3600.0
    assert config.smtp.attachment_storage.mode == "tempfile"


def test_cli_beats_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        tmp_path / "mailpipe.yaml",
        "smtp: {addr: '127.0.0.1:1111', hostname: file}\nhttp: {addr: '127.0.0.1:2222'}\n",
    )
    monkeypatch.setenv("MAILPIPE_SMTP__ADDR", "127.0.0.1:3333")
    monkeypatch.setenv("MAILPIPE_HTTP__ADDR", "127.0.0.1:4444")
    config, _ = load_config(cwd=tmp_path, overrides={"http": {"addr": "127.0.0.1:5555"}})
    assert config.smtp.hostname == "file"  # untouched by env: file value kept beside it
    assert config.smtp.addr == "127.0.0.1:3333"
    assert config.http.addr == "127.0.0.1:5555"


def test_several_listeners_inherit_limits(tmp_path: Path) -> None:
    write(
        tmp_path / "mailpipe.yaml",
        """
smtp:
  max_message_size: 5MB
  servers:
    - {name: apps, addr: "127.0.0.1:2525", max_recipients: 3}
    - {name: tls, addr: "127.0.0.1:2465", tls: self-signed, hostname: secure.test}
""",
    )
    config, _ = load_config(cwd=tmp_path)
    apps, tls = config.smtp.listeners()
    assert (apps.name, apps.max_recipients, apps.max_message_size) == ("apps", 3, 5 * 1024**2)
    assert tls.tls is not None and tls.tls.self_signed and tls.hostname == "secure.test"
    assert tls.max_recipients == 100


def test_errors_name_key_value_and_expectation(tmp_path: Path) -> None:
    write(
        tmp_path / "bad.yaml",
        """
smtp:
  max_message_size: lots
  read_timeout: forever
  max_recipents: 4
  servers: [{addr: "nowhere"}]
http: {auth: {type: bearer}}
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "bad.yaml"))
    text = str(info.value)
    assert "smtp.max_message_size: got 'lots'" in text and "10MB" in text
    assert "smtp.read_timeout: got 'forever'" in text and "60s" in text
    assert "smtp.max_recipents: unknown key" in text
    assert "smtp.servers[0].addr" in text and "host:port" in text
    assert "http.auth" in text and "token" in text


def test_unreadable_yaml_and_missing_file(tmp_path: Path) -> None:
    write(tmp_path / "broken.yaml", "smtp: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "absent.yaml"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60.0), ("500ms", 0.5), ("1h30m", 5400.0), (15, 15.0), ("2.5", 2.5), ("1d", 86400.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [(10485760, 10485760), ("10MB", 10 * 1024**2), ("512k", 512 * 1024), ("1 GiB", 1024**3)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["-1s", "soon", True, "10 parsecs"])
def test_bad_durations_raise(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_serve_with_broken_config_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    write(tmp_path / "mailpipe.yaml", "smtp:\n  max_recipients: many\n")
    result = subprocess.run(
        [sys.executable, "-m", "mailpipe", "serve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "smtp.max_recipients: got 'many'" in result.stderr
    assert "integer" in result.stderr


def test_check_config_prints_effective_values(tmp_path: Path) -> None:
    write(tmp_path / "mailpipe.yaml", "smtp: {hostname: shown.test}\n")
    result = subprocess.run(
        [sys.executable, "-m", "mailpipe", "check-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "MAILPIPE_SMTP__MAX_RECIPIENTS": "7"},
    )
    assert result.returncode == 0, result.stderr
    assert "hostname: shown.test" in result.stdout
    assert "max_recipients: 7" in result.stdout


# ---- each limit declared once ----------------------------------------------------------------


def test_listener_limits_come_from_one_declaration(tmp_path: Path) -> None:
    from mailpipe.config import ListenerLimits

    config, _ = load_config(cwd=tmp_path)
    (default,) = config.smtp.listeners()
    declared = {name: field.default for name, field in ListenerLimits.model_fields.items()}
    assert {name: getattr(default, name) for name in declared} == declared
    assert {name: getattr(config.smtp, name) for name in declared} == declared


def test_a_listener_overrides_only_what_it_writes_even_tls_off(tmp_path: Path) -> None:
    write(
        tmp_path / "mailpipe.yaml",
        """
smtp:
  tls: self-signed
  max_recipients: 7
  servers:
    - {name: plain, addr: "127.0.0.1:2525", tls: off, max_recipients: 100}
    - {name: inherits, addr: "127.0.0.1:2526"}
""",
    )
    plain, inherits = load_config(cwd=tmp_path)[0].smtp.listeners()
    assert plain.tls is None and plain.max_recipients == 100  # its own, equal to the default
    assert inherits.tls is not None and inherits.tls.self_signed
    assert inherits.max_recipients == 7
    # check-config shows what each entry writes, not defaults it does not use
    shown = check_config(tmp_path)
    assert "- name: inherits\n    addr: 127.0.0.1:2526\n" in shown.stdout


# ---- RoadRunner files --------------------------------------------------------------------------

RR_FILE = """
version: "3"
rpc: {listen: "tcp://127.0.0.1:6001"}
server:
  command: ""
  user: ""
  group: ""
  relay: pipes
  relay_timeout: 20s
logs: {mode: production, level: warn}
http:
  address: 127.0.0.1:44933
  middleware: [gzip, headers]
  pool: {num_workers: 6, supervisor: {exec_ttl: 10}}
kv: {local: {driver: memory}}
metrics: {address: localhost:2112}
status: {address: 127.0.0.1:2114}
reload: {interval: 1s, patterns: [".php"]}
smtp:
  addr: "127.0.0.1:2525"
  access_logs: true
  pool: {num_workers: 2, debug: false, stream_timeout: 10s}
jobs: {num_pollers: 10, pipeline_size: 100000, pool: {num_workers: 1, debug: true}}
"""


def check_config(cwd: Path, *args: str, env: dict[str, str] | None = None,
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailpipe", "check-config", *args],
        cwd=cwd, capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_roadrunner_file_loads_other_sections_noted_once_each(tmp_path: Path) -> None:
    write(tmp_path / ".rr.yaml", RR_FILE)
    config, _ = load_config(cwd=tmp_path)
    notes = config.notices
    for section in ("http", "kv", "metrics", "status", "reload"):
        assert sum(f"ignoring RoadRunner section '{section}'" in n for n in notes) == 1, notes
    assert not [n for n in notes if "'rpc'" in n]  # read as is: mailpipe's RPC endpoint
    assert config.rpc.listen == "tcp://127.0.0.1:6001"
    for key in ("smtp.access_logs", "smtp.pool.debug", "smtp.pool.stream_timeout",
                "jobs.num_pollers", "jobs.pipeline_size", "jobs.pool.debug"):
        assert sum(f"ignoring RoadRunner key '{key}'" in n for n in notes) == 1, notes
    assert (config.log.level, config.log.format) == ("warning", "json")  # logs mapped
    assert config.http.addr == "127.0.0.1:8025"  # RoadRunner's http section is not ours
    assert config.smtp.pool is not None and config.smtp.pool.num_workers == 2
    assert config.server.user is None and config.server.group is None  # "" is unset
    assert not hasattr(config.smtp, "access_logs")
    assert not hasattr(config.smtp.pool, "debug")
    assert not hasattr(config.smtp.pool, "stream_timeout")


@pytest.mark.parametrize(
    ("logs", "level", "fmt"),
    [
        ("{mode: development}", "debug", "console"),
        ("{mode: production}", "info", "json"),
        ("{mode: raw, level: error}", "error", "console"),
        ("{mode: off}", "error", "console"),
        ("{mode: development, level: info, encoding: json}", "info", "json"),
    ],
)
def test_roadrunner_logs_map_to_log(tmp_path: Path, logs: str, level: str, fmt: str) -> None:
    write(tmp_path / ".rr.yaml", f"version: '3'\nlogs: {logs}\n")
    config, _ = load_config(cwd=tmp_path)
    assert (config.log.level, config.log.format) == (level, fmt)


def test_our_log_section_beats_roadrunner_logs(tmp_path: Path) -> None:
    write(tmp_path / ".rr.yaml", "logs: {mode: development}\nlog: {level: error}\n")
    config, _ = load_config(cwd=tmp_path)
    assert (config.log.level, config.log.format) == ("error", "console")


def test_our_http_section_in_a_roadrunner_file_is_kept_and_checked(tmp_path: Path) -> None:
    write(tmp_path / ".rr.yaml", "version: '3'\nhttp: {addr: '127.0.0.1:9925'}\n")
    config, _ = load_config(cwd=tmp_path)
    assert config.http.addr == "127.0.0.1:9925" and config.notices == []
    write(tmp_path / ".rr.yaml", "version: '3'\nhttp: {adr: '127.0.0.1:9925'}\n")
    with pytest.raises(ConfigError, match=r"http\.adr: unknown key"):
        load_config(cwd=tmp_path)


def test_unknown_section_names_the_closest_key(tmp_path: Path) -> None:
    write(tmp_path / "mailpipe.yaml", "stmp: {addr: '127.0.0.1:2525'}\nstroe: {}\n")
    result = subprocess.run([sys.executable, "-m", "mailpipe", "serve"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "stmp: unknown section (did you mean smtp?)" in result.stderr
    assert "stroe: unknown section (did you mean store?)" in result.stderr


def test_roadrunner_file_through_serve_logs_one_info_line_per_section(
    mailpipe_factory: Callable[..., MailpipeServer],
) -> None:
    rpc = f"tcp://127.0.0.1:{free_port()}"
    server = mailpipe_factory({
        "version": "3", "rpc": {"listen": rpc}, "kv": {},
        "logs": {"mode": "production"}, "smtp": {"access_logs": True},
    })
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.sendmail("a@example.test", ["b@example.test"], "Subject: rr\r\n\r\nbody\r\n")
    assert server.wait_for_messages(1)[0]["subject"] == "rr"
    assert server.stop() == 0
    lines = [json.loads(line) for line in server.log().splitlines()]  # production: JSON
    infos = [line["msg"] for line in lines if line["level"] == "info"]
    for notice in ("ignoring RoadRunner section 'kv'", f"RPC endpoint on {rpc}",
                   "RoadRunner section 'logs' read as log: level=info, format=json"):
        assert infos.count(notice) == 1, infos
    assert sum("'smtp.access_logs'" in msg for msg in infos) == 1


def test_rpc_section(tmp_path: Path) -> None:
    config, _ = load_config(cwd=tmp_path)
    assert config.rpc.listen is None  # off unless configured
    assert config.rr_rpc == "http://127.0.0.1:8025"  # workers get the admin API, as before
    write(tmp_path / "mailpipe.yaml", "rpc: {listen: 'unix:///tmp/rr.sock'}\n")
    assert load_config(cwd=tmp_path)[0].rpc.listen == "unix:///tmp/rr.sock"
    write(tmp_path / "mailpipe.yaml", "rpc: {listen: '127.0.0.1:6001'}\n")
    with pytest.raises(ConfigError, match=r"rpc\.listen: .*expected tcp://host:port"):
        load_config(cwd=tmp_path)


def test_roadrunner_pipelines_are_pushed_to_not_consumed(tmp_path: Path) -> None:
    write(tmp_path / "mailpipe.yaml", """
server: {command: "php worker.php"}
jobs:
  pipelines: {rr: {driver: roadrunner, config: {addr: "tcp://127.0.0.1:6001", pipeline: emails}}}
  consume: [rr]
""")
    with pytest.raises(ConfigError, match="RoadRunner's own consumers take its jobs"):
        load_config(cwd=tmp_path)


# ---- sources: environment, /dev/null ---------------------------------------------------------


def test_bad_environment_value_names_the_variable_not_the_file(tmp_path: Path) -> None:
    write(tmp_path / "mailpipe.yaml", "smtp: {hostname: fine.test}\n")
    result = check_config(tmp_path, env={"MAILPIPE_SMTP__MAX_RECIPIENTS": "abc"})
    assert result.returncode == 2
    assert "MAILPIPE_SMTP__MAX_RECIPIENTS (smtp.max_recipients): got 'abc'" in result.stderr
    assert "mailpipe.yaml" not in result.stderr
    result = check_config(tmp_path, env={"MAILPIPE_SMTP__SERVERS": "[{\"addr\": \"nowhere\"}]"})
    assert "MAILPIPE_SMTP__SERVERS (smtp.servers[0].addr): got 'nowhere'" in result.stderr
    result = check_config(tmp_path, env={"MAILPIPE_SMTP": "{not json"})
    assert result.returncode == 2
    assert "MAILPIPE_SMTP: not valid JSON" in result.stderr and "Traceback" not in result.stderr


def test_file_and_environment_errors_each_name_their_source(tmp_path: Path) -> None:
    write(tmp_path / "mailpipe.yaml", "smtp: {max_line_length: 12}\n")
    result = check_config(tmp_path, env={"MAILPIPE_STORE__MAX_MESSAGES": "lots"})
    assert result.returncode == 2
    assert f"in the environment and in {tmp_path / 'mailpipe.yaml'}:" in result.stderr
    assert "  smtp.max_line_length: got 12" in result.stderr
    assert "  MAILPIPE_STORE__MAX_MESSAGES (store.max_messages): got 'lots'" in result.stderr


def test_dev_null_is_an_empty_config(tmp_path: Path) -> None:
    write(tmp_path / "mailpipe.yaml", "smtp: {hostname: not-used.test}\n")
    result = check_config(tmp_path, "-c", "/dev/null")
    assert result.returncode == 0, result.stderr
    assert "# from /dev/null" in result.stdout and "hostname: localhost" in result.stdout
    result = check_config(tmp_path, "-c", str(tmp_path))
    assert result.returncode == 2 and "is a directory" in result.stderr


def test_rules_across_sections_print_their_message_alone(tmp_path: Path) -> None:
    write(tmp_path / "mailpipe.yaml", "smtp: {delivery: jobs}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert "\n  smtp.delivery: 'jobs' needs smtp.jobs.pipeline" in str(info.value)


@pytest.mark.parametrize("auth", [None, {"type": "bearer", "token": "t0ken"}], ids=["open", "auth"])
def test_non_loopback_warning_only_without_http_auth(
    mailpipe_factory: Callable[..., MailpipeServer], auth: dict[str, str] | None,
) -> None:
    http = {"addr": f"0.0.0.0:{free_port()}", **({"auth": auth} if auth else {})}
    server = mailpipe_factory({"http": http}, wait=False)
    deadline = time.monotonic() + 20
    while "HTTP API on" not in server.log():
        assert server.process.poll() is None and time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert server.stop() == 0
    warned = "reachable from other machines" in server.log()
    assert warned is (auth is None), server.log()


# ---- server.user, server.group, server.on_init: keys that do what they say ---------------------

PHP_WORKER = ROOT / "examples" / "php" / "goridge_worker.php"
HOOKS_WORKER = ROOT / "tests" / "workers" / "hooks_worker.py"


def proc_ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid and Groups of a live process, from /proc (real, effective, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Uid", "Gid", "Groups"):
            fields[name] = [int(v) for v in value.split()]
    return fields


@pytest.fixture
def worker_nobody_can_read() -> Iterator[Path]:
    """The PHP worker copied where `nobody` can read it: the checkout may sit in a folder only
    root can enter (CI clones into a mktemp -d folder, mode 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="mailpipe-nobody-"))
    try:
        folder.chmod(0o755)
        for script in PHP_WORKER.parent.glob("*.php"):
            shutil.copy(script, folder / script.name)
            (folder / script.name).chmod(0o644)
        yield folder / PHP_WORKER.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="starting workers as another user needs root")
@pytest.mark.parametrize(("group", "gid"), [(None, "nogroup"), ("daemon", "daemon")])
def test_server_user_and_group_run_the_workers(
    mailpipe_factory: Callable[..., MailpipeServer], group: str | None, gid: str,
    worker_nobody_can_read: Path,
) -> None:
    php = require_tool("php")
    server_cfg = {"command": [php, str(worker_nobody_can_read)], "user": "nobody",
                  **({"group": group} if group else {})}
    server = mailpipe_factory({"server": server_cfg, "smtp": {"pool": {"num_workers": 2}}})
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.sendmail("a@example.test", ["b@example.test"], "Subject: as nobody\r\n\r\nhi\r\n")
    pids = [w["pid"] for w in server.get_json("/api/v1/workers")["workers"]]
    assert len(pids) == 2
    uid, gid_number = pwd.getpwnam("nobody").pw_uid, grp.getgrnam(gid).gr_gid
    for pid in pids:
        ids = proc_ids(pid)
        assert set(ids["Uid"]) == {uid} and set(ids["Gid"]) == {gid_number}, ids
        assert 0 not in ids["Groups"], ids  # none of root's groups carried over
    assert server.stop() == 0


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("user", "no-such-user-mp", "server.user: no such user 'no-such-user-mp'"),
    ("group", "no-such-group-mp", "server.group: no such group 'no-such-group-mp'"),
])
def test_unknown_user_or_group_stops_serve_with_a_clear_error(
    mailpipe_factory: Callable[..., MailpipeServer], key: str, value: str, needle: str,
) -> None:
    server_cfg = {"command": [sys.executable, str(HOOKS_WORKER)], key: value}
    server = mailpipe_factory({"server": server_cfg}, wait=False)
    assert server.process.wait(timeout=30) == 1
    log = server.log()
    assert needle in log and "Traceback" not in log, log


def test_on_init_runs_once_before_the_workers(
    mailpipe_factory: Callable[..., MailpipeServer], tmp_path: Path,
) -> None:
    order = tmp_path / "order.log"
    on_init = {"command": ["sh", "-c", 'echo "init $INIT_VALUE $SHARED" >> "$ORDER_LOG"; '
                           'echo migrated 3 tables'],
               "exec_timeout": "20s", "env": {"init_value": "from-on-init"}}
    server_cfg = {"command": [sys.executable, str(HOOKS_WORKER)], "on_init": on_init,
                  "env": {"ORDER_LOG": str(order), "HOOKS_ENV_LOG": str(order),
                          "SHARED": "from-server-env"}}
    server = mailpipe_factory({"server": server_cfg, "smtp": {"pool": {"num_workers": 2}}})
    lines = order.read_text().splitlines()
    assert lines[0] == "init from-on-init from-server-env"
    assert len(lines) == 3 and all(json.loads(line)["pid"] for line in lines[1:]), lines
    assert server.stop() == 0
    assert "on_init: migrated 3 tables" in server.log()


@pytest.mark.parametrize(("on_init", "needle"), [
    ({"command": ["sh", "-c", "echo migrating; echo 'no database' >&2; exit 3"]},
     "exited with status 3: migrating | no database"),
    ({"command": ["sleep", "30"], "exec_timeout": "300ms"},
     "did not finish within exec_timeout (0.3s): killed"),
    ({"command": ["/nonexistent/init"]}, "cannot start: No such file or directory"),
])
def test_on_init_failure_stops_startup(
    mailpipe_factory: Callable[..., MailpipeServer], on_init: dict[str, Any], needle: str,
) -> None:
    server_cfg = {"command": [sys.executable, str(HOOKS_WORKER)], "on_init": on_init}
    server = mailpipe_factory({"server": server_cfg}, wait=False)
    assert server.process.wait(timeout=30) == 1
    log = server.log()
    assert f"mailpipe: cannot start: server.on_init: {shlex.join(on_init['command'])} " \
           f"{needle}" in log, log
    assert "Traceback" not in log and "worker pool ready" not in log, log


def test_on_init_failure_with_exit_on_error_off_only_logs(
    mailpipe_factory: Callable[..., MailpipeServer],
) -> None:
    on_init = {"command": ["sh", "-c", "exit 4"], "exit_on_error": False}
    server = mailpipe_factory({"server": {"command": [sys.executable, str(HOOKS_WORKER)],
                                          "on_init": on_init}})
    assert server.get_json("/healthz")["ok"] is True
    assert server.stop() == 0
    assert "exited with status 4 (exit_on_error is off: starting anyway)" in server.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_server_user_without_root_is_a_clear_error() -> None:
    """In a child that has given up root (this interpreter cannot be run by another user)."""
    from mailpipe.workers.process import WorkerStartError, run_as

    read, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child reports through the pipe
        os.close(read)
        os.setgid(grp.getgrnam("nogroup").gr_gid)
        os.setuid(pwd.getpwnam("nobody").pw_uid)
        try:
            outcome = f"returned {run_as('root', None)!r}"
        except WorkerStartError as exc:
            outcome = str(exc)
        # Already that user: nothing to change (the preexec_fn left, which asks to die with
        # mailpipe, switches no user: as nobody a switch would fail with EPERM).
        own = run_as("nobody", None)
        grandchild = os.fork()  # where a preexec_fn runs: in a child of the one that made it
        if grandchild == 0:
            try:
                for fn in own.values():
                    fn()  # type: ignore[operator]
            except OSError:
                os._exit(2)
            os._exit(0)
        ran = os.waitpid(grandchild, 0)[1] == 0
        os.write(write_end, f"{outcome}\n{sorted(own)} {'ran' if ran else 'failed'}".encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read) as pipe:
        outcome, own = pipe.read().split("\n")
    assert os.waitpid(child, 0)[1] == 0
    assert outcome == ("server.user/server.group: starting workers as root:0 needs mailpipe "
                       f"to run as root (it runs as uid {pwd.getpwnam('nobody').pw_uid})")
    assert own in ("[] ran", "['preexec_fn'] ran")


def test_on_init_failure_stops_jobs_consume(tmp_path: Path) -> None:
    config = write(tmp_path / "consume.yaml", json.dumps({
        "data_dir": str(tmp_path / "data"),
        "server": {"on_init": {"command": ["sh", "-c", "echo cannot migrate; exit 5"]}},
        "jobs": {"pipelines": {"emails": {"driver": "sqlite"}},
                 "pool": {"command": [sys.executable, str(ROOT / "examples" / "consumer.py")]}},
    }))
    result = subprocess.run(
        [sys.executable, "-m", "mailpipe", "jobs", "consume", "-c", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert ("mailpipe: cannot start: server.on_init: sh -c 'echo cannot migrate; exit 5' "
            "exited with status 5: cannot migrate") in result.stderr
    assert "Traceback" not in result.stderr


def test_http_base_path_and_code_pattern(tmp_path: Path) -> None:
    config, _ = load_config(cwd=tmp_path, overrides={"http": {"base_path": "/mail/"}})
    assert config.http.base_path == "/mail"
    assert config.http.code_pattern == r"\b\d{4,8}\b"
    config, _ = load_config(cwd=tmp_path, overrides={"http": {"base_path": "/"}})
    assert config.http.base_path == ""
    for bad in ("mail", "/a b", "/a?x", "/a/../b", "/a//b"):
        with pytest.raises(ConfigError, match=r"http\.base_path"):
            load_config(cwd=tmp_path, overrides={"http": {"base_path": bad}})
    with pytest.raises(ConfigError, match=r"http\.code_pattern.*regular expression"):
        load_config(cwd=tmp_path, overrides={"http": {"code_pattern": "(\\d+"}})
