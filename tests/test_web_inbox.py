"""The inbox routes (web/inbox.py) through a real HTTP server on a local socket, over a real
store: live events, read state, waiting for an email, links, codes, the base path."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from conftest import make_email
from mailpipe.metrics import Metrics
from mailpipe.store.sqlite import SQLiteStore
from mailpipe.web.app import HttpAuth, create_app, start_http, stop_http


@pytest.fixture
async def client(store: SQLiteStore) -> AsyncIterator[TestClient]:
    app = create_app(store, Metrics(), ping_interval=0.2, code_pattern=r"\b\d{6}\b")
    async with TestClient(TestServer(app)) as c:
        yield c


async def json_of(resp: aiohttp.ClientResponse, status: int) -> Any:
    assert resp.status == status, await resp.text()
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    return json.loads(await resp.read())


async def read_event(resp: aiohttp.ClientResponse) -> tuple[str, Any]:
    """The next `event:`/`data:` pair of an SSE stream, skipping comments."""
    kind = None
    while True:
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            assert kind is not None
            assert await resp.content.readline() == b"\n"  # the event's end
            return kind, json.loads(line[6:])


# ---- read state -----------------------------------------------------------------------------


async def test_mark_read_one_and_all(client: TestClient, store: SQLiteStore) -> None:
    emails = [make_email(f"r{i}") for i in range(3)]
    for email in emails:
        await store.add(email)
    body = await json_of(await client.get("/api/v1/messages"), 200)
    assert body["unread"] == 3 and not any(m["read"] for m in body["messages"])

    summary = await json_of(
        await client.patch(f"/api/v1/messages/{emails[0].uuid}", json={"read": True}), 200)
    assert summary["uuid"] == emails[0].uuid and summary["read"] is True
    body = await json_of(await client.get("/api/v1/messages", params={"q": "is:unread"}), 200)
    assert (body["total"], body["unread"]) == (2, 2)

    assert (await json_of(await client.patch("/api/v1/messages", json={"read": True}), 200)
            == {"updated": 2})
    assert (await json_of(await client.get("/api/v1/messages"), 200))["unread"] == 0
    await json_of(await client.patch("/api/v1/messages/nope", json={"read": True}), 404)


@pytest.mark.parametrize("body", ['{"read": 1}', "{}", "[true]", "not json", '{"read": null}'])
async def test_mark_read_needs_a_boolean(client: TestClient, body: str) -> None:
    resp = await client.patch("/api/v1/messages", data=body,
                              headers={"Content-Type": "application/json"})
    assert "read" in (await json_of(resp, 400))["error"]


async def test_mark_read_is_refused_cross_origin(client: TestClient) -> None:
    resp = await client.patch("/api/v1/messages", json={"read": True},
                              headers={"Origin": "http://evil.test"})
    await json_of(resp, 403)
    resp = await client.patch("/api/v1/messages", data="read=1",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    await json_of(resp, 415)


# ---- live events ----------------------------------------------------------------------------


async def test_event_stream(client: TestClient, store: SQLiteStore) -> None:
    resp = await client.get("/api/v1/events")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert await resp.content.readline() == b": connected\n"
    email = make_email("<b>live</b>")
    await store.add(email)
    kind, data = await read_event(resp)
    assert kind == "new" and data["uuid"] == email.uuid and data["subject"] == "<b>live</b>"
    assert data["read"] is False

    await client.patch(f"/api/v1/messages/{email.uuid}", json={"read": True})
    assert await read_event(resp) == ("read", {"uuid": email.uuid, "read": True})
    await client.patch("/api/v1/messages", json={"read": True})
    assert await read_event(resp) == ("read", {"all": True, "read": True})
    await client.delete(f"/api/v1/messages/{email.uuid}")
    assert await read_event(resp) == ("deleted", {"uuid": email.uuid})
    await client.delete("/api/v1/messages")
    assert await read_event(resp) == ("cleared", {})

    lines = [await asyncio.wait_for(resp.content.readline(), 2) for _ in range(2)]
    assert lines == [b": ping\n", b"\n"]  # 0.2 s without a change
    resp.close()


async def test_event_stream_ends_when_mailpipe_stops(store: SQLiteStore) -> None:
    runner = await start_http(create_app(store, Metrics()), "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as session:
        streams = [await session.get(f"http://{host}:{port}/api/v1/events") for _ in range(2)]
        waiting = asyncio.create_task(
            session.get(f"http://{host}:{port}/api/v1/messages/wait?timeout=60"))
        await asyncio.sleep(0.2)
        start = time.monotonic()
        await stop_http(runner)
        assert time.monotonic() - start < 5  # nobody waited for the live requests
        for resp in streams:
            assert (await asyncio.wait_for(resp.content.read(), 5)).endswith(b": connected\n\n")
        resp = await asyncio.wait_for(waiting, 5)
        assert resp.status == 503


# ---- waiting for an email -------------------------------------------------------------------


async def test_wait_answers_at_once_with_a_stored_match(
    client: TestClient, store: SQLiteStore
) -> None:
    older = make_email("Reset your password", to=("ann@x.test",))
    await store.add(older)
    await store.add(make_email("Welcome", to=("ann@x.test",)))
    event = await json_of(
        await client.get("/api/v1/messages/wait", params={"to": "ANN@", "subject": "reset"}), 200)
    assert event["uuid"] == older.uuid
    assert "mailpipe" not in event or "outcomes" in event["mailpipe"]


async def test_wait_long_polls_for_a_new_match(client: TestClient, store: SQLiteStore) -> None:
    old = make_email("Code", to=("bob@x.test",))
    await store.add(old)
    waiting = asyncio.create_task(client.get(
        "/api/v1/messages/wait", params={"to": "bob@", "after": old.uuid, "timeout": 10}))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await store.add(make_email("Code", to=("carol@x.test",)))  # not for bob
    await asyncio.sleep(0.2)
    assert not waiting.done()
    new = make_email("Code", to=("bob@x.test",))
    await store.add(new)
    event = await json_of(await asyncio.wait_for(waiting, 5), 200)
    assert event["uuid"] == new.uuid


async def test_wait_after_a_time(client: TestClient, store: SQLiteStore) -> None:
    now = datetime.now(UTC)
    await store.add(make_email("old", received_at=now - timedelta(minutes=5)))
    new = make_email("new", received_at=now)
    await store.add(new)
    since = (now - timedelta(minutes=1)).isoformat()  # "+00:00", sent unencoded below
    event = await json_of(await client.get(f"/api/v1/messages/wait?after={since}"), 200)
    assert event["uuid"] == new.uuid
    since_z = (now - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = await json_of(await client.get(f"/api/v1/messages/wait?after={since_z}"), 200)
    assert event["uuid"] == new.uuid


async def test_wait_times_out_with_408(client: TestClient, store: SQLiteStore) -> None:
    await store.add(make_email("other"))
    start = time.monotonic()
    resp = await client.get("/api/v1/messages/wait", params={"subject": "never", "timeout": 1})
    assert (await json_of(resp, 408)) == {"error": "no matching email within 1 s"}
    assert 0.9 < time.monotonic() - start < 3


@pytest.mark.parametrize(
    ("query", "word"),
    [("timeout=301", "timeout"), ("timeout=-1", "timeout"), ("after=nope", "after"),
     ("after=2026-13-01T00:00:00Z", "after")],
)
async def test_wait_rejects_bad_parameters(client: TestClient, query: str, word: str) -> None:
    body = await json_of(await client.get(f"/api/v1/messages/wait?{query}"), 400)
    assert body["error"].startswith(word)


# ---- links and codes ------------------------------------------------------------------------


async def test_links_and_codes(client: TestClient, store: SQLiteStore) -> None:
    html = ('<p>Your code: <b>482913</b></p><a href="https://app.test/verify?t=1&amp;u=2">'
            'Verify <i>now</i></a> <a href="javascript:alert(1)">x</a>'
            '<a href="mailto:help@app.test">help</a><a href="https://app.test/verify?t=1&u=2">'
            'again</a>')
    text = "Code 482913 or 777111.\nOpen https://app.test/verify?t=1&u=2 or https://app.test/b."
    email = make_email("Verify", html=html, text=text)
    await store.add(email)
    body = await json_of(await client.get(f"/api/v1/messages/{email.uuid}/links"), 200)
    assert body == {"links": [
        {"url": "https://app.test/verify?t=1&u=2", "text": "Verify now", "source": "html"},
        {"url": "mailto:help@app.test", "text": "help", "source": "html"},
        {"url": "https://app.test/b", "text": "https://app.test/b", "source": "text"},
    ]}
    codes = await json_of(await client.get(f"/api/v1/messages/{email.uuid}/codes"), 200)
    assert codes == {"codes": ["482913", "777111"]}
    resp = await client.get(f"/api/v1/messages/{email.uuid}/codes",
                            params={"pattern": r"Code (\d+)"})
    assert await json_of(resp, 200) == {"codes": ["482913"]}
    resp = await client.get(f"/api/v1/messages/{email.uuid}/codes", params={"pattern": "("})
    assert (await json_of(resp, 400))["error"].startswith("pattern")
    await json_of(await client.get("/api/v1/messages/nope/links"), 404)


async def test_codes_from_html_without_text(client: TestClient, store: SQLiteStore) -> None:
    email = make_email("html only", text=None,
                       html="<style>.x{color:#123456}</style><p>Use 9021</p><p>then 55</p>")
    await store.add(email)
    resp = await client.get(f"/api/v1/messages/{email.uuid}/codes", params={"pattern": r"\d+"})
    assert await json_of(resp, 200) == {"codes": ["9021", "55"]}


# ---- base path and auth ---------------------------------------------------------------------


async def test_base_path(store: SQLiteStore) -> None:
    await store.add(make_email("prefixed"))
    auth = HttpAuth("bearer", token="t0ken")
    app = create_app(store, Metrics(), base_path="/mail", auth=auth)
    good = {"Authorization": "Bearer t0ken"}
    async with TestClient(TestServer(app)) as c:
        body = await json_of(await c.get("/mail/api/v1/messages", headers=good), 200)
        assert body["total"] == 1
        assert (await c.get("/mail/api/v1/messages")).status == 401
        await json_of(await c.get("/mail/healthz"), 200)  # open, as at the root
        for outside in ("/api/v1/messages", "/healthz", "/mailx/api/v1/messages", "/"):
            resp = await c.get(outside, headers=good)
            assert (await json_of(resp, 404)) == {"error": "not found"}, outside
        resp = await c.get("/mail", headers=good, allow_redirects=False)
        assert resp.status == 308 and resp.headers["Location"] == "/mail/"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        resp = await c.patch("/mail/api/v1/messages", json={"read": True}, headers=good)
        assert (await json_of(resp, 200)) == {"updated": 1}


async def test_new_responses_match_openapi_schemas(client: TestClient, store: SQLiteStore) -> None:
    import jsonschema

    doc = await json_of(await client.get("/api/openapi.json"), 200)

    def check(instance: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    email = make_email("schema 123456", html='<a href="https://x.test">x</a>')
    await store.add(email)
    base = f"/api/v1/messages/{email.uuid}"
    check(await json_of(await client.patch(base, json={"read": True}), 200), "MessageSummary")
    check(await json_of(await client.patch("/api/v1/messages", json={"read": False}), 200),
          "Updated")
    check(await json_of(await client.get(f"{base}/links"), 200), "LinkList")
    check(await json_of(await client.get(f"{base}/codes"), 200), "CodeList")
    check(await json_of(await client.get("/api/v1/messages/wait?timeout=0"), 200), "Event")
    check(await json_of(await client.get("/api/v1/messages/wait?subject=no&timeout=0"), 408),
          "Error")


def test_stopping_with_event_streams_open_ends_them_cleanly(mailpipe_factory: Any) -> None:
    """SIGTERM while a page's event stream (and MailHog's) is open: each stream ends, and
    mailpipe stops with status 0 and no error logged (a stream whose client has gone must
    not log a traceback when it is closed)."""
    import http.client
    import signal

    server = mailpipe_factory({"compat": {"mailhog": {"enabled": True}}})
    streams = []
    for path in ("/api/v1/events", "/compat/mailhog/api/v1/events"):
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=20)
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        streams.append((conn, response))
    streams[0][1].read(len(b": connected\n\n"))
    streams[1][0].close()  # one client gone before the stop
    assert server.stop(signal.SIGTERM) == 0
    assert streams[0][1].read() == b""  # the stream ended
    log = server.log()
    assert "ERROR" not in log and "Traceback" not in log, log
