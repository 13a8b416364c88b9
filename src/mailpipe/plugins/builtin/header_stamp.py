"""`header_stamp`: headers (and tags) added to every captured message, before the sinks.

Values are templates: `{session_uuid}`, `{message_uuid}`, `{remote_addr}`, `{remote_ip}`,
`{helo}`, `{server}`, `{mail_from}`, `{rcpt_to}` (comma separated), `{tls}` (yes/no),
`{auth_username}`; `{{` and `}}` are literal braces. `mode: set` replaces headers of the same
name instead of adding one more.
"""

from __future__ import annotations

import re
import string
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from mailpipe.plugins.builtin._common import Section, parse
from mailpipe.plugins.context import HookContext
from mailpipe.plugins.results import HookResult, Modify

FIELDS = ("session_uuid", "message_uuid", "remote_addr", "remote_ip", "helo", "server",
          "mail_from", "rcpt_to", "tls", "auth_username")
DEFAULT_HEADERS = {
    "X-Mailpipe-Session": "{session_uuid}",
    "X-Mailpipe-Remote": "{remote_addr}",
    "X-Mailpipe-Server": "{server}",
}
_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII but the colon (RFC 5322 field name)


def _check_template(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("line breaks are not allowed in a header value")
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    for _, name, spec, conversion in parts:
        if name is not None and (name not in FIELDS or spec or conversion):
            raise ValueError(f"unknown field {{{name}}}; known: "
                             + ", ".join(f"{{{f}}}" for f in FIELDS))
    return value


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError("not a valid header name (printable ASCII, no colon or space)")
    return value


Template = Annotated[str, AfterValidator(_check_template)]
HeaderName = Annotated[str, AfterValidator(_check_name)]


class HeaderStampConfig(Section):
    headers: dict[HeaderName, Template] = Field(default_factory=lambda: dict(DEFAULT_HEADERS))
    mode: Literal["add", "set"] = "add"
    tags: list[str] = Field(default_factory=list)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        if any(not tag or "\r" in tag or "\n" in tag for tag in value):
            raise ValueError("tags must be non-empty single-line strings")
        return value


def _values(ctx: HookContext) -> dict[str, str]:
    s = ctx.session
    values = {
        "session_uuid": s.session_uuid, "message_uuid": s.message_uuid or "",
        "remote_addr": s.remote_addr, "remote_ip": s.remote_ip, "helo": s.helo,
        "server": s.server, "mail_from": s.mail_from or "", "rcpt_to": ", ".join(s.rcpt_to),
        "tls": "yes" if s.tls else "no", "auth_username": s.auth_username or "",
    }
    # The client chose some of these (HELO, addresses): no control characters in a header.
    return {k: re.sub(r"[\x00-\x1f\x7f]", "", v) for k, v in values.items()}


class HeaderStamp:
    def init(self, config: dict) -> None:
        self.config = parse("header_stamp", HeaderStampConfig, config)

    def on_message_complete(self, ctx: HookContext) -> HookResult:
        values = _values(ctx)
        headers = [(name, template.format_map(values))
                   for name, template in self.config.headers.items()]
        if self.config.mode == "set":
            return Modify(set_headers=headers, tags=self.config.tags)
        return Modify(add_headers=headers, tags=self.config.tags)
