"""Tags in the web inbox, in a real browser (Debian's chromium through Playwright, as
tests/test_web_ui.py drives it) against a real `mailpipe serve` fed over real SMTP: chips on
the rows and in the open email, a click searches `tag:NAME`, the open email's tags are added
and removed from the page, and a change made elsewhere shows up live."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from conftest import MailpipeServer

# The browser fixtures of the inbox's own browser tests, shared.
from test_web_ui import Page, browser, email, open_page, send, wait_until  # noqa: F401


@pytest.fixture
def server(mailpipe_factory: Callable[..., MailpipeServer]) -> MailpipeServer:
    return mailpipe_factory({
        "tags": {"filters": [{"match": "subject:invoice", "tags": ["billing"]}]},
        "plugins": {"plugins": ["header_stamp"],
                    "plugin_config": {"header_stamp": {"tags": ["ci"]}}},
    })


def put_tags(server: MailpipeServer, uuid: str, tags: list[str]) -> Any:
    import urllib.request

    request = urllib.request.Request(
        f"{server.api}/api/v1/messages/{uuid}/tags", method="PUT",
        data=json.dumps({"tags": tags}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def tags_of(server: MailpipeServer, subject: str) -> list[str]:
    [found] = [m for m in server.messages(limit=100) if m["subject"] == subject]
    return found["tags"]


def test_tags_on_rows_search_and_edit(
        server: MailpipeServer, open_page: Callable[..., Page]) -> None:  # noqa: F811
    send(server, email("Invoice 42", to="alice+signup@example.org"))
    send(server, email("Hello", to="bob@example.org"))
    tab = open_page(server)
    page = tab.open()
    tab.wait_rows(2)
    assert tab.row("Invoice 42").locator(".row-tags .tag").all_inner_texts() == [
        "ci", "signup", "billing"]
    assert tab.row("Hello").locator(".row-tags .tag").all_inner_texts() == ["ci"]

    # A row's tag searches for it, without opening the email.
    tab.row("Invoice 42").locator(".row-tags .tag", has_text="signup").click()
    page.wait_for_function("() => document.getElementById('list').dataset.query === 'tag:signup'")
    assert page.input_value("#search") == "tag:signup"
    assert tab.rows().locator(".subject").all_inner_texts() == ["Invoice 42"]
    assert page.locator("#detail").is_hidden()

    # Back to everything; open "Hello" and edit its tags.
    page.fill("#search", "")
    page.wait_for_function("() => document.getElementById('list').dataset.query === ''")
    tab.open_email("Hello")
    editor = page.locator(".email-head .tag-editor")
    assert editor.locator(".tag").all_inner_texts() == ["ci"]
    editor.locator(".tag-input").fill("Urgent")
    editor.locator(".tag-input").press("Enter")
    editor.locator(".tag", has_text="Urgent").wait_for()
    wait_until(lambda: tags_of(server, "Hello") == ["ci", "Urgent"])
    # Another spelling of a tag it has is not added twice.
    editor.locator(".tag-input").fill("urgent")
    editor.locator(".tag-input").press("Enter")
    editor.locator(".tag-remove[aria-label='Remove tag ci']").click()
    wait_until(lambda: tags_of(server, "Hello") == ["Urgent"])
    assert editor.locator(".tag").all_inner_texts() == ["Urgent"]
    # The list follows (the change feed's `tags` event reloads it).
    tab.row("Hello").locator(".row-tags .tag", has_text="Urgent").wait_for()

    # Changed elsewhere (the API), shown live in the open email; names are text, not markup.
    uuid = page.locator("article.email").get_attribute("data-uuid")
    assert uuid is not None
    put_tags(server, uuid, ["<b>bold</b>", "two words"])
    editor.locator(".tag", has_text="two words").wait_for()
    assert editor.locator(".tag").all_inner_texts() == ["<b>bold</b>", "two words"]
    assert page.locator(".tag-editor b").count() == 0

    # The open email's tag searches too (quoted when it holds a space).
    editor.locator(".tag-name", has_text="two words").click()
    page.wait_for_function(
        "() => document.getElementById('list').dataset.query === 'tag:\"two words\"'")
    assert tab.rows().locator(".subject").all_inner_texts() == ["Hello"]
