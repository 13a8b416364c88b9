"""Captured HTML made safe to show, and what end-to-end tests read out of an email. Sans-I/O.

- `rewrite()`: the HTML body for a sandboxed iframe. The sandbox and the CSP (web/inbox.py)
  already stop scripts and remote loads; rewriting is the second wall and what makes the view
  useful: scripts, event handlers, frames and `javascript:` URLs are dropped, `cid:` images
  point at the message's attachments, remote images are blocked (and counted) unless allowed,
  and links open in a new tab without a handle on the opener.
- `links()`, `codes()`, `html_text()`: links and one-time codes for tests of sign-up flows.

Everything is parsed by the stdlib's html.parser, the way a browser tokenizes, and written back
with every attribute value and text escaped: no markup is ever cut out by regex. CSS values are
the exception (`url(...)` in style attributes and <style>), rewritten by a regex over CSS.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html import escape
from html.parser import HTMLParser
from urllib.parse import unquote

BASE = '<base target="_blank">'
# Dropped with everything inside them.
DROPPED_WITH_CONTENT = frozenset({"script", "template", "noembed", "noframes"})
# Dropped themselves; what they hold (fallback content) stays.
DROPPED_TAGS = frozenset({
    "iframe", "frame", "frameset", "object", "embed", "applet", "base", "meta", "link",
    "portal", "param", "set", "animate",
})
VOID = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
    "source", "track", "wbr",
})
LINK_TAGS = frozenset({"a", "area"})
LINK_SCHEMES = frozenset({"http", "https", "mailto", "tel"})
REMOTE_SCHEMES = frozenset({"http", "https"})
# Attributes that load a resource (a remote one is blocked unless allowed).
RESOURCE_ATTRS = frozenset({"src", "background", "poster", "lowsrc", "dynsrc"})
# Attributes holding a URL that is not loaded but followed or submitted.
NAVIGATION_ATTRS = frozenset({"href", "action", "formaction", "xlink:href", "ping", "cite"})
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):")
# Browsers ignore ASCII tabs and newlines anywhere in a URL and strip control characters and
# spaces around it: "java\tscript:" is javascript:.
_URL_NOISE = re.compile(r"[\x00-\x20\x7f]+")
_CSS_URL = re.compile(r"""url\(\s*(?:"([^"]*)"|'([^']*)'|([^)'"]*))\s*\)""", re.IGNORECASE)
_CSS_IMPORT = re.compile(r"@import\b[^;]*;?", re.IGNORECASE)
_TEXT_LINK = re.compile(r"""(?:https?://|mailto:)[^\s<>"'`]+""", re.IGNORECASE)
_TRAILING = ".,;:!?'\")]}>"
_BLOCKS = frozenset({"p", "div", "br", "li", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5",
                     "h6", "table", "section", "article", "header", "footer", "blockquote"})


def scheme_of(url: str) -> str | None:
    """The URL's scheme as a browser reads it (lowercase), None for a relative URL."""
    match = _SCHEME.match(_URL_NOISE.sub("", url).lower())
    return match.group(1) if match else None


def is_remote(url: str) -> bool:
    cleaned = _URL_NOISE.sub("", url)
    return scheme_of(url) in REMOTE_SCHEMES or cleaned.startswith(("//", "\\\\", "/\\", "\\/"))


# ---- the safe view -------------------------------------------------------------------------


@dataclass
class Rewritten:
    html: str
    blocked_remote: int


def rewrite(source: str, cid_url: Callable[[str], str | None], *, remote: bool) -> Rewritten:
    """`source` made safe for the iframe. `cid_url(content_id)` gives the URL of the attachment
    with that Content-ID (None: no such attachment); `remote` lets http(s) images load."""
    writer = _SafeWriter(cid_url, remote)
    writer.feed(source)
    writer.close()
    return Rewritten(writer.result(), writer.blocked)


class _SafeWriter(HTMLParser):
    def __init__(self, cid_url: Callable[[str], str | None], remote: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.cid_url = cid_url
        self.remote = remote
        self.blocked = 0
        self.out: list[str] = []
        self.skipping: str | None = None  # inside a DROPPED_WITH_CONTENT element
        self.in_style = False
        self.based = False

    def result(self) -> str:
        self._base()
        return "".join(self.out)

    def _base(self) -> None:
        # After a doctype (a base before it would put the page in quirks mode), before all else.
        if not self.based:
            self.based = True
            self.out.append(BASE)

    def handle_decl(self, decl: str) -> None:
        if not self.based and decl.lower().startswith("doctype"):
            self.out.append("<!DOCTYPE html>")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, self_closing=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, self_closing=True)

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], *, self_closing: bool) -> None:
        if self.skipping is not None or not _TAG_NAME.match(tag):
            return
        if tag in DROPPED_WITH_CONTENT:
            if not self_closing and tag not in VOID:
                self.skipping = tag
            return
        self._base()
        if tag in DROPPED_TAGS:
            return
        kept = self._attributes(tag, attrs)
        if tag in LINK_TAGS:
            kept = [(n, v) for n, v in kept if n not in ("target", "rel")]
            kept += [("target", "_blank"), ("rel", "noopener noreferrer")]
        text = "".join(f' {name}="{escape(value, quote=True)}"' for name, value in kept)
        self.out.append(f"<{tag}{text}>")
        if tag == "style" and not self_closing:
            self.in_style = True

    def _attributes(
        self, tag: str, attrs: Iterable[tuple[str, str | None]]
    ) -> list[tuple[str, str]]:
        kept = []
        for name, raw in attrs:
            value = raw or ""
            if name.startswith("on") or not _ATTR_NAME.match(name):
                continue  # event handlers (and names a browser would not read as we do)
            if name in RESOURCE_ATTRS or (name == "href" and tag == "image"):
                value = self._resource(value)
            elif name in ("srcset", "imagesrcset"):
                value = self._srcset(value)
            elif name in NAVIGATION_ATTRS:
                value = value if scheme_of(value) in LINK_SCHEMES or scheme_of(value) is None \
                    else ""
            elif name == "style":
                value = self._css(value)
            if value or raw is None or raw == "":
                kept.append((name, value))
        return kept

    def _resource(self, url: str) -> str:
        """A loaded URL as served: cid: rewritten, remote kept only if allowed, data: images
        kept (the CSP allows them), anything else emptied."""
        scheme = scheme_of(url)
        if scheme == "cid":
            return self.cid_url(unquote(_URL_NOISE.sub("", url)[4:])) or ""
        if is_remote(url):
            if self.remote:
                return url
            self.blocked += 1
            return ""
        if scheme == "data":
            return url if _URL_NOISE.sub("", url).lower().startswith("data:image/") else ""
        return "" if scheme is not None else url

    def _srcset(self, value: str) -> str:
        candidates = []
        for url, descriptor in _srcset_candidates(value):
            if url := self._resource(url):
                candidates.append(f"{url} {descriptor}".strip())
        return ", ".join(candidates)

    def _css(self, css: str) -> str:
        def replace(match: re.Match[str]) -> str:
            url = next(g for g in match.groups() if g is not None)
            safe = self._resource(url)
            return f'url("{safe}")' if safe else "none"

        return _CSS_URL.sub(replace, _CSS_IMPORT.sub("", css))

    def handle_endtag(self, tag: str) -> None:
        if self.skipping is not None:
            if tag == self.skipping:
                self.skipping = None
            return
        if tag in DROPPED_TAGS or tag in DROPPED_WITH_CONTENT or tag in VOID:
            return
        if not _TAG_NAME.match(tag):
            return
        self.in_style = self.in_style and tag != "style"
        self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if self.skipping is not None:
            return
        self._base()
        if self.in_style:
            # Raw text: escaping would break CSS; it cannot hold "</style" (the parser ended
            # the element there), "<" is refused anyway so nothing can be smuggled in.
            self.out.append(self._css(data).replace("<", "\\3c "))
        else:
            self.out.append(escape(data, quote=False))

    # Comments (conditional comments included), processing instructions, CDATA: dropped.
    def handle_comment(self, data: str) -> None:
        return None

    def handle_pi(self, data: str) -> None:
        return None

    def unknown_decl(self, data: str) -> None:
        return None


