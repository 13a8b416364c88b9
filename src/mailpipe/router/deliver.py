"""One-shot delivery of a stored message to an SMTP server: what "release" means in MailHog
and Mailpit. One connection, one transaction, then it closes; no queue, no retries (the
caller answers the error to whoever asked)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import aiosmtplib

Mechanism = Literal["PLAIN", "LOGIN", "CRAM-MD5"]
MECHANISMS: dict[str, Mechanism] = {"PLAIN": "PLAIN", "LOGIN": "LOGIN", "CRAM-MD5": "CRAM-MD5",
                                    "CRAMMD5": "CRAM-MD5"}  # MailHog spells it CRAMMD5
DEFAULT_TIMEOUT = 30.0


class DeliveryError(Exception):
    """The server could not be reached, or refused the message; the text says which."""


@dataclass(frozen=True, slots=True)
class Relay:
    """Where to deliver: host and port, optional AUTH, and whether to insist on TLS
    (STARTTLS; None uses it when the server offers it)."""

    host: str
    port: int = 25
    username: str | None = None
    password: str | None = None
    mechanism: Mechanism | None = None  # None: the best the server offers
    starttls: bool | None = None
    timeout: float = DEFAULT_TIMEOUT


def mechanism(name: str | None) -> Mechanism | None:
    """An AUTH mechanism as a client names it ("" or None: pick one); ValueError if unknown."""
    if not name:
        return None
    found = MECHANISMS.get(name.strip().upper())
    if found is None:
        raise ValueError(f"unknown AUTH mechanism {name!r} (PLAIN, LOGIN or CRAM-MD5)")
    return found


async def deliver(raw: bytes, relay: Relay, mail_from: str, rcpt_to: list[str]) -> None:
    """Send `raw` as it is from `mail_from` to `rcpt_to` through `relay`."""
    if not rcpt_to:
        raise DeliveryError("no recipient to deliver to")
    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, timeout=relay.timeout,
                             start_tls=relay.starttls)
    try:
        async with client:
            if relay.username is not None or relay.password is not None:
                await _login(client, relay)
            refused, _ = await client.sendmail(mail_from, rcpt_to, raw)
    except aiosmtplib.SMTPException as exc:
        raise DeliveryError(f"{relay.host}:{relay.port}: {exc}") from None
    except OSError as exc:
        raise DeliveryError(f"{relay.host}:{relay.port}: {exc.strerror or exc}") from None
    if refused:
        detail = "; ".join(f"{rcpt}: {reply.code} {reply.message}"
                           for rcpt, reply in refused.items())
        raise DeliveryError(f"{relay.host}:{relay.port} refused {detail}")


async def _login(client: aiosmtplib.SMTP, relay: Relay) -> None:
    username, password = relay.username or "", relay.password or ""
    if relay.mechanism is None:
        await client.login(username, password)
    elif relay.mechanism == "PLAIN":
        await client.auth_plain(username, password)
    elif relay.mechanism == "LOGIN":
        await client.auth_login(username, password)
    else:
        await client.auth_crammd5(username, password)
