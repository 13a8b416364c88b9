"""`SMTPConnection`: one SMTP session, server side, as a sans-I/O state machine (h11 style).

It takes the bytes a client sent and returns events for whoever drives it: bytes to send,
body chunks to store, verdicts to ask for, complete messages, "start TLS now", "close". It
never touches a socket, a file, a clock (the driver gives one) or a logger, so it can be
tested byte by byte. The parts it wires together each have one job: `states` (which command
is legal where, and where it leads), `lines` (where a command line ends), `commands`
(parsing), `replies` (every text), `reception` (a message body coming in, with `body`'s
scanner) and `auth` (the SASL exchanges). What stays here: the mode and phase changes, the
verdict holds, which reply answers what, and the events.

A held stage asks its verdict with a `VerdictNeeded` event and waits for `verdict()`. A driver
that can often answer at once (plugins that are plain functions) may set `judge`: the core
asks it first and, given a verdict, goes on in the same pass with no event and no wait.

It is deliberately permissive: mailpipe captures what applications send, so sloppy clients
(bare LF, long lines, 8-bit data without BODY=8BITMIME...) are accepted and their sins are
reported as `Violation` events instead of being refused.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..types import (
    AuthInfo,
    BodyDropped,
    Close,
    Disconnect,
    Envelope,
    Event,
    MessageBody,
    MessageReceived,
    Proceed,
    Reply,
    Respond,
    Send,
    Stage,
    StartTLS,
    Trace,
    Verdict,
    VerdictNeeded,
    Violation,
)
from . import auth, replies
from .commands import (
    BAD_SIZE,
    NOT_IMPLEMENTED,
    mask_auth,
    parse_bdat,
    parse_path,
    size_param,
    strip_keyword,
)
from .lines import LineReader
from .reception import CHUNK, HEADERS, MORE, SKIPPED, BdatReader, DataReader
from .settings import ProtocolSettings
from .states import COMMANDS, MODES, Mode, Phase

__all__ = ["SMTPConnection"]

# Plain ints in the hot loops: comparing them is cheaper than comparing enum members.
_COMMAND = int(Mode.COMMAND)
_AUTH = int(Mode.AUTH)
_DATA = int(Mode.DATA)
_BDAT = int(Mode.BDAT)
_WAIT = int(Mode.WAIT)
_WAIT_TLS = int(Mode.WAIT_TLS)
_CLOSED = int(Mode.CLOSED)
_IDLE = int(Phase.IDLE)
_RCPT = int(Phase.RCPT)
_MESSAGE = Stage.MESSAGE  # an enum's attribute lookup costs more than a global's
_MODES = {int(k): frozenset(int(m) for m in v) for k, v in MODES.items()}
# How a verdict resolves a wait
_PROCEED, _REFUSE, _DISCONNECT = 0, 1, 2

# A hostile client must not grow these without bound (or make each check O(n)).
_MAX_VIOLATIONS = 50
_MAX_TRANSCRIPT = 10_000
_NO_STAGES: frozenset[Stage] = frozenset()

Then = Callable[[], None]
Refuse = Callable[[bytes], None]
# A verdict given at once, or None: ask with a VerdictNeeded event (see the module docstring).
Judge = Callable[[Stage, dict[str, object], Envelope | None], Verdict | None]


class SMTPConnection:
    """One SMTP session, server side. Feed it bytes, act on the events it returns.

    `clock` gives the time (received_at, the CRAM-MD5 nonce); `held` are the stages at
    which the driver wants to give a verdict (MESSAGE is always held)."""

    # Slots: past 30 attributes an instance dict loses CPython's fast attribute access.
    __slots__ = (
        "_authenticated",
        "_buf",
        "_clock",
        "_env",
        "_events",
        "_exchange",
        "_held",
        "_lines",
        "_log",
        "_mode",
        "_out",
        "_phase",
        "_reader",
        "_refuse_with",
        "_resume",
        "_stage",
        "_then",
        "_transcript",
        "_violations",
        "auth",
        "held",
        "helo",
        "judge",
        "settings",
        "tls_active",
    )

    def __init__(
        self,
        settings: ProtocolSettings,
        *,
        clock: Callable[[], datetime],
        tls_active: bool = False,
        held: frozenset[Stage] = _NO_STAGES,
    ) -> None:
        self.settings = settings
        self.tls_active = tls_active
        self.helo = ""
        self.auth = AuthInfo()
        self._clock = clock
        self._held = self.held = held
        self.judge: Judge | None = None
        self._mode = _COMMAND
        self._phase = _IDLE
        self._buf = bytearray()
        self._events: list[Event] = []
        self._out: list[bytes] = []  # replies not yet wrapped in a Send
        self._log = settings.transcript or settings.trace
        self._transcript: list[str] | None = [] if settings.transcript else None
        self._violations: list[str] = []  # since the last message
        self._lines = LineReader(settings.max_line_length)
        self._authenticated = False
        self._exchange: auth.Exchange | None = None
        self._env: Envelope | None = None
        # what a verdict resumes: the mode, and what Proceed or Respond then does
        self._resume = _COMMAND
        self._then: Then | None = None
        self._refuse_with: Refuse | None = None
        self._stage = _MESSAGE
        self._reader: DataReader | BdatReader | None = None  # the body being received

    # ---- public API -------------------------------------------------------------------

    @property
    def awaiting_reply(self) -> bool:
        """A verdict is awaited (the message's, or a held stage's)."""
        return self._mode == _WAIT

    @property
    def waiting_stage(self) -> Stage | None:
        return self._stage if self._mode == _WAIT else None

    @property
    def in_transaction(self) -> bool:
        # A message waiting for its verdict still has a client waiting for the reply.
        return self._phase != _IDLE or _DATA <= self._mode <= _WAIT

    @property
    def in_data(self) -> bool:
        return self._mode == _DATA or self._mode == _BDAT

    @property
    def closed(self) -> bool:
        return self._mode == _CLOSED

    @property
    def buffered(self) -> int:
        """Bytes received and not consumed yet: in command mode, a line still incomplete."""
        return len(self._buf)

    def start(self) -> list[Event]:
        greeting = replies.greeting(self.settings.hostname)
        if self._held and Stage.CONNECT in self._held:
            self._hold(Stage.CONNECT, {}, lambda: self._send(greeting), self._close)
        else:
            self._send(greeting)
        return self._take_events()

    def receive(self, data: bytes) -> list[Event]:
        mode = self._mode
        if mode >= _WAIT:
            if mode == _WAIT:
                self._buf += data
            elif mode == _WAIT_TLS and data:
                self._violation(replies.V_PRE_TLS_DATA)
            return self._take_events()
        self._buf += data
        self._run()
        return self._take_events()

    def verdict(self, verdict: Verdict, *, close_reply: Reply | None = None) -> list[Event]:
        """Answer the stage awaiting a verdict (a VerdictNeeded or a MessageReceived), then
        read on; with `close_reply`, end the session with it right after."""
        how, reply = self._judged(verdict, self._stage)
        return self._resolve(how, reply, close_reply)

    @staticmethod
    def _judged(verdict: Verdict, stage: Stage) -> tuple[int, bytes]:
        if type(verdict) is Proceed:
            return _PROCEED, b""
        if type(verdict) is Respond:
            if stage != _MESSAGE and not 400 <= verdict.code < 600:
                raise ValueError(f"a {stage.name} verdict must be 4xx or 5xx: {verdict}")
            return _REFUSE, verdict.reply().encode()
        if type(verdict) is Disconnect:
            return _DISCONNECT, verdict.reply().encode()
        raise TypeError(f"not a verdict: {verdict!r}")

    def reply_to_message(self, reply: Reply, *, close_after: bool = False,
                         close_reply: Reply | None = None) -> list[Event]:
        """`verdict()` for the end of a message, given as a Reply; with close_after, then end
        the session with `close_reply` (221 Bye unless given, e.g. a 421 when closing)."""
        if self._mode == _WAIT and self._stage != _MESSAGE:
            raise RuntimeError("no message is awaiting a reply")
        final = (close_reply or _BYE) if close_after else None
        return self._resolve(_REFUSE, reply.encode(), final)

    def _resolve(self, how: int, reply: bytes, close_reply: Reply | None) -> list[Event]:
        if self._mode != _WAIT:
            if self._mode == _CLOSED:
                return []
            raise RuntimeError("no verdict is awaited")
        then, refuse = self._then, self._refuse_with
        self._then = self._refuse_with = None
        self._goto(self._resume)
        self._apply(how, reply, then, refuse)
        if close_reply is not None and self._mode != _CLOSED:
            self._close(close_reply.encode())
        if self._mode < _WAIT:
            self._run()
        return self._take_events()

    def _apply(self, how: int, reply: bytes, then: Then | None, refuse: Refuse | None) -> None:
        """What a verdict does: Proceed runs `then` (None: 250 Ok), Respond `refuse` (None:
        send its reply), Disconnect closes with its reply."""
        if how == _PROCEED:
            if then is not None:
                then()
            else:
                self._send(replies.OK)
        elif how == _REFUSE:
            if refuse is not None:
                refuse(reply)
            else:
                self._send(reply)
        else:
            self._close(reply)

    def tls_started(self) -> list[Event]:
        if self._mode != _WAIT_TLS:
            if self._mode == _CLOSED:
                return []
            raise RuntimeError("STARTTLS was not requested")
        # RFC 3207 4.2: forget everything learnt from the client before the handshake
        self.tls_active = True
        self.helo = ""
        self.auth = AuthInfo()
        self._authenticated = False
        self._reset_transaction()
        self._buf.clear()
        self._goto(_COMMAND)
        return self._take_events()

    def idle_timeout(self) -> list[Event]:
        return self._abort(replies.timeout(self.settings.hostname))

    def shutdown(self) -> list[Event]:
        return self._abort(replies.shutting_down(self.settings.hostname))

    def close_now(self, reply: Reply) -> list[Event]:
        """End the session with `reply` in any state, even while a message awaits its verdict
        (whoever was to give it has been cancelled)."""
        return self._abort(reply.encode())

    def connection_lost(self) -> None:
        """The client went away: drop any half-received body."""
        self._reset_transaction()
        self._buf.clear()
        self._goto(_CLOSED)
        self._events.clear()

    # ---- state ------------------------------------------------------------------------

    def _goto(self, mode: int, phase: int | None = None) -> None:
        """The only place the state changes; `states.MODES` says which moves are legal."""
        if mode != self._mode:
            if mode not in _MODES[self._mode]:
                raise AssertionError(f"{Mode(self._mode).name} -> {Mode(mode).name}")
            self._mode = mode
        if phase is not None:
            self._phase = phase

    def _hold(self, stage: Stage, args: dict[str, object], then: Then | None,
              refuse: Refuse | None) -> None:
        """Ask the driver for a verdict at `stage`: Proceed runs `then`, Respond `refuse`
        (None: send the reply as it is). The judge's verdict, when it gives one, at once."""
        judge = self.judge
        if judge is not None:
            verdict = judge(stage, args, self._env)
            if verdict is not None:
                self._apply(*self._judged(verdict, stage), then, refuse)
                return
        self._flush()
        self._events.append(VerdictNeeded(stage, args, self._env))
        self._await(stage, then, refuse)

    def _await(self, stage: Stage, then: Then | None, refuse: Refuse | None,
               phase: int | None = None) -> None:
        self._stage = stage
        self._then = then
        self._refuse_with = refuse
        self._resume = self._mode
        self._goto(_WAIT, phase)

    # ---- output -----------------------------------------------------------------------

    def _send(self, reply: bytes) -> None:
        self._out.append(reply)
        if self._log:
            for line in reply.decode("utf-8", "replace").split("\r\n")[:-1]:
                self._log_line("S", line, line)

    def _flush(self) -> None:
        out = self._out
        if out:
            # Usually one reply: sent as it is, without a join's copy.
            self._events.append(Send(out[0] if len(out) == 1 else b"".join(out)))
            out.clear()

    def _take_events(self) -> list[Event]:
        if self._out:
            self._flush()
        events = self._events
        self._events = []
        return events

    def _log_line(self, direction: str, line: str, masked: str) -> None:
        transcript = self._transcript
        if transcript is not None:
            if len(transcript) < _MAX_TRANSCRIPT - 1:
                transcript.append(f"{direction}: {line}")
            elif len(transcript) == _MAX_TRANSCRIPT - 1:
                transcript.append("[transcript truncated]")
        if self.settings.trace:
            self._events.append(Trace(direction, masked))

    def _log_data(self, size: int) -> None:
        if self._log:
            text = f"<message data: {size} bytes>"
            self._log_line("C", text, text)

    def _violation(self, text: str) -> None:
        if len(self._violations) < _MAX_VIOLATIONS and text not in self._violations:
            self._violations.append(text)
            self._events.append(Violation(text))

    def _close(self, reply: bytes) -> None:
        self._send(reply)
        self._reset_transaction()
        self._flush()
        self._events.append(Close())
        self._goto(_CLOSED)
        self._buf.clear()

    def _abort(self, reply: bytes) -> list[Event]:
        if self._mode == _CLOSED:
            return []
        self._close(reply)
        return self._take_events()

    # ---- input loop -------------------------------------------------------------------

    def _run(self) -> None:
        # Each reader returns True only after a mode change, so this cannot spin.
        while True:
            mode = self._mode
            if mode <= _AUTH:
                more = self._read_lines()
            elif mode <= _BDAT:
                more = self._read_body()
            else:
                return
            if not more:
                return

    def _read_lines(self) -> bool:
        buf, lines = self._buf, self._lines
        while self._mode <= _AUTH:
            if not buf:  # the usual end of a read: all its lines taken
                return False
            line = lines.take(buf, self._mode == _AUTH)
            if lines.bare_lf:
                lines.bare_lf = False
                self._violation(replies.V_BARE_LF_COMMAND)
            if line is None:
                if not lines.overlong:
                    return False
                lines.overlong = False
                self._line_too_long()
            elif self._mode == _COMMAND:
                self._command(line)
            else:
                self._auth_line(line)
        return True

    def _line_too_long(self) -> None:
        if self._log:
            self._log_line("C", replies.V_OVERLONG_LINE, replies.V_OVERLONG_LINE)
        self._violation(replies.v_long_command(self.settings.max_line_length))
        self._exchange = None  # an over-long AUTH response ends the exchange too
        self._goto(_COMMAND)
        self._send(replies.LINE_TOO_LONG)

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if self._log:
            self._log_line("C", line, mask_auth(line) if verb == "AUTH" else line)
        rule = _RULES.get(verb)
        if rule is None:
            self._unknown(verb)
            return
        handler, entry = rule
        outcome = entry[self._phase]
        if type(outcome) is bytes and verb != "BDAT":  # BDAT reads its chunk even so
            self._send(outcome)
            return
        handler(self, arg.strip(), outcome)

    def _unknown(self, verb: str) -> None:
        if verb in NOT_IMPLEMENTED:
            self._violation(replies.v_unimplemented(verb))
            self._send(replies.NOT_IMPLEMENTED)
        else:
            self._violation(replies.v_unrecognized(verb))
            self._send(replies.UNRECOGNIZED)

    # ---- commands: each gets its argument and what the state table says ---------------

    def _cmd_ehlo(self, arg: str, to: Phase) -> None:
        if not arg:
            self._send(replies.SYNTAX_EHLO)
            return
        reply = replies.ehlo(self.settings, self.tls_active)
        self._greeted("EHLO", arg, reply, to)

    def _cmd_helo(self, arg: str, to: Phase) -> None:
        if not arg:
            self._send(replies.SYNTAX_HELO)
            return
        self._greeted("HELO", arg, replies.helo(self.settings.hostname), to)

    def _greeted(self, verb: str, hostname: str, reply: bytes, to: Phase) -> None:
        if self._held and Stage.HELO in self._held:
            self._hold(Stage.HELO, {"hostname": hostname, "verb": verb},
                       lambda: self._greeted_ok(hostname, reply), None)
        else:
            self._greeted_ok(hostname, reply)

    def _greeted_ok(self, hostname: str, reply: bytes) -> None:
        self.helo = hostname
        self._reset_transaction()
        self._send(reply)

    def _cmd_mail(self, arg: str, to: Phase) -> None:
        rest, colon = strip_keyword(arg, "FROM")
        address, params = parse_path(rest) if rest is not None else (None, [])
        if address is None:
            self._send(replies.SYNTAX_MAIL)
            return
        if not colon:
            self._violation(replies.V_NO_COLON)
        if not self.helo:
            self._violation(replies.V_NO_HELO)
        size = size_param(params)
        if size == BAD_SIZE:
            self._send(replies.SYNTAX_SIZE)
            return
        limit = self.settings.max_message_size
        if size is not None and limit and size > limit:
            self._send(replies.TOO_BIG)
            return
        if self._held and Stage.MAIL in self._held:
            self._hold(Stage.MAIL, {"sender": address, "params": params},
                       lambda: self._mail_ok(address, params, to), None)
        else:
            self._mail_ok(address, params, to)

    def _mail_ok(self, address: str, params: list[str], to: Phase) -> None:
        self._env = Envelope(mail_from=address, mail_options=params, helo=self.helo)
        self._goto(self._mode, to)
        self._send(replies.MAIL_OK)

    def _cmd_rcpt(self, arg: str, to: Phase) -> None:
        rest, colon = strip_keyword(arg, "TO")
        address, params = parse_path(rest) if rest is not None else (None, [])
        if not address:
            self._send(replies.SYNTAX_RCPT)
            return
        if not colon:
            self._violation(replies.V_NO_COLON)
        limit = self.settings.max_recipients
        if limit and self._env is not None and len(self._env.rcpt_to) >= limit:
            self._send(replies.TOO_MANY_RCPTS)
            return
        if self._held and Stage.RCPT in self._held:
            self._hold(Stage.RCPT, {"recipient": address, "params": params},
                       lambda: self._rcpt_ok(address, params, to), None)
        else:
            self._rcpt_ok(address, params, to)

    def _rcpt_ok(self, address: str, params: list[str], to: Phase) -> None:
        env = self._env
        if env is not None:  # never None: the state table allows RCPT only after MAIL
            env.rcpt_to.append(address)
            env.rcpt_options.append(params)
        self._goto(self._mode, to)
        self._send(replies.RCPT_OK)

    def _cmd_data(self, arg: str, to: Phase) -> None:
        if self._held and Stage.DATA in self._held:
            self._hold(Stage.DATA, {"verb": "DATA"}, self._data_start, None)
        else:
            self._data_start()

    def _data_start(self) -> None:
        self._send(replies.DATA_GO_AHEAD)
        self._goto(_DATA)
        watch = bool(self._held) and Stage.HEADERS in self._held
        # SMTP smuggling: <LF>.<LF> ends DATA only if the client has never ended a line with
        # CRLF (lines.py); a CRLF client's body ends at <CRLF>.<CRLF> alone.
        self._reader = DataReader(self.settings, self._buf, watch, not self._lines.crlf)

    def _cmd_bdat(self, arg: str, to: Phase | bytes) -> None:
        parsed = parse_bdat(arg)
        if parsed is None:
            self._send(replies.SYNTAX_BDAT)
            return
        size, last = parsed
        if type(to) is bytes:
            self._bdat_read_only(size, last, to)
        elif self._phase == _RCPT and self._held and Stage.DATA in self._held:
            self._hold(Stage.DATA, {"verb": "BDAT"},
                       lambda: self._bdat_start(size, last, to),  # type: ignore[arg-type]
                       lambda reply: self._bdat_refused(size, last, reply))
        else:
            self._bdat_start(size, last, to)  # type: ignore[arg-type]

    def _bdat_start(self, size: int, last: bool, to: Phase) -> None:
        reader = self._reader
        if self._phase == _RCPT or not isinstance(reader, BdatReader):  # the first chunk
            watch = bool(self._held) and Stage.HEADERS in self._held
            reader = self._reader = BdatReader(self.settings, watch)
        reader.begin(size, last)
        self._goto(_BDAT, to)

    def _bdat_refused(self, size: int, last: bool, reply: bytes) -> None:
        """A verdict refused the transaction at its first chunk: read the chunk, answer
        `reply`; later chunks find no transaction."""
        self._reset_transaction()
        self._bdat_read_only(size, last, reply)

    def _bdat_read_only(self, size: int, last: bool, reply: bytes) -> None:
        self._reader = BdatReader.skipping(self.settings, size, last, reply)
        self._goto(_BDAT)

    def _cmd_rset(self, arg: str, to: Phase) -> None:
        self._reset_transaction()
        self._send(replies.OK)

    def _cmd_noop(self, arg: str, to: None) -> None:
        self._send(replies.OK)

    def _cmd_vrfy(self, arg: str, to: None) -> None:
        self._send(replies.VRFY)

    def _cmd_help(self, arg: str, to: None) -> None:
        self._send(replies.HELP)

    def _cmd_quit(self, arg: str, to: None) -> None:
        self._close(replies.BYE)

    def _cmd_starttls(self, arg: str, to: Phase) -> None:
        if not self.settings.tls_available:
            self._send(replies.NOT_IMPLEMENTED)
        elif self.tls_active:
            self._send(replies.TLS_ACTIVE)
        elif arg:
            self._send(replies.SYNTAX_STARTTLS)
        elif self._held and Stage.STARTTLS in self._held:
            self._hold(Stage.STARTTLS, {}, self._starttls_go, None)
        else:
            self._starttls_go()

    def _starttls_go(self) -> None:
        self._send(replies.TLS_READY)
        self._flush()
        self._events.append(StartTLS())
        self._goto(_WAIT_TLS)
        # RFC 3207 5: anything pipelined after STARTTLS was sent in clear text and
        # could be an injected command: it must not survive into the TLS session.
        if self._buf:
            self._violation(replies.V_PRE_TLS_DATA)
            self._buf.clear()

    # ---- AUTH -------------------------------------------------------------------------

    def _cmd_auth(self, arg: str, to: None) -> None:
        if self._authenticated:
            self._send(replies.AUTH_TWICE)
            return
        exchange = auth.start(arg, self.settings.auth_mechanisms)
        if type(exchange) is bytes:
            self._send(exchange)
            return
        # A new object per attempt: messages already delivered keep the AuthInfo they had.
        self.auth = AuthInfo(attempted=True, mechanism=exchange.mechanism)
        now = self._clock().timestamp()  # for the CRAM-MD5 nonce
        self._auth_step(exchange, exchange.begin(hostname=self.settings.hostname, now=now))

    def _auth_line(self, line: str) -> None:
        if self._log:
            self._log_line("C", line, "****")
        exchange, self._exchange = self._exchange, None
        self._goto(_COMMAND)
        if exchange is not None:  # never None: AUTH mode is entered with one
            self._auth_step(exchange, exchange.answer(line))

    def _auth_step(self, exchange: auth.Exchange, reply: bytes | None) -> None:
        """`reply` is the exchange's next one: a challenge, or why it ended (None: done)."""
        self.auth.username = exchange.username
        self.auth.password = exchange.password
        if reply is not None:
            self._send(reply)
            if exchange.waiting:
                self._exchange = exchange
                self._goto(_AUTH)
        elif self._held and Stage.AUTH in self._held:
            args: dict[str, object] = {"mechanism": exchange.mechanism,
                                       "username": exchange.username}
            self._hold(Stage.AUTH, args, self._auth_ok, None)
        else:
            self._auth_ok()

    def _auth_ok(self) -> None:
        self._authenticated = True
        self._send(replies.AUTH_OK)

    # ---- message bodies: the reader (reception.py) takes them in, this answers --------

    def _read_body(self) -> bool:
        reader = self._reader
        step = reader.feed(self._buf)
        if reader.out:
            self._take_body_events(reader)
        if step == MORE:
            return False
        if step == HEADERS:
            # Proceed: read on; Respond: read on too, then refuse with its reply
            self._hold(Stage.HEADERS, {"headers": reader.headers}, _nothing, self._fail_body)
            return True
        self._goto(_COMMAND)
        self._log_data(reader.size)
        if step == CHUNK:
            self._send(replies.bdat_received(reader.size))
        elif step == SKIPPED:  # no transaction to end: the chunk was refused before it came
            self._reader = None
            self._send(reader.refusal or replies.LOCAL_ERROR)
        elif reader.refusal is not None or reader.body is None:
            self._refuse(reader.refusal or replies.LOCAL_ERROR)
        else:
            if self._env is not None:
                for text in reader.violations(self._env.mail_options):
                    self._violation(text)
            self._deliver(reader.body, reader.chunked)
        return True

    def _take_body_events(self, reader: DataReader | BdatReader) -> None:
        self._events += reader.out
        reader.out.clear()

    def _fail_body(self, reply: bytes) -> None:
        reader = self._reader
        if reader is not None:
            reader.fail(reply)
            self._take_body_events(reader)

    def _refuse(self, reply: bytes) -> None:
        """End a transaction whose body was dropped, with the reply saying why."""
        self._reset_transaction()
        self._send(reply)

    def _reset_transaction(self) -> None:
        self._env = None
        reader, self._reader = self._reader, None
        if reader is not None and reader.chunked:
            self._events.append(BodyDropped())
        if self._phase != _IDLE:
            self._goto(self._mode, _IDLE)

    def _deliver(self, body: MessageBody, chunked: bool) -> None:
        env = self._env or Envelope(helo=self.helo)  # never None: DATA/BDAT require MAIL
        self._env = None
        self._reader = None
        self._flush()
        self._events.append(
            MessageReceived(
                envelope=env,
                auth=self.auth,
                body=body,
                received_at=self._clock(),
                violations=self._violations,
                transcript=list(self._transcript) if self._transcript is not None else None,
                tls=self.tls_active,
                chunked=chunked,
            )
        )
        self._violations = []
        # Proceed answers 250 Ok, a Respond its reply (the sinks give one); nothing to undo
        self._await(_MESSAGE, None, None, _IDLE)


def _nothing() -> None:
    pass


_HANDLERS: dict[str, Callable[[SMTPConnection, str, Any], None]] = {
    "EHLO": SMTPConnection._cmd_ehlo,
    "HELO": SMTPConnection._cmd_helo,
    "MAIL": SMTPConnection._cmd_mail,
    "RCPT": SMTPConnection._cmd_rcpt,
    "DATA": SMTPConnection._cmd_data,
    "BDAT": SMTPConnection._cmd_bdat,
    "RSET": SMTPConnection._cmd_rset,
    "NOOP": SMTPConnection._cmd_noop,
    "VRFY": SMTPConnection._cmd_vrfy,
    "HELP": SMTPConnection._cmd_help,
    "QUIT": SMTPConnection._cmd_quit,
    "AUTH": SMTPConnection._cmd_auth,
    "STARTTLS": SMTPConnection._cmd_starttls,
}
# verb -> (handler, what the state table says of it in each phase): one lookup per command
_RULES = {
    verb: (_HANDLERS[verb], tuple(int(x) if isinstance(x, Phase) else x for x in entry))
    for verb, entry in COMMANDS.items()
}
_BYE = Reply(221, "2.0.0 Bye")
