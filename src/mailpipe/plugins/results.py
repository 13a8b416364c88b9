"""What a hook answers: one `HookResult`, built with `Continue()`, `Accept()`, `Reject()`,
`Tempfail()`, `Disconnect()` or `Modify()`. Returning None is `Continue()`.

The same six actions travel over the wire to out-of-process plugins (`HookResult.Action` in
proto/mailpipe/plugin/v1/plugin.proto, same numbers), so `from_wire` and `ACTIONS` are here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

__all__ = [
    "Accept",
    "Action",
    "Continue",
    "Disconnect",
    "HookResult",
    "Modify",
    "Reject",
    "Tempfail",
    "from_wire",
]


class Action(IntEnum):
    """The proto's HookResult.Action values, in the same order."""

    CONTINUE = 0  # no opinion: later plugins run
    ACCEPT = 1  # the default (accepting) reply now: later plugins on this hook are skipped
    REJECT = 2  # 5xx
    TEMPFAIL = 3  # 4xx: the client retries later
    DISCONNECT = 4  # 421 and close
    MODIFY = 5  # continue, applying the modifications


# The reply each refusing action gets when the plugin names no code of its own.
DEFAULT_REPLY = {
    Action.REJECT: (550, "5.7.1", "Rejected by policy"),
    Action.TEMPFAIL: (451, "4.7.1", "Temporarily rejected, try again later"),
    Action.DISCONNECT: (421, "4.7.0", "Closing connection"),
}


@dataclass(frozen=True, slots=True)
class HookResult:
    """One hook call's answer. `code`, `enhanced` and `message` shape the SMTP reply of a
    refusal (0 or empty: the action's default); the modification fields count only for
    MODIFY: headers to add (after mailpipe's own, at the top) or to set (replacing every
    header of that name), the recipients to deliver to instead, tags for the event."""

    action: Action = Action.CONTINUE
    code: int = 0
    enhanced: str = ""
    message: str = ""
    add_headers: tuple[tuple[str, str], ...] = ()
    set_headers: tuple[tuple[str, str], ...] = ()
    rcpt_to: tuple[str, ...] | None = None
    tags: tuple[str, ...] = ()

    @property
    def refuses(self) -> bool:
        return self.action in DEFAULT_REPLY

    def reply(self) -> tuple[int, str, str]:
        """(code, enhanced code, text) of a refusal, defaults filled in, code kept in its
        class: a REJECT answering 4xx (or a TEMPFAIL 5xx) gets the action's default code."""
        code, enhanced, text = DEFAULT_REPLY[self.action]
        wanted = self.code
        if wanted and str(wanted)[0] == str(code)[0] and 400 <= wanted < 600:
            code = wanted
        if self.enhanced and self.enhanced[0] == str(code)[0]:
            enhanced = self.enhanced
        return code, enhanced, self.message or text


def Continue() -> HookResult:  # CamelCase: each reads as the action it returns
    return _CONTINUE


def Accept() -> HookResult:
    return _ACCEPT


def Reject(message: str = "", code: int = 0, enhanced: str = "") -> HookResult:
    return HookResult(Action.REJECT, code, enhanced, message)


def Tempfail(message: str = "", code: int = 0, enhanced: str = "") -> HookResult:
    return HookResult(Action.TEMPFAIL, code, enhanced, message)


def Disconnect(message: str = "", enhanced: str = "") -> HookResult:
    return HookResult(Action.DISCONNECT, 421, enhanced, message)


def Modify(
    add_headers: Any = (),
    set_headers: Any = (),
    rcpt_to: Any = None,
    tags: Any = (),
) -> HookResult:
    """Headers as (name, value) pairs or a mapping; recipients and tags as lists."""
    return HookResult(
        Action.MODIFY,
        add_headers=_pairs(add_headers, "add_headers"),
        set_headers=_pairs(set_headers, "set_headers"),
        rcpt_to=None if rcpt_to is None else _strings(rcpt_to, "rcpt_to"),
        tags=_strings(tags, "tags"),
    )


_CONTINUE = HookResult()
_ACCEPT = HookResult(Action.ACCEPT)


def from_wire(action: int, code: int, enhanced: str, message: str,
              modifications: dict[str, Any] | None) -> HookResult:
    """An out-of-process plugin's HookResult (its modifications_json already decoded)."""
    try:
        kind = Action(action)
    except ValueError:
        raise ValueError(f"unknown action {action}") from None
    if kind is Action.MODIFY:
        mods = modifications or {}
        if not isinstance(mods, dict):
            raise ValueError("modifications_json must be a JSON object")
        unknown = set(mods) - {"add_headers", "set_headers", "rcpt_to", "tags"}
        if unknown:
            raise ValueError(f"unknown modifications: {', '.join(sorted(unknown))}")
        return Modify(mods.get("add_headers", ()), mods.get("set_headers", ()),
                      mods.get("rcpt_to"), mods.get("tags", ()))
    return HookResult(kind, code, enhanced, message)


def _pairs(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, dict) else value
    pairs = []
    for item in items:
        if not (isinstance(item, list | tuple) and len(item) == 2
                and all(isinstance(part, str) for part in item)):
            raise ValueError(f"{what}: expected [name, value] pairs of strings, got {item!r}")
        name, text = item
        if not name or any(c in name for c in ":\r\n \t") or any(c in text for c in "\r\n"):
            raise ValueError(f"{what}: not a valid header: {name!r}: {text!r}")
        pairs.append((name, text))
    return tuple(pairs)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{what}: expected a list of strings, got {value!r}")
    if any(c in item for item in value for c in "\r\n"):
        raise ValueError(f"{what}: line breaks are not allowed")
    return tuple(value)
