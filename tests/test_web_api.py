"""The REST API over a real SQLiteStore, through a real HTTP server on a local socket."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any
from urllib.parse import unquote

import aiohttp
import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from conftest import make_email
from mailpipe.metrics import Metrics
from mailpipe.store.sqlite import SQLiteStore
from mailpipe.web import session as session_module
from mailpipe.web.app import HttpAuth, create_app, start_http, stop_http
from mailpipe.web.session import session_value


def described(name: str, content_type: str, data: bytes) -> dict[str, Any]:
    return {
        "filename": name,
        "content_type": content_type,
        "size": len(data),
        "disposition": "attachment",
        "sha256": hashlib.sha256(data).hexdigest(),
        "content": base64.b64encode(data).decode(),
    }


@pytest.fixture
async def client(store: SQLiteStore) -> AsyncIterator[TestClient]:
    assert store.metrics is not None
    async with TestClient(TestServer(create_app(store, store.metrics))) as c:
        yield c


async def json_of(resp: aiohttp.ClientResponse, status: int) -> Any:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return json.loads(await resp.read())


# ---- messages -------------------------------------------------------------------------------


async def test_list_pagination_and_search(client: TestClient, store: SQLiteStore) -> None:
    emails = [make_email(f"msg {i}") for i in range(5)] + [make_email("50% off")]
    for e in emails:
        await store.add(e)

    body = await json_of(await client.get("/api/v1/messages", params={"limit": 2}), 200)
    assert (body["total"], body["count"], body["offset"], body["limit"]) == (6, 2, 0, 2)
    assert [m["uuid"] for m in body["messages"]] == [emails[5].uuid, emails[4].uuid]

    body = await json_of(await client.get("/api/v1/messages?limit=2&offset=4"), 200)
    assert [m["uuid"] for m in body["messages"]] == [emails[1].uuid, emails[0].uuid]

    body = await json_of(await client.get("/api/v1/messages", params={"q": "0%"}), 200)
    assert body["total"] == 1 and body["messages"][0]["subject"] == "50% off"

    body = await json_of(await client.get("/api/v1/messages"), 200)
    assert body["limit"] == 50 and body["count"] == 6


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=1_0", "limit"),
        ("offset=-1", "offset"),
        ("offset=1.5", "offset"),
    ],
)
async def test_list_rejects_bad_parameters(client: TestClient, query: str, param: str) -> None:
    body = await json_of(await client.get(f"/api/v1/messages?{query}"), 400)
    assert body["error"].startswith(param)


async def test_get_message_is_the_event(
    client: TestClient, store: SQLiteStore, validate_event: Callable[[dict[str, Any]], None]
) -> None:
    email = make_email("full")
    email.outcomes["webhook"] = "delivered"
    await store.add(email)

    event = await json_of(await client.get(f"/api/v1/messages/{email.uuid}"), 200)
    assert event["mailpipe"] == {"outcomes": {"webhook": "delivered"}}
    del event["mailpipe"]
    assert event == email.event
    validate_event(event)


async def test_raw_is_exact_bytes(client: TestClient, store: SQLiteStore) -> None:
    raw = b"Subject: 8bit\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9 \xff\x00\x80\r\n"
    email = make_email("8bit", raw=raw)
    await store.add(email)

    resp = await client.get(f"/api/v1/messages/{email.uuid}/raw")
    assert resp.status == 200
    assert await resp.read() == raw
    assert resp.content_type == "message/rfc822"
    assert resp.headers["Content-Disposition"] == f'attachment; filename="{email.uuid}.eml"'
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_delete_one_and_all(client: TestClient, store: SQLiteStore) -> None:
    emails = [make_email(f"d{i}") for i in range(3)]
    for e in emails:
        await store.add(e)

    resp = await client.delete(f"/api/v1/messages/{emails[0].uuid}")
    assert resp.status == 204
    assert await store.get(emails[0].uuid) is None
    await json_of(await client.delete(f"/api/v1/messages/{emails[0].uuid}"), 404)
    assert await json_of(await client.delete("/api/v1/messages"), 200) == {"deleted": 2}
    assert await store.count() == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/messages/0b7a6c1e-0000-4000-8000-000000000000"),
        ("GET", "/api/v1/messages/nope/raw"),
        ("GET", "/api/v1/messages/nope/attachments/0"),
        ("DELETE", "/api/v1/messages/nope"),
        ("GET", "/api/v2/anything"),
    ],
)
async def test_not_found_is_json(client: TestClient, method: str, path: str) -> None:
    body = await json_of(await client.request(method, path), 404)
    assert body["error"]


async def test_closed_store_answers_503(client: TestClient, store: SQLiteStore) -> None:
    await store.close()
    body = await json_of(await client.get("/api/v1/messages"), 503)
    assert body == {"error": "store unavailable"}


async def test_without_store_only_service_routes_remain() -> None:
    async with TestClient(TestServer(create_app(None, Metrics()))) as c:
        assert (await json_of(await c.get("/healthz"), 200))["status"] == "ok"
        assert (await c.get("/metrics")).status == 200
        assert (await c.get("/api/openapi.json")).status == 200
        await json_of(await c.get("/api/v1/messages"), 404)


async def test_wrong_method_is_json_405(client: TestClient) -> None:
    resp = await client.post("/api/v1/messages")
    body = await json_of(resp, 405)
    assert body["error"] and "GET" in resp.headers["Allow"]


# ---- attachments ----------------------------------------------------------------------------


async def test_attachments(client: TestClient, store: SQLiteStore) -> None:
    pytest.importorskip("mailpipe.capture.message")
    pdf = b"%PDF-1.4\n\x00\xff binary \x80\n%%EOF"
    passwd = b"root:x:0:0:root:/root:/bin/bash\n"
    unicode_name = "Résumé 2024 ü.pdf"
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@x.test", "b@y.test", "files"
    msg.set_content("see attached")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename=unicode_name)
    msg.add_attachment(passwd, maintype="text", subtype="plain", filename="../../etc/passwd")
    email = make_email(
        "files",
        raw=msg.as_bytes(policy=SMTP),
        attachments=[
            described(unicode_name, "application/pdf", pdf),
            described("../../etc/passwd", "text/plain", passwd),
        ],
    )
    await store.add(email)
    base = f"/api/v1/messages/{email.uuid}/attachments"

    resp = await client.get(f"{base}/0")
    assert resp.status == 200
    assert await resp.read() == pdf
    assert resp.content_type == "application/pdf"
    assert filename_star(resp.headers["Content-Disposition"]) == unicode_name
    assert resp.headers["Content-Disposition"].isascii()

    resp = await client.get(f"{base}/1")
    assert resp.status == 200
    assert await resp.read() == passwd
    assert resp.content_type == "text/plain"
    disposition = resp.headers["Content-Disposition"]
    assert filename_star(disposition) == "passwd"
    assert "/" not in disposition and ".." not in disposition

    for missing in ("2", "99", "1000000"):
        await json_of(await client.get(f"{base}/{missing}"), 404)
    for bad in ("-1", "x", "1000001", "9" * 5000):  # not an index at all: 400, says why
        body = await json_of(await client.get(f"{base}/{bad}"), 400)
        assert body["error"] == "index must be an integer between 0 and 1000000"


async def test_attachments_agree_with_build_event(client: TestClient, store: SQLiteStore) -> None:
    """Each index serves the bytes the capture pipeline described at that index."""
    message = pytest.importorskip("mailpipe.capture.message")
    from mailpipe.capture.types import AuthInfo, Envelope

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@x.test", "b@y.test", "mixed"
    msg.set_content("text part")
    msg.add_alternative("<p>html <img src='cid:logo'></p>", subtype="html")
    msg.get_payload()[1].add_related(b"\x89PNG logo", "image", "png", cid="<logo>")
    msg.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="data.csv")
    msg.add_attachment(bytes(range(256)), maintype="application", subtype="octet-stream")
    email = message.build_event(
        msg.as_bytes(policy=SMTP),
        envelope=Envelope(mail_from="a@x.test", rcpt_to=["b@y.test"], helo="c.test"),
        auth=AuthInfo(),
        session=message.SessionInfo(
            str(uuidlib.uuid4()), "127.0.0.1:1", "127.0.0.1:25", "t", False
        ),
        received_at=datetime.now(UTC),
        options=message.EventOptions(),
    )
    described_list = email.event["attachments"]
    assert len(described_list) >= 2
    await store.add(email)

    for index, meta in enumerate(described_list):
        resp = await client.get(f"/api/v1/messages/{email.uuid}/attachments/{index}")
        assert resp.status == 200
        data = await resp.read()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"]
        assert data == base64.b64decode(meta["content"])
        assert resp.content_type == meta["content_type"]
        assert filename_star(resp.headers["Content-Disposition"])
    missing = f"/api/v1/messages/{email.uuid}/attachments/{len(described_list)}"
    await json_of(await client.get(missing), 404)


def filename_star(disposition: str) -> str:
    assert disposition.startswith("attachment;")
    match = re.search(r"filename\*=UTF-8''([^;\s]+)", disposition)
    assert match, disposition
    return unquote(match.group(1), encoding="utf-8", errors="strict")


# ---- health, metrics, auth ------------------------------------------------------------------


async def test_healthz(client: TestClient, store: SQLiteStore) -> None:
    body = await json_of(await client.get("/healthz"), 200)
    assert body["status"] == "ok" and body["ok"] is True and body["messages"] == 0

    degraded = create_app(store, Metrics(), health=lambda: {"ok": False, "smtp": "down"})
    async with TestClient(TestServer(degraded)) as c:
        body = await json_of(await c.get("/healthz"), 503)
        assert body == {"status": "degraded", "ok": False, "smtp": "down"}

    def broken() -> dict[str, Any]:
        raise RuntimeError("probe failed")

    async with TestClient(TestServer(create_app(store, Metrics(), health=broken))) as c:
        body = await json_of(await c.get("/healthz"), 503)
        assert body["status"] == "degraded" and "probe failed" in body["error"]


async def test_metrics_over_start_http(store: SQLiteStore) -> None:
    assert store.metrics is not None
    store.metrics.emails_accepted.labels(server="smtp").inc(3)
    await store.add(make_email())
    await store.add(make_email())
    runner = await start_http(create_app(store, store.metrics), "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{host}:{port}/metrics") as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    finally:
        await stop_http(runner)
    assert "mailpipe_store_messages 2.0" in text
    assert 'mailpipe_emails_accepted_total{server="smtp"} 3.0' in text


PROTECTED = ["/api/v1/messages", "/metrics", "/api/openapi.json"]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_basic_auth(store: SQLiteStore) -> None:
    auth = HttpAuth("basic", username="dev", password="pässwörd")
    async with TestClient(TestServer(create_app(store, Metrics(), auth=auth))) as c:
        for path in PROTECTED:
            resp = await c.get(path)
            assert resp.status == 401, path
            assert resp.headers["WWW-Authenticate"].startswith("Basic ")
            await json_of(resp, 401)
            for wrong in (basic("dev", "nope"), basic("root", "pässwörd"), "Bearer pässwörd"):
                assert (await c.get(path, headers={"Authorization": wrong})).status == 401
            good = await c.get(path, headers={"Authorization": basic("dev", "pässwörd")})
            assert good.status == 200, path
        assert (await c.get("/healthz")).status == 200


async def test_bearer_auth(store: SQLiteStore) -> None:
    auth = HttpAuth("bearer", token="s3cret-token")
    async with TestClient(TestServer(create_app(store, Metrics(), auth=auth))) as c:
        for path in PROTECTED:
            resp = await c.get(path)
            assert resp.status == 401, path
            assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
            for wrong in ("Bearer s3cret", basic("s3cret-token", "")):
                assert (await c.get(path, headers={"Authorization": wrong})).status == 401
            good = await c.get(path, headers={"Authorization": "Bearer s3cret-token"})
            assert good.status == 200, path
        # Unknown routes answer 401 too: without credentials nothing about the API leaks.
        assert (await c.get("/api/v1/messages/x")).status == 401
        assert (await c.get("/healthz")).status == 200


# ---- signing in with the bearer token: the session cookie -----------------------------------

TOKEN = "s3cret-token"


def cookie_header(resp: aiohttp.ClientResponse) -> str:
    (header,) = resp.headers.getall("Set-Cookie")
    return header


def cid_email() -> Any:
    """HTML with a cid: image (attachment 0) and a PDF (attachment 1)."""
    pytest.importorskip("mailpipe.capture.message")
    logo, pdf = b"\x89PNG\r\n\x1a\n not really", b"%PDF-1.4 x"
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@x.test", "b@y.test", "cid"
    msg.set_content("text")
    msg.add_alternative('<p>hi</p><img src="cid:logo@x">', subtype="html")
    msg.get_payload()[1].add_related(logo, "image", "png", cid="<logo@x>")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="a.pdf")
    inline = {**described("logo.png", "image/png", logo), "content_id": "<logo@x>"}
    email = make_email(
        "cid",
        html='<p>hi</p><img src="cid:logo@x">',
        raw=msg.as_bytes(policy=SMTP),
        attachments=[inline, described("a.pdf", "application/pdf", pdf)],
    )
    return email, logo, pdf


async def test_session_cookie_opens_what_the_token_opens(store: SQLiteStore) -> None:
    email, _, pdf = cid_email()
    await store.add(email)
    auth = HttpAuth("bearer", token=TOKEN)
    async with TestClient(TestServer(create_app(store, Metrics(), auth=auth))) as c:
        base = f"/api/v1/messages/{email.uuid}"
        routes = ["/api/v1/messages", base, f"{base}/html", f"{base}/raw",
                  f"{base}/attachments/1", "/metrics", "/api/openapi.json"]
        for path in routes:
            assert (await c.get(path)).status == 401, path
        assert await json_of(await c.get("/api/v1/session"), 200) == {
            "auth": "bearer", "cookie": False}

        # A wrong token: 401, no cookie.
        resp = await c.post("/api/v1/session", json={"token": "s3cret"})
        assert (await json_of(resp, 401))["error"] == "wrong token"
        assert "Set-Cookie" not in resp.headers
        for bad in (b"", b"{}", b'{"token": 1}', b'{"token": ""}', b"[]", b"nope"):
            resp = await c.post("/api/v1/session", data=bad,
                                headers={"Content-Type": "application/json"})
            assert resp.status == 400, bad
        assert not c.session.cookie_jar.filter_cookies(c.make_url("/"))

        resp = await c.post("/api/v1/session", json={"token": TOKEN})
        assert await json_of(resp, 200) == {"auth": "bearer", "cookie": True}
        header = cookie_header(resp)
        name, _, rest = header.partition("=")
        value, *attributes = [part.strip() for part in rest.split(";")]
        assert name == "mailpipe_session"
        assert re.fullmatch(r"[0-9a-f]{64}", value) and TOKEN not in value
        assert sorted(attributes) == ["HttpOnly", "Path=/", "SameSite=Strict"]  # no Secure: http
        assert await json_of(await c.get("/api/v1/session"), 200) == {
            "auth": "bearer", "cookie": True}

        for path in routes:
            assert (await c.get(path)).status == 200, path
        assert await (await c.get(f"{base}/attachments/1")).read() == pdf
        async with c.get("/api/v1/events") as stream:  # the event stream too
            assert stream.status == 200
            assert stream.content_type == "text/event-stream"

        # Signing out clears it.
        resp = await c.delete("/api/v1/session")
        assert resp.status == 204
        assert "Max-Age=0" in cookie_header(resp) and "Path=/" in cookie_header(resp)
        assert (await c.get("/api/v1/messages")).status == 401

        # Forged: the token itself, another key's HMAC, a truncated one.
        forged = [TOKEN, session_value(os.urandom(32), TOKEN), value[:-1], value.upper()]
        for cookie in forged:
            resp = await c.get("/api/v1/messages", headers={"Cookie": f"mailpipe_session={cookie}"})
            assert resp.status == 401, cookie
        good = {"Cookie": f"mailpipe_session={value}"}
        assert (await c.get("/api/v1/messages", headers=good)).status == 200

    # Another process's key (a restart, or another mailpipe with the same token): refused.
    other = HttpAuth("bearer", token=TOKEN, session_key=os.urandom(32))
    async with TestClient(TestServer(create_app(store, Metrics(), auth=other))) as c:
        assert (await c.get("/api/v1/messages", headers=good)).status == 401


async def test_the_cookie_is_secure_over_https(store: SQLiteStore) -> None:
    @web.middleware
    async def as_https(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request.clone(scheme="https"))  # as a TLS site would see it

    app = create_app(store, Metrics(), auth=HttpAuth("bearer", token=TOKEN), base_path="/m")
    app.middlewares.insert(0, as_https)
    async with TestClient(TestServer(app)) as c:
        resp = await c.post("/m/api/v1/session", json={"token": TOKEN})
        attributes = sorted(part.strip() for part in cookie_header(resp).split(";")[1:])
        assert attributes == ["HttpOnly", "Path=/m/", "SameSite=Strict", "Secure"]
        resp = await c.delete("/m/api/v1/session")
        assert "Secure" in cookie_header(resp)


async def test_the_html_view_keys_its_cid_images(store: SQLiteStore) -> None:
    """The sandboxed frame's image requests carry no cookie nor basic credentials: the /html
    route (behind auth) links each cid: image with a key that opens that attachment only."""
    email, logo, _ = cid_email()
    await store.add(email)
    for auth, header in (
        (HttpAuth("bearer", token=TOKEN), f"Bearer {TOKEN}"),
        (HttpAuth("basic", username="dev", password="pw"), basic("dev", "pw")),
    ):
        async with TestClient(TestServer(create_app(store, Metrics(), auth=auth))) as c:
            base = f"/api/v1/messages/{email.uuid}"
            html = await (await c.get(f"{base}/html", headers={"Authorization": header})).text()
            (src,) = re.findall(r'src="([^"]+)"', html)
            path, _, key = src.partition("?key=")
            assert path == "attachments/0" and re.fullmatch(r"[0-9a-f]{32}", key)
            resp = await c.get(f"{base}/{src}")  # no credentials
            assert resp.status == 200 and await resp.read() == logo
            refused = [
                f"{base}/attachments/1?key={key}",  # another attachment
                f"{base}/raw?key={key}",  # another route
                f"{base}/html?key={key}",
                f"/api/v1/messages/{uuidlib.uuid4()}/attachments/0?key={key}",
                f"{base}/attachments/0?key={key[:-1]}{'1' if key[-1] == '0' else '0'}",
                f"{base}/attachments/0",
            ]
            for path in refused:
                assert (await c.get(path)).status == 401, path

    # No auth: plain links, as before.
    async with TestClient(TestServer(create_app(store, Metrics()))) as c:
        html = await (await c.get(f"/api/v1/messages/{email.uuid}/html")).text()
        assert 'src="attachments/0"' in html


async def test_bearer_opens_the_page_and_the_sign_in_only(store: SQLiteStore) -> None:
    auth = HttpAuth("bearer", token=TOKEN)
    app = create_app(store, Metrics(), auth=auth, base_path="/mail")
    async with TestClient(TestServer(app)) as c:
        for path in ("/mail/", "/mail/ui/app.js", "/mail/api/v1/session", "/mail/healthz"):
            assert (await c.get(path)).status == 200, path
        assert (await c.get("/mail", allow_redirects=False)).status == 308
        for path in ("/mail/api/v1/messages", "/mail/ui/../api/v1/messages",
                     "/mail/ui/%2e%2e/api/v1/messages", "/mail/api/v1/events", "/mail/metrics"):
            assert (await c.get(path)).status == 401, path
        resp = await c.post("/mail/api/v1/session", json={"token": TOKEN})
        assert "Path=/mail/" in cookie_header(resp)
        assert (await c.get("/mail/api/v1/messages")).status == 200


async def test_basic_keeps_everything_behind_the_prompt(store: SQLiteStore) -> None:
    auth = HttpAuth("basic", username="dev", password="pw")
    async with TestClient(TestServer(create_app(store, Metrics(), auth=auth))) as c:
        for path in ("/", "/ui/app.js", "/api/v1/session"):
            resp = await c.get(path)
            assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic ")
        assert (await c.post("/api/v1/session", json={"token": "pw"})).status == 401
        resp = await c.post("/api/v1/session", json={"token": "pw"},
                            headers={"Authorization": basic("dev", "pw")})
        assert resp.status == 404 and "Set-Cookie" not in resp.headers
        resp = await c.get("/api/v1/session", headers={"Authorization": basic("dev", "pw")})
        assert await json_of(resp, 200) == {"auth": "basic", "cookie": False}


async def test_wrong_tokens_are_rate_limited(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "FAILURE_DELAY", 0.0)
    auth = HttpAuth("bearer", token=TOKEN)
    async with TestClient(TestServer(create_app(store, Metrics(), auth=auth))) as c:
        for _ in range(session_module.MAX_FAILURES):
            assert (await c.post("/api/v1/session", json={"token": "guess"})).status == 401
        for token in ("guess", TOKEN):  # the right one too, until the minute is over
            resp = await c.post("/api/v1/session", json={"token": token})
            assert resp.status == 429 and 1 <= int(resp.headers["Retry-After"]) <= 60
        # The header still works: only guessing through the form is limited.
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert (await c.get("/api/v1/messages", headers=headers)).status == 200


def test_auth_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        HttpAuth("basic", username="dev")
    with pytest.raises(ValueError):
        HttpAuth("bearer")


# ---- OpenAPI --------------------------------------------------------------------------------


async def test_openapi_lists_every_route(client: TestClient) -> None:
    doc = await json_of(await client.get("/api/openapi.json"), 200)
    assert doc["openapi"].startswith("3.1")

    served = set()
    for route in client.server.app.router.routes():
        if route.method == "HEAD":  # added by aiohttp for every GET
            continue
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.resource.canonical)
        served.add((path, route.method.lower()))
    documented = {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method in {"get", "put", "post", "delete", "patch"}
        and not path.startswith("/compat/")  # mounted only with compat (test_compat_*.py)
    }
    assert documented == served
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


async def test_responses_match_openapi_schemas(client: TestClient, store: SQLiteStore) -> None:
    doc = await json_of(await client.get("/api/openapi.json"), 200)

    def check(instance: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    email = make_email("schema")
    await store.add(email)
    check(await json_of(await client.get("/api/v1/messages"), 200), "MessageList")
    check(await json_of(await client.get(f"/api/v1/messages/{email.uuid}"), 200), "Event")
    check(await json_of(await client.get("/api/v1/messages?limit=0"), 400), "Error")
    check(await json_of(await client.get("/healthz"), 200), "Health")
