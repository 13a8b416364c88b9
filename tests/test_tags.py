"""Tags end to end: emails in over real SMTP (smtplib, swaks) to a real `mailpipe serve`, tags
from a plugin (header_stamp), plus-addresses and config filter rules, read and changed over
the HTTP API, searched with `q=tag:`; an old database upgraded; hostile tag input refused."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sqlite3
import subprocess
import urllib.parse
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import InProc, MailpipeServer, make_email, port_of, require_tool
from mailpipe.store.index import index_columns
from mailpipe.store.sqlite import SQLiteStore
from mailpipe.store.tags import MAX_TAG_CHARS, TagRules

TAGS_CONFIG = {
    "plus_addressing": True,
    "filters": [
        {"match": "from:shop subject:invoice", "tags": ["Invoices"]},
        # Mailpit's comma-separated form; a rule may build on tags given before it.
        {"match": "tag:signup -subject:spam", "tags": "onboarding, welcome"},
        {"match": "tag:invoices", "tags": ["accounts"]},  # given by a rule before it
    ],
}


def call(server: MailpipeServer, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """An HTTP request with a JSON body (as given, or encoded when not bytes)."""
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.api + path, data=data, method=method,
        headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def send(server: MailpipeServer, subject: str, sender: str, *recipients: str,
         cc: str | None = None) -> None:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    if cc:
        message["Cc"] = cc
    message["Subject"] = subject
    message.set_content(f"{subject} body")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.send_message(message, to_addrs=[*recipients, *([cc] if cc else [])])


def by_subject(server: MailpipeServer, count: int) -> dict[str, dict[str, Any]]:
    return {m["subject"]: m for m in server.wait_for_messages(count)}


def search(server: MailpipeServer, q: str) -> list[str]:
    found = server.get_json("/api/v1/messages?q=" + urllib.parse.quote(q))
    return sorted(m["subject"] for m in found["messages"])


@pytest.fixture
def server(mailpipe_factory: Callable[..., MailpipeServer]) -> MailpipeServer:
    return mailpipe_factory({
        "tags": TAGS_CONFIG,
        "plugins": {"plugins": ["header_stamp"], "plugin_config": {"header_stamp": {
            "headers": {"X-Stamped": "yes"}, "tags": ["ci"]}}},
    })


def test_automatic_tags_from_plugin_plus_address_and_filters(server: MailpipeServer) -> None:
    send(server, "Your invoice 42", "Shop <shop@store.test>", "alice+Signup@x.test")
    swaks = require_tool("swaks")
    subprocess.run(
        [swaks, "--server", f"127.0.0.1:{server.smtp_port}", "--timeout", "15",
         "--from", "bob@x.test", "--to", "carol+signup@x.test,dave+news@x.test",
         "--header", "Subject: spam of the day", "--body", "hi"],
        check=True, capture_output=True)
    send(server, "plain", "eve@x.test", "frank@x.test")

    found = by_subject(server, 3)
    # The plugin's tag first, then the plus-address, then the filters in config order;
    # "signup" keeps the spelling the store first saw ("Signup").
    assert found["Your invoice 42"]["tags"] == [
        "ci", "Signup", "Invoices", "onboarding", "welcome", "accounts"]
    assert found["spam of the day"]["tags"] == ["ci", "Signup", "news"]
    assert found["plain"]["tags"] == ["ci"]
    event = server.event(found["Your invoice 42"]["uuid"])
    assert event["tags"] == found["Your invoice 42"]["tags"]

    assert server.get_json("/api/v1/tags") == {"tags": [
        {"name": "accounts", "count": 1}, {"name": "ci", "count": 3},
        {"name": "Invoices", "count": 1},
        {"name": "news", "count": 1}, {"name": "onboarding", "count": 1},
        {"name": "Signup", "count": 2}, {"name": "welcome", "count": 1}]}
    assert search(server, "tag:SIGNUP") == ["Your invoice 42", "spam of the day"]
    assert search(server, "tag:signup -tag:invoices") == ["spam of the day"]
    assert search(server, "!tag:Signup") == ["plain"]
    assert search(server, 'tag:"ci" subject:invoice') == ["Your invoice 42"]
    assert search(server, "tag:sign") == []  # a whole tag, not a substring


def test_answers_match_the_openapi_document(server: MailpipeServer) -> None:
    doc = server.get_json("/api/openapi.json")

    def check(instance: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    send(server, "one", "a@x.test", "b+news@x.test")
    [message] = server.wait_for_messages(1)
    check(server.get_json("/api/v1/messages"), "MessageList")
    check(server.get_json(f"/api/v1/messages/{message['uuid']}"), "Event")
    check(server.get_json("/api/v1/tags"), "TagList")
    check(call(server, "PUT", f"/api/v1/messages/{message['uuid']}/tags",
               {"tags": ["a"]})[1], "MessageTags")
    check(call(server, "PUT", "/api/v1/tags", {"tags": ["b"], "ids": [message["uuid"]]})[1],
          "TaggedMessages")
    check(call(server, "PUT", "/api/v1/tags/b", {"name": "c"})[1], "TagUpdated")
    check(call(server, "DELETE", "/api/v1/tags/c")[1], "TagUpdated")
    check(call(server, "DELETE", "/api/v1/tags/c")[1], "Error")


def test_manual_tags_rename_and_delete_over_the_api(server: MailpipeServer) -> None:
    send(server, "one", "a@x.test", "b@x.test")
    send(server, "two", "a@x.test", "b@x.test")
    send(server, "three", "a@x.test", "b@x.test")
    found = by_subject(server, 3)
    one, two, three = (found[s]["uuid"] for s in ("one", "two", "three"))

    status, body = call(server, "PUT", f"/api/v1/messages/{one}/tags",
                        {"tags": [" Urgent ", "urgent", "QA/Review"]})
    assert (status, body) == (200, {"uuid": one, "tags": ["Urgent", "QA/Review"]})
    # Bulk: replace on both; a second spelling of a known tag takes the store's spelling.
    status, body = call(server, "PUT", "/api/v1/tags",
                        {"tags": ["URGENT", "billing"], "ids": [two, three, "no-such-id"]})
    assert status == 200 and body["not_found"] == ["no-such-id"]
    assert body["messages"] == [{"uuid": two, "tags": ["Urgent", "billing"]},
                                {"uuid": three, "tags": ["Urgent", "billing"]}]
    assert search(server, "tag:urgent") == ["one", "three", "two"]
    assert search(server, "is:tagged -tag:billing") == ["one"]

    # Rename (the path holds a "/" as %2F), then delete, everywhere.
    status, body = call(server, "PUT", "/api/v1/tags/qa%2Freview", {"name": "Reviewed"})
    assert (status, body) == (200, {"updated": 1})
    status, body = call(server, "DELETE", "/api/v1/tags/URGENT")
    assert (status, body) == (200, {"updated": 3})
    assert server.get_json("/api/v1/tags") == {"tags": [
        {"name": "billing", "count": 2}, {"name": "Reviewed", "count": 1}]}
    assert server.event(one)["tags"] == ["Reviewed"]

    # Emptying a message's tags removes the field from its event.
    assert call(server, "PUT", f"/api/v1/messages/{one}/tags", {"tags": []}) == (
        200, {"uuid": one, "tags": []})
    assert "tags" not in server.event(one)
    assert call(server, "DELETE", "/api/v1/tags/nothing")[0] == 404
    assert call(server, "PUT", "/api/v1/tags/nothing", {"name": "x"})[0] == 404
    assert call(server, "PUT", "/api/v1/messages/no-such-id/tags", {"tags": ["x"]})[0] == 404


HOSTILE = [
    ("PUT", "/api/v1/messages/{uuid}/tags", {"tags": ["x" * (MAX_TAG_CHARS + 1)]},
     f"a tag must be at most {MAX_TAG_CHARS} characters"),
    ("PUT", "/api/v1/messages/{uuid}/tags", {"tags": ["evil\r\nX-Log: forged"]},
     "a tag must not contain control characters"),
    ("PUT", "/api/v1/messages/{uuid}/tags", {"tags": ["\u202eabc"]},
     "a tag must not contain control characters"),
    ("PUT", "/api/v1/messages/{uuid}/tags", {"tags": ["  "]}, "a tag must not be empty"),
    ("PUT", "/api/v1/messages/{uuid}/tags", {"tags": [1]}, "a tag must be a string"),
    ("PUT", "/api/v1/messages/{uuid}/tags", {"tags": "x"}, "tags must be a list of strings"),
    ("PUT", "/api/v1/messages/{uuid}/tags", {"tags": [f"t{i}" for i in range(51)]},
     "a message may have at most 50 tags"),
    ("PUT", "/api/v1/messages/{uuid}/tags", b"not json",
     'the body must be JSON: {"tags": ["name", ...]}'),
    ("PUT", "/api/v1/messages/{uuid}/tags", [], 'the body must be JSON: {"tags": ["name", ...]}'),
    ("PUT", "/api/v1/tags", {"tags": ["x"], "ids": [None]}, "ids must be a list of message ids"),
    ("PUT", "/api/v1/tags", {"tags": ["x"], "ids": ["a"] * 10_001}, "at most 10000 ids at once"),
    ("PUT", "/api/v1/tags", {"tags": ["x"]},
     'the body must be JSON: {"tags": ["name", ...], "ids": ["uuid", ...]}'),
    ("PUT", "/api/v1/tags/x", {"name": "a\x00b"}, "a tag must not contain control characters"),
    ("PUT", "/api/v1/tags/x", {"name": 5}, "a tag must be a string"),
    ("DELETE", "/api/v1/tags/" + "y" * 200, None,
     f"a tag must be at most {MAX_TAG_CHARS} characters"),
    # A lone id where a list belongs: a string is not a list of ids.
    ("PUT", "/api/v1/tags", {"tags": ["x"], "ids": "{uuid}"}, "ids must be a list of message ids"),
]


def test_hostile_tag_input_is_refused(server: MailpipeServer) -> None:
    send(server, "target", "a@x.test", "b@x.test")
    [message] = server.wait_for_messages(1)
    uuid = message["uuid"]
    assert call(server, "PUT", f"/api/v1/messages/{uuid}/tags", {"tags": ["x"]})[0] == 200
    for method, path, body, error in HOSTILE:
        if isinstance(body, dict) and body.get("ids") == "{uuid}":
            body = {**body, "ids": uuid}
        answer = call(server, method, path.replace("{uuid}", uuid), body)
        assert answer == (400, {"error": error}), (method, path, body)
    # Nothing changed.
    assert server.get_json("/api/v1/tags") == {"tags": [{"name": "x", "count": 1}]}


def test_cross_site_tag_writes_are_refused(server: MailpipeServer) -> None:
    send(server, "target", "a@x.test", "b@x.test")
    [message] = server.wait_for_messages(1)
    status, _ = call(server, "PUT", f"/api/v1/messages/{message['uuid']}/tags",
                     {"tags": ["pwned"]}, headers={"Origin": "http://evil.test"})
    assert status == 403
    status, _ = call(server, "DELETE", "/api/v1/tags/ci", headers={"Origin": "http://evil.test"})
    assert status == 403
    assert server.get_json("/api/v1/tags") == {"tags": [{"name": "ci", "count": 1}]}


def test_a_bad_filter_rule_stops_startup_with_the_reason(
        mailpipe_factory: Callable[..., MailpipeServer]) -> None:
    server = mailpipe_factory({"tags": {"filters": [{"match": "from:x", "tags": ["a\x07"]}]}},
                              wait=False)
    assert server.process.wait(30) == 2
    assert "a tag must not contain control characters" in server.log()
    server = mailpipe_factory({"tags": {"filters": [{"match": "  ", "tags": ["a"]}]}},
                              wait=False)
    assert server.process.wait(30) == 2
    assert "has no search terms" in server.log()


async def test_plus_addressing_can_be_turned_off(inproc: InProc) -> None:
    app = await inproc(tags={"plus_addressing": False,
                             "filters": [{"match": "to:+", "tags": ["plus"]}]})
    import aiosmtplib

    await aiosmtplib.send(b"Subject: hi\r\n\r\nhi\r\n", sender="a@x.test",
                          recipients=["bob+news@x.test"], hostname="127.0.0.1",
                          port=port_of(app))
    assert app.store is not None
    [summary], _ = await app.store.list()
    assert summary["tags"] == ["plus"]


async def test_an_old_database_is_upgraded_with_tags_and_search_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    tagged = make_email("tagged", to=("ann+Beta@x.test",))
    tagged.event["tags"] = ["from-plugin"]
    tagged.event["message"]["headers"]["Cc"] = "Carbon <cc@x.test>"
    tagged.event["message"]["message_id"] = "<abc@x.test>"
    conn = sqlite3.connect(path)
    # The schema of the release before tags (the read column included), one message.
    conn.executescript("""
        CREATE TABLE messages (id INTEGER PRIMARY KEY, uuid TEXT NOT NULL UNIQUE,
            received_at TEXT NOT NULL, received_ts REAL NOT NULL, mail_from TEXT NOT NULL,
            rcpt TEXT NOT NULL, header_from TEXT, subject TEXT, snippet TEXT NOT NULL,
            size INTEGER NOT NULL, attachment_count INTEGER NOT NULL, search TEXT NOT NULL,
            event BLOB NOT NULL, outcomes BLOB, raw BLOB NOT NULL,
            read INTEGER NOT NULL DEFAULT 0);
    """)
    conn.execute("INSERT INTO messages VALUES (1, ?, '2026-01-01T00:00:00Z', 0, 'a@x', "
                 "'ann+Beta@x.test', NULL, 'tagged', '', 3, 0, ?, ?, NULL, 'raw', 1)",
                 (tagged.uuid, index_columns(tagged.event, 3)[10], tagged.json()))
    conn.commit()
    conn.close()
    store = SQLiteStore(path, tag_rules=TagRules())
    await store.start()
    try:
        [summary] = (await store.page()).messages
        assert summary["tags"] == ["from-plugin", "Beta"] and summary["read"] is True
        assert (await store.page(q="cc:carbon message-id:abc@x")).total == 1
        assert (await store.page(q="tag:beta")).total == 1
        assert await store.rename_tag("beta", "gamma") == 1
        assert (await store.get(tagged.uuid) or {})["tags"] == ["from-plugin", "gamma"]
    finally:
        await store.close()


async def test_tag_changes_reach_the_change_feed(store: SQLiteStore) -> None:
    email = make_email("watched")
    await store.add(email)
    with store.changes.subscribe() as changes:
        await store.add_tags([email.uuid], ["a", "b"])
        await store.remove_tags([email.uuid], ["A"])
        await store.rename_tag("b", "c")
        await store.delete_tag("c")
        seen = [await asyncio.wait_for(changes.get(), 5) for _ in range(4)]
    assert [(c.kind, c.data) for c in seen if c] == [
        ("tags", {"uuid": email.uuid, "tags": ["a", "b"]}),
        ("tags", {"uuid": email.uuid, "tags": ["b"]}),
        ("tags", {"uuid": email.uuid, "tags": ["c"]}),
        ("tags", {"uuid": email.uuid, "tags": []}),
    ]
