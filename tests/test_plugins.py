"""Python plugins in real SMTP sessions: every hook at its moment, what results do, the
executor's isolation (raising, hanging, slow, too many at once), the circuit breaker and its
health check, loading errors, and hot reload."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from conftest import InProc, port_of
from mailpipe.app import Mailpipe, StartupError
from mailpipe.config import load_config

SENDER = "app@example.test"
MESSAGE = "From: app@example.test\r\nTo: a@example.test\r\nSubject: plugged\r\n\r\nbody line\r\n"


def plugin_dir(tmp_path: Path, **sources: str) -> Path:
    """A plugin_path holding NAME.py for each keyword."""
    folder = tmp_path / "plugins"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return folder


def plugin(app: Mailpipe, name: str) -> Any:
    """The object behind a loaded Python plugin (to read what it recorded)."""
    for entry in app.plugins.entries:
        if entry.name == name:
            return entry.plugin.obj  # type: ignore[attr-defined]
    raise KeyError(name)


async def start(inproc: InProc, tmp_path: Path, smtp: dict[str, Any] | None = None,
                **plugins: Any) -> Mailpipe:
    sources = plugins.pop("sources", {})
    config = {"plugin_path": str(plugin_dir(tmp_path, **sources)), **plugins}
    return await inproc(smtp, plugins=config)


async def send(app: Mailpipe, recipients: list[str], sender: str = SENDER,
               message: str = MESSAGE, **login: str) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", port_of(app), timeout=10) as client:
            if login:
                client.login(login["user"], login["password"])
            return client.sendmail(sender, recipients, message)
    return await asyncio.to_thread(run)


async def emails(app: Mailpipe) -> list[dict[str, Any]]:
    """Every stored event, oldest first."""
    assert app.store is not None
    summaries, _ = await app.store.list(limit=1000)
    events = [await app.store.get(summary["uuid"]) for summary in reversed(summaries)]
    assert all(event is not None for event in events)
    return events  # type: ignore[return-value]


async def only_email(app: Mailpipe) -> dict[str, Any]:
    stored = await emails(app)
    assert len(stored) == 1, stored
    return stored[0]


RECORDER = '''
    import asyncio

    class Plugin:
        def __init__(self):
            self.calls = []

        def _note(self, ctx, **args):
            self.calls.append((ctx.hook, args, ctx))

        def on_rate_limit_check(self, ctx, remote_addr): self._note(ctx, remote_addr=remote_addr)
        def on_connect(self, ctx, remote_addr): self._note(ctx, remote_addr=remote_addr)
        def on_helo(self, ctx, hostname): self._note(ctx, hostname=hostname)
        def on_ehlo(self, ctx, hostname): self._note(ctx, hostname=hostname)
        def on_starttls(self, ctx): self._note(ctx)
        def on_auth(self, ctx, mechanism, username):
            self._note(ctx, mechanism=mechanism, username=username)
        async def on_mail_from(self, ctx, sender, params):
            await asyncio.sleep(0)
            self._note(ctx, sender=sender, params=params)
        def on_reputation_check(self, ctx, remote_addr, domain):
            self._note(ctx, remote_addr=remote_addr, domain=domain)
        def on_spf_check(self, ctx, sender, remote_ip):
            self._note(ctx, sender=sender, remote_ip=remote_ip)
            from mailpipe.plugins.results import Continue, HookResult
            return HookResult(message="softfail")
        def on_rcpt_to(self, ctx, recipient, params):
            self._note(ctx, recipient=recipient, params=params)
        def on_greylist_check(self, ctx, sender, recipient, remote_addr):
            self._note(ctx, sender=sender, recipient=recipient, remote_addr=remote_addr)
        def on_data(self, ctx): self._note(ctx)
        def on_headers(self, ctx, headers): self._note(ctx, headers=headers)
        def on_body(self, ctx, body): self._note(ctx, body=body)
        def on_antivirus_scan(self, ctx, content): self._note(ctx, content=content)
        def on_antispam_scan(self, ctx, content): self._note(ctx, content=content)
        def on_content_filter(self, ctx, content): self._note(ctx, content=content)
        def on_dkim_verify(self, ctx, content):
            self._note(ctx, content=content)
            from mailpipe.plugins.results import HookResult
            return HookResult(message="none")
        def on_dmarc_check(self, ctx, sender, spf_result, dkim_result):
            self._note(ctx, sender=sender, spf_result=spf_result, dkim_result=dkim_result)
        def on_message_complete(self, ctx, raw): self._note(ctx, raw=raw)
        def on_pre_delivery(self, ctx, recipient): self._note(ctx, recipient=recipient)
        def on_delivery_attempt(self, ctx, recipient, attempt):
            self._note(ctx, recipient=recipient, attempt=attempt)
        def on_delivery_success(self, ctx, recipient): self._note(ctx, recipient=recipient)
        def on_metrics_collect(self, ctx, event, data): self._note(ctx, event=event, data=data)
        def on_disconnect(self, ctx, remote_addr): self._note(ctx, remote_addr=remote_addr)
'''

SESSION_ORDER = [
    "on_rate_limit_check", "on_connect", "on_ehlo", "on_starttls", "on_ehlo", "on_auth",
    "on_mail_from", "on_reputation_check", "on_spf_check",
    "on_rcpt_to", "on_greylist_check", "on_rcpt_to", "on_greylist_check",
    "on_data", "on_headers", "on_body", "on_antivirus_scan", "on_antispam_scan",
    "on_content_filter", "on_dkim_verify", "on_dmarc_check", "on_message_complete",
    "on_pre_delivery", "on_pre_delivery",
]


async def test_every_hook_fires_at_its_moment_with_its_arguments(
    inproc: InProc, tmp_path: Path
) -> None:
    app = await start(inproc, tmp_path, {"tls": {"mode": "starttls", "self_signed": True}},
                      sources={"recorder": RECORDER})
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(app), tls_context=context,
                               start_tls=True) as client:
        await client.login("alice", "s3cret")
        await client.sendmail(SENDER, ["a@example.test", "b@example.test"], MESSAGE)
    recorder = plugin(app, "recorder")
    await wait_for(lambda: any(c[0] == "on_disconnect" for c in recorder.calls))
    hooks = [c[0] for c in recorder.calls]
    assert hooks[:len(SESSION_ORDER)] == SESSION_ORDER
    # Notifications run in the background, after the reply that caused them.
    assert set(hooks[len(SESSION_ORDER):]) == {
        "on_delivery_attempt", "on_delivery_success", "on_metrics_collect", "on_disconnect"}
    calls = {hook: (args, ctx) for hook, args, ctx in recorder.calls}
    event = await only_email(app)
    args, ctx = calls["on_auth"]
    assert args == {"mechanism": ctx.session.auth_mechanism, "username": "alice"}
    assert ctx.session.tls and ctx.message_uuid is None
    args, ctx = calls["on_mail_from"]
    assert args["sender"] == SENDER and ctx.message_uuid == event["uuid"]
    assert ctx.session.mail_from == SENDER and ctx.session.rcpt_to == []
    assert calls["on_reputation_check"][0]["domain"] == "example.test"
    assert calls["on_spf_check"][0] == {"sender": SENDER, "remote_ip": "127.0.0.1"}
    args, ctx = calls["on_greylist_check"]  # the second recipient's: the envelope so far
    assert args["recipient"] == "b@example.test" and ctx.session.rcpt_to == ["a@example.test"]
    assert ("Subject", "plugged") in calls["on_headers"][0]["headers"]
    assert calls["on_body"][0]["body"] == b"body line\r\n"
    raw = calls["on_message_complete"][0]["raw"]
    assert raw.endswith(b"body line\r\n") and calls["on_content_filter"][0]["content"] == raw
    assert calls["on_dmarc_check"][0] == {"sender": SENDER, "spf_result": "softfail",
                                          "dkim_result": "none"}
    args, ctx = calls["on_message_complete"]
    assert ctx.event is not None and ctx.event["uuid"] == event["uuid"] == ctx.message_uuid
    assert calls["on_delivery_attempt"][0]["attempt"] == 1
    sessions = {ctx.session_uuid for _, _, ctx in recorder.calls}
    assert sessions == {event["session"]["uuid"]}
    metrics = [args["event"] for hook, args, _ in recorder.calls if hook == "on_metrics_collect"]
    assert sorted(metrics) == ["connection_closed", "email_accepted"]


async def test_helo_fires_on_helo_not_on_ehlo(inproc: InProc, tmp_path: Path) -> None:
    app = await start(inproc, tmp_path, sources={"recorder": RECORDER})

    def run() -> None:
        with smtplib.SMTP("127.0.0.1", port_of(app)) as client:
            client.helo("old.client.test")
            client.sendmail(SENDER, ["a@example.test"], MESSAGE)
    await asyncio.to_thread(run)
    calls = plugin(app, "recorder").calls
    greetings = [(hook, args) for hook, args, _ in calls if hook in ("on_helo", "on_ehlo")]
    assert greetings == [("on_helo", {"hostname": "old.client.test"})]


POLICY = '''
    from mailpipe.plugins.results import Accept, Disconnect, Modify, Reject, Tempfail

    class Plugin:
        def on_mail_from(self, sender):
            if sender.startswith("tempfail@"):
                return Tempfail("Try later", 451, "4.7.1")
        def on_rcpt_to(self, recipient):
            if recipient.startswith("unknown@"):
                return Reject("No such user", 550, "5.1.1")
            if recipient.startswith("vip@"):
                return Accept()
            if recipient.startswith("alias@"):
                return Modify(rcpt_to=["alice@example.test", "bob@example.test"])
        def on_helo(self, hostname):
            if hostname == "spammer.test":
                return Disconnect("Go away")
        def on_message_complete(self, ctx, raw):
            if b"VIRUS" in raw:
                return Reject("Infected", 554, "5.7.1")
            return Modify(add_headers=[("X-Scanned", "clean")],
                          set_headers={"Subject": "[checked] plugged"}, tags=["scanned"])
'''

# Runs after POLICY: an ACCEPT there skips this plugin on the same hook.
SECOND = '''
    class Plugin:
        def __init__(self):
            self.rcpts = []
        def on_rcpt_to(self, recipient):
            self.rcpts.append(recipient)
'''


async def test_results_refuse_what_their_hook_is_about(inproc: InProc, tmp_path: Path) -> None:
    app = await start(inproc, tmp_path, plugins=["policy", "second"],
                      sources={"policy": POLICY, "second": SECOND})
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await send(app, ["a@example.test"], sender="tempfail@example.test")
    assert (refused.value.smtp_code, refused.value.smtp_error) == (451, b"4.7.1 Try later")
    refused_rcpts = await send(app, ["a@example.test", "unknown@example.test", "vip@example.test"])
    assert refused_rcpts == {"unknown@example.test": (550, b"5.1.1 No such user")}
    assert plugin(app, "second").rcpts == ["a@example.test"]  # not after REJECT or ACCEPT
    with pytest.raises(smtplib.SMTPDataError) as infected:
        await send(app, ["a@example.test"], message=MESSAGE + "VIRUS\r\n")
    assert (infected.value.smtp_code, infected.value.smtp_error) == (554, b"5.7.1 Infected")
    assert len(await emails(app)) == 1

    def greet() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port_of(app)) as client:
            reply = client.helo("spammer.test")
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.noop()
            return reply
    assert await asyncio.to_thread(greet) == (421, b"4.7.0 Go away")


async def test_modify_changes_the_stored_message_and_the_event(
    inproc: InProc, tmp_path: Path, validate_event: Any
) -> None:
    app = await start(inproc, tmp_path, sources={"policy": POLICY})
    await send(app, ["alias@example.test", "carol@example.test"])
    event = await only_email(app)
    validate_event(event)
    assert event["envelope"]["to"] == ["alice@example.test", "bob@example.test",
                                       "carol@example.test"]
    assert event["tags"] == ["scanned"]
    assert event["message"]["headers"]["X-Scanned"] == "clean"
    assert event["message"]["subject"] == "[checked] plugged"
    assert app.store is not None
    raw = await app.store.raw(event["uuid"])
    assert raw is not None
    assert raw.startswith(b"Subject: [checked] plugged\r\nX-Scanned: clean\r\n")
    assert raw.count(b"Subject:") == 1 and raw.endswith(b"\r\n\r\nbody line\r\n")


FAILING = '''
    import asyncio, time
    from mailpipe.plugins.results import Reject

    class Plugin:
        def __init__(self):
            self.errors = []
        def on_mail_from(self, sender):
            if sender.startswith("raise@"):
                raise RuntimeError("plugin bug")
        async def on_rcpt_to(self, recipient):
            if recipient.startswith("hang@"):
                await asyncio.Event().wait()
            if recipient.startswith("slow@"):
                await asyncio.sleep(0.05)
        def on_data(self):
            return "not a result"
        def on_error(self, error, stage):
            self.errors.append((stage, str(error)))
'''


async def test_a_failing_plugin_never_stops_the_session(inproc: InProc, tmp_path: Path) -> None:
    app = await start(inproc, tmp_path, sources={"failing": FAILING},
                      executor={"timeout": "0.3s", "failure_threshold": 100})
    assert await send(app, ["hang@example.test", "slow@example.test"],
                      sender="raise@example.test") == {}
    failing = plugin(app, "failing")
    await wait_for(lambda: len(failing.errors) == 3)
    stages = sorted(stage for stage, _ in failing.errors)
    assert stages == ["on_data", "on_mail_from", "on_rcpt_to"]
    assert any("timed out after 0.3s" in text for _, text in failing.errors)
    stats = app.plugins.status()[0]["stats"]
    assert stats["on_rcpt_to"]["timeouts"] == 1 and stats["on_rcpt_to"]["successes"] == 1
    assert stats["on_mail_from"]["recoveries"] == 1
    assert (await only_email(app))["envelope"]["to"] == ["hang@example.test", "slow@example.test"]


async def test_a_hook_set_to_tempfail_answers_4xx_when_its_plugin_fails(
    inproc: InProc, tmp_path: Path
) -> None:
    app = await start(inproc, tmp_path, sources={"failing": FAILING},
                      executor={"timeout": "0.3s", "on_failure_hooks": {"on_rcpt_to": "tempfail"}})
    refused = await send(app, ["hang@example.test", "ok@example.test"])
    reply = (451, b"4.3.0 Temporary failure in a plugin, please retry")
    assert refused == {"hang@example.test": reply}


async def test_without_panic_recovery_an_exception_answers_451(
    inproc: InProc, tmp_path: Path
) -> None:
    app = await start(inproc, tmp_path, sources={"failing": FAILING},
                      executor={"enable_panic_recovery": False})
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await send(app, ["a@example.test"], sender="raise@example.test")
    assert refused.value.smtp_code == 451


BLOCKING = '''
    import time, threading

    class Plugin:
        threaded = True  # its sync hooks block: run them in a thread
        def on_rcpt_to(self, recipient):
            if recipient.startswith("block@"):
                time.sleep(2)
'''


async def test_a_blocking_threaded_plugin_times_out_without_blocking_others(
    inproc: InProc, tmp_path: Path
) -> None:
    app = await start(inproc, tmp_path, sources={"blocking": BLOCKING},
                      executor={"timeout": "0.3s"})
    first = asyncio.ensure_future(send(app, ["block@example.test"]))
    await asyncio.sleep(0.05)
    # While one call blocks in its thread the loop serves another session.
    assert await asyncio.wait_for(send(app, ["ok@example.test"]), 1.0) == {}
    assert await first == {}
    stats = app.plugins.status()[0]["stats"]["on_rcpt_to"]
    assert stats["timeouts"] == 1 and stats["successes"] == 1


CONCURRENT = '''
    import asyncio

    class Plugin:
        def __init__(self):
            self.now = self.peak = 0
        async def on_rcpt_to(self, recipient):
            self.now += 1
            self.peak = max(self.peak, self.now)
            await asyncio.sleep(0.05)
            self.now -= 1
'''


async def test_max_concurrent_bounds_calls_in_flight(inproc: InProc, tmp_path: Path) -> None:
    app = await start(inproc, tmp_path, sources={"concurrent": CONCURRENT},
                      executor={"max_concurrent": 2})
    results = await asyncio.gather(*(send(app, [f"r{n}@example.test"]) for n in range(8)))
    assert results == [{}] * 8
    assert plugin(app, "concurrent").peak == 2


FLAKY = '''
    from mailpipe.plugins.results import Reject

    class Plugin:
        broken = True
        recovered = []
        def on_rcpt_to(self, recipient):
            if self.broken:
                raise ConnectionError("backend down")
            return Reject("refused by flaky", 550, "5.7.1")
        def health(self):
            return not self.broken
        def on_recovery(self, recovered, stage):
            self.recovered.append((recovered, stage))
'''


async def test_the_breaker_switches_a_failing_plugin_off_and_its_health_check_back_on(
    inproc: InProc, tmp_path: Path
) -> None:
    app = await start(inproc, tmp_path, sources={"flaky": FLAKY},
                      executor={"failure_threshold": 3}, health_check_interval="0.2s")
    flaky = plugin(app, "flaky")
    for n in range(5):
        assert await send(app, [f"r{n}@example.test"]) == {}
    status = app.plugins.status()[0]
    assert status["enabled"] is False
    assert status["stats"]["on_rcpt_to"]["executions"] == 3  # then skipped
    flaky.broken = False
    await wait_for(lambda: app.plugins.status()[0]["enabled"])
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await send(app, ["a@example.test", "b@example.test"])
    assert set(refused.value.recipients) == {"a@example.test", "b@example.test"}
    await wait_for(lambda: flaky.recovered == [("flaky", "health_check")])


async def test_a_misnamed_argument_or_an_unknown_plugin_fails_startup(
    inproc: InProc, tmp_path: Path
) -> None:
    bad = "class Plugin:\n    def on_rcpt_to(self, ctx, recipent):\n        pass\n"
    with pytest.raises(StartupError, match="recipent"):
        await start(inproc, tmp_path, sources={"bad": bad})
    with pytest.raises(StartupError, match="no plugin named 'nope'"):
        await start(inproc, tmp_path / "other", plugins=["nope"])


async def test_an_entry_point_plugin_is_found_by_name(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "acme_mail").mkdir(parents=True)
    (site / "acme_mail" / "__init__.py").write_text(textwrap.dedent('''
        from mailpipe.plugins.results import Reject
        class Guard:
            def on_rcpt_to(self, recipient):
                if recipient.endswith("@blocked.test"):
                    return Reject("Blocked domain", 550, "5.7.1")
    '''))
    dist = site / "acme_mail-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-mail\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mailpipe.plugins]\nguard = acme_mail:Guard\n")
    sys.path.insert(0, str(site))
    try:
        config, _ = load_config(cwd=tmp_path, overrides={
            "data_dir": str(tmp_path / "data"), "http": {"enabled": False},
            "smtp": {"addr": "127.0.0.1:0"}, "plugins": {"plugins": ["guard"]}})
        app = Mailpipe(config)
        await app.start()
        try:
            refused = await send(app, ["a@ok.test", "b@blocked.test"])
            assert refused == {"b@blocked.test": (550, b"5.7.1 Blocked domain")}
            assert app.plugins.status()[0]["source"] == "entry point acme_mail:Guard"
        finally:
            await app.shutdown()
    finally:
        sys.path.remove(str(site))


VERSIONED = '''
    from mailpipe.plugins.results import Modify

    class Plugin:
        def on_message_complete(self):
            return Modify(add_headers=[("X-Version", "{version}")])
'''


async def test_auto_reload_swaps_a_changed_plugin_without_dropping_a_session(
    inproc: InProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The edit keeps the file's size, within the same second: cached bytecode (written when
    # allowed) would look current, so the reload must compile the source itself.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    app = await start(inproc, tmp_path, sources={"versioned": VERSIONED.format(version=1)},
                      auto_reload=True, reload_interval="0.1s")
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(app)) as client:
        await client.sendmail(SENDER, ["a@example.test"], MESSAGE)
        path = tmp_path / "plugins" / "versioned.py"
        path.write_text(textwrap.dedent(VERSIONED.format(version=2)))
        await wait_for(lambda: app.plugins.reloads >= 1)
        await client.sendmail(SENDER, ["a@example.test"], MESSAGE)  # the same session
    versions = [event["message"]["headers"]["X-Version"] for event in await emails(app)]
    assert versions == ["1", "2"]


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_docs_describe_every_hook_as_the_table_does() -> None:
    """docs/plugins.md's hook table is HOOKS written out: each hook, its arguments and when
    it fires, so that the documentation cannot drift from what fires."""
    from conftest import ROOT
    from mailpipe.plugins.hooks import HOOKS

    docs = (ROOT / "docs" / "plugins.md").read_text()
    for hook in HOOKS.values():
        row = f"| `{hook.name}({', '.join(hook.args)})` | {hook.family} | {hook.when} |"
        assert row in docs, row


AWAITED = '''
    import asyncio

    class Plugin:
        async def on_rcpt_to(self, recipient, params):
            await asyncio.sleep(0)

        async def on_message_complete(self, raw):
            await asyncio.sleep(0)
'''


def test_awaited_verdicts_under_pipelined_load_in_mailpipe_serve(
    mailpipe_factory: Any, tmp_path: Path
) -> None:
    """Async hooks through `mailpipe serve` (uvloop, where the other plugin tests run on
    asyncio's loop), pipelining clients in parallel: every email is taken. Awaited verdicts
    pause and resume the session's read deadlines and its reading."""
    server = mailpipe_factory({"plugins": {
        "plugin_path": str(plugin_dir(tmp_path, awaited=AWAITED)), "plugins": ["awaited"]}})

    async def client(n: int) -> list[int]:
        codes = []
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=server.smtp_port,
                                   timeout=20) as smtp:
            for i in range(10):
                _, reply = await smtp.sendmail(SENDER, [f"r{n}.{i}@example.test"], MESSAGE)
                codes.append(int(reply.startswith("2.0.0")))
        return codes

    async def load() -> list[int]:
        results = await asyncio.gather(*(client(n) for n in range(20)))
        return [code for codes in results for code in codes]

    assert asyncio.run(load()) == [1] * 200
    assert server.get_json("/api/v1/messages?limit=1")["total"] == 200
    assert "Traceback" not in server.log()
