"""GET /api/v1/messages/{uuid}/spam-check: the stored email's spam score from SpamAssassin's
spamd (checks/spam.py), on demand: each request is one check."""

from __future__ import annotations

from aiohttp import web

from mailpipe.checks.spam import (
    MessageTooLarge,
    SpamChecker,
    SpamCheckError,
    SpamdTimeout,
    SpamdUnavailable,
    SpamNotConfigured,
    check_spam,
)
from mailpipe.store.sqlite import SQLiteStore
from mailpipe.web.app import ApiError, json_response

# Each failure its own status, so a client (the page) tells them apart without parsing
# the message: off, spamd down or answering garbage, too slow, the email too large.
STATUSES: dict[type[SpamCheckError], int] = {
    SpamNotConfigured: 503,
    SpamdUnavailable: 502,
    SpamdTimeout: 504,
    MessageTooLarge: 413,
}
BAD_GATEWAY = 502  # SpamdBadReply, and any other failure of spamd's


class SpamRoutes:
    def __init__(self, store: SQLiteStore, checker: SpamChecker | None) -> None:
        self.store = store
        self.checker = checker

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/api/v1/messages/{uuid}/spam-check", self.spam_check)]

    async def spam_check(self, request: web.Request) -> web.Response:
        raw = await self.store.raw(request.match_info["uuid"])
        if raw is None:
            raise ApiError(404, "message not found")
        try:
            result = await check_spam(self.checker, raw)
        except SpamCheckError as exc:
            raise ApiError(STATUSES.get(type(exc), BAD_GATEWAY), str(exc)) from None
        return json_response(result.as_json())
