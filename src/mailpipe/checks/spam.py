"""Spam score of a stored email from SpamAssassin's spamd (`spamassassin` in the config,
docs/spam.md): the score, the threshold, and every rule that fired with its score and
description, from one REPORT request. The protocol itself is checks/spamd.py (sans I/O);
this is its socket side, bounded in time (`timeout`) and size (`max_size`).

`mailpit_sa_check` gives the same result in Mailpit's shape, for its `sa-check` route.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mailpipe.checks.spamd import (
    Reply,
    ReplyParser,
    Rule,
    SpamdProtocolError,
    SpamdRefused,
    report_rules,
    request,
)
from mailpipe.config import is_loopback, parse_listen, split_host_port

if TYPE_CHECKING:
    from mailpipe.config import SpamAssassinConfig

READ_CHUNK = 65536
NOT_CONFIGURED = ("spam checking is not configured: set spamassassin.addr to a spamd "
                  "address (see docs/spam.md)")


class SpamCheckError(Exception):
    """The email could not be checked; the message says why, for the person asking."""


class SpamNotConfigured(SpamCheckError):
    """No spamd is configured (spamassassin.addr)."""


class SpamdUnavailable(SpamCheckError):
    """spamd could not be reached."""


class SpamdTimeout(SpamCheckError):
    """spamd did not answer within spamassassin.timeout."""


class SpamdBadReply(SpamCheckError):
    """spamd answered something that is not a spamd reply, or refused the check."""


class MessageTooLarge(SpamCheckError):
    """The email is larger than spamassassin.max_size: it is not sent to spamd."""


@dataclass(frozen=True, slots=True)
class SpamCheck:
    score: float
    threshold: float
    is_spam: bool
    rules: list[Rule]

    def as_json(self) -> dict[str, Any]:
        """mailpipe's own shape (GET /api/v1/messages/{uuid}/spam-check)."""
        return asdict(self)


def spamd_address(addr: str) -> tuple[str, int] | str:
    """spamassassin.addr: `host:port` (or tcp://host:port) as (host, port); a unix socket,
    `unix:///path` (or Mailpit's `unix:/path`), as its path. Raises ValueError."""
    if addr.startswith("unix:"):
        path = addr if addr.startswith("unix://") else "unix://" + addr[len("unix:"):]
        return str(parse_listen(path)[1])
    return split_host_port(addr)


def check_settings(addr: str | None, start: bool) -> None:
    """The spamassassin section's address rules, as config errors (ValueError)."""
    if addr is None:
        raise ValueError("spamassassin.start needs spamassassin.addr, the loopback "
                         "host:port spamd is to listen on (e.g. 127.0.0.1:7830)")
    address = spamd_address(addr)
    if isinstance(address, str):
        if start:
            raise ValueError("spamassassin.start runs spamd on a loopback host:port, not on "
                             "a unix socket")
        return
    if address[1] == 0:
        raise ValueError("spamassassin.addr needs spamd's port (0 is not one)")
    if start and not is_loopback(address[0]):
        raise ValueError(f"spamassassin.start runs spamd on loopback only: addr must be "
                         f"127.0.0.1:PORT or [::1]:PORT, got {addr!r}")


