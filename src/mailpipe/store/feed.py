"""The store's change feed: every change to the stored messages, for whoever watches.

The store publishes `new` (data: the summary), `deleted` ({"uuid"}), `cleared` ({}), `read`
({"uuid", "read"} or {"all": true, "read"}) and `tags` ({"uuid", "tags"}: its tags now) once
the change is committed; the SSE route and the
long poll subscribe. A subscriber that falls `backlog` changes behind is ended rather than
buffered without bound (a browser's EventSource reconnects and reloads the list), and every
subscription ends when the store closes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["new", "deleted", "cleared", "read", "tags"]
BACKLOG = 1000


@dataclass(frozen=True, slots=True)
class Change:
    kind: Kind
    data: dict[str, Any]


class Subscription:
    """Changes published since `ChangeFeed.subscribe()`, in order. Use as a context manager,
    so that leaving unsubscribes."""

    def __init__(self, feed: ChangeFeed, backlog: int) -> None:
        self._feed = feed
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._backlog = backlog
        self.ended = False

    async def get(self) -> Change | None:
        """The next change; None once the subscription has ended (store closed, too slow)."""
        if self.ended and self._queue.empty():
            return None
        change = await self._queue.get()
        if change is None:
            self.ended = True
        return change

    def end(self) -> None:
        self._deliver(None)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self._feed._subscribers.discard(self)

    def _deliver(self, change: Change | None) -> None:
        if self._here():
            self._put(change)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._put, change)

    def _deliver_many(self, changes: list[Change]) -> None:
        # One wake-up of the subscriber's loop for the lot (retention prunes in chunks).
        if self._here():
            self._put_many(changes)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._put_many, changes)

    def _here(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:  # a thread without a loop: the store's writer
            return False

    def _put_many(self, changes: list[Change]) -> None:
        for change in changes:
            self._put(change)

    def _put(self, change: Change | None) -> None:
        if self.ended:
            return
        if change is None or self._queue.qsize() >= self._backlog:
            self.ended = True
            self._feed._subscribers.discard(self)
            change = None
        self._queue.put_nowait(change)


class ChangeFeed:
    def __init__(self, backlog: int = BACKLOG) -> None:
        self.backlog = backlog
        self._subscribers: set[Subscription] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscription:
        """Changes from now on; call on the event loop that will read them."""
        subscription = Subscription(self, self.backlog)
        self._subscribers.add(subscription)
        return subscription

    def publish(self, kind: Kind, data: dict[str, Any]) -> None:
        """Hand `change` to every subscriber; callable from any thread."""
        change = Change(kind, data)
        for subscription in list(self._subscribers):
            subscription._deliver(change)

    def publish_many(self, kind: Kind, datas: list[dict[str, Any]]) -> None:
        """`publish(kind, data)` for each of `datas`, in order, with one wake-up per
        subscriber; callable from any thread."""
        if not datas or not self._subscribers:
            return
        changes = [Change(kind, data) for data in datas]
        for subscription in list(self._subscribers):
            subscription._deliver_many(changes)

    def close(self) -> None:
        """End every subscription (they see None after the changes already queued)."""
        for subscription in list(self._subscribers):
            subscription.end()
        self._subscribers.clear()
