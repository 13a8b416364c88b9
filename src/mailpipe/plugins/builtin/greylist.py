"""`greylist`: the classic triplet greylisting (client network, sender, recipient).

A triplet seen for the first time is answered 451 4.7.1 at RCPT TO; a retry after `delay`
and within `expire` of that first attempt passes, and the triplet then passes without delay
for `whitelist_for` after its last use. A retry too soon gets 451 again (the wait is not
restarted); one after `expire` starts over. Triplets live in memory (at most `max_entries`,
the least recently used dropped first), so a restart forgets them. Only runs when listed.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import Field, model_validator

from mailpipe.config import Duration
from mailpipe.plugins.builtin._common import (
    CIDR,
    Code,
    Enhanced,
    Matcher,
    Pattern,
    Section,
    client_ip,
    exempted,
    network_of,
    normal_address,
    parse,
    refusal,
    same_class,
)
from mailpipe.plugins.context import HookContext
from mailpipe.plugins.results import HookResult


class GreylistConfig(Section):
    delay: Duration = 300.0
    expire: Duration = 4 * 3600.0
    whitelist_for: Duration = 36 * 86400.0
    ipv4_prefix: int = Field(default=24, ge=1, le=32)
    ipv6_prefix: int = Field(default=64, ge=1, le=128)
    exempt: list[CIDR] = Field(default_factory=list)
    exempt_recipients: Pattern = Field(default_factory=list)
    exempt_senders: Pattern = Field(default_factory=list)
    max_entries: int = Field(default=100_000, ge=1)
    code: Code = 451
    enhanced: Enhanced = "4.7.1"
    message: str = "Greylisted, try again in {seconds} seconds"

    @model_validator(mode="after")
    def _check(self) -> GreylistConfig:
        same_class(self.code, self.enhanced)
        if self.code >= 500:
            raise ValueError("code: greylisting answers a 4xx code (the client must retry)")
        if self.expire <= self.delay:
            raise ValueError("expire must be longer than delay, or no retry could pass")
        return self


@dataclass(slots=True)
class Triplet:
    first_seen: float
    passed_until: float = 0.0  # 0: not passed yet


class Greylist:
    def init(self, config: dict) -> None:
        self.config = parse("greylist", GreylistConfig, config)
        self.exempt_recipients = Matcher(self.config.exempt_recipients)
        self.exempt_senders = Matcher(self.config.exempt_senders)
        self.triplets: OrderedDict[tuple[str, str, str], Triplet] = OrderedDict()

    def on_greylist_check(self, ctx: HookContext, sender: str | None,
                          recipient: str | None) -> HookResult | None:
        c = self.config
        text = ctx.session.remote_ip
        ip = client_ip(text)
        if (exempted(ip, c.exempt) or self.exempt_recipients(recipient)
                or self.exempt_senders(sender)):
            return None
        key = (network_of(ip, text, c.ipv4_prefix, c.ipv6_prefix),
               normal_address(sender), normal_address(recipient))
        wait = self._wait(key, time.monotonic())
        if wait is None:
            return None
        return refusal(c.code, c.enhanced, c.message.replace("{seconds}", str(wait)))

    def _wait(self, key: tuple[str, str, str], now: float) -> int | None:
        """Seconds the triplet must still wait, or None when it passes."""
        c = self.config
        entry = self.triplets.get(key)
        waited = now - entry.first_seen if entry is not None else -1.0
        if entry is None or (entry.passed_until and entry.passed_until <= now) or \
                (not entry.passed_until and waited > c.expire):
            # new, or its pass ran out, or it came back too late: start over
            self.triplets[key] = Triplet(now)
            self._touch(key, now)
            return max(1, math.ceil(c.delay))
        if not entry.passed_until and waited < c.delay:
            self._touch(key, now)
            return max(1, math.ceil(c.delay - waited))
        entry.passed_until = now + c.whitelist_for  # passes: retried in time, or known
        self._touch(key, now)
        return None

    def _touch(self, key: tuple[str, str, str], now: float) -> None:
        """Most recently used last; the front dropped when stale or over the bound."""
        triplets = self.triplets
        triplets.move_to_end(key)
        c = self.config
        while triplets:
            oldest_key = next(iter(triplets))
            oldest = triplets[oldest_key]
            stale = (oldest.passed_until <= now if oldest.passed_until
                     else now - oldest.first_seen > c.expire)
            if len(triplets) <= c.max_entries and not stale:
                return
            del triplets[oldest_key]
