"""One-shot SMTP delivery: a message handed to one downstream server, once, with aiosmtplib.

Used by Mailpit's release route (compat/mailpit.py) and meant for the router: no queue and no
retry here; the caller decides what a failure means. aiosmtplib is imported when a message
is delivered, so a mailpipe that never relays never loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailpipe.config import RelayConfig


class DeliveryError(Exception):
    """The downstream server refused the message, or could not be reached; the text says
    which, as the server put it."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """What the server answered: per refused recipient its reply, and the final reply."""

    refused: dict[str, str]
    reply: str


async def deliver(relay: RelayConfig, raw: bytes, sender: str,
                  recipients: Sequence[str]) -> Delivered:
    """Send `raw` from `sender` to `recipients` through `relay`. Raises DeliveryError when
    nothing was accepted (every recipient refused, the server down, TLS or AUTH failed)."""
    import aiosmtplib

    if not recipients:
        raise DeliveryError("no recipients")
    try:
        refused, reply = await aiosmtplib.send(
            raw,
            sender=sender,
            recipients=list(recipients),
            hostname=relay.host,
            port=relay.port,
            use_tls=relay.tls == "tls",
            # False, not None: "none" must never upgrade on its own, "starttls" must.
            start_tls=relay.tls == "starttls",
            validate_certs=not relay.allow_insecure,
            username=relay.auth.username if relay.auth else None,
            password=relay.auth.password if relay.auth else None,
            timeout=relay.timeout,
        )
    except aiosmtplib.SMTPRecipientsRefused as exc:
        raise DeliveryError(_refusals({r.recipient: str(r) for r in exc.recipients})) from None
    except aiosmtplib.SMTPResponseException as exc:
        raise DeliveryError(f"{exc.code} {exc.message}") from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise DeliveryError(str(exc) or type(exc).__name__) from None
    return Delivered({rcpt: f"{r.code} {r.message}" for rcpt, r in refused.items()}, reply)


def _refusals(by_recipient: dict[str, str]) -> str:
    return "; ".join(f"{rcpt}: {why}" for rcpt, why in by_recipient.items())
