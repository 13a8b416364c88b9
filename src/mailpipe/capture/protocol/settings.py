"""What one listener's sessions are allowed; built from the listener's config by the
transport (`capture.server.protocol_settings`), so no default here competes with config.py's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProtocolSettings:
    hostname: str
    max_message_size: int  # 0 = unlimited
    max_recipients: int  # 0 = unlimited
    max_line_length: int  # longest command line accepted (bytes, w/o CRLF)
    spool_threshold: int  # a body bigger than this is handed out in BodyChunk events
    auth_mechanisms: tuple[str, ...]  # offered in EHLO, in this order; others answer 504
    tls_available: bool = False  # advertise STARTTLS
    transcript: bool = False  # keep the session's commands and replies
    trace: bool = False  # emit Trace events (for DEBUG logs)
