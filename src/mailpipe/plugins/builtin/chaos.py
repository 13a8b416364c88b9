"""`chaos`: fail a chosen fraction of sessions, on purpose, to test how applications cope
with SMTP failures (what Mailpit's Chaos and MailHog's Jim are for).

Each rule names one or more stages (connect, helo, auth, mail, rcpt, data, message), the
probability it fires at each of them (`rate`, 0 to 1), and what it does when it fires: wait
`delay`, then answer `code` (4xx tempfails, 5xx rejects, 421 closes), or `action: disconnect`
(421 and close); a rule with only a delay slows the session down and lets it go on. Rules can
be narrowed to listeners (the session's server name), recipients and senders (patterns as in
`policy`). Rules run in order; the first that fails the command ends it.
"""

from __future__ import annotations

import asyncio
import random
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from mailpipe.config import Duration
from mailpipe.plugins.builtin._common import (
    Code,
    Enhanced,
    Matcher,
    Pattern,
    Section,
    parse,
    refusal,
    same_class,
)
from mailpipe.plugins.context import HookContext
from mailpipe.plugins.results import Disconnect, HookResult

StageName = Literal["connect", "helo", "auth", "mail", "rcpt", "data", "message"]
# Where a rule can look at senders and recipients.
HAS_SENDER = {"mail", "rcpt", "data", "message"}
HAS_RECIPIENTS = {"rcpt", "data", "message"}
DEFAULT_REPLY = {4: ("4.3.0", "Chaos: temporary failure"), 5: ("5.3.0", "Chaos: failure")}


def _stages(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _rate(value: Any) -> float:
    """0.1 or "10%" (Mailpit counts in percent)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        text = str(value).strip()
        rate = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:
        raise ValueError("expected a probability from 0 to 1, or a percentage like 10%")
    return rate


class Rule(Section):
    stage: Annotated[list[StageName], BeforeValidator(_stages)] = Field(min_length=1)
    rate: Annotated[float, BeforeValidator(_rate)]
    code: Code | None = None
    enhanced: Enhanced | None = None
    message: str | None = None
    action: Literal["reply", "disconnect"] | None = None
    delay: Duration = 0.0
    listeners: list[str] | None = None
    recipients: Pattern | None = None
    senders: Pattern | None = None

    @model_validator(mode="after")
    def _check(self) -> Rule:
        same_class(self.code, self.enhanced)
        if self.action == "disconnect" and self.code not in (None, 421):
            raise ValueError("action disconnect always answers 421: drop code or action")
        if self.action == "reply" and self.code is None:
            raise ValueError("action reply needs a code")
        if self.code is None and self.action is None and not self.delay:
            raise ValueError("a rule needs a code, action: disconnect or a delay")
        if self.recipients is not None and not HAS_RECIPIENTS.issuperset(self.stage):
            raise ValueError("recipients: only stages rcpt, data and message have recipients")
        if self.senders is not None and not HAS_SENDER.issuperset(self.stage):
            raise ValueError("senders: only stages mail, rcpt, data and message have a sender")
        return self


class ChaosConfig(Section):
    seed: int | None = None
    rules: list[Rule] = Field(default_factory=list)


class CompiledRule:
    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.listeners = None if rule.listeners is None else set(rule.listeners)
        self.recipients = Matcher(rule.recipients) if rule.recipients is not None else None
        self.senders = Matcher(rule.senders) if rule.senders is not None else None
        self.result = self._result(rule)

    @staticmethod
    def _result(rule: Rule) -> HookResult | None:
        if rule.action == "disconnect":
            return Disconnect(rule.message or "Chaos: closing connection", rule.enhanced or "")
        if rule.code is None:
            return None
        enhanced, text = DEFAULT_REPLY[rule.code // 100]
        return refusal(rule.code, rule.enhanced or enhanced, rule.message or text)

    def matches(self, ctx: HookContext, recipient: str | None) -> bool:
        s = ctx.session
        if self.listeners is not None and s.server not in self.listeners:
            return False
        if self.senders is not None and not self.senders(s.mail_from):
            return False
        if self.recipients is not None:
            wanted = [recipient] if recipient is not None else s.rcpt_to
            return any(self.recipients(r) for r in wanted)
        return True


class Chaos:
    def init(self, config: dict) -> None:
        c = parse("chaos", ChaosConfig, config)
        self.random = random.Random(c.seed)
        self.rules: dict[str, list[CompiledRule]] = {}
        for rule in c.rules:
            compiled = CompiledRule(rule)
            for stage in rule.stage:
                self.rules.setdefault(stage, []).append(compiled)

    async def _stage(self, stage: str, ctx: HookContext,
                     recipient: str | None = None) -> HookResult | None:
        for rule in self.rules.get(stage, ()):
            if not rule.matches(ctx, recipient):
                continue
            # The draw comes after the match: a rule fires at `rate` of what it matches.
            if self.random.random() >= rule.rule.rate:
                continue
            if rule.rule.delay:
                await asyncio.sleep(rule.rule.delay)
            if rule.result is not None:
                return rule.result
        return None

    async def on_connect(self, ctx: HookContext) -> HookResult | None:
        return await self._stage("connect", ctx)

    async def on_helo(self, ctx: HookContext) -> HookResult | None:
        return await self._stage("helo", ctx)

    async def on_ehlo(self, ctx: HookContext) -> HookResult | None:
        return await self._stage("helo", ctx)

    async def on_auth(self, ctx: HookContext) -> HookResult | None:
        return await self._stage("auth", ctx)

    async def on_mail_from(self, ctx: HookContext) -> HookResult | None:
        return await self._stage("mail", ctx)

    async def on_rcpt_to(self, ctx: HookContext, recipient: str | None) -> HookResult | None:
        return await self._stage("rcpt", ctx, recipient or "")

    async def on_data(self, ctx: HookContext) -> HookResult | None:
        return await self._stage("data", ctx)

    async def on_message_complete(self, ctx: HookContext) -> HookResult | None:
        return await self._stage("message", ctx)
