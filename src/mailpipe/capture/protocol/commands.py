"""Parsing of command lines: the verb, MAIL/RCPT paths and their parameters, BDAT's
arguments. Pure functions over strings; what a command does lives in the connection."""

from __future__ import annotations

# Known SMTP verbs we do not implement: 502 rather than 500, like Postfix.
NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML", "BURL"})


def strip_keyword(arg: str, keyword: str) -> tuple[str | None, bool]:
    """`FROM:<a>` -> (`<a>`, True); tolerates `FROM: <a>` and a missing colon (False)."""
    n = len(keyword)
    head = arg[: n + 1].upper()
    if head == keyword + ":":
        return arg[n + 1 :].lstrip(), True
    if head[:n] == keyword and (len(arg) == n or arg[n] in " \t"):
        return arg[n:].lstrip(), False
    return None, False


def parse_path(rest: str) -> tuple[str | None, list[str]]:
    """`<addr> P1 P2` or `addr P1` -> (addr, [P1, P2]); None when unparseable."""
    if rest[:1] == "<":
        end = rest.find(">")
        if end < 0:
            return None, []
        return rest[1:end], rest[end + 1 :].split()
    parts = rest.split()
    if not parts:
        return None, []
    return parts[0], parts[1:]


BAD_SIZE = -1


def size_param(params: list[str]) -> int | None:
    """MAIL's `SIZE=n` (RFC 1870): n; None without SIZE; BAD_SIZE when n is not a decimal
    number (`SIZE=-5`, `SIZE=1e9`, `SIZE=`, `SIZE`). Other parameters are not judged: a
    capture server takes what it does not know."""
    for param in params:
        key, equals, value = param.partition("=")
        if key.upper() == "SIZE":
            if not (equals and value.isascii() and value.isdigit()):
                return BAD_SIZE
            # int() refuses very long digit strings; anything this long is huge anyway
            return int(value) if len(value) <= 18 else 10**18
    return None


def parse_bdat(arg: str) -> tuple[int, bool] | None:
    """`1024 LAST` -> (1024, True); None when malformed."""
    parts = arg.split()
    count = parts[0] if parts else ""
    if (
        len(parts) > 2
        or not (count.isascii() and count.isdigit() and len(count) <= 18)
        or (len(parts) == 2 and parts[1].upper() != "LAST")
    ):
        return None
    return int(count), len(parts) == 2


def mask_auth(line: str) -> str:
    """`AUTH PLAIN secret` -> `AUTH PLAIN ****`, for logs."""
    parts = line.split(None, 2)
    return f"{parts[0]} {parts[1]} ****" if len(parts) == 3 else line
