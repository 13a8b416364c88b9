"""The state table of an SMTP session, as data.

Two things make up the state: the `Mode` says what the next input bytes are (a command, an
AUTH response, DATA or BDAT content, nothing while the driver is asked for a verdict), the
`Phase` says where the mail transaction stands. `COMMANDS` says, for each verb and phase,
whether the verb is legal there and the phase it leads to; `MODES` which mode may follow
which. `SMTPConnection._goto` is the only place either changes.
"""

from __future__ import annotations

from enum import IntEnum

from . import replies


class Mode(IntEnum):
    # Ordered so that the hot checks are single comparisons: lines are read in modes
    # <= AUTH, input is not processed at all in modes >= WAIT.
    COMMAND = 0
    AUTH = 1  # the next line answers a 334 challenge
    DATA = 2
    BDAT = 3
    WAIT = 4  # a verdict is awaited; input is buffered
    WAIT_TLS = 5  # the TLS handshake is awaited; input is discarded
    CLOSED = 6


class Phase(IntEnum):
    IDLE = 0  # no transaction
    MAIL = 1  # MAIL given, no recipient yet
    RCPT = 2  # at least one recipient
    BDAT = 3  # at least one BDAT chunk kept


# Which mode may follow which (a mode may always stay as it is).
MODES: dict[Mode, frozenset[Mode]] = {
    Mode.COMMAND: frozenset(
        {Mode.AUTH, Mode.DATA, Mode.BDAT, Mode.WAIT, Mode.WAIT_TLS, Mode.CLOSED}
    ),
    Mode.AUTH: frozenset({Mode.COMMAND, Mode.WAIT, Mode.CLOSED}),
    Mode.DATA: frozenset({Mode.COMMAND, Mode.WAIT, Mode.CLOSED}),
    Mode.BDAT: frozenset({Mode.COMMAND, Mode.WAIT, Mode.CLOSED}),
    # a verdict resumes whatever was interrupted
    Mode.WAIT: frozenset({Mode.COMMAND, Mode.AUTH, Mode.DATA, Mode.BDAT, Mode.WAIT_TLS,
                          Mode.CLOSED}),
    Mode.WAIT_TLS: frozenset({Mode.COMMAND, Mode.CLOSED}),
    Mode.CLOSED: frozenset(),
}

# For each verb, one entry per Phase (IDLE, MAIL, RCPT, BDAT): the phase the verb leads to
# when it succeeds, or the reply refusing it there. Verbs that leave the phase as it is say
# so with SAME; a verb missing here is unknown (500) or unimplemented (502).
SAME = None
_ANY_SAME = (SAME, SAME, SAME, SAME)
_TO_IDLE = (Phase.IDLE, Phase.IDLE, Phase.IDLE, Phase.IDLE)
Entry = tuple[Phase | bytes | None, Phase | bytes | None, Phase | bytes | None,
              Phase | bytes | None]
COMMANDS: dict[str, Entry] = {
    "EHLO": _TO_IDLE,
    "HELO": _TO_IDLE,
    "RSET": _TO_IDLE,
    "STARTTLS": _TO_IDLE,  # once the handshake is done
    "MAIL": (Phase.MAIL, replies.NESTED_MAIL, replies.NESTED_MAIL, replies.NESTED_MAIL),
    "RCPT": (replies.NEED_MAIL, Phase.RCPT, Phase.RCPT, Phase.BDAT),
    # DATA leads back to IDLE once the message is delivered
    "DATA": (replies.NEED_MAIL, replies.NEED_RCPT, Phase.IDLE, replies.DATA_AFTER_BDAT),
    # a refused BDAT still reads its chunk; BDAT LAST leads back to IDLE like DATA
    "BDAT": (replies.NEED_MAIL, replies.NEED_RCPT, Phase.BDAT, Phase.BDAT),
    "AUTH": (SAME, replies.AUTH_IN_TRANSACTION, replies.AUTH_IN_TRANSACTION,
             replies.AUTH_IN_TRANSACTION),
    "NOOP": _ANY_SAME,
    "VRFY": _ANY_SAME,
    "HELP": _ANY_SAME,
    "QUIT": _ANY_SAME,
}
