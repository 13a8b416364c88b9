"""The HTML compatibility check (issue 15), through the front door: emails with known
features sent over real SMTP (smtplib, swaks), the check read from a real `mailpipe serve`
over HTTP, each feature found on the lines where the email uses it, scored from caniemail's
data as Mailpit scores it, in Mailpit's html-check shape."""

from __future__ import annotations

import json
import smtplib
import subprocess
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MailpipeServer, require_tool

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "src" / "mailpipe" / "checks" / "data" / "caniemail.json"

# Line numbers matter: each feature below is asserted on the line it is written on.
NEWSLETTER = """<!DOCTYPE html>
<html lang="en">
<head>
<style>
/* brand colours */
.card > p, h1:hover { color: rgb(10, 20, 30); display: flex; }
@media (prefers-color-scheme: dark) {
  .card.dark { background-color: #000 !important; width: 20rem; }
}
</style>
</head>
<body>
<div class="card" style="display: grid; margin-inline-start: 4px; border-radius: 8px">
<p>Hello</p>
<img src="https://cdn.example.com/logo.webp" alt="logo" width="40">
<svg width="10" height="10"></svg>
<form action="https://example.com/subscribe"><input type="checkbox" name="ok"></form>
<!-- tracking pixel below -->
<img src="https://cdn.example.com/pixel.gif" alt="">
</div>
</body>
</html>
"""
EXPECTED_LINES = {
    "html-doctype": [1],
    "html-lang": [2],
    "html-style": [4],
    "css-comments": [5],
    "css-selector-child": [6],
    "css-selector-grouping": [6],
    "css-pseudo-class-hover": [6],
    "css-rgb": [6],
    "css-display-flex": [6],
    "css-at-media": [7],
    "css-at-media-prefers-color-scheme": [7],
    "css-selector-chaining": [8],
    "css-important": [8],
    "css-unit-rem": [8],
    "css-background-color": [8],
    "html-body": [12],
    "css-display-grid": [13],
    "css-display": [6, 13],
    "css-margin-inline-start-end": [13],
    "css-border-radius": [13],
    "html-div": [13],
    "html-p": [14],
    "image-webp": [15],
    "image-gif": [19],
    "html-img": [15, 19],
    "html-width": [15, 16],
    "html-svg": [16],
    "html-form": [17],
    "html-input-checkbox": [17],
    "html-comments": [18],
}
# Mailpit's swagger: HTMLCheckResponse, HTMLCheckWarning, HTMLCheckResult, HTMLCheckScore,
# HTMLCheckTotal.
MAILPIT_RESPONSE = {"Platforms", "Total", "Warnings"}
MAILPIT_TOTAL = {"Nodes", "Partial", "Supported", "Tests", "Unsupported"}
MAILPIT_WARNING = {"Category", "Description", "Keywords", "NotesByNumber", "Results", "Score",
                   "Slug", "Tags", "Title", "URL"}
MAILPIT_RESULT = {"Family", "Name", "NoteNumber", "Platform", "Support", "Version"}
MAILPIT_SCORE = {"Found", "Partial", "Supported", "Unsupported"}


def send_html(server: MailpipeServer, html: str, subject: str = "Newsletter") -> str:
    message = EmailMessage()
    message["From"] = "news@example.com"
    message["To"] = "reader@example.org"
    message["Subject"] = subject
    message.set_content("Read this in HTML.")
    message.add_alternative(html, subtype="html")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        smtp.send_message(message)
    return str(server.wait_for_messages(1)[0]["uuid"])


@pytest.fixture
def server(mailpipe_factory: Callable[..., MailpipeServer]) -> MailpipeServer:
    return mailpipe_factory()


def html_check(server: MailpipeServer, uuid: str) -> dict[str, Any]:
    return server.get_json(f"/api/v1/messages/{uuid}/html-check")


