"""The built-in plugins (rate_limit, policy, header_stamp, greylist, chaos) through real SMTP
sessions against a real Mailpipe: in process for most, one `mailpipe serve` end to end."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import time
from collections.abc import Callable
from typing import Any

import aiosmtplib
import pytest

from conftest import AsyncSMTP, InProc, MailpipeServer, port_of
from mailpipe.app import Mailpipe
from mailpipe.config import ConfigError
from mailpipe.plugins.builtin.rate_limit import Window

SENDER = "app@example.com"
RCPT = "dev@example.test"
BODY = b"From: <app@example.com>\r\nSubject: builtins\r\n\r\nHello.\r\n"
PLAIN = "AUTH PLAIN " + base64.b64encode(b"\0user\0secret").decode()


async def plugins(inproc: InProc, names: list[str], settings: dict[str, Any],
                  smtp: dict[str, Any] | None = None) -> Mailpipe:
    return await inproc(smtp, plugins={"plugins": names, "plugin_config": settings})


async def send(port: int, recipients: list[str] | None = None, sender: str = SENDER,
               body: bytes = BODY) -> dict[str, Any]:
    """One message with aiosmtplib; the refused recipients (as aiosmtplib reports them)."""
    refused, _ = await aiosmtplib.send(body, sender=sender, recipients=recipients or [RCPT],
                                       hostname="127.0.0.1", port=port)
    return refused


async def events(app: Mailpipe) -> list[dict[str, Any]]:
    assert app.store is not None
    listing, _ = await app.store.list(limit=100)
    found = [await app.store.get(item["uuid"]) for item in listing]
    return [event for event in found if event]


async def transaction(port: int, *lines: str) -> list[tuple[int, str]]:
    """Greeting, EHLO and the given commands on one connection: every reply."""
    client = await AsyncSMTP.open(port, greet=None)
    greeting = await client.reply()
    replies = [greeting, await client.command("EHLO client.test")]
    for line in lines:
        replies.append(await client.command(line))
    client.close()
    return replies


# ---- rate_limit ---------------------------------------------------------------------------


async def test_rate_limit_answers_421_past_the_connections_per_minute(inproc: InProc) -> None:
    app = await plugins(inproc, ["rate_limit"],
                        {"rate_limit": {"max_connections_per_minute": 3}})
    port = port_of(app)
    for _ in range(3):
        client = await AsyncSMTP.open(port, greet=None)
        greeting = await client.reply()
        assert greeting[0] == 220
        assert (await client.command("QUIT"))[0] == 221
        client.close()
    client = await AsyncSMTP.open(port, greet=None)
    greeting = await client.reply()
    assert greeting == (421, "4.7.0 Too many connections from your address, try again later")
    assert await client.closed()
    client.close()


async def test_rate_limit_counts_messages_at_mail_from(inproc: InProc) -> None:
    app = await plugins(inproc, ["rate_limit"], {"rate_limit": {
        "max_messages_per_minute": 2, "messages_code": 450, "messages_enhanced": "4.7.0",
        "messages_message": "Slow down"}})
    port = port_of(app)
    assert await send(port) == {} and await send(port) == {}
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await send(port)
    assert refused.value.code == 450 and refused.value.message == "4.7.0 Slow down"
    assert await app.store.count() == 2  # type: ignore[union-attr]


async def test_rate_limit_leaves_exempt_networks_alone(inproc: InProc) -> None:
    app = await plugins(inproc, ["rate_limit"], {"rate_limit": {
        "max_connections_per_minute": 1, "exempt": ["127.0.0.0/8", "::1"]}})
    for _ in range(5):
        client = await AsyncSMTP.open(port_of(app), greet=None)
        greeting = await client.reply()
        assert greeting[0] == 220
        client.close()


def test_rate_limit_window_forgets_idle_clients_and_stays_bounded() -> None:
    window = Window(max_keys=3)
    for n in range(10):
        window.add(f"10.0.0.{n}", now=100.0 + n)
    assert list(window.keys) == ["10.0.0.7", "10.0.0.8", "10.0.0.9"]  # the bound
    assert window.count("10.0.0.9", now=109.0) == 1
    window.add("10.0.0.9", now=170.0)  # a minute on: the others have aged out
    assert list(window.keys) == ["10.0.0.9"] and window.count("10.0.0.9", now=170.0) == 1


# ---- policy -------------------------------------------------------------------------------


async def test_policy_denies_senders_and_refuses_only_the_denied_recipients(
    inproc: InProc,
) -> None:
    app = await plugins(inproc, ["policy"], {"policy": {
        "senders": {"deny": ["*@spam.test", "re:^noreply-"]},
        "recipients": {"allow": ["@example.org", "ops@*"], "deny": ["Blocked@Example.org"]},
    }})
    port = port_of(app)
    for sender in ("bulk@SPAM.test", "noreply-42@example.com"):
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await send(port, sender=sender)
        assert refused.value.code == 550
        assert refused.value.message == "5.7.1 Sender address rejected by policy"
    refused = await send(port, ["a@example.org", "blocked@example.org", "x@other.test",
                                "ops@other.test"])
    assert sorted(refused) == ["blocked@example.org", "x@other.test"]
    assert refused["x@other.test"].code == 550
    stored = await events(app)
    assert len(stored) == 1
    assert stored[0]["envelope"]["to"] == ["a@example.org", "ops@other.test"]


async def test_policy_takes_its_own_code_a_4xx_tempfails(inproc: InProc) -> None:
    app = await plugins(inproc, ["policy"], {"policy": {
        "recipients": {"deny": ["*@later.test"], "code": 450, "enhanced": "4.2.0",
                       "message": "Mailbox busy"}}})
    replies = await transaction(port_of(app), f"MAIL FROM:<{SENDER}>", "RCPT TO:<a@later.test>",
                                "RCPT TO:<a@now.test>", "MAIL FROM:<<>>")
    assert replies[3] == (450, "4.2.0 Mailbox busy")
    assert replies[4][0] == 250


async def test_policy_null_sender_pattern(inproc: InProc) -> None:
    app = await plugins(inproc, ["policy"], {"policy": {"senders": {"deny": ["<>"]}}})
    replies = await transaction(port_of(app), "MAIL FROM:<>", "RSET", f"MAIL FROM:<{SENDER}>")
    assert replies[2][0] == 550 and replies[4][0] == 250


# ---- header_stamp -------------------------------------------------------------------------


async def test_header_stamp_defaults_land_in_the_stored_message(inproc: InProc) -> None:
    app = await plugins(inproc, ["header_stamp"], {})
    assert await send(port_of(app)) == {}
    [event] = await events(app)
    raw = (await app.store.raw(event["uuid"])).decode()  # type: ignore[union-attr]
    head = raw.split("\r\n\r\n", 1)[0]
    assert f"X-Mailpipe-Session: {event['session']['uuid']}" in head
    assert "X-Mailpipe-Remote: 127.0.0.1:" in head
    assert "X-Mailpipe-Server: default" in head
    headers = {k.lower(): v for k, v in event["message"]["headers"].items()}
    assert headers["x-mailpipe-server"] == "default"


async def test_header_stamp_templates_tags_and_set_mode(inproc: InProc) -> None:
    app = await plugins(inproc, ["header_stamp"], {"header_stamp": {
        "headers": {"X-Env": "{helo} via {server} for {rcpt_to}", "X-Id": "{message_uuid}",
                    "Subject": "stamped {{literally}}"},
        "mode": "set", "tags": ["stamped", "ci"]}})
    assert await send(port_of(app), ["a@example.test", "b@example.test"]) == {}
    [event] = await events(app)
    raw = (await app.store.raw(event["uuid"])).decode()  # type: ignore[union-attr]
    head = raw.split("\r\n\r\n", 1)[0]
    assert "X-Env: " in head and " via default for a@example.test, b@example.test" in head
    assert "X-Id: " in head
    assert head.count("Subject:") == 1 and event["message"]["subject"] == "stamped {literally}"
    assert event["tags"] == ["stamped", "ci"]


@pytest.mark.parametrize("with_mail_hook", [True, False])
async def test_header_stamp_message_uuid_is_the_event_uuid(
    inproc: InProc, with_mail_hook: bool,
) -> None:
    names = ["header_stamp", "policy"] if with_mail_hook else ["header_stamp"]
    app = await plugins(inproc, names, {"header_stamp": {"headers": {"X-Id": "{message_uuid}"}}})
    assert await send(port_of(app)) == {}
    [event] = await events(app)
    raw = (await app.store.raw(event["uuid"])).decode()  # type: ignore[union-attr]
    assert f"X-Id: {event['uuid']}\r\n" in raw


# ---- greylist -----------------------------------------------------------------------------


async def test_greylist_tempfails_a_new_triplet_and_passes_a_timely_retry(
    inproc: InProc,
) -> None:
    app = await plugins(inproc, ["greylist"], {"greylist": {"delay": "1s", "expire": "10s"}})
    port = port_of(app)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as first:
        await send(port)
    [error] = first.value.recipients
    assert error.code == 451 and error.message == "4.7.1 Greylisted, try again in 1 seconds"
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(port)  # too soon
    await asyncio.sleep(1.05)
    assert await send(port) == {}
    assert await send(port) == {}  # now known: no wait
    refused = await send(port, [RCPT, "new@example.test"])  # a new triplet waits again
    assert list(refused) == ["new@example.test"]
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(port, sender="other@example.com")  # so does another sender
    assert await app.store.count() == 3  # type: ignore[union-attr]


async def test_greylist_starts_over_after_expire_and_skips_exemptions(inproc: InProc) -> None:
    app = await plugins(inproc, ["greylist"], {"greylist": {
        "delay": "500ms", "expire": "1s", "exempt_recipients": ["postmaster@*"]}})
    port = port_of(app)
    assert await send(port, ["postmaster@example.test"]) == {}
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(port)
    await asyncio.sleep(1.2)  # past expire: this retry counts as a first attempt
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(port)
    await asyncio.sleep(0.6)
    assert await send(port) == {}


async def test_greylist_remembers_at_most_max_entries(inproc: InProc) -> None:
    app = await plugins(inproc, ["greylist"], {"greylist": {
        "delay": "100ms", "expire": "10s", "max_entries": 2}})
    port = port_of(app)
    recipients = ["a@example.test", "b@example.test", "c@example.test"]
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as first:
        await send(port, recipients)  # all three are new; a is dropped to remember c
    assert [r.recipient for r in first.value.recipients] == recipients
    await asyncio.sleep(0.15)
    assert await send(port, recipients[1:]) == {}  # remembered: they pass
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(port, recipients[:1])  # forgotten: greylisted as new


async def test_greylist_exempt_network(inproc: InProc) -> None:
    app = await plugins(inproc, ["greylist"], {"greylist": {"exempt": ["127.0.0.1/32"]}})
    assert await send(port_of(app)) == {}


# ---- chaos --------------------------------------------------------------------------------


async def rcpt_code(port: int, recipient: str = RCPT) -> int:
    client = await AsyncSMTP.open(port, greet=None)
    greeting = await client.reply()
    try:
        assert greeting[0] == 220, greeting
        await client.command("EHLO client.test")
        await client.command(f"MAIL FROM:<{SENDER}>")
        code, _ = await client.command(f"RCPT TO:<{recipient}>")
        await client.command("QUIT")
        return code
    finally:
        client.close()


async def test_chaos_fails_its_rate_of_recipients(inproc: InProc) -> None:
    app = await plugins(inproc, ["chaos"], {"chaos": {"seed": 42, "rules": [
        {"stage": "rcpt", "rate": 0.3, "code": 451, "enhanced": "4.3.0", "message": "chaos"}]}})
    port = port_of(app)
    slots = asyncio.Semaphore(50)  # under the listener's 100 connections per IP

    async def one() -> int:
        async with slots:
            return await rcpt_code(port)

    started = time.monotonic()
    codes = await asyncio.gather(*(one() for _ in range(1000)))
    assert set(codes) == {250, 451}
    failed = codes.count(451) / len(codes)
    assert abs(failed - 0.3) <= 0.05, failed
    assert time.monotonic() - started < 60


async def test_chaos_seed_repeats_the_same_failures(inproc: InProc) -> None:
    outcomes = []
    for _ in range(2):
        app = await plugins(inproc, ["chaos"], {"chaos": {"seed": 3, "rules": [
            {"stage": "rcpt", "rate": 0.5, "code": 451}]}})
        outcomes.append([await rcpt_code(port_of(app)) for _ in range(40)])
    assert outcomes[0] == outcomes[1] and set(outcomes[0]) == {250, 451}


async def test_chaos_reply_carries_the_rule_s_code_and_text(inproc: InProc) -> None:
    app = await plugins(inproc, ["chaos"], {"chaos": {"rules": [
        {"stage": "mail", "rate": 1.0, "code": 452, "enhanced": "4.3.1", "message": "Full"},
        {"stage": ["helo"], "rate": 1.0, "code": 554},
    ]}})
    replies = await transaction(port_of(app), "HELO again.test", f"MAIL FROM:<{SENDER}>")
    assert replies[1] == (554, "5.3.0 Chaos: failure")
    assert replies[2] == (554, "5.3.0 Chaos: failure")
    assert replies[3] == (452, "4.3.1 Full")


async def test_chaos_disconnect_answers_421_and_closes(inproc: InProc) -> None:
    app = await plugins(inproc, ["chaos"], {"chaos": {"rules": [
        {"stage": "mail", "rate": 1.0, "action": "disconnect"}]}})
    client = await AsyncSMTP.open(port_of(app))
    await client.command("EHLO client.test")
    assert await client.command(f"MAIL FROM:<{SENDER}>") == (
        421, "4.7.0 Chaos: closing connection")
    assert await client.closed()
    client.close()


async def test_chaos_delay_slows_the_command_and_lets_it_through(inproc: InProc) -> None:
    app = await plugins(inproc, ["chaos"], {"chaos": {"rules": [
        {"stage": "data", "rate": 1.0, "delay": "0.3s"}]}})
    client = await AsyncSMTP.open(port_of(app))
    for line in ("EHLO client.test", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPT}>"):
        assert (await client.command(line))[0] == 250
    started = time.monotonic()
    assert (await client.command("DATA"))[0] == 354
    assert time.monotonic() - started >= 0.3
    assert (await client.command(BODY + b".\r\n"))[0] == 250
    client.close()
    assert await app.store.count() == 1  # type: ignore[union-attr]


async def test_chaos_delay_then_failure_at_auth_and_message(inproc: InProc) -> None:
    app = await plugins(inproc, ["chaos"], {"chaos": {"rules": [
        {"stage": "auth", "rate": 1.0, "code": 535, "enhanced": "5.7.8", "delay": 0.2},
        {"stage": "message", "rate": 1.0, "code": 451},
    ]}})
    client = await AsyncSMTP.open(port_of(app))
    await client.command("EHLO client.test")
    started = time.monotonic()
    assert await client.command(PLAIN) == (535, "5.7.8 Chaos: failure")
    assert time.monotonic() - started >= 0.2
    for line in (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPT}>", "DATA"):
        assert (await client.command(line))[0] in (250, 354)
    assert await client.command(BODY + b".\r\n") == (451, "4.3.0 Chaos: temporary failure")
    client.close()
    assert await app.store.count() == 0  # type: ignore[union-attr]


async def test_chaos_recipient_rules_hit_only_matching_recipients(inproc: InProc) -> None:
    app = await plugins(inproc, ["chaos"], {"chaos": {"rules": [
        {"stage": "rcpt", "rate": 1.0, "code": 550, "recipients": ["*@bounce.test"]},
        {"stage": "data", "rate": 1.0, "code": 554, "recipients": ["re:^poison@"]},
    ]}})
    port = port_of(app)
    refused = await send(port, ["a@bounce.test", "b@ok.test", "c@Bounce.Test"])
    assert sorted(refused) == ["a@bounce.test", "c@Bounce.Test"]
    with pytest.raises(aiosmtplib.SMTPDataError) as data:
        await send(port, ["b@ok.test", "poison@ok.test"])
    assert data.value.code == 554
    [event] = await events(app)
    assert event["envelope"]["to"] == ["b@ok.test"]


async def test_chaos_listener_rules_hit_only_their_listener(inproc: InProc) -> None:
    app = await plugins(inproc, ["chaos"], {"chaos": {"rules": [
        {"stage": "connect", "rate": 1.0, "code": 421, "listeners": ["apps"]}]}},
        smtp={"servers": [{"name": "apps", "addr": "127.0.0.1:0"},
                          {"name": "tests", "addr": "127.0.0.1:0"}]})
    client = await AsyncSMTP.open(port_of(app, "apps"), greet=None)
    greeting = await client.reply()
    assert greeting == (421, "4.3.0 Chaos: temporary failure")
    assert await client.closed()
    client.close()
    assert await send(port_of(app, "tests")) == {}


async def test_chaos_rate_zero_never_fires_and_sender_rules_match(inproc: InProc) -> None:
    app = await plugins(inproc, ["chaos"], {"chaos": {"rules": [
        {"stage": "rcpt", "rate": "0%", "code": 550},
        {"stage": "rcpt", "rate": 1.0, "code": 550, "senders": ["flaky@*"]},
    ]}})
    port = port_of(app)
    assert await send(port) == {}
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(port, sender="flaky@example.com")


# ---- broken settings fail startup, naming the key ------------------------------------------


BROKEN: list[tuple[str, dict[str, Any], str]] = [
    ("chaos", {"rules": [{"stage": "rcpt", "rate": 2, "code": 451}]},
     "plugins.plugin_config.chaos.rules[0].rate: got 2: expected a probability from 0 to 1"),
    ("chaos", {"rules": [{"stage": "rcpt", "rate": "110%", "code": 451}]},
     "plugins.plugin_config.chaos.rules[0].rate: got '110%': expected a probability"),
    ("chaos", {"rules": [{"stage": "rcpt", "rate": 0.1, "code": 451, "stages": "x"}]},
     "plugins.plugin_config.chaos.rules[0].stages: unknown key (check its spelling)"),
    ("chaos", {"rules": [{"stage": "rcpt", "rate": 0.1, "code": 250}]},
     "plugins.plugin_config.chaos.rules[0].code: got 250: expected an SMTP refusal code"),
    ("chaos", {"rules": [{"stage": "quit", "rate": 0.1, "code": 451}]},
     "plugins.plugin_config.chaos.rules[0].stage[0]: got 'quit'"),
    ("chaos", {"rules": [{"stage": "mail", "rate": 0.1, "code": 451, "recipients": ["*"]}]},
     "recipients: only stages rcpt, data and message have recipients"),
    ("chaos", {"rules": [{"stage": "rcpt", "rate": 0.1, "code": 451, "enhanced": "5.1.1"}]},
     "enhanced code 5.1.1 does not match code 451"),
    ("policy", {"senders": {"allow": ["re:("]}},
     "plugins.plugin_config.policy.senders.allow: got ['re:(']: Value error, not a valid"),
    ("rate_limit", {"max_connections_per_minute": -1},
     "plugins.plugin_config.rate_limit.max_connections_per_minute: got -1"),
    ("rate_limit", {"exempt": ["localhost"]},
     "plugins.plugin_config.rate_limit.exempt[0]: got 'localhost': Value error, expected an IP"),
    ("greylist", {"delay": "1h", "expire": "30m"}, "expire must be longer than delay"),
    ("greylist", {"delay": "soon"}, "plugins.plugin_config.greylist.delay: got 'soon'"),
    ("header_stamp", {"headers": {"X-A": "{nope}"}},
     "plugins.plugin_config.header_stamp.headers.X-A: got '{nope}': unknown field {nope}"),
    ("header_stamp", {"headers": {"Bad Name": "x"}},
     "plugins.plugin_config.header_stamp.headers.Bad Name.[key]: got 'Bad Name': not a valid"),
]


@pytest.mark.parametrize(("name", "settings", "expected"), BROKEN,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BROKEN)])
async def test_broken_settings_fail_startup_naming_the_key(
    inproc: InProc, name: str, settings: dict[str, Any], expected: str,
) -> None:
    # Checked when the configuration loads (exit 2, `check-config`), before anything starts.
    with pytest.raises(ConfigError) as failed:
        await plugins(inproc, [name], {name: settings})
    text = str(failed.value)
    assert text.startswith("invalid configuration"), text
    assert expected.replace("Value error, ", "") in text, text


# ---- end to end: `mailpipe serve` with chaos from YAML --------------------------------------


def test_mailpipe_serve_with_chaos_from_yaml(
    mailpipe_factory: Callable[..., MailpipeServer],
) -> None:
    server = mailpipe_factory({"plugins": {"plugins": ["chaos"], "plugin_config": {"chaos": {
        "seed": 7, "rules": [{"stage": "rcpt", "rate": 1.0, "code": 451, "enhanced": "4.3.0",
                              "message": "chaos", "recipients": ["*@flaky.test"]}]}}}})
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(SENDER, ["a@flaky.test"], BODY)
        assert refused.value.recipients == {"a@flaky.test": (451, b"4.3.0 chaos")}
        assert client.sendmail(SENDER, ["a@steady.test", "b@flaky.test"], BODY) == {
            "b@flaky.test": (451, b"4.3.0 chaos")}
    assert [m["to"] for m in server.wait_for_messages(1)] != []


def test_mailpipe_serve_refuses_to_start_with_broken_chaos(
    mailpipe_factory: Callable[..., MailpipeServer],
) -> None:
    server = mailpipe_factory({"plugins": {"plugins": ["chaos"], "plugin_config": {"chaos": {
        "rules": [{"stage": "rcpt", "rate": 1.5, "code": 451}]}}}}, wait=False)
    assert server.process.wait(30) == 2  # a configuration error
    assert "plugins.plugin_config.chaos.rules[0].rate: got 1.5" in server.log()
