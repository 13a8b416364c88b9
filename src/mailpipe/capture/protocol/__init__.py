"""The SMTP server protocol as a sans-I/O state machine (h11 style): bytes in, events out.

`SMTPConnection` (connection.py) wires the parts: the state table (states.py), line framing
(lines.py), command parsing (commands.py), reply texts (replies.py), the body scanner
(body.py), the body readers (reception.py) and the SASL exchanges (auth.py). Storing big
bodies, the clock and the verdicts belong to the driver.
"""

from .connection import SMTPConnection
from .replies import (
    V_BARE_LF_COMMAND,
    V_BARE_LF_DATA,
    V_BARE_LF_END,
    V_DOT_LINE,
    V_EIGHT_BIT,
    V_LONG_DATA_LINE,
    V_NO_COLON,
    V_NO_HELO,
    V_PRE_TLS_DATA,
)
from .settings import ProtocolSettings

__all__ = [
    "V_BARE_LF_COMMAND",
    "V_BARE_LF_DATA",
    "V_BARE_LF_END",
    "V_DOT_LINE",
    "V_EIGHT_BIT",
    "V_LONG_DATA_LINE",
    "V_NO_COLON",
    "V_NO_HELO",
    "V_PRE_TLS_DATA",
    "ProtocolSettings",
    "SMTPConnection",
]
