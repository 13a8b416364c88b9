"""The sink interface: every captured email goes to every configured sink.

Workers, jobs, the store and the jsonl file are sinks; a relay or a webhook is one more,
registered by name (see `mailpipe.sinks.registry`). A sink answers each email with a typed
result (`mailpipe.sinks.results`). A `required` sink answers before the client gets its
reply, and its failures (an exception, or no answer within `timeout`) follow its failure
policy; any other sink gets the email after the 250 and its failures are only logged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from mailpipe.config import Duration, Section
from mailpipe.event import CapturedEmail
from mailpipe.sinks.results import SinkResult

if TYPE_CHECKING:
    from mailpipe.config import Config
    from mailpipe.metrics import Metrics


class SinkError(Exception):
    """A sink could not take an email, for a known reason (logged in one line, no trace)."""


# Required sinks run in stages, lowest first: DELIVER (workers, jobs, relays) before RECORD
# (files), and the store last, so that what is recorded includes what delivery made of the
# email. After a Reject only the STORE stage still runs: the email is final, and the store
# keeps it with the refusal in its outcomes. After a TempFail nothing runs: the client sends
# the email again.
DELIVER = 0
RECORD = 1
STORE = 2

FailurePolicy = Literal["tempfail", "reject", "ignore"]


class SinkSettings(Section):
    """What every `sinks.NAME` section may set; a sink's own settings extend it."""

    required: bool | None = None
    timeout: Duration | None = None  # 0: no limit
    on_failure: FailurePolicy | None = None


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What a sink's factory may use besides its own section."""

    config: Config
    metrics: Metrics


class Sink(ABC):
    name: str = "sink"
    stage: int = RECORD
    required: bool = True
    timeout: float = 30.0  # seconds; 0: no limit
    on_failure: FailurePolicy | None = None  # None: tempfail when required, else ignore
    # Where this sink's note goes in the email's outcomes (default: its name).
    outcome_key: str | None = None

    # The model of this sink's `sinks.NAME` section.
    Settings: ClassVar[type[SinkSettings]] = SinkSettings
    # Built only when `sinks.NAME` is present; built-ins enabled by their own sections
    # (store, workers, jobs) say False and let `create` decide.
    needs_section: ClassVar[bool] = True

    @classmethod
    def create(cls, settings: SinkSettings, context: SinkContext) -> Sink | None:
        """The sink for this configuration, or None when the configuration leaves it off."""
        return cls()

    def apply(self, settings: SinkSettings) -> None:
        """Take the common settings (required, timeout, on_failure) the section sets."""
        for key in SinkSettings.model_fields:
            value = getattr(settings, key)
            if value is not None:
                setattr(self, key, value)

    @property
    def failure_policy(self) -> FailurePolicy:
        return self.on_failure or ("tempfail" if self.required else "ignore")

    @property
    def key(self) -> str:
        return self.outcome_key or self.name

    async def start(self) -> None:
        """Open connections, files, threads. Called once before the first email."""

    @abstractmethod
    async def submit(self, email: CapturedEmail) -> SinkResult:
        """Answer for one email: Accepted once it is durably taken, TempFail or Reject.
        An exception counts as a failure and follows the failure policy."""

    async def close(self) -> None:
        """Flush what is pending and release resources. Called once at shutdown."""

    def health(self) -> dict[str, object]:
        """A small status document for /healthz."""
        return {"ok": True}
