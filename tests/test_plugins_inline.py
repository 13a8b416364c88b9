"""The inline path (plugins/inline.py: one generated function per hook calls its sync
plugins) in real SMTP sessions: arguments as each method asks for them (any subset, any
order, positional-only, none), per call isolation and counting when several plugins share
a hook, and the breaker's "failures in a row" now that a success is not written down."""

from __future__ import annotations

from pathlib import Path

from conftest import InProc
from test_plugins import plugin, send, start

# Three plugins on the same hooks taking different arguments: the values are read once
# for all of them, each gets its own.
PICKY = '''
    class Plugin:
        def __init__(self):
            self.seen = []
        def on_rcpt_to(self, params, recipient, /):
            self.seen.append(("rcpt", recipient, params))
        def on_data(self):
            self.seen.append(("data",))
        def on_headers(self, headers, ctx):
            self.seen.append(("headers", dict(headers)["Subject"], ctx.hook))
        def on_greylist_check(self, remote_addr, sender, extra=None):
            self.seen.append(("greylist", sender, remote_addr.startswith("127."), extra))
'''

RAISER = '''
    from mailpipe.plugins.results import HookResult
    class Plugin:
        def __init__(self):
            self.calls = 0
        def on_rcpt_to(self, ctx, recipient):
            self.calls += 1
            if recipient.startswith("boom"):
                raise RuntimeError("boom")
            if recipient.startswith("junk"):
                return "not a result"
            return HookResult(message="fine")
'''

COUNTER = '''
    class Plugin:
        def __init__(self):
            self.recipients = []
        def on_rcpt_to(self, ctx, recipient):
            self.recipients.append(recipient)
'''


async def test_each_method_gets_the_arguments_it_names(inproc: InProc, tmp_path: Path) -> None:
    app = await start(inproc, tmp_path, sources={"a": PICKY, "b": PICKY},
                      plugins=["a", "b"])
    assert await send(app, ["x@example.test"]) == {}
    for name in ("a", "b"):
        assert plugin(app, name).seen == [
            ("rcpt", "x@example.test", []),
            ("greylist", "app@example.test", True, None),
            ("data",),
            ("headers", "plugged", "on_headers"),
        ]


async def test_failures_and_nonsense_are_isolated_and_counted_per_plugin(
    inproc: InProc, tmp_path: Path
) -> None:
    app = await start(inproc, tmp_path, sources={"raiser": RAISER, "counter": COUNTER},
                      plugins=["raiser", "counter"], executor={"failure_threshold": 100})
    recipients = ["ok@example.test", "boom@example.test", "junk@example.test",
                  "ok2@example.test"]
    assert await send(app, recipients) == {}  # a failing plugin does not refuse
    # The plugin after the failing one still ran for every recipient.
    assert plugin(app, "counter").recipients == recipients
    stats = {s["name"]: s["stats"]["on_rcpt_to"] for s in app.plugins.status()}
    assert (stats["raiser"]["executions"], stats["raiser"]["successes"],
            stats["raiser"]["failures"], stats["raiser"]["recoveries"]) == (4, 2, 2, 2)
    assert (stats["counter"]["executions"], stats["counter"]["successes"],
            stats["counter"]["failures"]) == (4, 4, 0)
    assert "not a HookResult" in app.plugins.status()[0]["last_error"]


async def test_only_failures_in_a_row_open_the_breaker(inproc: InProc, tmp_path: Path) -> None:
    app = await start(inproc, tmp_path, sources={"raiser": RAISER},
                      executor={"failure_threshold": 2}, health_check_interval="1h")
    # fail, succeed, fail, succeed: never two in a row
    assert await send(app, ["boom1@x.test", "ok@x.test", "boom2@x.test", "ok@x.test"]) == {}
    assert app.plugins.status()[0]["enabled"] is True
    # two in a row: switched off, so the last recipient does not reach it
    assert await send(app, ["boom3@x.test", "junk@x.test", "ok@x.test"]) == {}
    status = app.plugins.status()[0]
    assert status["enabled"] is False
    assert plugin(app, "raiser").calls == 6
    assert status["stats"]["on_rcpt_to"]["executions"] == 6
