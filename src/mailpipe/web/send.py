"""`POST /api/v1/send`: a message injected as if received over SMTP (capture/inject.py).

The JSON is read here with its own bound (a message may be far bigger than aiohttp's 1 MiB
default, but not without limit), made into a message by web/compose.py, checked against the
`smtp` section's limits, and answered with what the SMTP session answered: the new event's
uuid, or the refusal with its SMTP code and text. The Mailpit-compatible route reuses
`read_json`, `inject` and `refusal` with its own JSON mapping (compose.from_mailpit).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from mailpipe.capture.inject import Injection, Injector, Outcome
from mailpipe.web.app import ApiError, json_response
from mailpipe.web.compose import SendError, Submission, parse_send

NO_SEND = "the send API is not available in this server"
# JSON carries a message as base64 (4/3 of its size) or escaped text: twice its size, and
# room for the rest of the object, is what a message within max_message_size can take.
JSON_SLACK = 1024 * 1024
_STAGE_COMMANDS = {"connect": "the connection", "helo": "EHLO", "mail": "MAIL FROM",
                   "rcpt": "RCPT TO", "data": "DATA", "message": "the end of data"}


class SendRoutes:
    """The send route over one Injector; without one (an API with no capture server) it
    answers 404."""

    def __init__(self, injector: Injector | None) -> None:
        self._injector = injector

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/api/v1/send", self.send)]

    async def send(self, request: web.Request) -> web.Response:
        injector = self._available()
        body = await read_json(request, json_limit(injector))
        try:
            submission = parse_send(body)
        except SendError as exc:
            raise ApiError(400, str(exc)) from None
        outcome = await inject(injector, submission, request)
        if not outcome.accepted:
            return refusal(outcome)
        return json_response({
            "uuid": outcome.uuid,
            "envelope": {"from": submission.mail_from, "to": submission.rcpt_to},
            "tags": submission.tags,
            "smtp": smtp_reply(outcome),
        })

    def _available(self) -> Injector:
        if self._injector is None:
            raise ApiError(404, NO_SEND)
        return self._injector


def json_limit(injector: Injector) -> int | None:
    size = injector.max_message_size
    return 2 * size + JSON_SLACK if size else None


async def read_json(request: web.Request, limit: int | None) -> Any:
    """The request's JSON body, read up to `limit` bytes (413 past it); 400 when it is
    empty or not JSON."""
    declared = request.content_length
    if limit is not None and declared is not None and declared > limit:
        raise _too_big(limit)
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if limit is not None and len(data) > limit:
            raise _too_big(limit)
    if not data.strip():
        raise ApiError(400, "body: expected a JSON object, got an empty body")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body: not valid JSON ({exc})") from None


def _too_big(limit: int) -> ApiError:
    return ApiError(413, f"body: larger than {limit} bytes, more than a message within "
                         "smtp.max_message_size can take")


async def inject(injector: Injector, submission: Submission, request: web.Request) -> Outcome:
    """Check the submission against the smtp limits (400/413), then inject it as sent by
    the HTTP client (its address is the session's remote_addr)."""
    size, limit = len(submission.raw), injector.max_message_size
    if limit and size > limit:
        raise ApiError(413, f"the message is {size} bytes, more than smtp.max_message_size "
                            f"({limit} bytes)")
    count, most = len(submission.rcpt_to), injector.max_recipients
    if count > most:
        raise ApiError(400, f"to: {count} recipients (to, cc and bcc together), more than "
                            f"smtp.max_recipients ({most})")
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    local = transport.get_extra_info("sockname") if transport is not None else None
    return await injector.inject(Injection(
        raw=submission.raw, mail_from=submission.mail_from, rcpt_to=submission.rcpt_to,
        tags=submission.tags, peer=_address(peer), local=_address(local)))


def _address(value: object) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None


def smtp_reply(outcome: Outcome) -> dict[str, Any]:
    """The SMTP reply as the API shows it: code, text, the stage it answered."""
    reply: dict[str, Any] = {"code": outcome.code, "text": outcome.text, "stage": outcome.stage}
    if outcome.recipient is not None:
        reply["recipient"] = outcome.recipient
    return reply


def refusal_status(outcome: Outcome) -> int:
    """A tempfail (4xx: a plugin's, a worker down, a broker down, shutting down) is 503, to
    be retried; a message too big 413; any other rejection 422."""
    if outcome.code < 500:
        return 503
    return 413 if outcome.code == 552 else 422


def refusal(outcome: Outcome) -> web.Response:
    """The error answer to a message the session did not accept."""
    where = _STAGE_COMMANDS.get(outcome.stage, outcome.stage)
    if outcome.recipient is not None:
        where += f" <{outcome.recipient}>"
    text = outcome.text.replace("\n", " ")
    return json_response(
        {"error": f"refused at {where}: {outcome.code} {text}", "smtp": smtp_reply(outcome)},
        status=refusal_status(outcome))
