"""Verdicts at every SMTP stage: who may answer a command before the default reply does.

Plugins, policy and chaos register async callables per `Stage`; at a stage with callables
the session holds the command, calls them in order with a `VerdictContext`, and the first
that returns a verdict wins: `Proceed()` (the default reply), `Respond(code, enhanced, text)`
(a 4xx/5xx instead) or `Disconnect(text)` (421, then close). None means "no opinion".

A stage nobody registered for is not held at all: no task, no coroutine, nothing awaited.
A callable that raises, hangs past `timeout` or answers nonsense costs the client a
`451 4.3.0` (it retries later), never a lost message; the failure is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailpipe.capture.types import (
    PROCEED,
    AuthInfo,
    Changes,
    Disconnect,
    Envelope,
    Proceed,
    Respond,
    Stage,
    Verdict,
)

if TYPE_CHECKING:
    from mailpipe.event import CapturedEmail

__all__ = [
    "TEMPFAIL",
    "Disconnect",
    "Proceed",
    "Respond",
    "Stage",
    "Verdict",
    "VerdictCheck",
    "VerdictContext",
    "Verdicts",
]

log = logging.getLogger("mailpipe.capture")

TEMPFAIL = Respond(451, "4.3.0", "Temporary failure, please retry")


@dataclass(slots=True)
class VerdictContext:
    """What a verdict callable knows about the session at its stage.

    `args` are the stage's own: CONNECT none; HELO `hostname`, `verb`; AUTH `mechanism`,
    `username`; STARTTLS none; MAIL `sender`, `params`; RCPT `recipient`, `params`; DATA
    `verb` (DATA or BDAT); HEADERS `headers` (bytes); MESSAGE none, the event is in `email`.
    `store` is the session's own key/value store, shared by every callable of the session.
    `message_uuid` is the transaction's (from MAIL FROM on; the event gets it); `changes`
    collects what callables want changed in the message (the session's, before MAIL FROM).
    """

    stage: Stage
    session: str
    server: str
    remote_addr: str
    local_addr: str
    tls: bool
    helo: str
    auth: AuthInfo
    envelope: Envelope | None
    args: dict[str, object]
    store: dict[str, object]
    email: CapturedEmail | None = None
    message_uuid: str | None = None
    changes: Changes | None = None


VerdictCheck = Callable[[VerdictContext], Awaitable[Verdict | None]]
# The same check when it can answer at once (plugins whose hooks are plain functions): the
# session then gets its verdict without a task, and pipelined commands are answered together.
VerdictNow = Callable[[VerdictContext], Verdict | None]
# Told what happened: "disconnect", "delivery_attempt", "delivery_success",
# "delivery_failure", "email_accepted", "email_refused"; the context's args say more.
Observer = Callable[[str, VerdictContext], None]


@dataclass
class Verdicts:
    """The callables registered per stage. `held` is what sessions opened from now on hold."""

    timeout: float = 30.0  # seconds a callable may take; past it the client gets 451
    _checks: dict[Stage, list[tuple[VerdictCheck, bool, VerdictNow | None]]] = field(
        default_factory=dict, init=False)
    held: frozenset[Stage] = field(default=frozenset(), init=False)
    # Per stage, its callables' `now` forms when every one has one (see `decide_now`).
    _now: dict[Stage, tuple[VerdictNow, ...]] = field(default_factory=dict, init=False)
    observer: Observer | None = None  # the plugins' notification hooks, when any
    observed: frozenset[str] = frozenset()  # what the observer wants to be told

    def register(self, stage: Stage, check: VerdictCheck, *, bounded: bool = True,
                 now: VerdictNow | None = None) -> None:
        """Call `check` at `stage`, after those registered before it. `bounded` False: the
        check bounds its own time (the plugin executor does, call by call). `now`: the same
        check, answering synchronously (see `decide_now`)."""
        self._checks.setdefault(stage, []).append((check, bounded, now))
        self._update()

    def unregister(self, stage: Stage, check: VerdictCheck) -> None:
        checks = self._checks.get(stage, [])
        for item in [item for item in checks if item[0] == check]:
            checks.remove(item)
        if not checks:
            self._checks.pop(stage, None)
        self._update()

    def _update(self) -> None:
        self.held = frozenset(self._checks)
        self._now = {stage: tuple(now for _, _, now in checks)  # type: ignore[misc]
                     for stage, checks in self._checks.items()
                     if all(now is not None for _, _, now in checks)}

    async def decide(self, context: VerdictContext) -> Verdict:
        """The first verdict of the stage's callables; Proceed when none has one."""
        for check, bounded, _ in list(self._checks.get(context.stage, ())):
            try:
                if bounded:
                    verdict = await asyncio.wait_for(check(context), self.timeout)
                else:
                    verdict = await check(context)
            except Exception as exc:
                reason = "timed out" if isinstance(exc, TimeoutError) else "failed"
                log.error("verdict at %s %s: %r", context.stage.name, reason, exc,
                          extra={"session": context.session}, exc_info=reason == "failed")
                return TEMPFAIL
            if verdict is not None:
                return _checked(context, verdict)
        return PROCEED

    def decide_now(self, context: VerdictContext) -> Verdict | None:
        """The stage's verdict without awaiting anything, when every callable of the stage
        can give it synchronously; None when one cannot (then `decide` is awaited)."""
        nows = self._now.get(context.stage)
        if nows is None:
            return None
        for now in nows:
            try:
                verdict = now(context)
            except Exception as exc:
                log.error("verdict at %s failed: %r", context.stage.name, exc,
                          extra={"session": context.session}, exc_info=True)
                return TEMPFAIL
            if verdict is not None:
                return verdict if verdict is PROCEED else _checked(context, verdict)
        return PROCEED


def _checked(context: VerdictContext, verdict: object) -> Verdict:
    """The verdict, or TEMPFAIL for nonsense. Only the sinks may answer 2xx to a message:
    a 250 from anyone else would lose it."""
    refusal = isinstance(verdict, Respond) and 400 <= verdict.code < 600
    if refusal or isinstance(verdict, Proceed | Disconnect):
        return verdict  # type: ignore[return-value]
    log.error("verdict at %s is not valid: %r", context.stage.name, verdict,
              extra={"session": context.session})
    return TEMPFAIL
