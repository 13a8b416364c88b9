"""`rate_limit`: connections (and, if asked, messages) per client IP per minute.

A sliding window of the last minute per client (IPv6 clients by their /64): a connection
past `max_connections_per_minute` is answered 421 and closed before the greeting
(`on_rate_limit_check`); a MAIL FROM past `max_messages_per_minute` gets 451. Only what was
let in counts, so a client that keeps retrying gets in again as its old connections age out
of the window. Loopback is not exempt unless listed (tests and local apps are limited too).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from pydantic import Field, model_validator

from mailpipe.plugins.builtin._common import (
    CIDR,
    Code,
    Enhanced,
    Section,
    client_ip,
    exempted,
    network_of,
    parse,
    refusal,
    same_class,
)
from mailpipe.plugins.context import HookContext
from mailpipe.plugins.results import HookResult

WINDOW = 60.0


class RateLimitConfig(Section):
    max_connections_per_minute: int = Field(default=60, ge=0)  # 0: not limited
    max_messages_per_minute: int = Field(default=0, ge=0)  # 0: not limited
    exempt: list[CIDR] = Field(default_factory=list)
    ipv6_prefix: int = Field(default=64, ge=1, le=128)
    max_tracked: int = Field(default=100_000, ge=1)  # clients remembered at most
    code: Code = 421
    enhanced: Enhanced = "4.7.0"
    message: str = "Too many connections from your address, try again later"
    messages_code: Code = 451
    messages_enhanced: Enhanced = "4.7.0"
    messages_message: str = "Too many messages from your address, try again later"

    @model_validator(mode="after")
    def _classes(self) -> RateLimitConfig:
        same_class(self.code, self.enhanced)
        same_class(self.messages_code, self.messages_enhanced)
        return self


class Window:
    """Event times per key over the last WINDOW seconds, for at most `max_keys` keys: the
    keys seen least recently are dropped first, those with nothing left in the window
    as soon as they reach the front."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.keys: OrderedDict[str, deque[float]] = OrderedDict()

    def count(self, key: str, now: float) -> int:
        times = self.keys.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - WINDOW:
            times.popleft()
        return len(times)

    def add(self, key: str, now: float) -> None:
        times = self.keys.get(key)
        if times is None:
            times = self.keys[key] = deque()
        times.append(now)
        self.keys.move_to_end(key)
        self._prune(now)

    def _prune(self, now: float) -> None:
        keys = self.keys
        while keys:
            oldest = next(iter(keys))
            if len(keys) <= self.max_keys and keys[oldest][-1] > now - WINDOW:
                return
            del keys[oldest]


class RateLimit:
    def init(self, config: dict) -> None:
        self.config = parse("rate_limit", RateLimitConfig, config)
        self.connections = Window(self.config.max_tracked)
        self.messages = Window(self.config.max_tracked)

    def _key(self, ctx: HookContext) -> str | None:
        """The client's window key; None when exempt."""
        text = ctx.session.remote_ip
        ip = client_ip(text)
        if exempted(ip, self.config.exempt):
            return None
        return network_of(ip, text, 32, self.config.ipv6_prefix)

    def on_rate_limit_check(self, ctx: HookContext) -> HookResult | None:
        c = self.config
        return self._check(ctx, self.connections, c.max_connections_per_minute,
                           (c.code, c.enhanced, c.message))

    def on_mail_from(self, ctx: HookContext) -> HookResult | None:
        c = self.config
        return self._check(ctx, self.messages, c.max_messages_per_minute,
                           (c.messages_code, c.messages_enhanced, c.messages_message))

    def _check(self, ctx: HookContext, window: Window, limit: int,
               reply: tuple[int, str, str]) -> HookResult | None:
        if not limit:
            return None
        key = self._key(ctx)
        if key is None:
            return None
        now = time.monotonic()
        if window.count(key, now) >= limit:
            return refusal(*reply)
        window.add(key, now)
        return None
