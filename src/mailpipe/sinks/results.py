"""What a sink answers for one email, and what the client is told once every sink answered.

A sink returns `Accepted`, `TempFail` (4xx: the client sends the email again later) or
`Reject` (5xx: the client gives up). The dispatcher folds the answers into one `DeliveryResult`,
which maps onto one SMTP reply: code, enhanced status code (RFC 3463) and text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

# class.subject.detail; the class must agree with the reply code's first digit.
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _check_reply(kind: str, code: int, enhanced: str, text: str, first_digit: int) -> None:
    if not (isinstance(code, int) and code // 100 == first_digit and 0 <= code % 100 <= 99):
        raise ValueError(f"{kind}: code {code!r} must be {first_digit}xx")
    if not _ENHANCED.fullmatch(enhanced) or enhanced[0] != str(first_digit):
        raise ValueError(f"{kind}: enhanced code {enhanced!r} must look like {first_digit}.X.Y")
    # A line break in the text would let it forge further reply lines.
    if "\r" in text or "\n" in text:
        raise ValueError(f"{kind}: the text must be one line")


@dataclass(frozen=True, slots=True)
class Accepted:
    """The sink took the email. `note` is kept in the email's outcomes under the sink's key;
    `close` ends the SMTP session after the 250 (a worker answering CLOSE)."""

    note: dict[str, Any] | None = None
    close: bool = False


ACCEPTED = Accepted()  # the plain answer, made once: sinks return it for every email


@dataclass(frozen=True, slots=True)
class TempFail:
    """Not now: the client is told to retry (4xx). `reason` is for the outcomes and the log,
    `text` for the client."""

    text: str = "Temporary failure, please retry"
    enhanced: str = "4.3.0"
    code: int = 451
    reason: str | None = None

    def __post_init__(self) -> None:
        _check_reply("TempFail", self.code, self.enhanced, self.text, 4)


@dataclass(frozen=True, slots=True)
class Reject:
    """Never: the client is told the email is refused for good (5xx)."""

    text: str = "Message rejected"
    enhanced: str = "5.7.1"
    code: int = 550
    reason: str | None = None

    def __post_init__(self) -> None:
        _check_reply("Reject", self.code, self.enhanced, self.text, 5)


SinkResult = Accepted | TempFail | Reject
Refusal = TempFail | Reject


def outcome_of(result: Refusal) -> dict[str, Any]:
    """How a refusal is noted in the email's outcomes (and so in the store)."""
    kind = "tempfail" if isinstance(result, TempFail) else "reject"
    return {"result": kind, "code": result.code, "enhanced": result.enhanced,
            "text": result.text, "reason": result.reason or result.text}


class DeliveryResult(NamedTuple):
    """The answer to one email: the SMTP reply to send and whether to close the session after.

    `sink` names the sink whose refusal decided (None when every sink accepted). A tuple,
    not a dataclass: one is made for every email, and a tuple is the cheapest to make.
    """

    code: int
    enhanced: str
    text: str
    close: bool = False
    sink: str | None = None

    @property
    def accepted(self) -> bool:
        return self.code < 400

    @classmethod
    def accept(cls, queued_id: str, *, close: bool = False) -> DeliveryResult:
        return cls(250, "2.0.0", f"Ok: queued as {queued_id}", close=close)

    @classmethod
    def refuse(cls, result: Refusal, sink: str) -> DeliveryResult:
        return cls(result.code, result.enhanced, result.text, sink=sink)
