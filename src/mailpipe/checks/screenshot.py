"""A PNG of an email's HTML as a browser renders it: headless Chromium through Playwright.

What is rendered is the HTML view's safe rewrite (web/htmlview.py: no scripts, no frames, no
remote images) with the email's own cid: images inlined as data: URLs; the page also runs
without JavaScript, in an offline context whose every request is aborted, so rendering an
email never reaches the network. Each screenshot is bounded in time (`timeout`, browser start
included) and height (`max_height` pixels), and a few run at a time.

Playwright is optional (`pip install 'mailpipe[screenshots]'`), Chromium too: without them
`ScreenshotUnavailable` says what is missing and the route answers 503.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEBIAN_CHROMIUM = "/usr/bin/chromium"
VIEWPORT_HEIGHT = 800
# No sandbox: Chromium refuses to start with one as root (containers); the page has no
# JavaScript and no network, which is the wall here.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-extensions"]
MAX_INLINE_IMAGE = 5 * 1024 * 1024  # bytes of one cid: image inlined as a data: URL


class ScreenshotUnavailable(Exception):
    """Playwright or Chromium is not installed (or Chromium does not start)."""


@dataclass(frozen=True)
class ScreenshotLimits:
    chromium: str | None = None
    timeout: float = 20.0
    max_height: int = 4000


async def screenshot(html: str, width: int, limits: ScreenshotLimits = ScreenshotLimits()
                     ) -> bytes:
    """A PNG `width` pixels wide of `html` (already made safe), at most max_height high."""
    try:
        from playwright.async_api import Error as PlaywrightError
        from playwright.async_api import async_playwright
    except ImportError:
        raise ScreenshotUnavailable(
            "screenshots need Playwright: pip install 'mailpipe[screenshots]'") from None
    executable = chromium_path(limits.chromium)
    async with asyncio.timeout(limits.timeout), async_playwright() as playwright:
        try:
            browser = await playwright.chromium.launch(
                executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        except PlaywrightError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no reason given"
            raise ScreenshotUnavailable(f"Chromium did not start: {first}") from None
        try:
            return await _render(browser, html, width, limits.max_height)
        finally:
            await browser.close()


async def _render(browser: Any, html: str, width: int, max_height: int) -> bytes:
    context = await browser.new_context(
        viewport={"width": width, "height": VIEWPORT_HEIGHT}, java_script_enabled=False,
        offline=True, device_scale_factor=1)
    page = await context.new_page()
    await page.route("**/*", lambda route: route.abort())
    await page.set_content(html, wait_until="load")
    height = await page.evaluate("document.documentElement.scrollHeight")
    clip = {"x": 0, "y": 0, "width": width,
            "height": max(1, min(int(height or VIEWPORT_HEIGHT), max_height))}
    return await page.screenshot(type="png", full_page=True, clip=clip, animations="disabled")


def chromium_path(configured: str | None) -> str | None:
    """The browser to launch: the configured one, else Debian's chromium, else (None)
    Playwright's own download, if `playwright install chromium` was run."""
    if configured:
        found = shutil.which(configured) or (configured if Path(configured).is_file() else None)
        if found is None:
            raise ScreenshotUnavailable(f"checks.screenshot.chromium: {configured} not found")
        return found
    if Path(DEBIAN_CHROMIUM).is_file():
        return DEBIAN_CHROMIUM
    return None


def data_url_images(attachments: list[tuple[bytes, str]]) -> Callable[[int], str | None]:
    """For the safe rewrite's cid: images: attachment index -> a data: URL of it, when it is
    an image small enough (anything else stays out of the render)."""

    def url(index: int) -> str | None:
        if index >= len(attachments):
            return None
        payload, content_type = attachments[index]
        if not content_type.startswith("image/") or len(payload) > MAX_INLINE_IMAGE:
            return None
        return f"data:{content_type};base64,{base64.b64encode(payload).decode()}"

    return url
