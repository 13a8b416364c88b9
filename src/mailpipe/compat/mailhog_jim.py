"""Jim, MailHog's chaos monkey (MailHog-Server monkey/jim.go), over mailpipe's verdict seam
(capture/verdicts.py): invited, changed and sent away at run time through /api/v2/jim.

mailpipe's `chaos` plugin is configuration read when plugins load; test suites written for
MailHog switch Jim on and off between tests. So, while Jim is invited, his chances answer at
the SMTP stages as MailHog's do: refusing the connection (`AcceptChance`: the chance to let
one in), dropping it at any command (`DisconnectChance`), rejecting MAIL FROM, RCPT TO and
AUTH. mailpipe says 421 as it closes, where MailHog just closes. `LinkSpeed*` are kept and
shown, but do nothing: mailpipe does not throttle bytes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from mailpipe.capture.types import Disconnect, Respond, Stage
from mailpipe.capture.verdicts import VerdictContext, Verdicts

# Jim's settings with MailHog's defaults (its -jim-* flags), in its JSON order.
DEFAULTS: dict[str, float] = {
    "DisconnectChance": 0.005,
    "AcceptChance": 0.99,
    "LinkSpeedAffect": 0.1,
    "LinkSpeedMin": 1024.0,
    "LinkSpeedMax": 10240.0,
    "RejectSenderChance": 0.05,
    "RejectRecipientChance": 0.05,
    "RejectAuthChance": 0.05,
}
CHANCES = frozenset(name for name in DEFAULTS if name.endswith(("Chance", "Affect")))
# Where a command can be dropped: every stage with a command of the client's.
COMMAND_STAGES = (Stage.HELO, Stage.AUTH, Stage.MAIL, Stage.RCPT, Stage.DATA)
# The replies MailHog's SMTP server gives when Jim says no.
REJECTIONS = {
    Stage.MAIL: Respond(550, "5.1.0", "Invalid sender"),
    Stage.RCPT: Respond(550, "5.1.1", "Invalid recipient"),
    Stage.AUTH: Respond(535, "5.7.8", "Authentication credentials invalid"),
}
REJECTED_BY = {Stage.MAIL: "RejectSenderChance", Stage.RCPT: "RejectRecipientChance",
               Stage.AUTH: "RejectAuthChance"}
GONE = Disconnect("Jim says goodbye")


class JimError(ValueError):
    """Settings that are not Jim's: the text names the field."""


def settings_from(body: Any) -> dict[str, float]:
    """Jim from a request body, as MailHog decodes one: field names in any case, and a field
    left out is 0 (a fresh Jim, not the defaults); checked here, which MailHog does not."""
    if not isinstance(body, Mapping):
        raise JimError("the body must be a JSON object of Jim's settings")
    names = {name.lower(): name for name in DEFAULTS}
    settings = dict.fromkeys(DEFAULTS, 0.0)
    for key, value in body.items():
        name = names.get(str(key).lower())
        if name is None:
            raise JimError(f"unknown setting {key!r}: Jim has {', '.join(DEFAULTS)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise JimError(f"{name} must be a number")
        if name in CHANCES and not 0 <= value <= 1:
            raise JimError(f"{name} must be a chance from 0 to 1")
        if value < 0:
            raise JimError(f"{name} must not be negative")
        settings[name] = float(value)
    if settings["LinkSpeedMin"] > settings["LinkSpeedMax"]:
        raise JimError("LinkSpeedMin must not be more than LinkSpeedMax")
    return settings


class Jim:
    """Jim at work: his checks registered with `verdicts` until `leave()`."""

    def __init__(self, verdicts: Verdicts, settings: Mapping[str, float] | None = None,
                 rng: random.Random | None = None) -> None:
        self.verdicts = verdicts
        self.random = rng or random.SystemRandom()
        self.settings = dict(DEFAULTS if settings is None else settings)
        self._checks = [(stage, *self._check_for(stage))
                        for stage in (Stage.CONNECT, *COMMAND_STAGES)]
        for stage, check, now in self._checks:
            verdicts.register(stage, check, now=now)

    def leave(self) -> None:
        for stage, check, _ in self._checks:
            self.verdicts.unregister(stage, check)

    def decide(self, stage: Stage) -> Disconnect | Respond | None:
        """Jim's verdict at `stage`: MailHog rolls once per question, so do we."""
        chance = self.random.random
        if stage == Stage.CONNECT:
            return GONE if chance() >= self.settings["AcceptChance"] else None
        if chance() < self.settings["DisconnectChance"]:
            return GONE
        rejected_by = REJECTED_BY.get(stage)
        if rejected_by is not None and chance() < self.settings[rejected_by]:
            return REJECTIONS[stage]
        return None

    def _check_for(self, stage: Stage) -> tuple[Any, Any]:
        def now(context: VerdictContext) -> Disconnect | Respond | None:
            return self.decide(stage)

        async def check(context: VerdictContext) -> Disconnect | Respond | None:
            return self.decide(stage)

        return check, now
