"""Web API benchmark: the inbox routes with a full store (50,000 emails by default).

    python benchmarks/web.py [--emails 50000] [--requests 50] [--db PATH] [--json FILE]

Fills a fresh store through its own write path (SQLiteStore.add, many at a time so they share
commits), serves it with the real API app on a local port, then times sequential requests
(one at a time, as a page makes them) and prints p50/p95 per scenario:

- list: `GET /api/v1/messages` (first page of 50, with the total and unread counts);
- search words / from: / is:unread: `GET /api/v1/messages?q=...` (first page and total);
- read one: `GET /api/v1/messages/{uuid}` for messages spread over the store;
- page: the web inbox in Debian's chromium (Playwright), from navigation to the first list
  rows visible, each load in a fresh browser context (nothing cached); `--no-page` skips it.

Aims (issue 12): list under 50 ms, search under 200 ms, page usable under 1 s.
`filled_api()`: an API over a filled store, as an async context manager.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from mailpipe.event import CapturedEmail, new_uuid
from mailpipe.metrics import Metrics
from mailpipe.store.sqlite import SQLiteStore
from mailpipe.web.app import create_app, start_http, stop_http

WORDS = [
    "account", "invoice", "order", "shipped", "receipt", "password", "reset", "welcome",
    "verify", "newsletter", "weekly", "report", "meeting", "update", "delivery", "payment",
    "confirm", "team", "project", "release", "notes", "security", "alert", "login", "device",
    "profile", "settings", "trial", "upgrade", "plan", "billing", "customer", "support",
]
SENDERS = [f"{name}@{domain}" for name in ("noreply", "billing", "alerts", "team", "news")
           for domain in ("shop.test", "bank.test", "app.test", "social.test")]
CHUNK = 2000  # emails queued at once while filling: they share the writer's commits


def synthetic_email(i: int, rng: random.Random, start: datetime) -> CapturedEmail:
    """Email number `i`: a few KB of text (half with an HTML part), like an app's mail."""
    sender = rng.choice(SENDERS)
    to = f"user{i % 997}@example.test"
    subject = " ".join(rng.choices(WORDS, k=5)).capitalize() + f" #{i}"
    text = "\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(12))
    html = f"<html><body><p>{text.replace(chr(10), '</p><p>')}</p></body></html>" \
        if i % 2 else None
    raw = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{text}\r\n").encode()
    received = (start + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
    event: dict[str, Any] = {
        "event": "EMAIL_RECEIVED",
        "uuid": new_uuid(),
        "remote_addr": "127.0.0.1:50000",
        "received_at": received,
        "envelope": {"from": sender, "to": [to], "helo": "bench.test"},
        "authentication": {"attempted": False, "mechanism": None, "username": None,
                           "password": None},
        "message": {"headers": {"From": sender, "To": to, "Subject": subject},
                    "body": text, "text": text, "html": html, "subject": subject,
                    "size": len(raw)},
        "attachments": [{"filename": "r.pdf", "content_type": "application/pdf", "size": 3}]
        if i % 10 == 0 else [],
    }
    return CapturedEmail(event=event, raw=raw)


async def fill_store(path: Path, emails: int, *, seed: int = 12) -> SQLiteStore:
    """A started store at `path` holding `emails` synthetic emails (retention off)."""
    store = SQLiteStore(path, max_messages=max(emails, 1), synchronous="OFF", batch_max=4096)
    await store.start()
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(seconds=emails)
    for first in range(0, emails, CHUNK):
        batch = [synthetic_email(i, rng, start) for i in range(first, min(first + CHUNK, emails))]
        await asyncio.gather(*(store.add(email) for email in batch))
    return store


@contextlib.asynccontextmanager
async def filled_api(emails: int = 50_000, db: Path | None = None) -> AsyncIterator[str]:
    """The API over a store of `emails` emails on a free local port; yields its base URL.
    With `db`, an existing store there is reused when it already holds that many."""
    with tempfile.TemporaryDirectory(prefix="mailpipe-web-bench-") as tmp:
        path = db or Path(tmp) / "store.db"
        store = SQLiteStore(path, max_messages=max(emails, 1))
        await store.start()
        if await store.count() != emails:
            await store.clear()
            await store.close()
            store = await fill_store(path, emails)
        runner = await start_http(create_app(store, Metrics()), "127.0.0.1", 0)
        try:
            host, port = runner.addresses[0][:2]
            yield f"http://{host}:{port}"
        finally:
            await stop_http(runner)
            await store.close()


async def time_requests(session: aiohttp.ClientSession, urls: list[str]) -> list[float]:
    """Milliseconds per request, one after another; every answer must be 200."""
    timings = []
    for url in urls:
        start = time.perf_counter()
        async with session.get(url) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url}: HTTP {resp.status}")
        timings.append((time.perf_counter() - start) * 1000)
    return timings


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


