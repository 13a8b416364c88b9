"""`policy`: sender and recipient allow and deny lists.

Patterns are globs matched against the whole address, case-insensitively (`*@example.com`,
`@example.com` for a whole domain, `<>` for the null sender), or `re:REGEX` (searched). Deny
wins over allow; once an allow list is given, what it does not match is refused. A refused
sender refuses the transaction (at MAIL FROM), a refused recipient that recipient only.
"""

from __future__ import annotations

from pydantic import Field, model_validator

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
from mailpipe.plugins.results import HookResult


class Rules(Section):
    allow: Pattern = Field(default_factory=list)
    deny: Pattern = Field(default_factory=list)
    code: Code = 550
    enhanced: Enhanced = "5.7.1"
    message: str = ""

    @model_validator(mode="after")
    def _classes(self) -> Rules:
        same_class(self.code, self.enhanced)
        return self


class PolicyConfig(Section):
    senders: Rules = Rules()
    recipients: Rules = Rules()


class Lists:
    """One `Rules` section, compiled."""

    def __init__(self, rules: Rules, default_message: str) -> None:
        self.allow = Matcher(rules.allow)
        self.deny = Matcher(rules.deny)
        self.reply = (rules.code, rules.enhanced, rules.message or default_message)

    def check(self, address: str | None) -> HookResult | None:
        if self.deny(address) or (self.allow and not self.allow(address)):
            return refusal(*self.reply)
        return None


class Policy:
    def init(self, config: dict) -> None:
        c = parse("policy", PolicyConfig, config)
        self.senders = Lists(c.senders, "Sender address rejected by policy")
        self.recipients = Lists(c.recipients, "Recipient address rejected by policy")

    def on_mail_from(self, sender: str | None) -> HookResult | None:
        return self.senders.check(sender)

    def on_rcpt_to(self, recipient: str | None) -> HookResult | None:
        return self.recipients.check(recipient)
