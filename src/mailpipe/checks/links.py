"""The link check: every http(s) URL an email links to or loads, and what its server answers.

`extract()` is pure: the HTML's links (htmlview.links), then what the HTML loads (src,
srcset, background, poster, stylesheets, CSS url()), then the text body's URLs; each URL once,
only http and https. `check()` does the requests: HEAD, then GET when HEAD is refused (405,
501), never reading a body; at most `concurrency` at a time, each link bounded by `timeout`
(redirects included), no cookies kept. Redirects are followed only when asked (Mailpit's
`follow=true`), at most `max_redirects` of them, and only to http(s) URLs: a redirect to
ftp:, javascript: or any other scheme is reported, never followed.

The answer is Mailpit's LinkCheckResponse: {"Errors": n, "Links": [{URL, StatusCode,
Status}]}; StatusCode 0 when no HTTP answer came (Status says why); Errors counts the links
with a status of 400 or more, or 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urljoin

import aiohttp

from mailpipe.checks.scan import Document, scan
from mailpipe.web.htmlview import _CSS_URL, _srcset_candidates, links, scheme_of

CHECKED_SCHEMES = frozenset({"http", "https"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
REFUSED_HEAD = frozenset({405, 501})
USER_AGENT = "mailpipe-link-check"
# Attributes that load what they name.
_LOADED = ("src", "background", "poster", "lowsrc")


@dataclass(frozen=True)
class LinkLimits:
    timeout: float = 10.0  # seconds per link, redirects included
    concurrency: int = 5
    max_links: int = 200  # past these, links are listed as not checked
    max_redirects: int = 10


# ---- which URLs ------------------------------------------------------------------------------


def extract(html: str | None, text: str | None) -> list[str]:
    found = links(html, text)
    ordered = [link["url"] for link in found if link["source"] == "html"]
    if html:
        ordered += _loaded(scan(html))
    ordered += [link["url"] for link in found if link["source"] == "text"]
    unique = dict.fromkeys(url.strip() for url in ordered if scheme_of(url) in CHECKED_SCHEMES)
    return list(unique)


def _loaded(doc: Document) -> list[str]:
    urls = []
    for el in doc.elements:
        urls += [el.attrs[name] for name in _LOADED if el.attrs.get(name)]
        urls += [url for url, _ in _srcset_candidates(el.attrs.get("srcset", ""))]
        rel = el.attrs.get("rel", "").lower().split()
        if el.tag == "link" and "stylesheet" in rel and el.attrs.get("href"):
            urls.append(el.attrs["href"])
    for css, _ in doc.inline_styles + doc.sheets:
        urls += [next(g for g in m.groups() if g is not None) for m in _CSS_URL.finditer(css)]
    return urls


# ---- checking them ---------------------------------------------------------------------------


async def link_check(html: str | None, text: str | None, *, follow: bool = False,
                     limits: LinkLimits = LinkLimits()) -> dict[str, Any]:
    """The whole check of an email's bodies, in Mailpit's LinkCheckResponse shape (what the
    Mailpit-compatible API answers)."""
    urls = await asyncio.to_thread(extract, html, text)  # parsing a large body is CPU work
    return await check(urls, follow=follow, limits=limits)


async def check(urls: Iterable[str], *, follow: bool = False,
                limits: LinkLimits = LinkLimits()) -> dict[str, Any]:
    urls = list(urls)
    checked, skipped = urls[: limits.max_links], urls[limits.max_links:]
    gate = asyncio.Semaphore(limits.concurrency)
    connector = aiohttp.TCPConnector(limit=limits.concurrency)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                     headers={"User-Agent": USER_AGENT}) as session:

        async def one(url: str) -> dict[str, Any]:
            async with gate:
                code, status = await _bounded(session, url, follow, limits)
            return {"URL": url, "StatusCode": code, "Status": status}

        results = list(await asyncio.gather(*(one(url) for url in checked)))
    results += [{"URL": url, "StatusCode": 0,
                 "Status": f"not checked: more than {limits.max_links} links"} for url in skipped]
    errors = sum(1 for r in results if r["StatusCode"] == 0 or r["StatusCode"] >= 400)
    return {"Errors": errors, "Links": results}


async def _bounded(session: aiohttp.ClientSession, url: str, follow: bool,
                   limits: LinkLimits) -> tuple[int, str]:
    try:
        async with asyncio.timeout(limits.timeout):
            return await _status(session, url, follow, limits.max_redirects)
    except TimeoutError:
        return 0, f"timed out after {limits.timeout:g} s"
    except aiohttp.InvalidURL:
        return 0, "invalid URL"
    except aiohttp.ClientConnectorError as exc:
        return 0, f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    except (aiohttp.ClientError, ValueError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"[:200]


async def _status(session: aiohttp.ClientSession, url: str, follow: bool,
                  max_redirects: int) -> tuple[int, str]:
    current = url
    for _ in range(max_redirects + 1):
        code, location = await _answer(session, current)
        if not (follow and code in REDIRECTS and location):
            return code, _phrase(code)
        target = urljoin(current, location)
        scheme = scheme_of(target)
        if scheme not in CHECKED_SCHEMES:
            return code, f"{_phrase(code)}: redirect to a {scheme or 'relative'}: URL not followed"
        current = target
    return 0, f"too many redirects (more than {max_redirects})"


async def _answer(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    """The status and Location of HEAD `url`, or of GET when HEAD is refused."""
    code, location = await _request(session, "HEAD", url)
    if code in REFUSED_HEAD:
        code, location = await _request(session, "GET", url)
    return code, location


async def _request(session: aiohttp.ClientSession, method: str, url: str
                   ) -> tuple[int, str | None]:
    # The body is never read: leaving the block closes the connection.
    async with session.request(method, url, allow_redirects=False) as response:
        return response.status, response.headers.get("Location")


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""
