"""The hook context: what a plugin knows when one of its hooks is called.

One `SessionView` per SMTP session is shared by every hook of that session (its `store` is
the per-session key/value store plugins share); each call gets a `HookContext` with the
hook's name, stage and arguments on top. Out-of-process plugins get `to_wire()`, the same
facts as JSON (`{"args": {...}, "envelope": {"mail_from", "rcpt_to"}, ...}`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailpipe.capture.types import Stage

if TYPE_CHECKING:
    from mailpipe.capture.verdicts import VerdictContext
    from mailpipe.event import CapturedEmail


def _ip_of(host: str) -> str:
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass(slots=True)
class SessionView:
    """A session's facts as plugins see them, as plain values (`StageSession` has the same
    attributes, read from the capture server's stage when asked)."""

    session_uuid: str = ""
    server: str = ""
    remote_addr: str = ""
    local_addr: str = ""
    tls: bool = False
    helo: str = ""
    auth_mechanism: str | None = None
    auth_username: str | None = None
    message_uuid: str | None = None  # from MAIL FROM until the transaction ends
    mail_from: str | None = None
    rcpt_to: list[str] = field(default_factory=list)
    store: dict[str, Any] = field(default_factory=dict)

    @property
    def remote_ip(self) -> str:
        return _ip_of(self.remote_addr)


class StageSession:
    """`SessionView`'s attributes over the capture server's context of one SMTP stage: made
    for every held stage, so it copies nothing until a plugin reads it. Read later, it still
    tells the stage's facts (the envelope's recipients as they were)."""

    __slots__ = ("_rcpts", "_v")

    def __init__(self, vctx: VerdictContext) -> None:
        self._v = vctx
        envelope = vctx.envelope  # recipients are only ever added to an envelope
        self._rcpts = len(envelope.rcpt_to) if envelope is not None else 0

    session_uuid = property(lambda self: self._v.session)
    server = property(lambda self: self._v.server)
    remote_addr = property(lambda self: self._v.remote_addr)
    local_addr = property(lambda self: self._v.local_addr)
    tls = property(lambda self: self._v.tls)
    helo = property(lambda self: self._v.helo)
    auth_mechanism = property(lambda self: self._v.auth.mechanism)
    auth_username = property(lambda self: self._v.auth.username)
    message_uuid = property(lambda self: self._v.message_uuid)
    store = property(lambda self: self._v.store)
    remote_ip = property(lambda self: _ip_of(self._v.remote_addr))

    @property
    def mail_from(self) -> str | None:
        v = self._v
        if v.stage is Stage.MAIL:  # the transaction starts with this command
            return str(v.args.get("sender", ""))
        return v.envelope.mail_from if v.envelope is not None else None

    @property
    def rcpt_to(self) -> list[str]:
        v = self._v
        if v.envelope is None or v.stage is Stage.MAIL:
            return []
        return v.envelope.rcpt_to[:self._rcpts]


class HookContext:
    """One hook call's context. `event` is the EMAIL_RECEIVED document once it exists: read
    from `email` when first asked (an event built in a helper process arrives as JSON, and
    decoding it for plugins that never look would cost every message)."""

    __slots__ = ("_email", "_event", "args", "hook", "session", "stage")

    def __init__(self, hook: str, stage: str, args: dict[str, Any],
                 session: SessionView | StageSession, event: dict[str, Any] | None = None,
                 email: CapturedEmail | None = None) -> None:
        self.hook = hook
        self.stage = stage
        self.args = args
        self.session = session
        self._event = event
        self._email = email

    @property
    def event(self) -> dict[str, Any] | None:
        if self._event is None and self._email is not None:
            self._event = self._email.event
        return self._event

    @event.setter
    def event(self, value: dict[str, Any] | None) -> None:
        self._event = value

    def __repr__(self) -> str:
        return f"HookContext(hook={self.hook!r}, stage={self.stage!r}, args={self.args!r})"

    # Short names for what plugins read most.
    @property
    def session_uuid(self) -> str:
        return self.session.session_uuid

    @property
    def message_uuid(self) -> str | None:
        return self.session.message_uuid

    @property
    def remote_addr(self) -> str:
        return self.session.remote_addr

    @property
    def store(self) -> dict[str, Any]:
        return self.session.store

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready facts for out-of-process plugins; bytes arguments travel as text
        (UTF-8, undecodable bytes replaced) with the exact bytes in base64 beside them
        under `<name>_base64`."""
        s = self.session
        return {
            "hook": self.hook,
            "stage": self.stage,
            "session_uuid": s.session_uuid,
            "message_uuid": s.message_uuid,
            "server": s.server,
            "remote_addr": s.remote_addr,
            "local_addr": s.local_addr,
            "tls": s.tls,
            "helo": s.helo,
            "auth": {"mechanism": s.auth_mechanism, "username": s.auth_username},
            "envelope": {"mail_from": s.mail_from, "rcpt_to": list(s.rcpt_to)},
            "args": _wire_args(self.args),
            "store": {k: v for k, v in s.store.items() if _jsonable(v)},
            "event": self.event,
        }


def _wire_args(args: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in args.items():
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
            out[name] = data.decode("utf-8", "replace")
            out[f"{name}_base64"] = base64.b64encode(data).decode("ascii")
        elif isinstance(value, BaseException):
            out[name] = f"{type(value).__name__}: {value}"
        else:
            out[name] = value
    return out


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | dict)
