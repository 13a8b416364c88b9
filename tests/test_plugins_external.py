"""Out-of-process plugins in real SMTP sessions: the Go example (go-plugin 1.0.1, built from
Debian's packages) answering hooks in `mailpipe serve`, killed mid-session, and reloaded
under load."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import textwrap
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from conftest import InProc, MailpipeServer, port_of

SENDER = "app@example.test"
MESSAGE = "From: app@example.test\r\nSubject: out of process\r\n\r\nhello\r\n"


def test_a_go_plugin_refuses_tempfails_and_adds_a_header(
    go_plugin: str, mailpipe_factory: Any
) -> None:
    server: MailpipeServer = mailpipe_factory({
        "smtp": {"include_raw": True},
        "plugins": {"external": {"gohooks": {"command": go_plugin}}},
    })
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as tempfailed:
            client.sendmail("tempfail@example.test", ["a@example.test"], MESSAGE)
        assert tempfailed.value.smtp_code == 451
        assert tempfailed.value.smtp_error == b"4.7.1 Try again later (go plugin)"
        refused = client.sendmail(SENDER, ["a@example.test", "reject-me@example.test"], MESSAGE)
    assert refused == {"reject-me@example.test": (550, b"5.1.1 No such user (go plugin)")}
    listing = server.get_json("/api/v1/messages")
    assert listing["total"] == 1
    event = server.get_json(f"/api/v1/messages/{listing['messages'][0]['uuid']}")
    assert event["envelope"]["to"] == ["a@example.test"]
    assert event["message"]["headers"]["X-Go-Plugin"] == "yes"
    assert event["message"]["raw"].startswith("X-Go-Plugin: yes\r\n")
    log = server.log()
    assert "plugins started: gohooks (external)" in log
    assert "recipient refused" in log  # the plugin's own hclog line, in mailpipe's log


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_a_plugin_killed_mid_session_leaves_the_session_answered_and_comes_back(
    inproc: InProc, go_plugin: str
) -> None:
    app = await inproc(plugins={"external": {"gohooks": {"command": go_plugin}},
                                "health_check_interval": "0.2s"})
    external = app.plugins.entries[0].plugin
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(app), timeout=10) as client:
        await client.mail(SENDER)
        os.kill(external.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        # The plugin is down: its hook follows the failure policy (continue), fast.
        code, _ = await client.rcpt("reject-while-down@example.test")
        assert code == 250
        await client.rset()
        await wait_for(lambda: external.restarts >= 1  # type: ignore[attr-defined]
                       and app.plugins.status()[0]["enabled"])
        await client.mail(SENDER)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("reject-again@example.test")
        assert refused.value.code == 550
    status = app.plugins.status()[0]
    assert status["restarts"] >= 1 and status["pid"] != 0


VERSIONED = '''
    from mailpipe.plugins.results import Modify

    class Plugin:
        def on_message_complete(self):
            return Modify(add_headers=[("X-Version", "{version}")])
'''


async def test_reloading_under_load_drops_nothing(
    inproc: InProc, go_plugin: str, tmp_path: Path
) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "versioned.py").write_text(textwrap.dedent(VERSIONED.format(version=1)))
    app = await inproc(plugins={"plugin_path": str(folder), "plugins": ["versioned"],
                                "external": {"gohooks": {"command": go_plugin}}})
    sent: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(app), timeout=20) as smtp:
            while not stop.is_set():
                refused, reply = await smtp.sendmail(
                    SENDER, [f"r{n}@example.test", f"reject{n}@example.test"], MESSAGE)
                sent.append({"refused": sorted(refused), "reply": reply})

    clients = [asyncio.ensure_future(client(n)) for n in range(4)]
    for version in (2, 3):
        await asyncio.sleep(0.3)
        (folder / "versioned.py").write_text(textwrap.dedent(VERSIONED.format(version=version)))
        outcome = await app.plugins.reload()
        assert outcome == {"versioned": "reloaded", "gohooks": "reloaded"}
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*clients)
    assert len(sent) > 20
    # Every email answered, every time: the reject still refused, the others taken.
    assert all(len(item["refused"]) == 1 for item in sent)
    assert all(item["reply"].startswith("2.0.0 Ok") for item in sent)
    assert app.store is not None
    summaries, total = await app.store.list(limit=1)
    assert total == len(sent)
    newest = await app.store.get(summaries[0]["uuid"])
    assert newest is not None and newest["message"]["headers"]["X-Version"] == "3"
