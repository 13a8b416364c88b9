"""Workers and plugins die with mailpipe, even a mailpipe killed outright (SIGKILL runs no
shutdown): they lead their own sessions, so only the kernel's parent-death signal reaches
them (children.py)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, MailpipeServer, python_plugin_command

HOOKS_WORKER = ROOT / "tests" / "workers" / "hooks_worker.py"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the parent-death signal is Linux's")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; its state in /proc says it is dead.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def test_workers_and_plugins_die_with_a_killed_mailpipe(mailpipe_factory: Any) -> None:
    command, args = python_plugin_command()
    server: MailpipeServer = mailpipe_factory({
        "server": {"command": [sys.executable, str(HOOKS_WORKER)]},
        "smtp": {"pool": {"num_workers": 2}},
        "plugins": {"external": {"pyhooks": {"command": command, "args": args}}},
    })
    workers = [w["pid"] for w in server.get_json("/api/v1/workers")["workers"]]
    plugins = [p["pid"] for p in server.get_json("/api/v1/plugins")["plugins"]]
    children = workers + plugins
    assert len(workers) == 2 and len(plugins) == 1 and all(children)
    assert all(alive(pid) for pid in children)
    server.stop(signal.SIGKILL)
    try:
        assert wait_gone(children) == []
    finally:
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
