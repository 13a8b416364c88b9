"""The sink interface: every captured email goes to every configured sink.

Later parts (workers, jobs, relay, webhooks) are sinks too. A sink marked `required` must
accept an email before the client gets its 250; any other sink's failure is logged only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from mailpipe.event import CapturedEmail


class SinkError(Exception):
    """A sink could not take an email; the client is told to retry (451 4.3.0)."""


# Required sinks run in stages, lowest first: DELIVER (workers, jobs) before RECORD (the
# store, files), so that what is recorded includes what delivery made of the email.
DELIVER = 0
RECORD = 1


class Sink(ABC):
    name: str = "sink"
    required: bool = True
    stage: int = RECORD

    async def start(self) -> None:
        """Open connections, files, threads. Called once before the first email."""

    @abstractmethod
    async def submit(self, email: CapturedEmail) -> None:
        """Accept one email durably, or raise (any exception counts as a failure)."""

    async def close(self) -> None:
        """Flush what is pending and release resources. Called once at shutdown."""

    def health(self) -> dict[str, object]:
        """A small status document for /healthz."""
        return {"ok": True}
