"""A pytest plugin for end-to-end tests of your application's email (loaded automatically
where mailpipe is installed: it is registered as a `pytest11` entry point).

    def test_sign_up(mailpipe_server, client):
        client.post("/sign-up", data={"email": "ann@example.test"},
                    smtp_port=mailpipe_server.smtp_port)
        email = mailpipe_server.wait_for_email(to="ann@example.test", subject="Confirm")
        (code,) = mailpipe_server.codes(email["uuid"])
        confirm = [link["url"] for link in mailpipe_server.links(email["uuid"])
                   if "/confirm" in link["url"]]

`mailpipe_server` is a real mailpipe, started in-process (in a thread with its own event loop)
on free ports with a store in a temporary directory, one per test; the helpers talk to its
HTTP API like any client. Override the `mailpipe_config` fixture to change its configuration
(a dict laid out like mailpipe.yaml), or use `start_mailpipe()` directly for another scope.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import math
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


class EmailNotReceived(AssertionError):
    """wait_for_email() timed out: no stored email matched."""


class MailpipeServer:
    """A running mailpipe: where to send email and how to read what arrived."""

    def __init__(self, smtp_host: str, smtp_port: int, http_url: str,
                 authorization: str | None = None) -> None:
        self.smtp_host = smtp_host
        self.smtp_port = smtp_port
        self.http_url = http_url  # with the base path, no trailing slash
        self.authorization = authorization  # the Authorization header http.auth asks for

    def wait_for_email(self, *, to: str | None = None, subject: str | None = None,
                       after: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """The newest email whose recipients contain `to` and subject contains `subject`
        (case-insensitive substrings), received after `after` (an RFC 3339 time or an email's
        uuid), waiting up to `timeout` seconds for it; its full event (the EMAIL_RECEIVED
        document). Raises EmailNotReceived when none arrives in time."""
        params = {"to": to, "subject": subject, "after": after,
                  "timeout": max(0, math.ceil(timeout))}
        try:
            return self._get("/api/v1/messages/wait", params, timeout=timeout + 10)
        except urllib.error.HTTPError as exc:
            if exc.code != 408:
                raise
            seen = [m["subject"] for m in self.messages(limit=10)]
            raise EmailNotReceived(
                f"no email to={to!r} subject={subject!r} after={after!r} within {timeout} s; "
                f"newest stored subjects: {seen}"
            ) from None

    async def await_email(self, **kwargs: Any) -> dict[str, Any]:
        """wait_for_email() for async tests: waits in a thread, the test's loop runs on."""
        return await asyncio.to_thread(lambda: self.wait_for_email(**kwargs))

    def links(self, uuid: str) -> list[dict[str, str]]:
        """Every http, https and mailto link of the email: [{"url", "text", "source"}]."""
        return list(self._get(f"/api/v1/messages/{_quote(uuid)}/links")["links"])

    def codes(self, uuid: str, pattern: str | None = None) -> list[str]:
        """One-time codes in the email's text (`http.code_pattern`, else `pattern`)."""
        params = {"pattern": pattern} if pattern else {}
        return list(self._get(f"/api/v1/messages/{_quote(uuid)}/codes", params)["codes"])

    def messages(self, q: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Summaries of the stored emails, newest first (`q`: the inbox search syntax)."""
        return list(self._get("/api/v1/messages", {"q": q, "limit": limit})["messages"])

    def clear(self) -> None:
        """Delete every stored email."""
        with self._open("/api/v1/messages", method="DELETE"):
            pass

    def _get(self, path: str, params: dict[str, Any] | None = None,
             timeout: float = 30.0) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        with self._open(path + (f"?{query}" if query else ""), timeout=timeout) as response:
            return json.loads(response.read())

    def _open(self, path: str, *, method: str = "GET", timeout: float = 30.0) -> Any:
        headers = {"Authorization": self.authorization} if self.authorization else {}
        request = urllib.request.Request(self.http_url + path, method=method, headers=headers)
        return urllib.request.urlopen(request, timeout=timeout)


@contextlib.contextmanager
def start_mailpipe(config: dict[str, Any] | None = None,
                   data_dir: Path | None = None) -> Iterator[MailpipeServer]:
    """Run mailpipe on free local ports while the block runs; `config` is merged over that
    (e.g. {"http": {"base_path": "/mail"}}). The store lives in `data_dir` (default: a
    temporary directory removed afterwards)."""
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailpipe-")))
        runner = _Runner(_overrides(config or {}, data_dir), data_dir)
        yield runner.start()
        runner.stop()


@pytest.fixture
def mailpipe_config() -> dict[str, Any]:
    """Configuration of `mailpipe_server` (laid out like mailpipe.yaml); override to change."""
    return {}


@pytest.fixture
def mailpipe_server(mailpipe_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                    ) -> Iterator[MailpipeServer]:
    """A running mailpipe for this test, with an empty store."""
    with start_mailpipe(mailpipe_config, tmp_path_factory.mktemp("mailpipe")) as server:
        yield server


# ---- running it ----------------------------------------------------------------------------


def _overrides(config: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """Free ports on loopback and the data directory, under whatever the user set."""
    http = {"addr": "127.0.0.1:0", **(config.get("http") or {}), "enabled": True}
    smtp = {"addr": "127.0.0.1:0", **(config.get("smtp") or {})}
    return {**config, "data_dir": str(data_dir), "http": http, "smtp": smtp}


class _Runner:
    """Mailpipe on its own event loop in a thread, so that sync tests can use it too."""

    def __init__(self, overrides: dict[str, Any], cwd: Path) -> None:
        self.overrides = overrides
        self.cwd = cwd
        self.ready: concurrent.futures.Future[MailpipeServer] = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._run, name="mailpipe-testing", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None

    def start(self) -> MailpipeServer:
        self.thread.start()
        return self.ready.result(timeout=60)

    def stop(self) -> None:
        if self.loop is not None and self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(timeout=60)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start() when it failed before serving
            if not self.ready.done():
                self.ready.set_exception(exc)

    async def _main(self) -> None:
        from mailpipe.app import Mailpipe
        from mailpipe.config import load_config

        # cwd: the test directory's own mailpipe.yaml (if any) is not read, the test decides.
        config, _ = load_config(cwd=self.cwd, overrides=self.overrides)
        app = Mailpipe(config)
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        await app.start()
        try:
            smtp_host, smtp_port = app.capture.addresses()["default"].rsplit(":", 1)
            http_host, http_port = app.http_address()
            url = f"http://{http_host}:{http_port}{config.http.base_path}"
            self.ready.set_result(MailpipeServer(smtp_host.strip("[]"), int(smtp_port), url,
                                                 _authorization(config.http.auth)))
            await self.stopping.wait()
        finally:
            await app.shutdown()


def _authorization(auth: Any) -> str | None:
    if auth is None:
        return None
    if auth.type == "bearer":
        return f"Bearer {auth.token}"
    pair = f"{auth.username}:{auth.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def _quote(uuid: str) -> str:
    return urllib.parse.quote(uuid, safe="")
