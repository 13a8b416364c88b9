"""Mailpit's Chaos: three triggers (Sender, Recipient, Authentication), each an SMTP error code
and a probability in percent, changed at run time through /api/v1/chaos.

mailpipe's `chaos` plugin (plugins/builtin/chaos.py) is configuration, read when plugins load;
Mailpit's triggers change while mail flows. So they are Mailpit's semantics over the verdict
seam (capture/verdicts.py): while a trigger has a probability above 0 it answers at its stage
(MAIL, RCPT, AUTH) with `<code> Chaos <trigger> error`, as Mailpit does; while none has, no
stage is held for it at all.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailpipe.capture.types import Respond, Stage
from mailpipe.capture.verdicts import VerdictContext, Verdicts

# Trigger name -> (its stage, its default error code, the word in the reply), Mailpit's.
TRIGGERS: dict[str, tuple[Stage, int, str]] = {
    "Sender": (Stage.MAIL, 451, "sender"),
    "Recipient": (Stage.RCPT, 451, "recipient"),
    "Authentication": (Stage.AUTH, 535, "authentication"),
}
# The names --chaos-triggers accepts for each (case-insensitive), as Mailpit's Set() does.
ALIASES = {"sender": "Sender", "recipient": "Recipient", "recipients": "Recipient",
           "auth": "Authentication", "authentication": "Authentication"}


class ChaosError(ValueError):
    """Bad triggers: the text is Mailpit's wording."""


@dataclass(frozen=True, slots=True)
class Trigger:
    ErrorCode: int
    Probability: int


def default_triggers() -> dict[str, Trigger]:
    return {name: Trigger(code, 0) for name, (_, code, _) in TRIGGERS.items()}


def checked(name: str, code: Any, probability: Any) -> Trigger:
    """One trigger, validated as Mailpit validates it (0 code: the default)."""
    if not _is_int(code) or not _is_int(probability):
        raise ChaosError(f"{name}: ErrorCode and Probability must be integers")
    if code == 0:
        code = TRIGGERS[name][1]
    if not 400 <= code <= 599:
        raise ChaosError("error code must be between 400 and 599")
    if not 0 <= probability <= 100:
        raise ChaosError("probability must be between 0 and 100")
    return Trigger(code, probability)


def from_json(data: Any) -> dict[str, Trigger]:
    """PUT /api/v1/chaos's body: triggers left out are reset to 0% (Mailpit's rule)."""
    if not isinstance(data, Mapping):
        raise ChaosError("expected a JSON object of triggers")
    unknown = sorted(set(data) - set(TRIGGERS))
    if unknown:
        raise ChaosError(f"unknown trigger {unknown[0]!r}: expected Sender, Recipient or "
                         "Authentication")
    triggers = default_triggers()
    for name, value in data.items():
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ChaosError(f"{name}: expected {{ErrorCode, Probability}}")
        triggers[name] = checked(name, value.get("ErrorCode", 0), value.get("Probability", 0))
    return triggers


def parse_triggers(text: str) -> dict[str, Trigger]:
    """Mailpit's --chaos-triggers: `Sender:451:10,Recipient:451:10,Authentication:535:5`."""
    triggers = default_triggers()
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        name = ALIASES.get(fields[0].strip().lower())
        if len(fields) != 3 or name is None:
            raise ChaosError(f"{item!r}: expected Trigger:ErrorCode:Probability, the trigger "
                             "Sender, Recipient or Authentication")
        try:
            code, probability = int(fields[1]), int(fields[2])
        except ValueError:
            raise ChaosError(f"{item!r}: ErrorCode and Probability must be integers") from None
        triggers[name] = checked(name, code, probability)
    return triggers


def as_json(triggers: Mapping[str, Trigger]) -> dict[str, dict[str, int]]:
    return {name: {"ErrorCode": t.ErrorCode, "Probability": t.Probability}
            for name, t in triggers.items()}


class Chaos:
    """The live triggers, answering at their stages through `verdicts`."""

    def __init__(self, verdicts: Verdicts, triggers: Mapping[str, Trigger] | None = None,
                 rng: random.Random | None = None) -> None:
        self.verdicts = verdicts
        self.random = rng or random.SystemRandom()
        self.triggers = default_triggers()
        self._checks = {name: self._check_for(name) for name in TRIGGERS}
        self._registered: set[str] = set()
        self.set(triggers or {})

    def set(self, triggers: Mapping[str, Trigger]) -> None:
        self.triggers = {**default_triggers(), **triggers}
        for name, trigger in self.triggers.items():
            stage = TRIGGERS[name][0]
            check, now = self._checks[name]
            if trigger.Probability > 0 and name not in self._registered:
                self.verdicts.register(stage, check, now=now)
                self._registered.add(name)
            elif trigger.Probability == 0 and name in self._registered:
                self.verdicts.unregister(stage, check)
                self._registered.discard(name)

    def close(self) -> None:
        self.set({})

    def _check_for(self, name: str) -> tuple[Any, Any]:
        word = TRIGGERS[name][2]

        def now(context: VerdictContext) -> Respond | None:
            trigger = self.triggers[name]
            # randrange(100) is 0..99 and a probability 1..100: fire below it, as Mailpit does.
            if trigger.Probability and self.random.randrange(100) < trigger.Probability:
                return Respond(trigger.ErrorCode, "", f"Chaos {word} error")
            return None

        async def check(context: VerdictContext) -> Respond | None:
            return now(context)

        return check, now


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
