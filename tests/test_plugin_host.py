"""Out-of-process plugins over go-plugin's gRPC protocol, mailpipe as the host: real plugin
processes (the Go example built with Debian's go-plugin 1.0.1, the Python SDK example), real
unix sockets, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PYTHON_PLUGIN, ROOT, missing, python_plugin_command
from mailpipe.plugins.base import PluginError
from mailpipe.plugins.context import HookContext, SessionView
from mailpipe.plugins.external import (
    ExternalPlugin,
    HandshakeError,
    PluginCallError,
    PluginUnavailable,
    StartError,
)
from mailpipe.plugins.external.handshake import parse_handshake
from mailpipe.plugins.external.logs import log_stderr_line
from mailpipe.plugins.results import Action

EXPECTED_HOOKS = {"on_mail_from", "on_rcpt_to", "on_message_complete"}


@pytest.fixture(params=["go", "python"])
async def plugin(request: pytest.FixtureRequest):
    if request.param == "go":
        command, args = request.getfixturevalue("go_plugin"), []
    else:
        command, args = python_plugin_command()
    p = ExternalPlugin(request.param, command, args, restart_backoff=(0.1, 1.0))
    await p.start({})
    yield p
    await p.close()


def ctx(hook: str, session: SessionView | None = None, **args) -> HookContext:
    session = session or SessionView(session_uuid="s-1", remote_addr="127.0.0.1:5000",
                                     mail_from="alice@example.org")
    return HookContext(hook=hook, stage="test", args=args, session=session)


async def test_hooks_answer_as_the_plugin_says(plugin: ExternalPlugin) -> None:
    assert plugin.kind == "external"
    assert plugin.implemented() == EXPECTED_HOOKS
    refused = await plugin.call("on_rcpt_to", ctx("on_rcpt_to", recipient="reject-me@x.org",
                                                  params={}))
    assert (refused.action, refused.reply()[:2]) == (Action.REJECT, (550, "5.1.1"))
    accepted = await plugin.call("on_rcpt_to", ctx("on_rcpt_to", recipient="bob@x.org",
                                                   params={}))
    assert accepted.action is Action.CONTINUE
    tempfailed = await plugin.call("on_mail_from", ctx("on_mail_from",
                                                       sender="tempfail@x.org", params={}))
    assert (tempfailed.action, tempfailed.reply()[0]) == (Action.TEMPFAIL, 451)
    modified = await plugin.call("on_message_complete", ctx("on_message_complete",
                                                            raw=b"Subject: hi\r\n\r\nbody\xff"))
    header = "X-Go-Plugin" if plugin.name == "go" else "X-Python-Plugin"
    assert (modified.action, modified.add_headers) == (Action.MODIFY, ((header, "yes"),))
    assert await plugin.health()


async def test_plugin_stderr_reaches_mailpipe_logs(plugin: ExternalPlugin,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mailpipe.plugins")
    await plugin.call("on_rcpt_to", ctx("on_rcpt_to", recipient="reject2@x.org", params={}))
    records = await _wait_for(lambda: [r for r in caplog.records
                                       if r.getMessage() == "recipient refused"])
    record = records[0]
    assert record.name == f"mailpipe.plugins.{plugin.name}"
    assert record.levelno == logging.WARNING  # hclog's "warn"
    assert record.recipient == "reject2@x.org"  # the entry's other keys as context
    assert record.plugin == plugin.name


async def test_killed_plugin_is_restarted(plugin: ExternalPlugin,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailpipe.plugins")
    old_pid, old_socket = plugin.pid, plugin._current.handshake.address
    os.kill(old_pid, signal.SIGKILL)
    await _wait_for(lambda: plugin.pid != old_pid)
    started = time.monotonic()
    with pytest.raises(PluginError):  # PluginUnavailable while it is down
        await plugin.call("on_rcpt_to", ctx("on_rcpt_to", recipient="x@y", params={}))
    assert time.monotonic() - started < 0.5
    assert not await plugin.health() or plugin.restarts == 1
    await _wait_for(lambda: plugin.restarts == 1 and plugin.pid is not None, timeout=15)
    assert plugin.pid != old_pid
    assert not os.path.exists(old_socket)
    assert any("exited unexpectedly with code -9" in r.getMessage() for r in caplog.records)
    result = await plugin.call("on_rcpt_to", ctx("on_rcpt_to", recipient="reject@y",
                                                 params={}))
    assert result.action is Action.REJECT
    assert await plugin.health()


async def test_call_while_down_raises_unavailable(go_plugin: str) -> None:
    p = ExternalPlugin("down", go_plugin, restart_backoff=(5.0, 5.0))
    await p.start({})
    try:
        pid = p.pid
        os.kill(pid, signal.SIGKILL)
        await _wait_for(lambda: p.pid is None)
        with pytest.raises(PluginUnavailable, match="'down' is not running"):
            await p.call("on_rcpt_to", ctx("on_rcpt_to", recipient="a@b", params={}))
        assert not await p.health()
        assert p.implemented() == EXPECTED_HOOKS  # still named: its calls fail, not vanish
    finally:
        await p.close()


async def test_close_stops_process_socket_and_dir(plugin: ExternalPlugin) -> None:
    inst = plugin._current
    pid, socket_path, socket_dir = plugin.pid, inst.handshake.address, inst.socket_dir
    assert os.path.exists(socket_path) and os.path.isdir(socket_dir)
    started = time.monotonic()
    await plugin.close()
    # Shutdown did it (go-plugin 1.0.1 answers it UNAVAILABLE as it stops), not the 2 s kill.
    assert time.monotonic() - started < 2.0
    assert inst.proc.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(socket_path)
    assert not os.path.exists(socket_dir)
    assert plugin.pid is None
    with pytest.raises(PluginUnavailable):
        await plugin.call("on_rcpt_to", ctx("on_rcpt_to", recipient="a@b", params={}))


async def test_select_picks_the_first_healthy(go_plugin: str) -> None:
    p = ExternalPlugin("selector", go_plugin)
    await p.start({})
    try:
        downstreams = [
            {"name": "down", "host": "10.0.0.1", "port": 25, "weight": 9, "healthy": False},
            {"name": "up", "host": "10.0.0.2", "port": 2525, "weight": 1, "healthy": True,
             "labels": {"zone": "a"}, "tls": "not a proto field"},
        ]
        envelope = {"mail_from": "a@b", "rcpt_to": ["c@d"]}
        assert await p.select(downstreams, envelope, "m-1", b"{}") == "up"
        downstreams[1]["healthy"] = False
        with pytest.raises(PluginCallError, match="UNAVAILABLE: no healthy downstream"):
            await p.select(downstreams, envelope, "m-1", b"{}")
    finally:
        await p.close()


async def test_selector_only_python_plugin(tmp_path: Path) -> None:
    script = tmp_path / "selector_only.py"
    script.write_text(
        "from mailpipe.plugins.sdk import serve\n"
        "class Last:\n"
        "    def select(self, downstreams, envelope, message_uuid, event):\n"
        "        return downstreams[-1]['name'] if event['ok'] else ''\n"
        "serve(selector=Last())\n")
    p = ExternalPlugin("sel", sys.executable, [str(script)])
    await p.start({})
    try:
        assert p.implemented() == frozenset()  # no Hooks service: UNIMPLEMENTED
        pick = [{"name": "a", "healthy": True}, {"name": "b", "healthy": True}]
        assert await p.select(pick, {}, "m", b'{"ok": true}') == "b"
        with pytest.raises(PluginCallError, match="unknown downstream ''"):
            await p.select(pick, {}, "m", b'{"ok": false}')
        with pytest.raises(PluginCallError, match="UNIMPLEMENTED"):
            await p.call("on_connect", ctx("on_connect", remote_addr="1.2.3.4"))
    finally:
        await p.close()


async def test_tcp_plugin(tmp_path: Path) -> None:
    script = tmp_path / "tcp.py"
    script.write_text(
        "from mailpipe.plugins.sdk import Accept, serve\n"
        "class Hooks:\n"
        "    def on_ehlo(self, ctx):\n"
        "        return Accept()\n"
        "serve(hooks=Hooks(), network='tcp')\n")
    p = ExternalPlugin("tcp", sys.executable, [str(script)])
    await p.start({})
    try:
        host, port = p._current.handshake.address.rsplit(":", 1)
        assert (p._current.handshake.network, host) == ("tcp", "127.0.0.1")
        assert 10000 <= int(port) <= 25000  # PLUGIN_MIN_PORT..PLUGIN_MAX_PORT
        result = await p.call("on_ehlo", ctx("on_ehlo", hostname="client"))
        assert result.action is Action.ACCEPT
    finally:
        await p.close()


async def test_python_plugin_exception_is_a_call_error(tmp_path: Path) -> None:
    script = tmp_path / "raises.py"
    script.write_text(
        "from mailpipe.plugins.sdk import serve\n"
        "class Broken:\n"
        "    def on_helo(self, ctx):\n"
        "        raise RuntimeError('helo broke: ' + ctx['args']['hostname'])\n"
        "serve(hooks=Broken())\n")
    p = ExternalPlugin("broken", sys.executable, [str(script)])
    await p.start({})
    try:
        assert p.implemented() == {"on_helo"}
        with pytest.raises(PluginCallError, match="INTERNAL: RuntimeError: helo broke: mx1"):
            await p.call("on_helo", ctx("on_helo", hostname="mx1"))
    finally:
        await p.close()


async def test_garbage_handshake_names_the_plugin(tmp_path: Path) -> None:
    script = tmp_path / "chatty.sh"
    script.write_text("#!/bin/sh\necho 'hello from a plugin that prints first'\nsleep 30\n")
    script.chmod(0o755)
    p = ExternalPlugin("chatty", str(script), start_timeout=10)
    with pytest.raises(HandshakeError, match="plugin 'chatty': bad handshake line "
                                             "'hello from a plugin that prints first'"):
        await p.start({})
    await p.close()


@pytest.mark.parametrize("kind", ["go", "python"])
async def test_missing_cookie_exits_1_with_a_clear_error(kind: str,
                                                        request: pytest.FixtureRequest) -> None:
    # The plugin run without mailpipe's cookie, as if run by hand: go-plugin (and the SDK)
    # refuse with go-plugin's message.
    command = [request.getfixturevalue("go_plugin")] if kind == "go" else \
        [sys.executable, str(PYTHON_PLUGIN)]
    p = ExternalPlugin("nocookie", "env", ["-u", "MAILPIPE_PLUGIN", *command])
    with pytest.raises(StartError, match=r"'nocookie' exited with code 1 before its handshake"
                                         r".*This binary is a plugin"):
        await p.start({})


async def test_long_stderr_lines_do_not_block_the_plugin(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # 3 MiB on stderr in lines past the reader's limit, then the handshake: had the reader
    # stopped at the first long line, the plugin would block on a full pipe and never start.
    script = tmp_path / "noisy.py"
    script.write_text(
        "import sys\n"
        "sys.stderr.write(('x' * (3 << 20)) + '\\n[WARN] after the long line\\n')\n"
        "sys.stderr.flush()\n"
        "from mailpipe.plugins.sdk import serve\n"
        "class Hooks:\n"
        "    def on_connect(self, ctx):\n"
        "        return None\n"
        "serve(hooks=Hooks())\n")
    caplog.set_level(logging.DEBUG, logger="mailpipe.plugins")
    p = ExternalPlugin("noisy", sys.executable, [str(script)], start_timeout=20)
    await p.start({})
    try:
        assert p.implemented() == {"on_connect"}
        assert any(r.getMessage() == "[WARN] after the long line" for r in caplog.records)
    finally:
        await p.close()


async def test_start_timeout(tmp_path: Path) -> None:
    script = tmp_path / "silent.sh"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    p = ExternalPlugin("silent", str(script), start_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(StartError, match=r"'silent' did not start within 0\.5s"):
        await p.start({})
    assert time.monotonic() - started < 4


async def test_missing_command() -> None:
    p = ExternalPlugin("ghost", "/nonexistent/mailpipe-plugin")
    with pytest.raises(StartError, match="'ghost': cannot run '/nonexistent/mailpipe-plugin'"):
        await p.start({})


async def test_reload_swaps_the_process_without_failing_calls(plugin: ExternalPlugin) -> None:
    old_pid, old_proc = plugin.pid, plugin._current.proc
    results: list[Action] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            result = await plugin.call("on_rcpt_to", ctx("on_rcpt_to", recipient="reject@x",
                                                         params={}))
            results.append(result.action)

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    await asyncio.sleep(0.2)
    await plugin.reload()
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*callers)  # any failed call raises here
    assert plugin.pid not in (None, old_pid)
    assert old_proc.returncode is not None
    assert len(results) > 10 and set(results) == {Action.REJECT}
    assert plugin.restarts == 0  # a reload is not a crash


@pytest.mark.parametrize("line", [
    "1|1|unix|/run/plugin123|grpc|",
    "1|1|tcp|127.0.0.1:1234|grpc",
    "1|1|unix|/p|grpc||true",
    "  1|1|tcp|127.0.0.1:1|grpc  \n",
])
def test_handshake_lines_accepted(line: str) -> None:
    shake = parse_handshake("p", line)
    assert shake.protocol == "grpc" and shake.app_version == 1
    assert shake.target in ("unix:/run/plugin123", "127.0.0.1:1234", "unix:/p", "127.0.0.1:1")


@pytest.mark.parametrize(("line", "problem"), [
    ("1|1|unix", "expected 4 to 7 fields"),
    ("2|1|unix|/p|grpc|", "core protocol version '2'"),
    ("1|3|unix|/p|grpc|", "app protocol version '3'"),
    ("1|1|pipe|/p|grpc|", "unknown address type 'pipe'"),
    ("1|1|tcp|127.0.0.1:1", "protocol 'netrpc'"),
    ("1|1|tcp|127.0.0.1:1|netrpc|", "protocol 'netrpc'"),
    ("1|1|unix|/p|grpc|" + "A" * 60, "TLS"),
])
def test_handshake_lines_refused(line: str, problem: str) -> None:
    with pytest.raises(HandshakeError, match=f"plugin 'p': bad handshake line .*{problem}"):
        parse_handshake("p", line)


def test_stderr_lines_as_hclog(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("mailpipe.plugins.t")
    caplog.set_level(logging.DEBUG, logger="mailpipe.plugins.t")
    lines = [
        b'{"@level":"error","@message":"boom","@module":"m","@timestamp":"x","name":"n","k":1}',
        b"[WARN] careful\n", b"[INFO] hello", b"panic: runtime error", b"fatal error: oom",
        b"just text", b"{not json", b"   \n",
    ]
    for line in lines:
        log_stderr_line(logger, "t", line)
    got = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [
        (logging.ERROR, "boom"), (logging.WARNING, "[WARN] careful"),
        (logging.INFO, "[INFO] hello"), (logging.ERROR, "panic: runtime error"),
        (logging.ERROR, "fatal error: oom"), (logging.DEBUG, "just text"),
        (logging.DEBUG, "{not json"),
    ]
    first = caplog.records[0]
    assert (first.plugin_module, first.plugin_name, first.k) == ("m", "n", 1)


def test_generated_protos_are_current(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        missing("grpcio-tools is not installed (the test extra)")
    plugin_out, rpc_out = tmp_path / "plugin", tmp_path / "rpc"
    subprocess.run([str(ROOT / "scripts" / "gen_protos.sh"), str(plugin_out), str(rpc_out)],
                   check=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    src = ROOT / "src" / "mailpipe"
    for out, committed in ((plugin_out, src / "plugins" / "external" / "proto"),
                           (rpc_out, src / "rpc" / "proto")):
        names = sorted(p.name for p in out.glob("*_pb2.py"))
        assert names == sorted(p.name for p in committed.glob("*_pb2.py"))
        for name in names:
            assert (out / name).read_bytes() == (committed / name).read_bytes(), \
                f"{name} is stale: run make protos"


async def _wait_for(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        with contextlib.suppress(Exception):
            await asyncio.sleep(0.02)


async def test_reload_runs_the_new_binary(go_plugin: str, tmp_path: Path) -> None:
    launcher = tmp_path / "plugin"
    launcher.write_text(f"#!/bin/sh\nexec {go_plugin}\n")
    launcher.chmod(0o755)
    p = ExternalPlugin("swap", str(launcher))
    await p.start({})
    try:
        assert p.files() == [str(launcher)]
        message = ctx("on_message_complete", raw=b"x")
        assert (await p.call("on_message_complete", message)).add_headers[0][0] == "X-Go-Plugin"
        python, args = python_plugin_command()
        launcher.write_text(f"#!/bin/sh\nexec {python} {args[0]}\n")  # a new "build"
        await p.reload()
        assert (await p.call("on_message_complete", message)).add_headers[0][0] == \
            "X-Python-Plugin"
    finally:
        await p.close()


async def test_a_failed_reload_keeps_the_running_plugin(go_plugin: str, tmp_path: Path) -> None:
    launcher = tmp_path / "plugin"
    launcher.write_text(f"#!/bin/sh\nexec {go_plugin}\n")
    launcher.chmod(0o755)
    p = ExternalPlugin("keep", str(launcher))
    await p.start({})
    try:
        pid = p.pid
        launcher.write_text("#!/bin/sh\necho broken build\n")
        with pytest.raises(HandshakeError, match=r"'keep'.*broken build"):
            await p.reload()
        assert p.pid == pid
        result = await p.call("on_rcpt_to", ctx("on_rcpt_to", recipient="reject@x", params={}))
        assert result.action is Action.REJECT
    finally:
        await p.close()


async def test_config_reaches_the_python_plugin() -> None:
    command, args = python_plugin_command()
    p = ExternalPlugin("configured", command, args)
    await p.start({"reject_pattern": "^nobody@"})
    try:
        refused = await p.call("on_rcpt_to", ctx("on_rcpt_to", recipient="nobody@x", params={}))
        kept = await p.call("on_rcpt_to", ctx("on_rcpt_to", recipient="reject@x", params={}))
        assert (refused.action, kept.action) == (Action.REJECT, Action.CONTINUE)
    finally:
        await p.close()


async def test_call_timeout(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text(
        "import asyncio\n"
        "from mailpipe.plugins.sdk import serve\n"
        "class Slow:\n"
        "    async def on_data(self, ctx):\n"
        "        await asyncio.sleep(30)\n"
        "serve(hooks=Slow())\n")
    p = ExternalPlugin("slow", sys.executable, [str(script)], call_timeout=0.3)
    await p.start({})
    try:
        started = time.monotonic()
        with pytest.raises(PluginCallError, match="'slow': on_data failed: DEADLINE_EXCEEDED"):
            await p.call("on_data", ctx("on_data"))
        assert time.monotonic() - started < 2
        assert await p.health()  # a slow call is not a dead plugin
    finally:
        await p.close()
