"""Every hook mailpipe fires: its family, its arguments and what its result can do.

`HOOKS` is the one table of them; pluggy's hook specifications (`MailpipeSpecs`) are made
from it, so a plugin method whose name is a hook but whose arguments are not the hook's
is refused at load with pluggy's own message. Every hook also receives `ctx`
(a `HookContext`) when it asks for it.

`effect` says what a result can do at that hook:
- "session": a refusal answers this command (a reject at on_rcpt_to refuses that
  recipient only; at on_mail_from the transaction; at on_connect the whole session);
- "message": a refusal answers the message's final reply (nothing reaches a sink);
- "notify": the result is ignored (the hook reports what happened).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailpipe.capture.types import Stage

PROJECT = "mailpipe"


@dataclass(frozen=True, slots=True)
class Hook:
    name: str
    family: str
    args: tuple[str, ...]
    stage: Stage | None  # the SMTP stage it is fired at (None: outside a command)
    effect: str  # "session", "message" or "notify"
    when: str


def _hooks(*rows: tuple[str, str, tuple[str, ...], Stage | None, str, str]) -> dict[str, Hook]:
    return {row[0]: Hook(*row) for row in rows}


S = Stage
HOOKS: dict[str, Hook] = _hooks(
    ("on_connect", "connection", ("remote_addr",), S.CONNECT, "session",
     "a client connected, before the greeting; a refusal replaces the 220 and closes"),
    ("on_disconnect", "connection", ("remote_addr",), None, "notify",
     "the connection closed, for whatever reason"),
    ("on_helo", "command", ("hostname",), S.HELO, "session", "HELO, before its 250"),
    ("on_ehlo", "command", ("hostname",), S.HELO, "session", "EHLO, before its 250"),
    ("on_auth", "command", ("mechanism", "username"), S.AUTH, "session",
     "AUTH's credentials were captured, before the 235; a refusal fails the AUTH"),
    ("on_starttls", "command", (), S.STARTTLS, "session",
     "STARTTLS, before the 220 that starts the handshake"),
    ("on_mail_from", "transaction", ("sender", "params"), S.MAIL, "session",
     "MAIL FROM, before its 250; a refusal refuses the transaction"),
    ("on_rcpt_to", "transaction", ("recipient", "params"), S.RCPT, "session",
     "RCPT TO, before its 250; a refusal refuses that recipient only"),
    ("on_data", "transaction", (), S.DATA, "session",
     "DATA (or the first BDAT), before the body is read; a refusal refuses the body"),
    ("on_headers", "message", ("headers",), S.HEADERS, "message",
     "the header block has arrived (the body is still coming); a refusal answers the "
     "message's final reply once the body has been read"),
    ("on_body", "message", ("body",), S.MESSAGE, "message",
     "the whole message has arrived; `body` is what follows the headers"),
    ("on_message_complete", "message", ("raw",), S.MESSAGE, "message",
     "the whole message has arrived and the event exists (ctx.event); last before sinks"),
    ("on_enqueue", "queue", ("queue_id",), None, "notify",
     "a job holding the email was pushed to a pipeline"),
    ("on_dequeue", "queue", ("queue_id",), None, "notify",
     "a consumer took a job off a pipeline"),
    ("on_queue_retry", "queue", ("queue_id", "attempt"), None, "notify",
     "a job goes back on its pipeline for another attempt; `attempt` is the one it goes "
     "back for (2 after the first failure)"),
    ("on_pre_delivery", "delivery", ("recipient",), S.MESSAGE, "message",
     "before the sinks get the email, once per recipient; a refusal refuses the message"),
    ("on_delivery_attempt", "delivery", ("recipient", "attempt"), None, "notify",
     "a sink (workers, jobs, router) is about to take the email"),
    ("on_delivery_success", "delivery", ("recipient",), None, "notify",
     "the sinks took the email (the client gets 250)"),
    ("on_delivery_failure", "delivery", ("recipient", "error"), None, "notify",
     "a sink failed the email (the client gets 4xx or 5xx)"),
    ("on_rate_limit_check", "security", ("remote_addr",), S.CONNECT, "session",
     "a client connected, before on_connect; a tempfail is the usual answer"),
    ("on_greylist_check", "security", ("sender", "recipient", "remote_addr"), S.RCPT,
     "session", "RCPT TO, after on_rcpt_to; a tempfail greylists that recipient"),
    ("on_reputation_check", "security", ("remote_addr", "domain"), S.MAIL, "session",
     "MAIL FROM, after on_mail_from; `domain` is the sender's (the HELO name if none)"),
    ("on_antivirus_scan", "content", ("content",), S.MESSAGE, "message",
     "the whole message, after on_body"),
    ("on_antispam_scan", "content", ("content",), S.MESSAGE, "message",
     "the whole message, after on_antivirus_scan"),
    ("on_content_filter", "content", ("content",), S.MESSAGE, "message",
     "the whole message, after on_antispam_scan"),
    ("on_spf_check", "authentication", ("sender", "remote_ip"), S.MAIL, "session",
     "MAIL FROM, after on_reputation_check; the result's message is the SPF result "
     "(pass, fail, softfail, neutral, none...) handed to on_dmarc_check"),
    ("on_dkim_verify", "authentication", ("content",), S.MESSAGE, "message",
     "the whole message, after the content filters; the result's message is the DKIM "
     "result handed to on_dmarc_check"),
    ("on_dmarc_check", "authentication", ("sender", "spf_result", "dkim_result"), S.MESSAGE,
     "message", "after on_dkim_verify"),
    ("on_metrics_collect", "metrics", ("event", "data"), None, "notify",
     "mailpipe counted something: event is connection_closed, email_accepted or "
     "email_refused, data its numbers"),
    ("on_error", "error", ("error", "stage"), None, "notify",
     "a plugin call raised, timed out or answered nonsense; `stage` is the hook's name"),
    ("on_recovery", "error", ("recovered", "stage"), None, "notify",
     "a plugin switched off by its circuit breaker is back (`recovered` is its name)"),
)
del S

# The order hooks of one SMTP stage run in: the table's order within the stage.
STAGE_HOOKS: dict[Stage, tuple[str, ...]] = {}
for _hook in HOOKS.values():
    if _hook.stage is not None and _hook.effect != "notify":
        STAGE_HOOKS.setdefault(_hook.stage, ())
        STAGE_HOOKS[_hook.stage] += (_hook.name,)
# Within MESSAGE: delivery checks and content first, the final word last.
STAGE_HOOKS[Stage.MESSAGE] = (
    "on_body", "on_antivirus_scan", "on_antispam_scan", "on_content_filter",
    "on_dkim_verify", "on_dmarc_check", "on_message_complete", "on_pre_delivery",
)
STAGE_HOOKS[Stage.CONNECT] = ("on_rate_limit_check", "on_connect")
STAGE_HOOKS[Stage.MAIL] = ("on_mail_from", "on_reputation_check", "on_spf_check")
STAGE_HOOKS[Stage.RCPT] = ("on_rcpt_to", "on_greylist_check")


# pluggy and the specifications made with it (`hookspec`, `hookimpl`, `MailpipeSpecs`) are
# built on first use (module __getattr__): only loading a Python plugin needs them, and a
# mailpipe without plugins does not import pluggy at all (idle memory, issue 13).
_PLUGGY_NAMES = ("hookspec", "hookimpl", "MailpipeSpecs")


def _spec(hookspec: Any, hook: Hook) -> object:
    # pluggy reads argument names from the function's code, so each spec is real code.
    namespace: dict[str, object] = {}
    exec(f"def {hook.name}({', '.join(('ctx', *hook.args))}):\n    pass", namespace)
    spec = namespace[hook.name]
    spec.__doc__ = hook.when  # type: ignore[attr-defined]
    return hookspec(spec)


def _pluggy_names() -> dict[str, Any]:
    import pluggy  # here, not at the top: see _PLUGGY_NAMES

    hookspec = pluggy.HookspecMarker(PROJECT)

    class MailpipeSpecs:
        """pluggy hook specifications, one per row of HOOKS."""

    for hook in HOOKS.values():
        setattr(MailpipeSpecs, hook.name, staticmethod(_spec(hookspec, hook)))
    MailpipeSpecs.__module__, MailpipeSpecs.__qualname__ = __name__, "MailpipeSpecs"
    return {"hookspec": hookspec, "hookimpl": pluggy.HookimplMarker(PROJECT),
            "MailpipeSpecs": MailpipeSpecs}


def __getattr__(name: str) -> Any:
    if name in _PLUGGY_NAMES:
        values = _pluggy_names()
        globals().update(values)  # made once: later lookups find them in the module
        return values[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
