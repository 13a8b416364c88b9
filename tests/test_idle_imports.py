"""Idle memory (issue 13): `mailpipe serve` with the default configuration imports only what
that configuration uses.

The jobs drivers, the worker pool, the plugin system's pluggy and built-ins, PyYAML (no config
file) and the web inbox's HTML view are each imported on first use; multiprocessing never (the
event helpers are plain subprocesses). A fresh interpreter runs the startup path of
`serve` (the CLI module, the default config, Mailpipe built and started on free ports), takes
one email, and lists what it imported. No RSS or timing here: benchmarks/README.md has them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Imported by no part of a default mailpipe, idle or after its first email.
NOT_IMPORTED = (
    # jobs drivers and the jobs producer
    "redis",
    "aio_pika",
    "aiormq",
    "nats",
    "mailpipe.jobs.sink",
    "mailpipe.jobs.producer",
    "mailpipe.jobs.runner",
    "mailpipe.jobs.drivers",
    # the worker pool and on_init
    "mailpipe.workers.pool",
    "mailpipe.workers.process",
    "mailpipe.workers.goridge",
    "mailpipe.workers.sink",
    "mailpipe.workers.on_init",
    # the plugin system's heavy parts (external plugins speak gRPC)
    "pluggy",
    "grpc",
    "mailpipe.plugins.builtin",
    "mailpipe.plugins.external",
    # the SDK, the CLI's tables, the config file's parser
    "mailpipe.sdk",
    "rich",
    "yaml",
    # the process pool (event helpers are plain subprocesses, spoken to over pipes)
    "multiprocessing",
    "concurrent.futures.process",
    # the inbox's HTML view, until a request asks for it
    "mailpipe.web.htmlview",
    "html.parser",
    # the content checks (HTML, links, screenshots), until a request asks for one
    "mailpipe.checks.html",
    "mailpipe.checks.links",
    "mailpipe.checks.screenshot",
    "tinycss2",
    "playwright",
)

SCRIPT = textwrap.dedent("""
    import asyncio, json, smtplib, sys

    import mailpipe.cli  # what `mailpipe serve` imports first
    from mailpipe.app import Mailpipe
    from mailpipe.config import load_config

    async def main(data_dir):
        config, path = load_config(None, {
            "smtp": {"addr": "127.0.0.1:0"}, "http": {"addr": "127.0.0.1:0"},
            "data_dir": data_dir,
        })
        assert path is None, path
        app = Mailpipe(config)
        await app.start()
        try:
            host, port = next(iter(app.capture.addresses().values())).rsplit(":", 1)
            def send():
                with smtplib.SMTP(host, int(port), timeout=10) as client:
                    client.sendmail("a@example.test", ["b@example.test"],
                                    "Subject: idle\\r\\n\\r\\nhello\\r\\n")
            await asyncio.to_thread(send)
            assert await app.store.count() == 1  # stored before its 250
        finally:
            await app.shutdown()
        return sorted(sys.modules)

    print(json.dumps(asyncio.run(main(sys.argv[1]))))
""")


def test_default_serve_imports_only_what_it_uses(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "data")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout.splitlines()[-1]))
    assert "mailpipe.app" in modules and "mailpipe.web.app" in modules  # it did start
    loaded = sorted(
        name
        for name in modules
        if any(name == heavy or name.startswith(heavy + ".") for heavy in NOT_IMPORTED)
    )
    assert loaded == [], f"imported by a default mailpipe, though it does not use them: {loaded}"


# The event-building helper process (capture/indexer.py) runs beside mailpipe while it takes
# mail: it imports what building an event needs, and none of the server's stacks.
HELPER_NOT_IMPORTED = ("asyncio", "ssl", "uvloop", "pydantic", "aiohttp", "prometheus_client",
                       "click", "sqlite3", "mailpipe.config", "mailpipe.capture.server")


def test_the_event_helper_imports_none_of_the_servers_stacks(tmp_path: Path) -> None:
    script = "import json, sys, mailpipe.capture.indexer; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout))
    assert "mailpipe.capture.message" in modules  # it can build events
    loaded = sorted(
        name
        for name in modules
        if any(name == heavy or name.startswith(heavy + ".") for heavy in HELPER_NOT_IMPORTED)
    )
    assert loaded == [], f"imported by the event helper, though it does not use them: {loaded}"
