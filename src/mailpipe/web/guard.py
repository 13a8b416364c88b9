"""Browser safety: which requests a web page may make of the API.

Sans-I/O: a request's method, scheme and headers in, a `Refusal` (or None) out; the aiohttp
middleware in web/app.py only applies the verdict. Two attacks are closed here:

- Cross-site requests. Any page can send a "simple" POST or a no-cors fetch (text/plain, a
  form) to 127.0.0.1:8025 without a CORS preflight, so a state-changing request must come from
  no browser page at all (no Origin, no Referer: the CLI, curl, scripts) or from the API's own
  origin; and a body must be JSON, which no page can send cross-origin without a preflight
  (or typeless, from a client that carries none of a browser's marks).
- DNS rebinding. A page on evil.example re-resolves its name to 127.0.0.1 and is then
  same-origin with the API, so the browser lets it read and write. It can only do that under
  its own DNS name, which arrives in the Host header: only names we know are ours are served.
  An IP-literal Host cannot be rebound, which is why a wildcard bind accepts any IP literal.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
ANY_HOST = "*"
DEFAULT_PORTS = {"http": 80, "https": 443}
# host[:port] as a browser sends it: a name or IPv4 literal, or a bracketed IPv6 literal.
_AUTHORITY = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\[\]:/@?#\s]+)(?::(\d{1,5}))?$")
# Headers only a browser sends with a request: with none of them, no page sent it.
BROWSER_MARKS = ("Origin", "Referer", "Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest")
_JSON_TYPE = re.compile(r"^application/(?:[a-z0-9!#$&^_.-]+\+)?json$")


@dataclass(frozen=True)
class Refusal:
    """Why a request is not served: answered as {"error": reason} with `status`."""

    status: int
    reason: str


def normalize_host(host: str) -> str:
    """A host name or IP literal as compared here: lowercase, no brackets, no trailing dot."""
    return host.strip().lower().strip("[]").rstrip(".")


def parse_authority(text: str) -> tuple[str, int | None] | None:
    """`host[:port]` from a Host header, normalized; None when it is not one."""
    match = _AUTHORITY.match(text.strip())
    if match is None:
        return None
    port = match.group(2)
    return normalize_host(match.group(1)), int(port) if port is not None else None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class BrowserGuard:
    """The Host check, the same-origin check on writes and the JSON body check."""

    def __init__(self, bind_host: str | None = None, allowed_hosts: Iterable[str] = ()) -> None:
        allowed = {normalize_host(name) for name in allowed_hosts}
        self.any_host = ANY_HOST in allowed
        bind = normalize_host(bind_host) if bind_host is not None else "127.0.0.1"
        self.any_ip = bind in WILDCARD_BINDS
        self.hosts = frozenset(LOOPBACK_NAMES | allowed | ({bind} - WILDCARD_BINDS))

    def check(self, method: str, scheme: str, headers: Mapping[str, str]) -> Refusal | None:
        """The first reason to refuse this request, or None to serve it."""
        return (
            self.host_refusal(headers.get("Host"))
            or origin_refusal(method, scheme, headers)
            or content_type_refusal(method, headers)
        )

    def host_refusal(self, host_header: str | None) -> Refusal | None:
        if self.any_host or host_header is None:  # no Host: HTTP/1.0, never a browser
            return None
        authority = parse_authority(host_header)
        if authority is not None and self.allows(authority[0]):
            return None
        return Refusal(
            403,
            f"Host {host_header!r} is not allowed (DNS rebinding protection): "
            "list the names you reach mailpipe by in http.allowed_hosts",
        )

    def allows(self, host: str) -> bool:
        return host in self.hosts or (self.any_ip and is_ip_literal(host))


def origin_refusal(method: str, scheme: str, headers: Mapping[str, str]) -> Refusal | None:
    """A write from a page on another origin; reads are left to the browser's same-origin
    policy (the API sends no CORS headers, so another origin cannot read the answer)."""
    if method.upper() in SAFE_METHODS:
        return None
    origin = headers.get("Origin")
    source = origin if origin is not None else headers.get("Referer")
    if source is None:  # not sent by a web page: the CLI, curl, a script
        return None
    own = own_origin(scheme, headers.get("Host"))
    if own is not None and page_origin(source) == own:
        return None
    header = "Origin" if origin is not None else "Referer"
    return Refusal(403, f"cross-origin request refused: {header} {source!r} is not this API's "
                        "origin (requests without Origin and Referer, like the CLI's, are served)")


def content_type_refusal(method: str, headers: Mapping[str, str]) -> Refusal | None:
    """A POST/PUT/PATCH body must be JSON: forms and text/plain are what pages send freely.
    A body with no Content-Type at all is served when nothing marks a browser: some clients
    send their JSON so (npm's `mailhog`), while a browser's POST always carries Origin (the
    Fetch standard; "null" when hidden) and, today, Sec-Fetch-* headers."""
    if method.upper() not in BODY_METHODS or not has_body(headers):
        return None
    media_type = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if _JSON_TYPE.match(media_type):
        return None
    if "Content-Type" not in headers and not any(name in headers for name in BROWSER_MARKS):
        return None
    given = repr(media_type) if media_type else "no Content-Type"
    return Refusal(415, f"a {method.upper()} body must be application/json, not {given}")


def has_body(headers: Mapping[str, str]) -> bool:
    length = (headers.get("Content-Length") or "").strip()
    return "Transfer-Encoding" in headers or (length != "" and length != "0")


def own_origin(scheme: str, host_header: str | None) -> tuple[str, str, int] | None:
    """scheme, host, port the request came to (the Host header, checked before this)."""
    authority = parse_authority(host_header) if host_header is not None else None
    if authority is None:
        return None
    return _origin(scheme, *authority)


def page_origin(url: str) -> tuple[str, str, int] | None:
    """scheme, host, port of an Origin or Referer value; None for "null" or garbage."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.scheme.lower() not in DEFAULT_PORTS:
        return None
    return _origin(parts.scheme, normalize_host(parts.hostname), port)


def _origin(scheme: str, host: str, port: int | None) -> tuple[str, str, int]:
    """An origin as compared: an absent port is the scheme's default (http://h is h:80)."""
    scheme = scheme.lower()
    return scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme, 0)