def test_features_found_on_their_lines(server: MailpipeServer) -> None:
    uuid = send_html(server, NEWSLETTER)
    result = html_check(server, uuid)
    by_slug = {w["Slug"]: w for w in result["Warnings"]}
    for slug, lines in EXPECTED_LINES.items():
        assert slug in by_slug, f"{slug} not found; found {sorted(by_slug)}"
        assert by_slug[slug]["Lines"] == lines, slug
        assert by_slug[slug]["Score"]["Found"] == len(lines), slug
    # Not used by this email: not reported.
    for absent in ("html-video", "css-at-font-face", "html-table", "css-position"):
        assert absent not in by_slug


def test_scores_follow_caniemail_data(server: MailpipeServer) -> None:
    uuid = send_html(server, NEWSLETTER)
    result = html_check(server, uuid)
    table = {f["slug"]: f for f in json.loads(TABLE.read_text())["features"]}
    flex = next(w for w in result["Warnings"] if w["Slug"] == "css-display-flex")
    facts = [value for by_platform in table["css-display-flex"]["support"].values()
             for by_version in by_platform.values() for value in by_version.values()]
    assert len(flex["Results"]) == len(facts)
    assert flex["Score"]["Supported"] == pytest.approx(
        100 * facts.count("y") / len(facts), abs=0.01)
    assert flex["Score"]["Unsupported"] == pytest.approx(
        100 * facts.count("n") / len(facts), abs=0.01)
    assert flex["Title"] == table["css-display-flex"]["title"]
    assert flex["URL"].startswith("https://www.caniemail.com/features/")
    # A partly supported result names its note, and the note is there.
    noted = [r for w in result["Warnings"] for r in w["Results"] if r["NoteNumber"]]
    assert noted
    for warning in result["Warnings"]:
        for r in warning["Results"]:
            if r["NoteNumber"]:
                assert r["NoteNumber"] in warning["NotesByNumber"]
    outlook = [r for r in flex["Results"]
               if r["Family"] == "outlook" and r["Platform"] == "windows"]
    assert outlook and all(r["Support"] == "no" for r in outlook)
    assert outlook[0]["Name"].startswith("Outlook Windows (")

    total = result["Total"]
    # style, body, div, p, img, svg, form, input, img: not html, head nor meta.
    assert total["Nodes"] == 9
    assert total["Tests"] == len(table)
    assert total["Supported"] + total["Partial"] + total["Unsupported"] == pytest.approx(100)
    assert 0 < total["Unsupported"] < 100
    # Worst first: the first warning weighs at least as much as the last.
    first, last = result["Warnings"][0], result["Warnings"][-1]
    weight = lambda w: (w["Score"]["Partial"] + w["Score"]["Unsupported"]) * w["Score"]["Found"]  # noqa: E731
    assert weight(first) >= weight(last)

    families = {f["Family"]: f for f in result["Families"]}
    assert {"gmail", "outlook", "apple-mail"} <= set(families)
    for family in families.values():
        assert family["Supported"] + family["Partial"] + family["Unsupported"] == \
            pytest.approx(100, abs=0.05)
    # Outlook on Windows is known for the worst support: not better than Apple Mail here.
    assert families["outlook"]["Supported"] <= families["apple-mail"]["Supported"]
    assert "ios" in result["Platforms"] and "Gmail" in result["Platforms"]["ios"]


def openapi_check(server: MailpipeServer, instance: Any, name: str) -> None:
    """`instance` against the schema `name` of the API's own OpenAPI document."""
    doc = server.get_json("/api/openapi.json")
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)


def test_mailpit_shape(server: MailpipeServer) -> None:
    """The field names of Mailpit's html-check answer; mailpipe's extras are additions."""
    from mailpipe.checks.html import mailpit_html_check

    uuid = send_html(server, NEWSLETTER)
    ours = html_check(server, uuid)
    openapi_check(server, ours, "HtmlCheck")
    assert set(ours) == MAILPIT_RESPONSE | {"Families"}
    mailpit = mailpit_html_check(server.event(uuid)["message"]["html"])
    assert set(mailpit) == MAILPIT_RESPONSE
    assert set(mailpit["Total"]) == MAILPIT_TOTAL
    assert mailpit["Total"] == ours["Total"]
    assert mailpit["Warnings"]
    for warning in mailpit["Warnings"]:
        assert set(warning) == MAILPIT_WARNING
        assert set(warning["Score"]) == MAILPIT_SCORE
        assert isinstance(warning["Tags"], list)
        for result in warning["Results"]:
            assert set(result) == MAILPIT_RESULT
            assert result["Support"] in ("yes", "no", "partial")
    assert all(isinstance(v, list) for v in mailpit["Platforms"].values())