async def time_page_loads(base: str, loads: int) -> list[float]:
    """Milliseconds from navigating to `base`/ until the first list row is visible."""
    from playwright.async_api import async_playwright

    timings = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        for _ in range(loads + 1):  # the first warms the browser and the page's files
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            page = await context.new_page()
            start = time.perf_counter()
            await page.goto(f"{base}/", wait_until="commit")
            await page.locator("#list .row").first.wait_for(state="visible")
            timings.append((time.perf_counter() - start) * 1000)
            await context.close()
        await browser.close()
    return timings[1:]


def summary_row(name: str, timings: list[float]) -> dict[str, Any]:
    return {"scenario": name, "requests": len(timings),
            "p50_ms": percentile(timings, 50), "p95_ms": percentile(timings, 95),
            "max_ms": max(timings), "mean_ms": statistics.fmean(timings)}


async def run(
    emails: int, requests: int, db: Path | None, page_loads: int = 0
) -> list[dict[str, Any]]:
    fill_start = time.perf_counter()
    async with filled_api(emails, db) as base, aiohttp.ClientSession() as session:
        print(f"store ready with {emails} emails in {time.perf_counter() - fill_start:.1f} s",
              file=sys.stderr)
        api = f"{base}/api/v1/messages"
        async with session.get(f"{api}?limit=1000") as resp:
            uuids = [m["uuid"] for m in (await resp.json())["messages"]]
        scenarios = {
            "list (first page)": [api] * requests,
            "search: 2 words": [f"{api}?q=invoice+shipped"] * requests,
            "search: phrase": [f"{api}?q=%22password+reset%22"] * requests,
            "search: from:": [f"{api}?q=from:billing@bank"] * requests,
            "search: is:unread": [f"{api}?q=is:unread"] * requests,
            "read one": [f"{api}/{uuids[i % len(uuids)]}" for i in range(requests)],
        }
        await time_requests(session, [api] * 3)  # warm the page cache and connections
        rows = []
        for name, urls in scenarios.items():
            rows.append(summary_row(name, await time_requests(session, urls)))
        if page_loads:
            rows.append(summary_row("page: first rows", await time_page_loads(base, page_loads)))
    return rows


def print_table(rows: list[dict[str, Any]], emails: int) -> None:
    print(f"\nmailpipe web API, {emails} stored emails, sequential requests")
    print(f"{'scenario':<20} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for row in rows:
        print(f"{row['scenario']:<20} {row['requests']:>4} {row['p50_ms']:>8.1f} "
              f"{row['p95_ms']:>8.1f} {row['max_ms']:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--db", type=Path, help="keep the filled store here, reuse it next run")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--page-loads", type=int, default=10,
                        help="page loads timed in chromium (0 or --no-page: none)")
    parser.add_argument("--no-page", action="store_const", const=0, dest="page_loads")
    args = parser.parse_args()
    rows = asyncio.run(run(args.emails, args.requests, args.db, args.page_loads))
    print_table(rows, args.emails)
    if args.json:
        args.json.write_text(json.dumps({"emails": args.emails, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