class SpamChecker:
    """A spamd client: one connection per check, as spamc does."""

    def __init__(self, addr: str, *, timeout: float = 10.0, max_size: int = 500 * 1024) -> None:
        self.address = spamd_address(addr)
        self.timeout = timeout
        self.max_size = max_size

    @classmethod
    def from_config(cls, config: SpamAssassinConfig) -> SpamChecker | None:
        """None when spam checking is off (no spamassassin.addr)."""
        if config.addr is None:
            return None
        return cls(config.addr, timeout=config.timeout, max_size=config.max_size)

    @property
    def where(self) -> str:
        """The address, for messages. (Imported here: the web app loads without capture.)"""
        from mailpipe.capture.server import format_addr

        return format_addr(self.address)

    async def check(self, raw: bytes) -> SpamCheck:
        """The email's score and rules. Raises a SpamCheckError."""
        if len(raw) > self.max_size:
            raise MessageTooLarge(
                f"the email is {len(raw)} bytes, more than spamassassin.max_size "
                f"({self.max_size} bytes): it was not sent to spamd (spamc, too, leaves "
                "larger emails unchecked; raise max_size to check it)")
        reply = await self._exchange(request("REPORT", raw))
        try:
            is_spam, score, threshold = reply.verdict()
            rules = report_rules(reply.body)
        except SpamdProtocolError as exc:
            raise SpamdBadReply(f"spamd at {self.where} answered something that is not a "
                                f"spamd report: {exc}") from None
        return SpamCheck(score=score, threshold=threshold, is_spam=is_spam, rules=rules)

    async def ping(self) -> None:
        """Whether spamd answers (PONG); raises a SpamCheckError."""
        await self._exchange(request("PING"))

    async def _exchange(self, payload: bytes) -> Reply:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._talk(payload)
        except TimeoutError:
            raise SpamdTimeout(f"spamd at {self.where} did not answer within "
                               f"{self.timeout:g} s (spamassassin.timeout)") from None
        except ConnectionRefusedError:
            raise SpamdUnavailable(f"spamd at {self.where} refused the connection: is it "
                                   "running? (see docs/spam.md)") from None
        except FileNotFoundError:
            raise SpamdUnavailable(f"spamd's socket {self.where} does not exist: is spamd "
                                   "running? (see docs/spam.md)") from None
        except OSError as exc:
            raise SpamdUnavailable(f"cannot talk to spamd at {self.where}: "
                                   f"{exc.strerror or exc}") from None
        except SpamdRefused as exc:
            raise SpamdBadReply(f"spamd at {self.where} did not check the email: "
                                f"{exc}") from None
        except SpamdProtocolError as exc:
            raise SpamdBadReply(f"spamd at {self.where} answered something that is not "
                                f"the spamd protocol: {exc}") from None

    async def _talk(self, payload: bytes) -> Reply:
        if isinstance(self.address, str):
            reader, writer = await asyncio.open_unix_connection(self.address)
        else:
            reader, writer = await asyncio.open_connection(*self.address)
        try:
            writer.write(payload)
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # as spamc does: the request is whole
            parser = ReplyParser()
            while chunk := await reader.read(READ_CHUNK):
                if (reply := parser.feed(chunk)) is not None:
                    return reply
            return parser.eof()
        finally:
            writer.close()
            with contextlib.suppress(OSError):  # reset by a peer that has said all it will
                await writer.wait_closed()


async def check_spam(checker: SpamChecker | None, raw: bytes) -> SpamCheck:
    """`checker.check(raw)`; SpamNotConfigured when there is no checker."""
    if checker is None:
        raise SpamNotConfigured(NOT_CONFIGURED)
    return await checker.check(raw)


async def mailpit_sa_check(checker: SpamChecker | None, raw: bytes) -> dict[str, Any]:
    """Mailpit's SpamAssassinResponse (GET /api/v1/message/{ID}/sa-check): IsSpam, Error,
    Score and Rules [{Name, Score, Description}], scores rounded down to one decimal as
    Mailpit does. A check that fails is answered as Mailpit answers it, with the reason in
    Error; SpamNotConfigured is raised when no spamd is configured (Mailpit answers that
    with a 400 error)."""
    try:
        result = await check_spam(checker, raw)
    except SpamNotConfigured:
        raise
    except SpamCheckError as exc:
        return {"IsSpam": False, "Error": str(exc), "Score": 0.0, "Rules": []}
    return {
        "IsSpam": result.is_spam,
        "Error": "",
        "Score": _round_down(result.score),
        "Rules": [
            {"Name": rule.name, "Score": _round_down(rule.score),
             "Description": rule.description}
            for rule in result.rules
        ],
    }


def _round_down(value: float) -> float:
    return math.floor(value * 10) / 10