def test_swaks_html_email(server: MailpipeServer) -> None:
    swaks = require_tool("swaks")
    body = ("<table cellpadding=\"4\">\n<tr><td style=\"position: absolute\">"
            "<video src=\"https://example.com/a.mp4\"></video></td></tr>\n</table>\n")
    subprocess.run(
        [swaks, "--server", f"127.0.0.1:{server.smtp_port}", "--to", "a@example.org",
         "--from", "b@example.com", "--header", "Subject: swaks html",
         "--add-header", "MIME-Version: 1.0",
         "--add-header", "Content-Type: text/html; charset=utf-8", "--body", body],
        check=True, capture_output=True, timeout=30,
    )
    uuid = server.wait_for_messages(1)[0]["uuid"]
    by_slug = {w["Slug"]: w for w in html_check(server, uuid)["Warnings"]}
    assert by_slug["html-table"]["Lines"] == [1]
    assert by_slug["html-cellpadding"]["Lines"] == [1]
    assert by_slug["css-position"]["Lines"] == [2]
    assert by_slug["html-video"]["Lines"] == [2]


def test_no_html_and_unknown_message(server: MailpipeServer) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.com", "b@example.org", "t"
    message.set_content("plain text only")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        smtp.send_message(message)
    uuid = server.wait_for_messages(1)[0]["uuid"]
    status, body, _ = server.request("GET", f"/api/v1/messages/{uuid}/html-check")
    assert status == 404 and json.loads(body) == {"error": "message has no HTML body"}
    status, body, _ = server.request("GET", "/api/v1/messages/nope/html-check")
    assert status == 404 and json.loads(body) == {"error": "message not found"}


def test_hostile_html_is_checked_not_choked_on(server: MailpipeServer) -> None:
    """Broken markup and CSS still give a check: unclosed tags, a <style> never closed, CSS
    that is not CSS, deep nesting."""
    hostile = ("<div><p style='color:;;;: : rgb(' <b>\n" + "<div>" * 2000
               + "</p>\n<style>@media { .a { x: }\n<div>inside the style, as a browser reads it")
    uuid = send_html(server, hostile)
    result = html_check(server, uuid)
    assert result["Total"]["Nodes"] > 2000
    by_slug = {w["Slug"]: w for w in result["Warnings"]}
    assert by_slug["html-div"]["Score"]["Found"] == 2001
    assert by_slug["css-at-media"]["Lines"] == [3]


# Pieces of markup and CSS, shuffled: mostly broken documents.
TOKENS = [*"<>/=\"' \n;:{}()@#.*!-,", "style", "div", "img", "src", "srcset", "a", "href",
          "display", "flex", "px", "rem", "@media", "url(", "rgb(", "calc(", "<!--", "-->",
          "<!DOCTYPE", "svg", "⚡", "\x00", "<style>", "</style>", "a:hover", "--x"]
MARKUP = st.lists(st.sampled_from(TOKENS), max_size=60).map("".join)


@settings(max_examples=200, deadline=None)
@given(MARKUP)
def test_any_input_gives_a_check(html: str) -> None:
    """Whatever a sender writes, the pure check answers in shape (never raises)."""
    from mailpipe.checks.html import html_check

    result = html_check(html)
    total = result["Total"]
    assert total["Supported"] + total["Partial"] + total["Unsupported"] == pytest.approx(100)
    lines = html.count("\n") + 1
    for warning in result["Warnings"]:
        assert warning["Score"]["Found"] == len(warning["Lines"]) > 0
        assert all(1 <= line <= lines for line in warning["Lines"])