def _srcset_candidates(value: str) -> list[tuple[str, str]]:
    """(url, descriptor) pairs as the HTML standard splits a srcset: a URL runs to the next
    whitespace (commas inside it, as in data: URLs, belong to it), then descriptors to the
    next comma."""
    found = []
    i, n = 0, len(value)
    while i < n:
        while i < n and (value[i].isspace() or value[i] == ","):
            i += 1
        start = i
        while i < n and not value[i].isspace():
            i += 1
        url = value[start:i]
        descriptor = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            end = value.find(",", i)
            end = n if end < 0 else end
            descriptor, i = value[i:end].strip(), end + 1
        if url:
            found.append((url, descriptor))
    return found


_ATTR_NAME = re.compile(r"^[a-z_:][a-z0-9_:.-]*$")
# Elements with other names (a browser would read "a\"x" as one odd name, we drop it) go.
_TAG_NAME = re.compile(r"^[a-z][a-z0-9-]*(?::[a-z][a-z0-9-]*)?$")


# ---- links, codes and text -----------------------------------------------------------------


class _LinkCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []  # (url, text)
        self.open: list[tuple[int, list[str]]] = []  # per <a> being read: its link, its text

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = next((v for n, v in attrs if n == "href" and v), None)
        if tag in LINK_TAGS and href is not None:
            self.links.append((href.strip(), ""))
            if tag == "a":
                self.open.append((len(self.links) - 1, []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self.open:
            index, texts = self.open.pop()
            self.links[index] = (self.links[index][0], " ".join("".join(texts).split()))

    def handle_data(self, data: str) -> None:
        for _, texts in self.open:
            texts.append(data)


def links(html: str | None, text: str | None) -> list[dict[str, str]]:
    """Every http, https and mailto link: the HTML's hrefs in order, then the text body's
    URLs; each URL once, first place wins."""
    found: list[dict[str, str]] = []
    seen: set[str] = set()

    def add(url: str, label: str, source: str) -> None:
        if scheme_of(url) in ("http", "https", "mailto") and url not in seen:
            seen.add(url)
            found.append({"url": url, "text": label, "source": source})

    if html:
        collector = _LinkCollector()
        collector.feed(html)
        collector.close()
        for url, label in collector.links:
            add(url, label, "html")
    for match in _TEXT_LINK.finditer(text or ""):
        url = match.group(0).rstrip(_TRAILING)
        add(url, url, "text")
    return found


class _TextCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head", "title"):
            self.hidden += 1
        elif tag in _BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head", "title"):
            self.hidden = max(0, self.hidden - 1)
        elif tag in _BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def html_text(html: str) -> str:
    """The text a reader sees in `html`: one line per block, spaces collapsed."""
    collector = _TextCollector()
    collector.feed(html)
    collector.close()
    lines = ("".join(collector.parts)).split("\n")
    return "\n".join(" ".join(line.split()) for line in lines if line.strip())


def codes(pattern: re.Pattern[str], text: str | None, html: str | None) -> list[str]:
    """Matches of `pattern` (its first group when it has one) in the text body, or in the
    HTML's text when there is no text body; each once, in order."""
    body = text if text else html_text(html or "")
    found: dict[str, None] = {}
    for match in pattern.finditer(body):
        found.setdefault(match.group(1) if pattern.groups else match.group(0), None)
    return list(found)
