"""What the admin API and CLI may do to a running mailpipe: the one seam between the web layer
and the parts it manages (worker pool, SMTP sessions, the process itself)."""

from __future__ import annotations

from typing import Any, Protocol


class NoWorkerPool(Exception):
    """Worker management was asked for, but no worker pool is configured (server.command)."""


class AdminOps(Protocol):
    def workers(self) -> list[dict[str, Any]]:
        """Each worker: pid, status (ready/working/invalid/...), num_execs, created_at (RFC 3339),
        rss_bytes, last_error. Raises NoWorkerPool."""
        ...

    async def add_worker(self) -> dict[str, Any]:
        """Start one more worker; its info once ready. Raises NoWorkerPool."""
        ...

    async def remove_worker(self) -> dict[str, Any] | None:
        """Stop one worker (an idle one first); its info, or None when none is left."""
        ...

    async def reset_workers(self) -> int:
        """Replace every worker without failing emails in flight; how many were replaced."""
        ...

    def connections(self) -> list[dict[str, Any]]:
        """Each SMTP session: uuid, remote_addr, server, since, state, emails, tls."""
        ...

    def close_connection(self, uuid: str) -> bool:
        """Close one session with 421 (after the email in flight, if any); False if unknown."""
        ...

    def stop(self) -> None:
        """Begin a graceful shutdown, as SIGTERM does."""
        ...
