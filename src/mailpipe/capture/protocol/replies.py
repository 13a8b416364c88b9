"""Every reply text of the SMTP core, and the violation texts it reports.

Fixed replies are bytes built once; the few that carry a value are functions."""

from __future__ import annotations

from functools import lru_cache

from ..types import Reply
from .settings import ProtocolSettings

# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
DATA_LINE_LIMIT = 1000

OK = b"250 2.0.0 Ok\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
DATA_GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
BYE = b"221 2.0.0 Bye\r\n"
VRFY = b"252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n"
HELP = (
    b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP AUTH STARTTLS\r\n"
)
UNRECOGNIZED = b"500 5.5.2 Command unrecognized\r\n"
NOT_IMPLEMENTED = b"502 5.5.1 Command not implemented\r\n"
LINE_TOO_LONG = b"500 5.5.2 Line too long\r\n"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
NEED_RCPT = b"503 5.5.1 Error: need RCPT command\r\n"
NESTED_MAIL = b"503 5.5.1 Error: nested MAIL command\r\n"
DATA_AFTER_BDAT = b"503 5.5.1 Error: DATA not allowed after BDAT\r\n"
TOO_MANY_RCPTS = b"452 4.5.3 Too many recipients\r\n"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
LOCAL_ERROR = b"451 4.3.0 Error: local error in processing\r\n"
SYNTAX_EHLO = b"501 5.5.4 Syntax: EHLO hostname\r\n"
SYNTAX_HELO = b"501 5.5.4 Syntax: HELO hostname\r\n"
SYNTAX_MAIL = b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
SYNTAX_RCPT = b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
SYNTAX_SIZE = b"501 5.5.4 Bad SIZE parameter: SIZE takes a decimal number of octets (RFC 1870)\r\n"
SYNTAX_BDAT = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
SYNTAX_AUTH = b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
SYNTAX_STARTTLS = b"501 5.5.4 Syntax: STARTTLS\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
AUTH_CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"
AUTH_BAD_BASE64 = b"501 5.5.2 Invalid base64 data\r\n"
AUTH_UNKNOWN = b"504 5.5.4 Unrecognized authentication type\r\n"
AUTH_TWICE = b"503 5.5.1 Error: already authenticated\r\n"
AUTH_IN_TRANSACTION = b"503 5.5.1 Error: MAIL transaction in progress\r\n"
CHALLENGE_EMPTY = b"334 \r\n"
CHALLENGE_USERNAME = b"334 VXNlcm5hbWU6\r\n"  # "Username:"
CHALLENGE_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
TLS_READY = b"220 2.0.0 Ready to start TLS\r\n"
TLS_ACTIVE = b"503 5.5.1 Error: TLS already active\r\n"

# ---- violations -----------------------------------------------------------------------
V_BARE_LF_COMMAND = "bare LF line ending in command"
V_BARE_LF_DATA = "bare LF line ending in message data"
# SMTP smuggling (body.py's docstring): what ended DATA, or did not, when it was not CRLF.CRLF
V_DOT_LINE = ("bare LF or CR before/after '.' in DATA: not an end of data"
              " (SMTP smuggling pattern)")
V_BARE_LF_END = ("DATA ended at a '.' line with bare LF: accepted because every command line"
                 " of the session ended with bare LF")
V_LONG_DATA_LINE = f"message data line longer than {DATA_LINE_LIMIT} bytes"
V_EIGHT_BIT = "8-bit message data without BODY=8BITMIME or SMTPUTF8"
V_NO_HELO = "MAIL without HELO/EHLO"
V_NO_COLON = "MAIL/RCPT without colon after FROM/TO"
V_PRE_TLS_DATA = "input sent before the TLS handshake discarded"
V_OVERLONG_LINE = "<over-long line discarded>"


@lru_cache(maxsize=64)
def greeting(hostname: str) -> bytes:
    return f"220 {hostname} ESMTP mailpipe\r\n".encode()


def helo(hostname: str) -> bytes:
    return f"250 {hostname}\r\n".encode()


def bdat_received(size: int) -> bytes:
    return f"250 2.0.0 {size} bytes received\r\n".encode()


def challenge(data: bytes) -> bytes:
    return b"334 " + data + b"\r\n"


def timeout(hostname: str) -> bytes:
    return f"421 4.4.2 {hostname} Error: timeout exceeded\r\n".encode()


def shutting_down(hostname: str) -> bytes:
    return f"421 4.3.2 {hostname} Service shutting down\r\n".encode()


def v_long_command(limit: int) -> str:
    return f"command line longer than {limit} bytes"


def v_unimplemented(verb: str) -> str:
    return f"unimplemented command {verb}"


def v_unrecognized(verb: str) -> str:
    return f"unrecognized command {verb[:32]!r}"


@lru_cache(maxsize=64)
def ehlo(settings: ProtocolSettings, tls_active: bool) -> bytes:
    size = settings.max_message_size
    lines = [
        settings.hostname,
        "PIPELINING",
        f"SIZE {size}" if size else "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "CHUNKING",
        "ENHANCEDSTATUSCODES",
    ]
    if settings.auth_mechanisms:
        lines.append("AUTH " + " ".join(settings.auth_mechanisms))
    if settings.tls_available and not tls_active:
        lines.append("STARTTLS")
    lines.append("HELP")
    return Reply(250, "\n".join(lines)).encode()
