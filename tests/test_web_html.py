"""The safe HTML view (web/htmlview.py): unit tests of the rewriting, then the route through a
real server with the headers a browser enforces."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from conftest import make_email
from mailpipe.metrics import Metrics
from mailpipe.store.sqlite import SQLiteStore
from mailpipe.web.app import create_app
from mailpipe.web.htmlview import BASE, html_text, links, rewrite


def cid_url(content_id: str) -> str | None:
    return {"logo@x": "attachments/0"}.get(content_id)


def safe(source: str, *, remote: bool = False) -> str:
    return rewrite(source, cid_url, remote=remote).html


@pytest.mark.parametrize(
    "hostile",
    [
        "<script>parent.pwned=1</script>",
        "<SCRIPT SRC=//evil.test/x.js></SCRIPT>",
        '<img src=x onerror="pwned=1">',
        '<body onload=pwned=1>',
        '<svg><script>pwned=1</script><animate attributeName=href to="javascript:pwned=1"/>',
        '<a href="javascript:pwned=1">x</a>',
        '<a href="  JaVa\tScRiPt:pwned=1">x</a>',
        '<a href="vbscript:pwned">x</a>',
        '<a href="data:text/html,<script>pwned=1</script>">x</a>',
        '<iframe src="javascript:pwned=1"></iframe>',
        '<object data="evil.swf"></object><embed src="evil.swf">',
        '<meta http-equiv="refresh" content="0;url=javascript:pwned=1">',
        '<form action="javascript:pwned=1"><button formaction="javascript:pwned=1">',
        '<base href="javascript:pwned=1//">',
        '<!--[if IE]><script>pwned=1</script><![endif]-->',
        "<img src=\"x\" alt='\"><script>pwned=1</script>'>",
        '<a href="x" onclick=pwned=1>x</a>',
        '<template><script>pwned=1</script></template>',
        '<style>@import "javascript:pwned"; body{background:url(javascript:pwned=1)}</style>',
    ],
)
def test_nothing_runnable_survives(hostile: str) -> None:
    out = safe(f"<p>before</p>{hostile}<p>after</p>").lower()
    assert "<script" not in out and "<svg><animate" not in out
    assert "javascript:" not in out and "vbscript:" not in out and "onerror" not in out
    assert "onload" not in out and "onclick" not in out and "<iframe" not in out
    assert "<object" not in out and "<embed" not in out and "<meta" not in out
    assert "@import" not in out and "<base href" not in out
    assert "<p>before</p>" in out and "<p>after</p>" in out


def test_markup_in_attributes_and_text_stays_text() -> None:
    out = safe("<img src=\"x\" alt='\"><script>pwned=1</script>'><p>1 &lt; 2 &amp; <b>3</b></p>")
    assert '<img src="x" alt="&quot;&gt;&lt;script&gt;pwned=1&lt;/script&gt;">' in out
    assert "<p>1 &lt; 2 &amp; <b>3</b></p>" in out


def test_links_open_in_a_new_tab_without_the_opener() -> None:
    out = safe('<a href="https://x.test/a" target="_top" rel="opener">x</a>')
    assert out == BASE + ('<a href="https://x.test/a" target="_blank" '
                          'rel="noopener noreferrer">x</a>')
    assert safe("<!DOCTYPE html><html><p>x</p>").startswith("<!DOCTYPE html>" + BASE + "<html>")


def test_remote_images_are_blocked_and_counted() -> None:
    source = ('<img src="https://t.test/pixel.gif"><img srcset="//cdn.test/a.png 1x, '
              'data:image/png;base64,AAAA 2x"><td background="http://t.test/bg.png">'
              '<div style="background: url( \'https://t.test/b.png\' ) no-repeat; color: red">'
              '<style>p { background-image: url(http://t.test/c.png) }</style>'
              '<img src="data:image/png;base64,AAAA"><img src="data:text/html,x">')
    view = rewrite(source, cid_url, remote=False)
    assert view.blocked_remote == 5
    assert "t.test" not in view.html and "cdn.test" not in view.html
    assert 'srcset="data:image/png;base64,AAAA 2x"' in view.html
    assert 'style="background: none no-repeat; color: red"' in view.html
    assert '<img src="data:image/png;base64,AAAA">' in view.html
    assert "data:text/html" not in view.html

    allowed = rewrite(source, cid_url, remote=True)
    assert allowed.blocked_remote == 0
    assert 'src="https://t.test/pixel.gif"' in allowed.html
    assert 'url(&quot;https://t.test/b.png&quot;)' in allowed.html


def test_cid_images_point_at_the_attachments() -> None:
    out = safe('<img src="cid:logo@x"><img src="CID:logo%40x"><img src="cid:missing">'
               '<p style="background:url(cid:logo@x)">')
    assert out.count('src="attachments/0"') == 2
    assert '<img>' in out  # an unknown Content-ID loads nothing
    assert 'url(&quot;attachments/0&quot;)' in out  # quotes escaped in the attribute


def test_links_and_text_helpers() -> None:
    found = links('<a href="https://a.test/">A <b>link</b></a><a href="/rel">r</a>'
                  '<area href="https://b.test/"><a name="x">n</a>',
                  "See (https://c.test/x), mailto:m@c.test. ftp://no.test")
    assert [(f["url"], f["text"], f["source"]) for f in found] == [
        ("https://a.test/", "A link", "html"),
        ("https://b.test/", "", "html"),
        ("https://c.test/x", "https://c.test/x", "text"),
        ("mailto:m@c.test", "mailto:m@c.test", "text"),
    ]
    assert html_text("<head><title>T</title></head><p>a  b</p><div>c<br>d</div>") == "a b\nc\nd"


# ---- the route --------------------------------------------------------------------------------


@pytest.fixture
async def client(store: SQLiteStore) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(store, Metrics()))) as c:
        yield c


def attachment(content_id: str | None) -> dict[str, Any]:
    return {"filename": "logo.png", "content_type": "image/png", "size": 4,
            "disposition": "inline", "content_id": content_id, "sha256": "0" * 64,
            "content": "iVBO"}


async def test_html_route(client: TestClient, store: SQLiteStore) -> None:
    html = ('<p>Hi</p><img src="cid:logo@x"><img src="https://t.test/p.gif">'
            '<script>pwned=1</script><a href="https://app.test">go</a>')
    email = make_email("html", html=html, attachments=[attachment(None), attachment("<logo@x>")])
    await store.add(email)

    resp = await client.get(f"/api/v1/messages/{email.uuid}/html")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Mailpipe-Blocked-Remote"] == "1"
    assert resp.headers["Content-Security-Policy"] == (
        "sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
        "img-src 'self' data:; style-src 'unsafe-inline'; font-src data:")
    body = await resp.text()
    assert body.startswith(BASE)
    assert '<img src="attachments/1">' in body and "pwned" not in body
    assert 'rel="noopener noreferrer"' in body and "t.test" not in body

    resp = await client.get(f"/api/v1/messages/{email.uuid}/html?remote=1")
    assert resp.headers["X-Mailpipe-Blocked-Remote"] == "0"
    assert "img-src 'self' data: http: https:;" in resp.headers["Content-Security-Policy"]
    assert 'src="https://t.test/p.gif"' in await resp.text()

    assert (await client.get(f"/api/v1/messages/{email.uuid}/html?remote=2")).status == 400
    assert (await client.get("/api/v1/messages/nope/html")).status == 404
    text_only = make_email("text only")
    await store.add(text_only)
    resp = await client.get(f"/api/v1/messages/{text_only.uuid}/html")
    assert resp.status == 404 and (await resp.json())["error"] == "message has no HTML body"
