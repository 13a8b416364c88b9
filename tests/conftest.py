"""Shared fixtures: a real `mailpipe serve` process on free ports, the event schema, tools."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from mailpipe.app import Mailpipe
from mailpipe.config import load_config
from mailpipe.event import CapturedEmail
from mailpipe.metrics import Metrics
from mailpipe.schema import event_schema as packaged_event_schema
from mailpipe.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
# Messages real mailers (PHPMailer, Symfony Mailer) put on the wire, and what each must become.
CORPUS = ROOT / "tests" / "data" / "corpus"
CORPUS_MANIFEST: list[dict[str, Any]] = [
    json.loads(line) for line in (CORPUS / "manifest.jsonl").read_text().splitlines()
]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(message: str) -> NoReturn:
    """Something a test needs is not here: skipped on a developer's machine, a failure under
    CI, where everything must be present."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """The path of an external program; skipped without it, except under CI where it fails."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (make test installs it from Debian's packages)")
    return path


def require_service(name: str, host: str, port: int) -> None:
    """A real service the test talks to (Redis, RabbitMQ, NATS...) must be listening."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError as exc:
        missing(f"{name} is not reachable on {host}:{port}: {exc}")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this run: the kernel may give the same
    ephemeral port to two binds in a row once the first socket is closed, and two listeners
    of one server (or two servers of one test) must not get the same one."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@pytest.fixture(scope="session")
def event_schema() -> dict[str, Any]:
    """The schema shipped in the package, the one GET /api/v1/schema serves."""
    return packaged_event_schema()


@pytest.fixture(scope="session")
def validate_event(event_schema: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(
        event_schema, format_checker=Draft202012Validator.FORMAT_CHECKER
    )

    def validate(event: dict[str, Any]) -> None:
        errors = sorted(validator.iter_errors(event), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])

    return validate


@dataclass
class MailpipeServer:
    """A `mailpipe serve` child process and how to reach it."""

    workdir: Path
    smtp_port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    extra_ports: dict[str, int] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        req = urllib.request.Request(self.api + path, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def get_json(self, path: str) -> Any:
        status, body, _ = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body[:200]!r}"
        return json.loads(body)

    def messages(self, **params: Any) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return self.get_json(f"/api/v1/messages?{query}")["messages"]

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.get_json(f"/api/v1/messages?limit={max(count, 1)}")
            if found["total"] >= count or time.monotonic() > deadline:
                return found["messages"]
            time.sleep(0.05)

    def event(self, uuid: str) -> dict[str, Any]:
        return self.get_json(f"/api/v1/messages/{uuid}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_mailpipe(
    workdir: Path,
    config: dict[str, Any] | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> MailpipeServer:
    workdir.mkdir(parents=True, exist_ok=True)
    smtp_port, http_port = free_port(), free_port()
    cfg: dict[str, Any] = {
        "smtp": {"addr": f"127.0.0.1:{smtp_port}"},
        "http": {"addr": f"127.0.0.1:{http_port}"},
        "data_dir": str(workdir / "data"),
        "shutdown_timeout": "10s",
    }
    for section, values in (config or {}).items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    (workdir / "mailpipe.yaml").write_text(yaml.safe_dump(cfg))
    log_path = workdir / "mailpipe.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    child_env.update(env or {})
    process = subprocess.Popen(
        [sys.executable, "-m", "mailpipe", "serve", *(args or [])],
        cwd=workdir,
        stdout=open(workdir / "stdout.log", "wb"),  # noqa: SIM115
        stderr=open(log_path, "wb"),  # noqa: SIM115
        env=child_env,
    )
    server = MailpipeServer(workdir, smtp_port, http_port, process, log_path)
    if wait:
        wait_until_ready(server)
    return server


def wait_until_ready(server: MailpipeServer, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            stdout = (server.workdir / "stdout.log").read_text(errors="replace")
            raise AssertionError(
                f"mailpipe exited early with status {server.process.returncode}:\n"
                f"stderr:\n{server.log()}\nstdout:\n{stdout}"
            )
        try:
            with urllib.request.urlopen(server.api + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"mailpipe did not become ready:\n{server.log()}")


@pytest.fixture
def mailpipe_factory(tmp_path: Path) -> Iterator[Callable[..., MailpipeServer]]:
    started: list[MailpipeServer] = []

    def factory(config: dict[str, Any] | None = None, **kwargs: Any) -> MailpipeServer:
        server = start_mailpipe(tmp_path / f"mp{len(started)}", config, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture
def mailpipe(mailpipe_factory: Callable[..., MailpipeServer]) -> MailpipeServer:
    """A mailpipe with defaults (memory attachments, raw included in events)."""
    return mailpipe_factory({"smtp": {"include_raw": True}})


# ---- captured emails and the store ------------------------------------------------------------


def make_email(
    subject: str | None = "Hello",
    *,
    mail_from: str = "app@example.com",
    to: tuple[str, ...] = ("user@example.org",),
    header_from: str = "App <app@example.com>",
    text: str | None = "Plain body",
    html: str | None = None,
    received_at: datetime | None = None,
    raw: bytes | None = None,
    uuid: str | None = None,
    attachments: list[dict[str, Any]] | None = None,
) -> CapturedEmail:
    """A small event that follows email-event.schema.json, built by hand."""
    when = (received_at or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
    raw = raw if raw is not None else f"Subject: {subject}\r\n\r\n{text}\r\n".encode()
    headers = {"FROM": header_from, "To": ", ".join(to)}
    if subject is not None:
        headers["Subject"] = subject
    event: dict[str, Any] = {
        "event": "EMAIL_RECEIVED",
        "uuid": uuid or str(uuidlib.uuid4()),
        "remote_addr": "127.0.0.1:50000",
        "received_at": when,
        "envelope": {"from": mail_from, "to": list(to), "helo": "client.test"},
        "authentication": {
            "attempted": False,
            "mechanism": None,
            "username": None,
            "password": None,
        },
        "message": {
            "headers": headers,
            "body": text if text is not None else (html or ""),
            "text": text,
            "html": html,
            "subject": subject,
            "size": len(raw),
        },
        "attachments": attachments or [],
    }
    return CapturedEmail(event=event, raw=raw)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """A started SQLiteStore in tmp_path, with metrics."""
    s = SQLiteStore(tmp_path / "store.db", metrics=Metrics())
    await s.start()
    yield s
    await s.close()


# ---- CPython's email test corpus ----------------------------------------------------------------


@pytest.fixture(scope="session")
def cpython_email_files() -> list[Path]:
    """The messages of CPython's own email tests (test/test_email/data, binary ones included).

    Skipped where the interpreter was installed without its test package, failed under CI."""
    import sysconfig

    data = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"
    files = sorted(p for p in data.glob("*") if p.is_file()) if data.is_dir() else []
    if not files:
        missing(f"CPython's email test corpus is not installed ({data})")
    return files


# ---- in process: a real Mailpipe in the test's event loop ---------------------------------
# Its store and SMTP listeners are real (HTTP off unless asked), so tests can reach into it
# (verdicts, plugins) while clients still talk over real sockets.

InProc = Callable[..., Awaitable[Mailpipe]]


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[InProc]:
    apps: list[Mailpipe] = []

    async def start(smtp: dict[str, Any] | None = None, **top: Any) -> Mailpipe:
        overrides = {
            "data_dir": str(tmp_path / f"data{len(apps)}"),
            "http": {"enabled": False},
            "smtp": {"addr": "127.0.0.1:0", **(smtp or {})},
            **top,
        }
        config, _ = load_config(cwd=tmp_path, overrides=overrides)
        app = Mailpipe(config)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        if not app.capture.stopping:
            await app.shutdown()


def port_of(app: Mailpipe, listener: str = "default") -> int:
    return int(app.capture.addresses()[listener].rsplit(":", 1)[1])


# ---- out-of-process plugins: the examples, built and run for real --------------------------

GO_SOURCES = ROOT / "examples" / "plugins" / "go"
PYTHON_PLUGIN = ROOT / "examples" / "plugins" / "python_plugin.py"
GO_PLUGIN_LIB = Path("/usr/share/gocode/src/github.com/hashicorp/go-plugin")


@pytest.fixture(scope="session")
def go_plugin() -> str:
    """The example Go plugin, built once per source hash under build/ (offline, GOPATH)."""
    require_tool("go")
    require_tool("protoc")
    if not GO_PLUGIN_LIB.is_dir():
        missing("go-plugin is not installed (golang-github-hashicorp-go-plugin-dev)")
    digest = hashlib.sha256()
    for path in (GO_SOURCES / "main.go", GO_SOURCES / "build.sh",
                 ROOT / "proto" / "mailpipe" / "plugin" / "v1" / "plugin.proto"):
        digest.update(path.read_bytes())
    binary = ROOT / "build" / "go-plugin" / digest.hexdigest()[:16] / "mailpipe-go-plugin"
    if not binary.exists():
        subprocess.run([str(GO_SOURCES / "build.sh"), str(binary)], check=True, timeout=300)
    return str(binary)


def python_plugin_command() -> tuple[str, list[str]]:
    return sys.executable, [str(PYTHON_PLUGIN)]


# ---- a raw SMTP client, for exact control of what is sent when ----------------------------


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readuntil(b"\r\n")
        lines.append(line[:-2])
        if line[3:4] != b"-":
            return int(line[:3]), b"\n".join(x[4:] for x in lines).decode()


class AsyncSMTP:
    """An SMTP client over an asyncio stream, for exact control of what is sent when."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, *, greet: int | None = 220) -> AsyncSMTP:
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        if greet is not None:
            code, text = await client.reply()
            assert code == greet, text
        return client

    async def reply(self) -> tuple[int, str]:
        return await asyncio.wait_for(read_reply(self.reader), 10)

    async def command(self, line: str | bytes) -> tuple[int, str]:
        self.writer.write(line.encode() + b"\r\n" if isinstance(line, str) else line)
        return await self.reply()

    async def closed(self) -> bool:
        """True once the server has closed the connection."""
        try:
            return await asyncio.wait_for(self.reader.read(), 5) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()
